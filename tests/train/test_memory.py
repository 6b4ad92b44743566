"""rodin/train/memory.py: --micro_batch_size=auto picks the largest micro-batch whose estimated step fits
the device (a stated cap here), keeps the global batch and so the data order, and says why."""

import dataclasses
import json
import os

import pytest
import torch

import train
from rodin.config import parse_args
from rodin.train import checkpoint, memory


def run_train(demo_data, out_dir, name, *args):
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out_dir}", f"--name={name}", *args]
    assert train.main(argv) == 0
    with open(os.path.join(out_dir, name, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out_dir, name, "metrics.jsonl")) as f:
        return config, [json.loads(line) for line in f]


def step_gib(micro_batch, accumulation=2):
    cfg = parse_args(["--preset=test", f"--micro_batch_size={micro_batch}", f"--grad_accum_steps={accumulation}"])
    return memory.estimate(cfg)["peak"]


def test_auto_takes_the_largest_micro_batch_under_the_cap_and_keeps_the_global_batch(demo_data, tmp_path, capsys):
    # a cap between what a micro-batch of 4 and one of 8 need (16 sequences a step: 16 = 4 x 4 = 8 x 2)
    cap = (step_gib(4) + step_gib(8)) / 2
    config, auto = run_train(demo_data, tmp_path, "auto", "--micro_batch_size=auto", "--global_batch=16",
                             f"--memory_gib={cap}", "--memory_margin=0", "--max_steps=6", "--eval_every=3")
    assert (config["micro_batch_size"], config["grad_accum_steps"], config["global_batch"]) == (4, 4, 16)  # in config.json
    out = capsys.readouterr().out
    assert "batch: micro-batch 4 x 4 accumulation x 1 process(es) = global batch 16" in out
    assert "the next size up would need" in out
    assert step_gib(4) <= cap < step_gib(8)  # the choice fits, the next size up would not
    # the same global batch in one micro-batch: the same data, step for step (float tolerance:
    # gradients summed over 4 micro-batches instead of one)
    _, whole = run_train(demo_data, tmp_path, "whole", "--micro_batch_size=16", "--max_steps=6", "--eval_every=3")
    assert [r["tokens_seen"] for r in auto] == [r["tokens_seen"] for r in whole]
    assert [r.get("loss", r.get("val_loss")) for r in auto] == pytest.approx([r.get("loss", r.get("val_loss")) for r in whole], rel=1e-5)
    # a bigger card resumes the run with a bigger micro-batch: the global batch, the data order, go on
    config, _ = run_train(demo_data, tmp_path, "auto", "--micro_batch_size=auto", "--global_batch=16",
                          f"--memory_gib={step_gib(16, 1) * 2}", "--memory_margin=0", "--max_steps=8", "--eval_every=3")
    assert (config["micro_batch_size"], config["grad_accum_steps"]) == (16, 1)
    assert checkpoint.read_meta(checkpoint.latest(tmp_path / "auto"))["step"] == 8


def test_fit_needs_few_estimates_and_steps_up_or_down_when_the_straight_line_is_off():
    cfg = parse_args(["--preset=test", "--global_batch=64", "--micro_batch_size=auto"])
    calls = []

    def fake_estimate(c):  # 1 GiB of state, 1 GiB per sequence, and a bump at 16
        calls.append(c.micro_batch_size)
        gib = 1 + c.micro_batch_size + (3 if c.micro_batch_size == 16 else 0)
        return {"peak": gib, "params": 0, "grads": 0, "optimizer": 0, "activations": 0, "temporaries": 0}

    assert memory.fit_micro_batch(cfg, 1, 18.5, fake_estimate) == (8, 9, 20)
    assert sorted(set(calls)) == [1, 2, 8, 16] and len(calls) == 4
    assert memory.fit_micro_batch(cfg, 2, 100, fake_estimate)[0] == 32  # 64 over 2 ranks
    with pytest.raises(ValueError, match=r"even a micro-batch of 1 needs 2.0 GiB, more than the 1.5 GiB"):
        memory.fit_micro_batch(cfg, 1, 1.5, fake_estimate)

    def concave_estimate(c):  # the step from 1 to 2 costs more a sequence than later ones (RODIN-1B: 4 fitted, 8 too)
        return {"peak": 2 + 2 * c.micro_batch_size**0.5, "params": 0, "grads": 0, "optimizer": 0, "activations": 0,
                "temporaries": 0}

    micro, need, bigger = memory.fit_micro_batch(cfg, 1, 8, concave_estimate)  # the line says 4; 8 needs 7.66
    assert micro == 8 and need == pytest.approx(2 + 2 * 8**0.5) and bigger == pytest.approx(10)


def test_under_fsdp_each_rank_holds_its_share_of_the_states_and_whole_activations():
    figures = {"peak": 0, "params": 4.0, "grads": 4.0, "optimizer": 8.0, "activations": 3.0, "temporaries": 1.0}
    assert memory.per_device_gib(figures, 8) == pytest.approx(16 / 8 + 4)


@pytest.mark.parametrize("argv,world,message", [
    (["--global_batch=6", "--micro_batch_size=auto"], 4, r"--global_batch=6 cannot be split over 4 processes"),
    (["--global_batch=10", "--micro_batch_size=4"], 1, r"--global_batch=10 is not a whole number of micro-batches of 4"),
    (["--micro_batch_size=auto"], 1, r"--micro_batch_size=auto needs the global batch: add --global_batch"),
    (["--global_batch=8", "--micro_batch_size=4", "--optimizer_in_backward=true", "--grad_clip=0"], 1,
     r"--global_batch=8: with --optimizer_in_backward a step is one micro-batch on each process"),
])
def test_a_global_batch_that_cannot_be_made_is_refused_naming_the_option(argv, world, message):
    with pytest.raises(ValueError, match=message):
        memory.resolve_batch(parse_args(["--preset=test", *argv]), world, torch.device("cpu"))


def test_ramp_up_stages_stay_whole_micro_batches():
    cfg = parse_args(["--preset=test", "--global_batch=96", "--micro_batch_size=auto", "--rampup_start=24",
                      "--rampup_increment=12", "--rampup_steps=10"])
    assert memory.micro_batch_choices(cfg, 2) == [6, 3, 2, 1]  # gcd(96, 24, 12) = 12 over 2 ranks


def test_on_cuda_a_real_step_confirms_the_choice_or_takes_a_smaller_one(monkeypatch):
    cfg = memory.with_micro_batch(parse_args(["--preset=test", "--global_batch=16", "--micro_batch_size=auto"]), 8, 1)
    tried = []

    def step(c, device):
        tried.append(c.micro_batch_size)
        if c.micro_batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    chosen, note = memory.confirm_on_cuda(cfg, 1, torch.device("cuda"), step)
    assert tried == [8, 4, 2] and (chosen.micro_batch_size, chosen.grad_accum_steps) == (2, 8)
    assert "ran out of memory at 8: micro-batch 2" in note
    assert memory.confirm_on_cuda(cfg, 1, torch.device("cpu"), step) == (cfg, None)  # the estimate decides on CPU
    assert memory.confirm_on_cuda(dataclasses.replace(cfg), 2, torch.device("cuda"), step)[1] is None  # and under torchrun
