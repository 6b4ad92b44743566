"""FP8 matmuls (rodin/train/fp8.py, --fp8): torch._scaled_mm's real FP8 arithmetic runs on a CPU, so
the layer, its training, its resume and FSDP2 over gloo are tested here; its speed is a GPU's
(bench/gpu.py's fp8 item)."""

import os
import subprocess

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_distributed import common, losses, torchrun
from test_train import metrics, run_train

from rodin.config import MODELS, parse_args
from rodin.model import LLaMA
from rodin.train import checkpoint, fp8


def linear_pair(recipe, shape=(64, 96)):
    torch.manual_seed(0)
    plain = torch.nn.Linear(*shape, bias=False)
    eight = torch.nn.Linear(*shape, bias=False)
    eight.load_state_dict(plain.state_dict())
    eight.__class__, eight.fp8_recipe = fp8.Float8Linear, recipe
    return plain, eight


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_an_fp8_linear_layer_computes_what_bf16_does_within_fp8_precision(recipe):
    plain, eight = linear_pair(recipe)
    x = torch.randn(2, 16, 64) * torch.linspace(0.1, 10, 64)  # channels of very different scale
    x_plain, x_eight = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y_plain, y_eight = plain(x_plain), eight(x_eight)
    assert y_eight.dtype == y_plain.dtype == torch.bfloat16 and y_eight.shape == y_plain.shape
    assert relative_error(y_eight, y_plain) < 0.06  # e4m3: 3 bits of mantissa
    grad = torch.randn_like(y_plain)
    y_plain.backward(grad)
    y_eight.backward(grad)
    assert relative_error(x_eight.grad, x_plain.grad) < 0.15  # gradients in e5m2 (tensorwise): 2 bits
    assert relative_error(eight.weight.grad, plain.weight.grad) < 0.15
    assert eight.weight.grad.dtype == torch.float32  # the fp32 master weight's gradient


def test_fp8_swaps_only_the_blocks_linear_layers_sized_for_it_and_keeps_the_state_dict():
    odd_ffn = LLaMA(MODELS["test"].__class__(**{**MODELS["test"].__dict__, "ffn_dim": 150}))
    assert fp8.convert(odd_ffn, "tensorwise") == 4 * MODELS["test"].n_layers  # the FFN (150 wide) stays bf16
    model = LLaMA(MODELS["test"])
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert fp8.convert(model, "tensorwise") == 7 * MODELS["test"].n_layers  # wq wk wv wo w1 w2 w3
    assert type(model.output) is torch.nn.Linear and type(model.tok_embeddings) is torch.nn.Embedding
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    with torch.no_grad():  # evaluation and sampling stay bf16: same logits as before the swap
        tokens = torch.randint(0, 512, (2, 16))
        plain = LLaMA(MODELS["test"])
        plain.load_state_dict(keys)
        assert torch.equal(model(tokens)[0], plain(tokens)[0])


def test_training_with_fp8_tracks_bf16_and_resumes_bit_identically(demo_data, tmp_path):
    args = ["--dtype=bf16", "--max_steps=16", "--ckpt_every=100", "--eval_every=8"]
    bf16 = metrics(run_train(demo_data, tmp_path / "bf16", *args))
    straight = run_train(demo_data, tmp_path / "fp8", *args, "--fp8=tensorwise")
    eight = metrics(straight)
    # the same curve within FP8's noise: every logged loss within 2 % of bf16's
    pairs = [(a["loss"], b["loss"]) for a, b in zip(bf16, eight) if "loss" in a]
    assert len(pairs) >= 15 and all(abs(e - b) / b < 0.02 for b, e in pairs), pairs
    assert eight[-1]["loss"] < eight[1]["loss"] - 0.5  # and it learns
    run_train(demo_data, tmp_path / "resumed", *args, "--fp8=tensorwise", "--stop_at_step=5")
    resumed = run_train(demo_data, tmp_path / "resumed", *args, "--fp8=tensorwise")
    a = load_file(os.path.join(checkpoint.latest(straight), "model.safetensors"))
    b = load_file(os.path.join(checkpoint.latest(resumed), "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)
    assert [r.get("loss") for r in metrics(resumed)] == [r.get("loss") for r in eight]


def test_fp8_under_fsdp_on_two_processes_gives_the_losses_of_one_process(demo_data, tmp_path):
    # FSDP2 gathers bf16 weights as without FP8; each rank's FP8 matmuls are its own micro-batch's
    args = ["--max_steps=6", "--eval_every=3", "--ckpt_every=100", "--micro_batch_size=2", "--dtype=bf16", "--fp8=tensorwise"]
    done = subprocess.run(torchrun(*common(demo_data, tmp_path, "fsdp"), *args), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bf16 + fp8 tensorwise" in done.stdout + done.stderr
    one = run_train(demo_data, tmp_path / "one", "--max_steps=6", "--eval_every=3", "--ckpt_every=100",
                    "--micro_batch_size=4", "--dtype=bf16", "--fp8=tensorwise")
    # not bit-identical: a rank scales its half batch by its own amax, one process the whole batch
    assert losses(os.path.join(tmp_path, "fsdp")) == pytest.approx(losses(one), rel=0.02)


def test_fp8_auto_turns_on_only_on_a_card_with_fp8_and_a_model_large_enough(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fp8.resolve(parse_args(["--preset=rodin-1b"]), cpu) == "off"  # FP8 on a CPU is slower than bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8.resolve(parse_args(["--preset=rodin-1b"]), cuda) == "tensorwise"
    assert fp8.precision(parse_args(["--preset=rodin-1b"]), cuda) == (
        "bf16 + fp8 tensorwise (attention only: ffn_dim 5461 is not a multiple of 16)")
    assert fp8.resolve(parse_args(["--preset=b200"]), cuda) == "tensorwise"
    assert fp8.resolve(parse_args(["--preset=gpu-demo", "--fp8=auto"]), cuda) == "off"  # too small to pay
    assert fp8.resolve(parse_args(["--preset=3090"]), cuda) == "off"  # the 3090 preset stays bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    assert fp8.resolve(parse_args(["--preset=rodin-1b"]), cuda) == "off"


def test_fp8_that_cannot_run_is_refused_in_one_line_naming_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    with pytest.raises(ValueError, match=r"--fp8=tensorwise: NVIDIA GeForce RTX 3090 \(compute capability 8.6\) has no FP8 "
                                         r"matmuls .*; use --fp8=off"):
        fp8.resolve(parse_args(["--preset=3090", "--fp8=tensorwise"]), torch.device("cuda"))
    with pytest.raises(ValueError, match=r"--fp8=rowwise: FP8 matmuls need the model's dim and heads x head_dim divisible "
                                         r"by 16 \(dim=72, .*\); use --fp8=off"):
        fp8.resolve(parse_args(["--preset=test", "--fp8=rowwise", "--model.dim=72"]), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"--fp8='e4m3': choose off, auto, tensorwise or rowwise"):
        parse_args(["--preset=test", "--fp8=e4m3"])
