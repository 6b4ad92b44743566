"""rodin/eval/report.py: two run directories become PNG plots and one Markdown page."""

import json

import pytest

from rodin.eval.report import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root, name, val_losses, tokens_per_step, eval_acc=None):
    run = root / name
    (run / "eval").mkdir(parents=True)
    records = [{"step": 0, "val_loss": val_losses[0], "val_bpb": val_losses[0] / 2, "tokens_seen": 0}]
    for step in range(1, 11):
        record = {"step": step, "loss": 6.0 - 0.3 * step, "lr": 1e-3, "tokens_per_s": 1000.0 + step,
                  "tokens_seen": step * tokens_per_step}
        if step % 5 == 0:
            record.update(val_loss=val_losses[step // 5], val_bpb=val_losses[step // 5] / 2)
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.json").write_text(json.dumps({"model": {"dim": 64, "n_layers": 2}}))
    if eval_acc is not None:
        results = {"results": {"littre_cloze": {"alias": "littre_cloze", "acc,none": eval_acc, "acc_stderr,none": 0.1}}}
        (run / "eval" / "step-0000010.json").write_text(json.dumps(results))
    return str(run)


def test_report_of_two_runs_draws_their_curves_and_tabulates_loss_speed_and_eval(tmp_path):
    a = fake_run(tmp_path, "small", [6.5, 4.25, 3.875], 512, eval_acc=0.45)
    b = fake_run(tmp_path, "wide", [6.5, 4.0, 3.625], 1024)
    out = tmp_path / "report"
    assert main([a, b, f"--out={out}"]) == 0

    for png in ("loss.png", "bpb.png", "throughput.png", "eval.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    assert not (out / "mfu.png").exists()  # no MFU on CPU runs: no empty plot
    page = (out / "report.md").read_text()
    for image in ("loss.png", "bpb.png", "throughput.png", "eval.png"):
        assert f"]({image})" in page
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| small") or line.startswith("| wide")}
    assert "3.875" in rows["small"] and "1.938" in rows["small"] and "10,240" in rows["wide"] and "3.625" in rows["wide"]
    assert "| littre_cloze | acc | 0.4500 |" in page


def test_report_of_a_directory_that_is_not_a_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main([str(tmp_path), f"--out={tmp_path / 'r'}"])


def test_bits_per_byte_of_each_source_are_drawn_beside_the_overall_one(tmp_path, monkeypatch):
    import rodin.eval.report

    run = tmp_path / "mixed"
    run.mkdir()
    records = [{"step": s, "val_loss": 4.0, "val_bpb": 2.0, "val_bpb/wiki": 1.8, "val_bpb/legi": 2.2} for s in (0, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn, real_plot = {}, rodin.eval.report.plot

    def recording_plot(runs, keys, ylabel, path, **kwargs):
        drawn[ylabel] = keys
        return real_plot(runs, keys, ylabel, path, **kwargs)

    monkeypatch.setattr(rodin.eval.report, "plot", recording_plot)
    assert main([str(run), f"--out={tmp_path / 'report'}"]) == 0
    assert [label for _, label, _ in drawn["bits per byte"]] == ["val", "legi", "wiki"]
    assert (tmp_path / "report" / "bpb.png").read_bytes()[:8] == PNG_MAGIC


def test_learning_curves_and_needle_grids_of_the_runs_are_drawn_in_the_report(tmp_path):
    from rodin.eval import curves

    runs = []
    for name, offset in (("small", 0.0), ("wide", 0.1)):
        run = fake_run(tmp_path, name, [6.5, 4.25, 3.875], 512)
        rows = [{"step": s, "tokens_seen": 512 * s, "request": "littre_cloze", "task": "littre_cloze", "metric": m,
                 "value": 0.25 + 0.05 * s + offset, "stderr": 0.01, "num_fewshot": 3, "samples": 528}
                for s in (5, 10) for m in ("acc", "acc_norm")]
        curves.append_rows(f"{run}/eval/curve.csv", rows)
        runs.append(run)
    cells = [{"length": n, "depth": d, "retrieved": 1.0 if d < 1 else 0.5} for n in (1024, 2048) for d in (0.0, 0.5, 1.0)]
    needle = {"kind": "needle", "step": 10, "mode": "log-likelihood", "lengths": [1024, 2048], "depths": [0.0, 0.5, 1.0],
              "trials": 2, "cells": cells}
    (tmp_path / "wide" / "eval" / "needle-step-0000010.json").write_text(json.dumps(needle))
    out = tmp_path / "report"
    assert main([*runs, f"--out={out}"]) == 0
    page = (out / "report.md").read_text()
    assert "## Learning curves" in page and "](curve-littre_cloze.png)" in page
    assert (out / "curve-littre_cloze.png").read_bytes()[:8] == PNG_MAGIC
    assert "## Needle in a haystack: wide (step 10, log-likelihood)" in page and "| 100% | 50% | 50% |" in page
    assert (out / "needle-wide.png").read_bytes()[:8] == PNG_MAGIC and not (out / "needle-small.png").exists()
