"""train.py: the demo path end to end, exact resume, and a clean stop on SIGTERM."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import train
from rodin.train import checkpoint


def run_train(demo_data, out_dir, *args):
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out_dir}", "--name=run", *args]
    assert train.main(argv) == 0
    return os.path.join(out_dir, "run")


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_demo_path_trains_writes_its_run_directory_and_resumes(demo_data, tmp_path, capsys):
    run_dir = run_train(demo_data, tmp_path, "--max_steps=40", "--eval_every=20")
    records = metrics(run_dir)
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(records[1])
    assert 0 < records[-1]["val_bpb"] < records[0]["val_bpb"]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 1.0, val
    for name in ("config.json", "loss.png", "samples.md"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert checkpoint.read_meta(checkpoint.latest(run_dir))["step"] == 40
    assert "samples:" in capsys.readouterr().out

    run_train(demo_data, tmp_path, "--max_steps=45", "--eval_every=20")
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in metrics(run_dir)][-5:] == [41, 42, 43, 44, 45]


@pytest.mark.parametrize("schedule", [
    [],
    # warmup-stable-decay with a batch ramp-up from 4 to 8 sequences, interrupted mid-ramp
    ["--schedule=wsd", "--decay_steps=6", "--grad_accum_steps=2", "--rampup_start=4", "--rampup_increment=4", "--rampup_steps=10"],
    # the memory savers of the 3090 preset: AdamW in backward, recomputed blocks, chunked loss
    ["--optimizer_in_backward=true", "--grad_clip=0", "--activation_checkpointing=full", "--loss_chunk=48"],
    # Muon: grouped with AdamW and clipped over accumulated micro-batches; then stepped in backward
    ["--optimizer=muon", "--grad_accum_steps=2", "--micro_batch_size=2"],
    ["--optimizer=muon", "--optimizer_in_backward=true", "--grad_clip=0", "--activation_checkpointing=full", "--loss_chunk=48"],
    # Muon's variants, whose NorMuon second moment is optimizer state too; momentum warm-up interrupted
    # mid-way, the embeddings at their own lr (a group of their own)
    ["--optimizer=muon", "--muon_orthogonalise=polar_express", "--muon_normuon=true", "--muon_cautious_weight_decay=true",
     "--muon_momentum_warmup_steps=10", "--embedding_lr_scale=0.5"],
], ids=["cosine", "wsd+rampup", "3090-savers", "muon+accumulation", "muon-in-backward", "muon-variants"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(demo_data, tmp_path, schedule):
    straight = run_train(demo_data, tmp_path / "a", "--max_steps=16", "--ckpt_every=100", *schedule)
    run_train(demo_data, tmp_path / "b", "--max_steps=16", "--ckpt_every=100", "--stop_at_step=7", *schedule)
    resumed = run_train(demo_data, tmp_path / "b", "--max_steps=16", "--ckpt_every=100", *schedule)
    a = load_file(os.path.join(checkpoint.latest(straight), "model.safetensors"))
    b = load_file(os.path.join(checkpoint.latest(resumed), "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    a_opt = load_file(os.path.join(checkpoint.latest(straight), "optimizer.safetensors"))
    b_opt = load_file(os.path.join(checkpoint.latest(resumed), "optimizer.safetensors"))
    assert all(a_opt[k].equal(b_opt[k]) for k in a_opt)
    losses = lambda run: [(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(run)]  # noqa: E731
    assert losses(straight) == losses(resumed)
    if "--schedule=wsd" in schedule:
        records = metrics(straight)[1:]
        assert [r["batch_size"] for r in records] == [4] * 10 + [8] * 6
        assert records[-1]["tokens_seen"] == (4 * 10 + 8 * 6) * 32
        assert {r["lr"] for r in records[2:10]} == {1e-2} and records[-1]["lr"] < 1e-2  # stable, then decay


def test_a_run_whose_steps_slow_down_gets_its_checkpoints_by_the_clock(demo_data, tmp_path, step_clock):
    step_clock.seconds = lambda n: 0.0 if n <= 3 else 120.0  # from the 4th step on, 2 minutes a step
    run = run_train(demo_data, tmp_path, "--max_steps=12", "--ckpt_every=1000", "--ckpt_every_minutes=5",
                    "--keep_checkpoints=10")
    # 5 minutes after the start (or the last checkpoint) falls within steps 6 and 9; 12 is the end
    assert [checkpoint.step_of(p) for p in checkpoint.complete_checkpoints(run)] == [6, 9, 12]


def test_milestone_checkpoints_survive_pruning_in_the_run_directory_and_in_the_mirror(demo_data, tmp_path):
    from rodin.spot.mirror import Mirror

    remote = f"file://{tmp_path / 'remote'}"
    run = run_train(demo_data, tmp_path, "--max_steps=12", "--ckpt_every=2", "--keep_checkpoints=2", "--keep_every=3",
                    f"--mirror={remote}")
    # every multiple of 3 is written and kept, beside the newest two of the others
    kept = ["step-0000003", "step-0000006", "step-0000009", "step-0000010", "step-0000012"]
    assert [os.path.basename(p) for p in checkpoint.complete_checkpoints(run)] == kept
    assert Mirror(remote).complete() == kept


def test_resuming_with_another_model_shape_is_refused(demo_data, tmp_path):
    run_train(demo_data, tmp_path, "--max_steps=2")
    with pytest.raises(ValueError, match="trained with model"):
        run_train(demo_data, tmp_path, "--max_steps=4", "--model.n_layers=3")


def test_sigterm_mid_run_writes_a_checkpoint_and_exits_0(demo_data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--preset=test", f"--data_dir={demo_data['dir']}",
           f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}", "--name=run", "--max_steps=100000",
           "--ckpt_every=100000", "--eval_every=100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_path = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics_path.exists() or len(metrics_path.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: checkpoint written" in out
    meta = checkpoint.read_meta(checkpoint.latest(tmp_path / "run"))
    assert 3 <= meta["step"] < 100000


def test_sigkill_at_a_random_step_loses_only_the_steps_since_the_last_checkpoint(demo_data, tmp_path):
    args = ["--max_steps=24", "--ckpt_every=4", "--eval_every=100"]
    straight = run_train(demo_data, tmp_path / "a", *args)
    kill_at = random.randint(5, 20)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--preset=test", f"--data_dir={demo_data['dir']}",
           f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path / 'b'}", "--name=run", *args]
    # the same intra-op threads as this process, so that the two halves add up bit for bit
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_path = tmp_path / "b" / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics_path.exists() or len(metrics_path.read_text().splitlines()) <= kill_at):
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no handler runs, maybe mid-checkpoint
    proc.wait()
    logged = len(metrics_path.read_text().splitlines()) - 1
    killed = tmp_path / "b" / "run"
    assert logged < 24, f"the run finished before the kill at step {kill_at}"
    # a newer checkpoint that never got its manifest, as a kill mid-write leaves it
    os.makedirs(os.path.join(checkpoint.checkpoint_root(killed), "step-0000023"))
    with pytest.warns(UserWarning, match="step-0000023: skipping checkpoint"):
        last = checkpoint.latest(killed)
    saved = checkpoint.read_meta(last)["step"] if last else 0
    assert 0 <= logged - saved <= 4, f"killed near step {logged}, newest checkpoint at {saved}"
    with pytest.warns(UserWarning, match="step-0000023: skipping checkpoint"):
        resumed = run_train(demo_data, tmp_path / "b", *args)
    a = load_file(os.path.join(checkpoint.latest(straight), "model.safetensors"))
    b = load_file(os.path.join(checkpoint.latest(resumed), "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a), f"killed at step {logged}: the finished run differs from a straight one"


def test_held_out_loss_and_bpb_are_reported_for_each_source_and_over_all(demo_data, corpus_slice, tmp_path):
    from data import encode

    with open(corpus_slice, encoding="utf-8") as f:
        lines = f.readlines()
    (tmp_path / "first.txt").write_text("".join(lines[:3000]), encoding="utf-8")
    (tmp_path / "second.txt").write_text("".join(lines[3000:]), encoding="utf-8")
    shards = tmp_path / "shards"
    encode.main([str(tmp_path / "first.txt"), str(tmp_path / "second.txt"), f"--tokenizer={demo_data['tokenizer']}",
                 f"--out_dir={shards}", "--workers=1", "--val_fraction=0.1"])
    argv = ["--preset=test", f"--data_dir={shards}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}",
            "--name=run", "--max_steps=4", "--eval_every=2", "--eval_batches=4"]
    assert train.main(argv) == 0
    evals = [r for r in metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        per_source = [r["val_loss/first.txt"], r["val_loss/second.txt"]]
        # each source evaluates the same number of windows, so the overall loss is their mean
        assert r["val_loss"] == pytest.approx(sum(per_source) / 2)
        assert min(r["val_bpb/first.txt"], r["val_bpb/second.txt"]) <= r["val_bpb"] <= max(r["val_bpb/first.txt"], r["val_bpb/second.txt"])


def test_a_finished_run_gives_the_signal_handlers_back(demo_data, tmp_path):
    # a process forked afterwards (a multiprocessing pool) must die on SIGTERM, or Pool.terminate hangs
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    run_train(demo_data, tmp_path, "--max_steps=2")
    assert {s: signal.getsignal(s) for s in before} == before
