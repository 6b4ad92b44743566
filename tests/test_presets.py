"""Each GPU preset's switches together, on CPU: the `test` model shape trained with every other
field as the preset sets it (read from rodin/config.py when the test runs), compiled and in bf16
as on a GPU, with the preset's activation checkpointing, optimizer in backward, loss chunking and
batch ramp-up, gives finite, falling losses, checkpoints, and a resumed run bit-identical to an
uninterrupted one. Presets meant for a node of GPUs run under torchrun, 2 gloo ranks (FSDP2).

A tiny run changes only what must shrink to take seconds on a CPU: model shape, data, device,
sequence length, micro-batch, accumulation (at most 4), steps and cadences, and the sizes that
are proportions of those (loss chunks per micro-batch, warmup, the ramp-up's stages).
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from torch._dynamo.utils import counters

import sft
import train
from rodin.config import PRESETS, SFT_PRESETS, config_to_dict, parse_args
from rodin.model import LLaMA, ModelConfig
from rodin.train import checkpoint
from rodin.train.optim import optimizer_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the presets of GPU runs: every one whose device is not pinned to the CPU
GPU_PRESETS = [name for name, cfg in PRESETS.items() if cfg.device != "cpu"]
# LoRA presets are a full preset's run with adapters: tests/train/test_lora.py trains, resumes and compiles them
GPU_SFT_PRESETS = [name for name, cfg in SFT_PRESETS.items() if cfg.device != "cpu" and not cfg.lora_rank]
# meant for a node of GPUs (torchrun --nproc_per_node=8, README); the others for one GPU
UNDER_TORCHRUN = ("rodin-1b", "b200", "lucie-7b")
WORLD = 2  # gloo ranks of the torchrun runs
STEPS, RESUME_AT = 8, 4


def tiny_args(name, presets=PRESETS, world=1):
    """Overrides that make preset `name` a run of seconds on a CPU, its other fields untouched;
    `auto` compile and dtype resolved as on a GPU (compiled, bf16)."""
    p = presets[name]
    seq_len = 32 if presets is PRESETS else 128  # SFT: room for a Q&A
    nominal_micro_batch = p.micro_batch_size or 8  # --micro_batch_size=auto: what a 24 GiB card fits
    micro_batch = min(nominal_micro_batch, 2)
    if p.global_batch:  # stated once: a tiny global batch of 2 micro-batches a rank
        accumulation = 1 if p.optimizer_in_backward else 2
        batch = [f"--global_batch={micro_batch * accumulation * world}"]
    else:
        accumulation = min(p.grad_accum_steps, 4)
        batch = [f"--grad_accum_steps={accumulation}"]
    args = [f"--preset={name}", "--device=cpu", f"--seq_len={seq_len}", f"--micro_batch_size={micro_batch}", *batch,
            f"--max_steps={STEPS}",
            f"--warmup_steps={max(1, round(p.warmup_steps * STEPS / p.max_steps))}",
            "--log_every=1", "--eval_every=2", "--eval_batches=1", f"--ckpt_every={RESUME_AT}",
            "--sample_tokens=8", "--wandb=disabled", "--tqdm=false"]
    if presets is PRESETS:
        args.append("--model=test")  # SFT takes the model of --init_from
    if p.schedule == "wsd":
        args.append(f"--decay_steps={max(1, round(p.decay_steps * STEPS / p.max_steps))}")
    if p.loss_chunk:  # as many chunks per micro-batch as the preset's
        chunks = math.ceil(nominal_micro_batch * p.seq_len / p.loss_chunk)
        args.append(f"--loss_chunk={math.ceil(micro_batch * seq_len / chunks)}")
    if p.rampup_start:  # from one micro-batch a step to the full batch, by one, in the first half
        per_micro_step = micro_batch * world
        args += [f"--rampup_start={per_micro_step}", f"--rampup_increment={per_micro_step}",
                 f"--rampup_steps={STEPS // 2}"]
    if p.compile == "auto":
        args.append("--compile=on")
    if p.dtype == "auto":
        args.append("--dtype=bf16")
    return args


def tiny_config(name, world):
    """What the tiny run of a pretraining preset trains with, its paths and name left out."""
    cfg = parse_args(tiny_args(name, world=world))
    return json.dumps(config_to_dict(dataclasses.replace(cfg, name="", data_dir="", tokenizer="", out_dir="")))


def distinct_runs(names, world):
    """Presets grouped by the tiny run they make (b200 and rodin-1b differ only in sizes a tiny
    run shrinks): one run for each group."""
    groups = {}
    for name in names:
        groups.setdefault(tiny_config(name, world), []).append(name)
    return [pytest.param(group[0], id="+".join(group)) for group in groups.values()]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_tensors(path):
    """Weights and optimizer state of a checkpoint (either format), loaded into one process."""
    meta = checkpoint.read_meta(path)
    cfg = types.SimpleNamespace(**dict(meta["config"], model=ModelConfig(**meta["config"]["model"])))
    model = LLaMA(cfg.model)
    optimizer = optimizer_for(model, cfg)
    checkpoint.load(path, model, optimizer, restore_rng_state=False)
    tensors = dict(model.state_dict())
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return tensors


def resume_from_a_copy(run_dir, copy_dir, step):
    """A copy of a run as it was when it stopped after its checkpoint at `step`."""
    shutil.copytree(run_dir, copy_dir)
    for path in checkpoint.complete_checkpoints(copy_dir):
        if checkpoint.read_meta(path)["step"] > step:
            shutil.rmtree(path)


def assert_trained_and_resumed_bit_identically(straight, resumed):
    records = metrics(straight)
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses + val), losses + val
    # the same held-out batch every 2 steps: lower at each evaluation (the run is deterministic)
    assert all(later < earlier for earlier, later in zip(val, val[1:])), val
    assert checkpoint.read_meta(checkpoint.latest(straight))["step"] == STEPS
    assert checkpoint.read_meta(checkpoint.latest(resumed))["step"] == STEPS
    same = ("step", "loss", "val_loss", "batch_size", "lr", "tokens_seen")
    assert [{k: r.get(k) for k in same} for r in metrics(resumed)] == [{k: r.get(k) for k in same} for r in records]
    a, b = checkpoint_tensors(checkpoint.latest(straight)), checkpoint_tensors(checkpoint.latest(resumed))
    assert a.keys() == b.keys() and [k for k in a if not a[k].equal(b[k])] == []


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles afresh (from torch's on-disk caches): earlier tests' graphs neither
    count against dynamo's recompile limit nor hide a recompile."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def assert_one_graph_for_all_blocks():
    """The straight and the resumed run (one process) compiled one graph, without a graph break."""
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_every_preset_named_for_torchrun_exists():
    assert set(UNDER_TORCHRUN) <= set(GPU_PRESETS)


@pytest.mark.parametrize("name", distinct_runs([n for n in GPU_PRESETS if n not in UNDER_TORCHRUN], 1))
def test_preset_compiled_in_bf16_trains_and_resumes_bit_identically(name, demo_data, tmp_path):
    data = [f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}"]
    args = tiny_args(name) + data
    assert train.main(args + ["--name=straight"]) == 0
    resume_from_a_copy(tmp_path / "straight", tmp_path / "resumed", RESUME_AT)
    assert train.main(args + ["--name=resumed"]) == 0
    assert_trained_and_resumed_bit_identically(tmp_path / "straight", tmp_path / "resumed")
    assert_one_graph_for_all_blocks()


def torchrun(args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           os.path.join(ROOT, "train.py"), *args]
    # dynamo's log says what each rank compiled: one line per graph traced, and any recompilation
    env = dict(os.environ, TORCH_LOGS="dynamo,recompiles,graph_breaks")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    return done


@pytest.mark.parametrize("name", distinct_runs(UNDER_TORCHRUN, WORLD))
def test_node_preset_compiled_in_bf16_under_torchrun_trains_and_resumes_bit_identically(name, demo_data, tmp_path):
    data = [f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}"]
    args = tiny_args(name, world=WORLD) + data
    done = torchrun(args + ["--name=straight"])
    assert "(FSDP2)" in done.stdout
    traced = [line for line in done.stderr.splitlines() if "torchdynamo start tracing" in line]
    # one graph per rank serves every block, the whole run: no recompilation, no graph break
    assert sorted(line.split("]")[0] for line in traced) == [f"[rank{r}" for r in range(WORLD)], traced
    assert "Recompiling" not in done.stderr and "Graph break" not in done.stderr
    resume_from_a_copy(tmp_path / "straight", tmp_path / "resumed", RESUME_AT)
    assert "resuming from" in torchrun(args + ["--name=resumed"]).stdout
    assert checkpoint.is_dcp(checkpoint.latest(tmp_path / "resumed"))
    assert_trained_and_resumed_bit_identically(tmp_path / "straight", tmp_path / "resumed")
    if PRESETS[name].rampup_start:
        sizes = [r["batch_size"] for r in metrics(tmp_path / "straight") if "batch_size" in r]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1], sizes


@pytest.fixture(scope="module")
def pretrained(demo_data, tmp_path_factory):
    """A test-shape checkpoint with room for chat-length rows, for the SFT presets."""
    out = tmp_path_factory.mktemp("pretrain")
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out}", "--name=base", "--max_steps=4", "--eval_every=100", "--model.max_seq_len=128"]
    assert train.main(argv) == 0
    return str(out / "base")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from conftest import littre_slice

    path = tmp_path_factory.mktemp("chat") / "littre.jsonl"
    path.write_text("".join(littre_slice(80)), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", GPU_SFT_PRESETS)
def test_sft_preset_compiled_in_bf16_on_packed_rows_trains_and_resumes_bit_identically(name, pretrained, chat_data, tmp_path):
    args = tiny_args(name, SFT_PRESETS) + [f"--init_from={pretrained}", f"--data={chat_data}", "--val_fraction=0.2",
                                           f"--out_dir={tmp_path}"]
    assert sft.main(args + ["--name=straight"]) == 0
    resume_from_a_copy(tmp_path / "straight", tmp_path / "resumed", RESUME_AT)
    assert sft.main(args + ["--name=resumed"]) == 0
    assert_trained_and_resumed_bit_identically(tmp_path / "straight", tmp_path / "resumed")
    assert_one_graph_for_all_blocks()  # rows of every length: compiled dynamic
