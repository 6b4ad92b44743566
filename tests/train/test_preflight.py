"""A run that cannot work on the device found stops before its first step, and before anything is
written, in one line naming the option that fixes it. The CUDA conditions are tested on the CPU
with torch's CUDA queries answered by a fake card; the `gpu` tests ask the real one."""

import importlib.util
import os
import re
import types

import pytest
import torch
import torch.distributed as dist

import train
from rodin.config import parse_args
from rodin.train import distributed, preflight
from rodin.train.device import resolve_dtype

GIB = 2**30


def fake_card(monkeypatch, name, total_gib, capability):
    """torch.cuda answers as if this card were cuda:0 (with Triton, which torch.compile needs there)."""
    props = types.SimpleNamespace(name=name, total_memory=int(total_gib * GIB), major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: types.ModuleType(name) if name == "triton" else find_spec(name))


def as_run(argv, world=1):
    """The config train.py checks: its micro-batch and accumulation resolved from --global_batch."""
    from rodin.train.memory import resolve_batch

    return resolve_batch(parse_args(argv), world, torch.device("cpu"))[0]


def run_args(demo_data, tmp_path, *args):
    return [f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}",
            "--name=run", "--wandb=disabled", *args]


def suggested_options(message):
    """The options a refusal says would fit: '...: --a=1 --b=2 fits (~x GiB); ...' -> ['--a=1', '--b=2']."""
    found = re.search(r": ((?:--\w+=\S+ )+)fits", message)
    assert found, message
    return found.group(1).split()


@pytest.mark.parametrize("card, total_gib, fix", [
    # the preset accumulates: weights, gradients and Muon's momentum alone are 14.3 GiB
    ("NVIDIA GeForce RTX 4060 Ti", 16, r"alone need ~14.3 GiB: --optimizer_in_backward=true --grad_accum_steps=1 --grad_clip=0"),
    ("NVIDIA GeForce RTX 3070", 8, "weights and optimizer state alone need ~.* GiB: more GPUs under torchrun"),
])
def test_the_24_gib_preset_on_a_smaller_card_stops_before_anything_is_written_naming_the_fix(
        demo_data, tmp_path, monkeypatch, card, total_gib, fix):
    fake_card(monkeypatch, card, total_gib, (8, 6))
    with pytest.raises(ValueError) as error:
        train.main(["--preset=3090", *run_args(demo_data, tmp_path)])
    message = str(error.value)
    assert "\n" not in message and f"cuda ({card}) has {total_gib:.1f} GiB" in message and re.search(fix, message), message
    assert "--check_memory=false" in message
    assert not os.path.exists(tmp_path / "run")
    if "fits" in message:  # and what it suggests does fit
        preflight.check(parse_args(["--preset=3090", *suggested_options(message)]), torch.device("cuda"))


def test_a_run_on_the_card_it_fits_passes_and_the_check_can_be_skipped(monkeypatch):
    fake_card(monkeypatch, "NVIDIA GeForce RTX 3090", 24, (8, 6))
    cuda = torch.device("cuda")
    preflight.check(as_run(["--preset=3090"]), cuda)  # ~19 GiB estimated
    too_big = ["--preset=rodin-1b", "--micro_batch_size=8", "--activation_checkpointing=none"]
    with pytest.raises(ValueError) as error:  # ~58 GiB: recomputation and smaller micro-batches, the same batch
        preflight.check(as_run(too_big), cuda)
    options = suggested_options(str(error.value))
    fixed = as_run(too_big + options)
    preflight.check(fixed, cuda)
    assert fixed.micro_batch_size * fixed.grad_accum_steps == 512  # the global batch
    preflight.check(parse_args(["--preset=rodin-1b", "--check_memory=false"]), cuda)
    # under torchrun FSDP2 holds an eighth of the weights and optimizer state on each of 8 GPUs
    fake_card(monkeypatch, "NVIDIA H100 80GB HBM3", 80, (9, 0))
    preflight.check(as_run(["--preset=lucie-7b"], world=8), cuda, world=8)
    with pytest.raises(ValueError, match="alone need ~.* GiB: .*several GPUs under torchrun"):
        preflight.check(as_run(["--preset=lucie-7b"]), cuda, world=1)


def test_bf16_on_a_card_without_it_stops_naming_fp32_and_auto_picks_fp32_there(demo_data, tmp_path, monkeypatch):
    fake_card(monkeypatch, "Tesla T4", 15, (7, 5))
    with pytest.raises(ValueError, match=r"--dtype=bf16: cuda \(Tesla T4\) does not compute bf16 natively .* use --dtype=fp32"):
        train.main(["--preset=gpu-demo", "--dtype=bf16", *run_args(demo_data, tmp_path)])
    assert not os.path.exists(tmp_path / "run")
    cuda = torch.device("cuda")
    assert resolve_dtype(cuda, "auto") == "fp32"
    preflight.check(parse_args(["--preset=gpu-demo"]), cuda)
    fake_card(monkeypatch, "NVIDIA A100-SXM4-80GB", 80, (8, 0))
    assert resolve_dtype(cuda, "auto") == "bf16"


def test_torchrun_on_cuda_without_nccl_stops_before_joining_the_process_group(monkeypatch):
    fake_card(monkeypatch, "NVIDIA H100 80GB HBM3", 80, (9, 0))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="torchrun on CUDA needs NCCL, which this torch build lacks"):
        distributed.setup("auto")
    assert not dist.is_initialized()


def test_compile_without_its_compiler_stops_naming_compile_off(demo_data, tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    cpp_compiler_search.cache_clear()
    try:  # torch's own patch: monkeypatch's undo would delete the option from torch's config
        with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), pytest.raises(
                ValueError, match=r"torch.compile on the CPU needs a C\+\+ compiler .* or --compile=off"):
            train.main(["--preset=test", "--compile=on", *run_args(demo_data, tmp_path)])
    finally:
        cpp_compiler_search.cache_clear()
    assert not os.path.exists(tmp_path / "run")
    # on CUDA, Triton
    fake_card(monkeypatch, "NVIDIA H100 80GB HBM3", 80, (9, 0))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="torch.compile on CUDA needs Triton.*or --compile=off"):
        preflight.check(parse_args(["--preset=gpu-demo"]), torch.device("cuda"), compiled=True)


@pytest.mark.parametrize("savers", [
    [], ["--activation_checkpointing=ops"], ["--activation_checkpointing=half", "--model.tie_embeddings=false"],
    ["--activation_checkpointing=full", "--loss_chunk=512", "--optimizer_in_backward=true", "--grad_clip=0"],
    ["--grad_accum_steps=2", "--optimizer=muon", "--loss_chunk=512"],
], ids=["plain", "ops", "half+untied", "3090-savers", "accumulated+muon+chunks"])
def test_the_quick_memory_estimate_follows_the_fake_tensor_one(savers):
    """The fake-tensor estimate runs the real step (bench/memory_estimate.py, seconds to minutes);
    the quick one is a formula. On an 11 M-parameter model, where the vocabulary weighs more than
    in the presets' (within 5 % there), they agree within 20 %."""
    from bench.memory_estimate import estimate

    cfg = parse_args(["--preset=test", "--model.dim=512", "--model.n_layers=2", "--model.n_heads=8", "--model.n_kv_heads=4",
                      "--model.ffn_dim=1376", "--model.vocab_size=8192", "--model.max_seq_len=512", "--seq_len=512",
                      "--micro_batch_size=4", *savers])
    assert preflight.estimate_peak_gib(cfg) == pytest.approx(estimate(cfg)["peak"], rel=0.2)


# ---- on a real card ---------------------------------------------------------------------------


@pytest.mark.gpu
def test_on_this_card_a_run_beyond_its_memory_stops_before_anything_is_written(demo_data, tmp_path):
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    cfg = parse_args(["--preset=rodin-1b"])
    micro_batch = cfg.micro_batch_size
    while preflight.estimate_peak_gib(parse_args(["--preset=rodin-1b", f"--micro_batch_size={micro_batch}"])) <= total:
        micro_batch *= 2
    with pytest.raises(ValueError, match=r"need ~.* GiB on each GPU \(estimated\), cuda .* fits"):
        train.main(["--preset=rodin-1b", f"--micro_batch_size={micro_batch}", *run_args(demo_data, tmp_path)])
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.gpu
def test_on_this_card_the_memory_estimate_is_within_10_percent_of_the_allocators_peak(demo_data, tmp_path):
    """The 3090 preset, eager (the estimate's step), a few steps of two micro-batches (gradients
    accumulate as in the preset's 64): torch.cuda.max_memory_allocated."""
    args = ["--preset=3090", "--global_batch=16", "--compile=off", "--max_steps=2", "--eval_batches=1", "--sample_tokens=4", "--tqdm=false"]
    torch.cuda.reset_peak_memory_stats()
    assert train.main(args + run_args(demo_data, tmp_path)) == 0
    peak = torch.cuda.max_memory_allocated() / GIB
    assert preflight.estimate_peak_gib(parse_args(args)) == pytest.approx(peak, rel=0.1)


# ---- torch --------------------------------------------------------------------------------------


def test_a_torch_older_than_rodin_needs_is_named_with_the_fix():
    from rodin import torch_too_old

    assert torch_too_old("2.9.0") is None and torch_too_old("2.11.0+cu130") is None and torch_too_old("3.0.0") is None
    line = torch_too_old("2.8.0+cu128")
    assert "torch >= 2.9" in line and "2.8.0+cu128" in line and "pip install 'torch>=2.9'" in line


def test_importing_rodin_on_an_older_torch_stops_in_one_line():
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-c", "import torch; torch.__version__ = '2.8.0'; import rodin.train.optim"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: rodin needs torch >= 2.9 (torch.optim.Muon), this is torch 2.8.0: pip install 'torch>=2.9' "
        "(the build for your CUDA driver)"]
