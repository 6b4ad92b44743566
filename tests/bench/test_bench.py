"""bench/: every benchmark runs in --quick mode, prints its line of figures and appends a row with
date, machine and commit to the results file (the values themselves are not tested: they are
measurements, not specifications)."""

import dataclasses
import re

import pytest
import torch

from bench import checkpoint_save, cost, data_loader, guard_cost, memory_estimate, recipe, train_throughput
from bench.results import HEADER
from rodin.config import MODELS, PRESETS
from rodin.model import LLaMA
from rodin.train import activation_checkpoint
from rodin.train.device import autocast
from rodin.train.loop import train_step
from rodin.train.loss import make_loss_fn
from rodin.train.optim import optimizer_for


def rows(path):
    return [line for line in path.read_text().splitlines() if line.startswith("| 20")]


@pytest.mark.parametrize("bench,name,expected", [
    (train_throughput, "train_throughput", ("rodin_tok_s", "transformers_tok_s", "ratio")),
    (checkpoint_save, "checkpoint_save", ("save_s", "size_mb", "blocked_steps")),
    (data_loader, "data_loader", ("step_ms", "load_share")),
    (guard_cost, "guard_cost", ("step_ms", "guard_ms", "guard_share")),
    (cost, "cost", ("gpu_hours", "cost_eur")),
    (memory_estimate, "memory_estimate", ("params_gib", "activations_gib", "peak_gib")),
    (recipe, "recipe", ("target_bpb", "adamw_fp32_final_bpb", "adamw_auto_final_bpb", "muon_auto_final_bpb")),
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


def test_memory_estimate_counts_fp32_weights_two_adam_moments_and_what_each_saver_removes():
    cfg = dataclasses.replace(PRESETS["test"], micro_batch_size=8, seq_len=64)
    n_params = LLaMA(cfg.model).num_params()
    plain = memory_estimate.estimate(cfg)
    assert plain["params"] * 2**30 == pytest.approx(4 * n_params, rel=0.01)  # fp32 master weights
    assert plain["optimizer"] == pytest.approx(2 * plain["params"], rel=0.01)  # AdamW's two moments
    assert plain["peak"] > plain["params"] + plain["optimizer"] + plain["activations"] / 2
    recomputed = memory_estimate.estimate(dataclasses.replace(cfg, activation_checkpointing="full"))
    assert recomputed["activations"] < plain["activations"] / 2
    # where weights outweigh activations, gradients stepped and freed in backward are never all alive
    weighty = dataclasses.replace(cfg, model=MODELS["demo"], micro_batch_size=1, seq_len=16, activation_checkpointing="full")
    whole = memory_estimate.estimate(weighty)
    in_backward = memory_estimate.estimate(dataclasses.replace(weighty, optimizer_in_backward=True, grad_clip=0.0))
    assert whole["grads"] > whole["params"] / 2 and in_backward["grads"] < whole["grads"] / 10
    assert in_backward["peak"] < whole["peak"] - whole["params"] / 2


def test_memory_estimate_of_a_global_batch_accumulates_as_the_run_would_and_keeps_whole_gradients(tmp_path):
    figures = memory_estimate.main(["--quick", "--global_batch=16", "--micro_batch_size=4", f"--results={tmp_path / 'R.md'}"])
    assert figures["grad_accum_steps"] == 4 and figures["grads_gib"] == figures["params_gib"]
    with pytest.raises(SystemExit, match="--micro_batch_size=auto is fitted at the start of a run"):
        memory_estimate.main(["--quick", "--global_batch=16", "--micro_batch_size=auto", f"--results={tmp_path / 'R.md'}"])


def test_memory_estimate_under_fsdp_divides_weights_gradients_and_moments_by_the_world_size(tmp_path):
    one = memory_estimate.main(["--quick", f"--results={tmp_path / 'R.md'}"])
    four = memory_estimate.main(["--quick", "--world_size=4", f"--results={tmp_path / 'R.md'}"])
    states = four["params_gib"] + four["grads_gib"] + four["optimizer_gib"]
    assert four["per_gpu_gib"] == pytest.approx(states / 4 + four["activations_gib"] + four["temporaries_gib"])
    assert four["per_gpu_gib"] < one["peak_gib"] and "per_gpu_gib" not in one


@pytest.mark.gpu
def test_memory_estimate_is_within_a_tenth_of_what_the_gpu_allocates():
    cfg = dataclasses.replace(PRESETS["3090"], model=dataclasses.replace(PRESETS["3090"].model, n_layers=4),
                              micro_batch_size=4, compile="off")
    estimated = memory_estimate.estimate(cfg)["peak"]
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    with device:
        model = LLaMA(cfg.model)
    activation_checkpoint.apply(model, cfg.activation_checkpointing)
    optimizer = optimizer_for(model, cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.micro_batch_size, cfg.seq_len), device=device)
    amp = autocast(device, "bf16", cache=False)
    for _ in range(2):
        train_step(model, optimizer, lambda: (tokens, tokens), 1, 0.0, device, amp, make_loss_fn(cfg.loss_chunk))
    measured = torch.cuda.max_memory_allocated(device) / 2**30
    assert estimated == pytest.approx(measured, rel=0.1)


@pytest.mark.gpu
def test_gpu_throughput_reports_mfu_and_peak_memory(tmp_path):
    figures = train_throughput.main(["--quick", "--device=cuda", f"--results={tmp_path / 'R.md'}"])
    assert figures["rodin_peak_gib"] > 0 and figures["transformers_peak_gib"] > 0
    if "rodin_mfu" in figures:  # the device is in rodin.train.device.PEAK_BF16_FLOPS
        assert 0 < figures["rodin_mfu"] < 1


def test_recipe_reach_interpolates_between_evaluations_and_says_when_a_curve_never_gets_there():
    curve = [(0, 0.0, 5.0), (10, 2.0, 3.0), (20, 4.0, 2.0)]
    assert recipe.reach(curve, 2.5) == pytest.approx((15, 3.0))
    assert recipe.reach(curve, 3.0) == pytest.approx((10, 2.0))
    assert recipe.reach(curve, 1.0) is None
    assert recipe.recipe_args("muon-bf16") == ["--optimizer=muon", "--dtype=bf16"]
    assert "--lr=3e-3" in recipe.recipe_args("adamw-fp32")  # AdamW at the lr it was tuned at
