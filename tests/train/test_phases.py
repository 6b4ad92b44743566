"""A new phase (--init_from) starts from another run's checkpoint: annealing with a new schedule,
with or without the optimizer state, and context extension with a longer context and RoPE theta."""

import json
import os

import pytest

import train
from rodin.train import checkpoint


def run(demo_data, out_dir, name, *args):
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out_dir}", f"--name={name}", "--eval_every=100", *args]
    assert train.main(argv) == 0
    with open(os.path.join(out_dir, name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("phases")
    records = run(demo_data, out, "base", "--max_steps=8", "--schedule=constant")
    return out, records


def test_annealing_phase_starts_from_the_checkpoint_and_decays_linearly_to_zero(demo_data, base, capsys):
    out, base_records = base
    with_state = run(demo_data, out, "anneal", f"--init_from={out / 'base'}", "--max_steps=4", "--schedule=linear",
                     "--warmup_steps=0", "--min_lr=0")
    assert "with its optimizer state" in capsys.readouterr().out
    assert with_state[0]["val_loss"] == base_records[-1]["val_loss"]  # the very weights the base run ended with
    assert [r["lr"] for r in with_state[1:]] == pytest.approx([1e-2, 0.75e-2, 0.5e-2, 0.25e-2])
    fresh = run(demo_data, out, "anneal-fresh", f"--init_from={out / 'base' / 'checkpoints'}/step-0000008",
                "--max_steps=4", "--schedule=linear", "--warmup_steps=0", "--min_lr=0", "--init_optimizer=false")
    assert fresh[1]["loss"] == with_state[1]["loss"]  # same weights, same first batch
    assert fresh[2]["loss"] != with_state[2]["loss"]  # Adam's moments shaped the first update
    assert checkpoint.read_meta(checkpoint.latest(out / "anneal"))["step"] == 4


def test_context_extension_phase_runs_at_a_longer_context_with_a_new_rope_theta(demo_data, base):
    out, base_records = base
    records = run(demo_data, out, "long", f"--init_from={out / 'base'}", "--max_steps=3", "--seq_len=96",
                  "--model.max_seq_len=128", "--model.rope_theta=40000", "--micro_batch_size=2")
    assert records[0]["val_loss"] < base_records[0]["val_loss"] - 0.5  # trained weights, not a fresh init
    assert records[-1]["tokens_seen"] == 3 * 2 * 96
    config = checkpoint.read_meta(checkpoint.latest(out / "long"))["config"]["model"]
    assert (config["max_seq_len"], config["rope_theta"]) == (128, 40000.0)


def test_a_phase_may_not_change_the_shape_of_the_model(demo_data, base):
    out, _ = base
    with pytest.raises(ValueError, match="may change only max_seq_len, rope_theta.*changes dim"):
        run(demo_data, out, "wider", f"--init_from={out / 'base'}", "--max_steps=1", "--model.dim=128")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        run(demo_data, out, "nothing", f"--init_from={out / 'missing'}", "--max_steps=1")


def test_a_phase_from_a_run_of_the_other_optimizer_takes_its_weights_and_refuses_its_optimizer_state(demo_data, base):
    out, base_records = base  # an AdamW run
    with pytest.raises(ValueError, match=r"holds adamw's optimizer state, this run uses --optimizer=muon; "
                                         r"take its weights alone with --init_optimizer=false"):
        run(demo_data, out, "muon-phase", f"--init_from={out / 'base'}", "--max_steps=2", "--optimizer=muon")
    assert not os.path.exists(out / "muon-phase" / "checkpoints")  # nothing written
    records = run(demo_data, out, "muon-phase", f"--init_from={out / 'base'}", "--max_steps=2", "--optimizer=muon",
                  "--init_optimizer=false")
    assert records[0]["val_loss"] == base_records[-1]["val_loss"]  # the AdamW run's very weights
    # and the Muon run cannot be resumed as an AdamW one
    with pytest.raises(ValueError, match=r"holds muon's optimizer state, this run uses --optimizer=adamw; resume with --optimizer=muon"):
        run(demo_data, out, "muon-phase", "--max_steps=4", f"--init_from={out / 'base'}", "--init_optimizer=false")
