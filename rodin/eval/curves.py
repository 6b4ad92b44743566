"""Learning curves: benchmark scores of a run's checkpoints against the tokens each had seen.

Frozen decisions:
- runs/NAME/eval/curve.csv holds one row per (checkpoint, task, metric) and only grows: a
  checkpoint pruned later keeps its points, and one already scored for a requested task with the
  same number of shots is never scored again (delete the file to start over).
- `request` is the task or group asked for (french_bench), `task` the harness's own (sub)task.
- One PNG per task, each metric a line against tokens seen (comparable across batch sizes).
"""

import csv
import io
import os
import re

from rodin.io import atomic_write_text, figure, save_figure

FIELDS = ["step", "tokens_seen", "request", "task", "metric", "value", "stderr", "num_fewshot", "samples"]
NOT_METRICS = ("alias", "sample_len")


def read_curve(path):
    """The rows of a curve.csv, typed; [] when there is none yet."""
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("step", "tokens_seen", "num_fewshot"):
            row[key] = int(row[key])
        row["value"] = float(row["value"])
        row["stderr"] = float(row["stderr"]) if row["stderr"] not in ("", "N/A") else None
        row["samples"] = int(row["samples"]) if row["samples"] else None
    return rows


def scored(rows):
    """{(step, request, num_fewshot)} already in the curve."""
    return {(r["step"], r["request"], r["num_fewshot"]) for r in rows}


def append_rows(path, new_rows):
    """Add rows to curve.csv, rewritten whole under a temporary name: a crash keeps the old file."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(read_curve(path) + list(new_rows))
    atomic_write_text(path, buffer.getvalue())


def requested_name(task, group_subtasks, requests):
    """The requested task or group a result belongs to (climbing the harness's groups)."""
    parent = {sub: group for group, subs in group_subtasks.items() for sub in subs}
    name = task
    while name not in requests and name in parent:
        name = parent[name]
    return name if name in requests else task


def rows_from_results(results, step, tokens_seen, num_fewshot, requests):
    """Curve rows of one checkpoint from the harness's results dict (tasks and groups)."""
    rows = []
    tables = dict(results.get("results", {}), **results.get("groups", {}))
    for task, metrics in tables.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not isinstance(value, (int, float)) or "stderr" in metric or metric in NOT_METRICS:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"step": step, "tokens_seen": tokens_seen,
                         "request": requested_name(task, results.get("group_subtasks", {}), requests),
                         "task": task, "metric": metric, "value": float(value),
                         "stderr": stderr if isinstance(stderr, (int, float)) else None,
                         "num_fewshot": num_fewshot, "samples": metrics.get("sample_len")})
    return rows


def file_name(task):
    return "curve-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", task) + ".png"


def plot_task(series, task, path):
    """One figure: for each (label, rows), each metric of `task` against tokens seen."""
    fig, ax = figure(7, 4)
    styles = ["o-", "s--", "^:", "v-."]
    for i, (label, rows) in enumerate(series):
        metrics = sorted({r["metric"] for r in rows if r["task"] == task})
        for k, metric in enumerate(metrics):
            points = sorted((r["tokens_seen"], r["value"]) for r in rows if r["task"] == task and r["metric"] == metric)
            ax.plot(*zip(*points), styles[k % len(styles)], color=f"C{i}", lw=1.2, ms=4,
                    label=f"{label} {metric}" if label else metric)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("score")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_curves(series, out_dir):
    """A PNG per task found in any of series [(label, rows)]; returns {task: path}."""
    tasks = sorted({r["task"] for _, rows in series for r in rows})
    return {task: plot_task(series, task, os.path.join(out_dir, file_name(task))) for task in tasks}
