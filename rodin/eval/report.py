"""A report of one or several runs, side by side: loss curves, throughput and eval scores.

    rodin report runs/demo                         # -> runs/demo/report/
    rodin report runs/a runs/b --out=reports/ab    # compare runs

Frozen decisions:
- Everything comes from what a run directory already holds: metrics.jsonl, config.json and what
  rodin.eval.harness writes into eval/ (lm-eval results, curve.csv, needle-step-N.json); nothing is recomputed.
- Curves are drawn against tokens seen (comparable across batch sizes), steps when a run lacks it.
- The page is report.md beside its PNGs, so it reads the same on GitHub and on disk.
"""

import argparse
import glob
import json
import os
import statistics

from rodin.eval.curves import plot_curves, read_curve
from rodin.io import atomic_write_text, figure, save_figure
from rodin.ship.modelcard import eval_scores, plot_evals
from rodin.train.runlog import read_run


def read_report_run(run_dir):
    """A run's record (rodin.train.runlog.read_run) with its learning curve and newest needle grid."""
    run = read_run(run_dir)
    needles = sorted(glob.glob(os.path.join(run_dir, "eval", "needle-step-*.json")))
    needle = None
    if needles:
        with open(needles[-1]) as f:
            needle = json.load(f)
    return dict(run, curve=read_curve(os.path.join(run_dir, "eval", "curve.csv")), needle=needle)


def x_axis(records):
    if records and all("tokens_seen" in r for r in records):
        return "tokens seen", lambda r: r["tokens_seen"]
    return "step", lambda r: r["step"]


def plot(runs, key_styles, ylabel, path, log_x=False):
    """One figure: for each run, the series of each metric key that its records hold."""
    fig, ax = figure(8, 4.5)
    xlabel = "step"
    for i, run in enumerate(runs):
        xlabel, x = x_axis(run["records"])
        for key, label, style in key_styles:
            points = [(x(r), r[key]) for r in run["records"] if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), style, color=f"C{i}", label=f"{run['name']} {label}", lw=1.2, ms=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def has(runs, key):
    return any(key in r for run in runs for r in run["records"])


def last(records, key):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def median(records, key):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def summary_table(runs):
    rows = ["| run | shape | steps | tokens seen | train loss | val loss | val bpb | tokens/s | MFU | peak GiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        recs, model = run["records"], (run["config"] or {}).get("model", {})
        shape = f"{model['dim']}d×{model['n_layers']}L" if model else "–"
        mfu = median(recs, "mfu")
        rows.append(f"| {run['name']} | {shape} | {fmt(last(recs, 'step'), 'd')} | {fmt(last(recs, 'tokens_seen'), ',d')} "
                    f"| {fmt(last(recs, 'loss'), '.3f')} | {fmt(last(recs, 'val_loss'), '.3f')} "
                    f"| {fmt(last(recs, 'val_bpb'), '.3f')} | {fmt(median(recs, 'tokens_per_s'), ',.0f')} "
                    f"| {fmt(None if mfu is None else 100 * mfu, '.1f')}{'' if mfu is None else ' %'} "
                    f"| {fmt(median(recs, 'peak_mem_gib'), '.1f')} |")
    return "\n".join(rows)


def eval_table(runs):
    """Rows task/metric, one column per run: its newest eval (by label, step-N sorts by step)."""
    cells, labels = eval_scores(runs)
    if not cells:
        return None
    names = list(labels)
    rows = ["| task | metric | " + " | ".join(f"{n} ({labels[n]})" for n in names) + " |",
            "|---|---|" + "---:|" * len(names)]
    for (task, metric), values in sorted(cells.items()):
        rows.append(f"| {task} | {metric} | " + " | ".join(fmt(values.get(n), '.4f') for n in names) + " |")
    return "\n".join(rows)


def learning_curves(runs, out_dir):
    """The section of the learning curves (rodin.eval.harness --every_checkpoint): a plot per task, every run in it."""
    series = [(run["name"], run["curve"]) for run in runs if run["curve"]]
    if not series:
        return []
    page = ["## Learning curves", "", "Benchmark scores of each kept checkpoint against the tokens it had seen.", ""]
    for task, path in plot_curves(series, out_dir).items():
        page += [f"![{task}]({os.path.basename(path)})", ""]
    return page


def needles(runs, out_dir):
    """The section of the needle-in-a-haystack checks (rodin.eval.harness --needle): each run's newest."""
    page = []
    for run in runs:
        result = run["needle"]
        if result:
            from rodin.eval import needle  # torch: only when there is one

            path = needle.heat_map(result, os.path.join(out_dir, f"needle-{run['name']}.png"))
            page += [f"## Needle in a haystack: {run['name']} (step {result['step']}, {result['mode']})", "",
                     f"![needle {run['name']}]({os.path.basename(path)})", "", needle.table(result), ""]
    return page


def make_report(run_dirs, out_dir):
    runs = [read_report_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    images = [("Loss", plot(runs, [("loss", "train", "-"), ("val_loss", "val", "o--")], "loss (nats/token)",
                                 os.path.join(out_dir, "loss.png")))]
    if has(runs, "val_bpb"):
        # the held-out set of each source, when train.py measured them apart (val_bpb/SOURCE)
        sources = sorted({k for run in runs for r in run["records"] for k in r if k.startswith("val_bpb/")})
        styles = ["s--", "^:", "v-.", "d--", "x:", "+-."]
        keys = [("val_bpb", "val", "o-")] + [(k, k.split("/", 1)[1], styles[i % len(styles)]) for i, k in enumerate(sources)]
        images.append(("Validation bits per byte", plot(runs, keys, "bits per byte", os.path.join(out_dir, "bpb.png"))))
    if has(runs, "tokens_per_s"):
        images.append(("Throughput", plot(runs, [("tokens_per_s", "", "-")], "tokens/s",
                                          os.path.join(out_dir, "throughput.png"))))
    if has(runs, "mfu"):
        images.append(("MFU", plot(runs, [("mfu", "", "-")], "model FLOPs utilisation", os.path.join(out_dir, "mfu.png"))))
    page = [f"# Run report: {', '.join(r['name'] for r in runs)}", "", summary_table(runs), ""]
    for title, path in images:
        page += [f"## {title}", "", f"![{title}]({os.path.basename(path)})", ""]
    evals = eval_table(runs)
    page += ["## Evaluation (lm-evaluation-harness)", ""]
    if evals:
        cells, labels = eval_scores(runs)
        plot_evals(cells, list(labels), os.path.join(out_dir, "eval.png"))
        page += ["![Evaluation](eval.png)", "", evals, ""]
    else:
        page += ["No eval results yet: `rodin eval RUN` writes them into RUN/eval/.", ""]
    page += learning_curves(runs, out_dir) + needles(runs, out_dir)
    path = os.path.join(out_dir, "report.md")
    atomic_write_text(path, "\n".join(page))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    parser.add_argument("--out", default=None, help="default: RUN/report for one run, report/ for several")
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(args.runs[0], "report") if len(args.runs) == 1 else "report")
    print(f"wrote {make_report(args.runs, out)}")
    return 0
