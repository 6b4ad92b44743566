"""rodin/config.py: presets in one place, overridden by --key=value."""

import pytest

from rodin.config import MODELS, PRESETS, TrainConfig, config_from_dict, config_to_dict, parse_args


def test_overrides_are_typed_by_the_dataclass():
    cfg = parse_args(["--preset=test", "--lr=0.5", "--max_steps=7", "--tqdm=false", "--model.n_layers=3", "--model.rope_theta=1e6"])
    assert (cfg.lr, cfg.max_steps, cfg.tqdm) == (0.5, 7, False)
    assert (cfg.model.n_layers, cfg.model.rope_theta) == (3, 1e6)
    assert cfg.micro_batch_size == PRESETS["test"].micro_batch_size


def test_model_preset_swap_then_field_override_in_any_order():
    cfg = parse_args(["--model.max_seq_len=512", "--model=rodin-1b", "--seq_len=512"])
    assert cfg.model.dim == MODELS["rodin-1b"].dim and cfg.model.max_seq_len == 512


@pytest.mark.parametrize("argv,message", [
    (["--nope=1"], "unknown option --nope"),
    (["--model.nope=1"], "unknown option --model.nope"),
    (["--preset=gpt5"], "unknown preset"),
    (["--lr=fast"], "--lr expects float"),
    (["--tqdm=maybe"], "--tqdm expects true or false"),
    (["lr=1"], "--key=value"),
    (["--keep_checkpoints=1"], "at least 2|>= 2"),
    (["--preset=test", "--seq_len=4096"], "max_seq_len"),
    (["--preset=test", "--output_lr_scale=0.5"], "--output_lr_scale=0.5: this model's output is its embedding matrix"),
    (["--preset=test", "--embedding_lr_scale=0"], "--embedding_lr_scale=0.0 --output_lr_scale=1.0: both must be > 0"),
    (["--preset=test", "--muon_momentum_start=1.2"], "--muon_momentum_start=1.2: steps must be >= 0 and the start in"),
])
def test_bad_arguments_are_refused_with_the_reason(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_config_round_trips_through_json_dict():
    cfg = parse_args(["--preset=test", "--model=lucie-7b", "--seq_len=64"])
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_every_preset_is_a_valid_train_config():
    for name, cfg in PRESETS.items():
        assert isinstance(cfg, TrainConfig), name
        assert cfg.seq_len <= cfg.model.max_seq_len, name


def test_lucie_preset_ramps_256_to_1024_sequences_by_64_on_a_node_of_8():
    from rodin.train.optim import batch_size_at

    cfg = PRESETS["lucie-7b"]
    per_micro_step = cfg.micro_batch_size * 8
    full = cfg.global_batch
    assert full == 1024 and full % per_micro_step == 0 and cfg.seq_len == cfg.model.max_seq_len == 4096
    sizes = [batch_size_at(step, full, cfg.rampup_start, cfg.rampup_increment, cfg.rampup_steps) for step in range(cfg.max_steps)]
    assert sizes[0] == 256 and sizes[-1] == 1024 and sorted(set(sizes)) == list(range(256, 1025, 64))
    assert all(size % per_micro_step == 0 for size in set(sizes))  # whole micro-steps on every rank
    assert sum(sizes[: cfg.rampup_steps]) == pytest.approx(10e6, rel=0.05)  # the ramp spans ~10 M sequences
    assert sum(sizes) * cfg.seq_len == pytest.approx(3e12, rel=0.02)  # ~3 T tokens, as Lucie-7B


def test_dtype_auto_is_bf16_on_cpus_with_native_bf16_and_fp32_elsewhere(monkeypatch):
    import torch

    from rodin.train import device

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(device, "cuda_has_native_bf16", lambda d: True)  # a card from compute capability 8.0 (tests/train/test_preflight.py: older ones)
    assert device.resolve_dtype(cpu) == "bf16" and device.resolve_dtype(cuda) == "bf16"
    assert device.resolve_dtype(cpu, "fp32") == "fp32"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.resolve_dtype(cpu) == "fp32" and isinstance(device.autocast(cpu), type(device.autocast(cpu, "fp32")))
    assert device.autocast(cpu, "bf16").fast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype=fp16: choose auto, fp32 or bf16"):
        parse_args(["--preset=test", "--dtype=fp16"])


def test_native_bf16_is_read_from_the_cpu_flags_when_torch_cannot_tell(monkeypatch, tmp_path):
    import builtins

    import torch

    from rodin.train import device

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    real_open = builtins.open
    for flags, expected in (("fpu sse2 avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True), ("fpu avx2 avx512f", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(tmp_path / "cpuinfo" if path == "/proc/cpuinfo" else path, *a, **k))
        assert device.cpu_has_native_bf16() is expected, flags
