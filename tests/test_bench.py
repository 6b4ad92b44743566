"""bench/: every benchmark runs in --quick mode, prints its line of figures and appends a row with
date, machine and commit to the results file (the values themselves are not tested: they are
measurements, not specifications)."""

import re

import pytest

from bench import checkpoint_save, cost, data_loader, train_throughput
from bench.results import HEADER


def rows(path):
    return [line for line in path.read_text().splitlines() if line.startswith("| 20")]


@pytest.mark.parametrize("bench,name,expected", [
    (train_throughput, "train_throughput", ("rodin_tok_s", "transformers_tok_s", "ratio")),
    (checkpoint_save, "checkpoint_save", ("save_s", "size_mb", "blocked_steps")),
    (data_loader, "data_loader", ("step_ms", "load_share")),
    (cost, "cost", ("gpu_hours", "cost_eur")),
])
def test_bench_quick_prints_figures_and_appends_a_dated_row(bench, name, expected, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text(HEADER + "| 2020-01-01 00:00 | older | a machine | abc1234 | x=1 |\n")
    figures = bench.main(["--quick", f"--results={results}"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{name}: ")
    for key in expected:
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, key
        assert re.search(rf"\b{key}=[0-9]", line), key
    older, new = rows(results)  # appended below the older row, under the one header
    assert results.read_text().count("| date (UTC) |") == 1
    date, bench_name, machine, commit, text = (cell.strip() for cell in new.strip("|").split("|"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", date) and bench_name == name and machine and commit
    assert text == line[len(name) + 2 :]


def test_throughput_profile_splits_the_step_into_shared_kernels_and_bounds_the_ratio(tmp_path):
    figures = train_throughput.main(["--quick", "--profile", "--device=cpu", f"--results={tmp_path / 'R.md'}"])
    for name in ("rodin", "transformers"):
        matmul, attention = figures[f"{name}_matmul_share"], figures[f"{name}_attention_share"]
        assert 0 < matmul < 1 and 0 < attention < 1 and matmul + attention < 1
    # ours with nothing but the kernels both models share: faster than ours as it is
    assert figures["ratio_ceiling"] > figures["ratio"]


def test_cost_of_the_anchor_is_the_anchor():
    # RODIN-1B: 32 B tokens ~ 140 B200-hours ~ 285 EUR, so the default estimate must give it back
    figures = cost.estimate(32e9, "rodin-1b", "B200")
    assert figures["gpu_hours"] == pytest.approx(140) and figures["cost_eur"] == pytest.approx(285)
    # twice the tokens per second on 4 GPUs: half the GPU-hours, an eighth of the wall-clock
    faster = cost.estimate(32e9, "rodin-1b", "B200", tokens_per_s=2 * figures["tok_s_per_gpu"], gpus=4)
    assert faster["gpu_hours"] == pytest.approx(70) and faster["wall_hours"] == pytest.approx(17.5)


@pytest.mark.gpu
def test_gpu_throughput_reports_mfu_and_peak_memory(tmp_path):
    figures = train_throughput.main(["--quick", "--device=cuda", f"--results={tmp_path / 'R.md'}"])
    assert figures["rodin_peak_gib"] > 0 and figures["transformers_peak_gib"] > 0
    if "rodin_mfu" in figures:  # the device is in rodin.device.PEAK_BF16_FLOPS
        assert 0 < figures["rodin_mfu"] < 1
