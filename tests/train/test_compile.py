"""torch.compile of the blocks: compiled training computes what eager training does, and a run
compiles one graph for all its blocks, whatever else it does between steps (held-out evaluation
and sampling run eager; SFT rows of varying length share one dynamic graph)."""

import json
import os

import pytest
import torch
from torch._dynamo.utils import counters

import sft
import train
from rodin.data import sft_rows


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles afresh (from torch's on-disk caches) and counts only its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def run(demo_data, out_dir, *args):
    # micro-batches of 2 x 32 tokens: the shape of tests/test_presets.py, whose graphs torch's caches keep
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out_dir}", "--name=run", "--micro_batch_size=2", *args]
    assert train.main(argv) == 0
    with open(os.path.join(out_dir, "run", "metrics.jsonl")) as f:
        return [r[k] for r in map(json.loads, f) for k in ("loss", "val_loss") if k in r]


def graphs():
    """(graphs compiled, graph breaks) since the test started."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("savers", [
    ["--activation_checkpointing=ops"],  # selective recomputation: its policy applied inside the compiled graph
    ["--activation_checkpointing=full", "--optimizer_in_backward=true", "--loss_chunk=16"],  # the 3090 preset's set
], ids=["ops", "3090-savers"])
def test_compiled_training_gives_the_losses_of_eager_training(demo_data, tmp_path, savers):
    args = ["--max_steps=6", "--eval_every=3", "--grad_clip=0", *savers]
    eager = run(demo_data, tmp_path / "eager", *args)
    compiled = run(demo_data, tmp_path / "compiled", "--compile=on", *args)
    assert graphs() == (1, 0)
    # fp32: inductor only reorders sums
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_evaluation_and_sampling_between_compiled_steps_compile_nothing(demo_data, tmp_path):
    # before they ran eager, this run compiled 6 graphs: training, evaluation (no grad), sampling's
    # prompt and its one-token steps (no autocast; start_pos and length change), and training again
    # after the first sampling had moved the KV-cache attribute into the block's submodules
    losses = run(demo_data, tmp_path, "--compile=on", "--dtype=bf16", "--max_steps=6", "--eval_every=2",
                 "--sample_every=2", "--sample_tokens=12")
    assert len(losses) == 6 + 4
    assert graphs() == (1, 0)
    assert counters["frames"]["total"] == 1  # dynamo was asked to compile once: no recompilation


def test_sft_rows_of_varying_length_share_one_compiled_graph(demo_data, tmp_path, monkeypatch):
    from conftest import littre_slice

    lengths = set()
    get = sft_rows.Rows.get

    def recording_get(self, indices):
        batch = get(self, indices)
        lengths.add(batch[0].size(1))
        return batch

    monkeypatch.setattr(sft_rows.Rows, "get", recording_get)
    assert train.main(["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                       f"--out_dir={tmp_path}", "--name=base", "--max_steps=2", "--eval_every=100",
                       "--model.max_seq_len=128"]) == 0
    data = tmp_path / "littre.jsonl"
    data.write_text("".join(littre_slice(60)), encoding="utf-8")
    torch._dynamo.reset()
    counters.clear()
    assert sft.main(["--preset=test", f"--init_from={tmp_path / 'base'}", f"--data={data}", f"--out_dir={tmp_path}",
                     "--seq_len=128", "--micro_batch_size=2", "--val_fraction=0.2", "--max_steps=6", "--eval_every=3",
                     "--compile=on", "--dtype=bf16"]) == 0
    # packed rows are cut after the longest row of their batch: they differ in length
    assert len(lengths) > 2, lengths
    assert graphs() == (1, 0) and counters["frames"]["total"] == 1


def test_compile_auto_compiles_on_cuda_and_on_a_cpu_only_for_runs_long_enough_to_pay(monkeypatch):
    from rodin.config import PRESETS, parse_args
    from rodin.train import distributed

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    short, long = parse_args(["--preset=test"]), parse_args(["--preset=test", f"--max_steps={distributed.CPU_COMPILE_MIN_STEPS}"])
    assert distributed.compiles(short, cuda) and distributed.compiles(long, cpu) and not distributed.compiles(short, cpu)
    assert distributed.compiles(PRESETS["cpu-demo"], cpu)  # make pretrain on a CPU compiles
    monkeypatch.setattr(distributed, "has_cpp_compiler", lambda: False)
    assert not distributed.compiles(long, cpu)  # auto without a compiler: eager, not an error
    assert not distributed.compiles(parse_args(["--preset=test", "--compile=off"]), cuda)
