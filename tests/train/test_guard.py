"""rodin/train/guard.py: a step that is not finite is not applied, a loss spike is rolled back past
its data, and a run that keeps diverging stops in one line, exactly resumable, never leaving a
checkpoint with non-finite weights.

Trouble is provoked through a test hook the product does not have: batches at chosen data
positions are poisoned (their loss and gradients multiplied, or made NaN), so the same data makes
the same trouble in any process, and skipping past it ends it. Divergence is also provoked honestly,
with a learning rate far too high."""

import glob
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import train
from rodin.config import parse_args
from rodin.data.batches import TrainBatches
from rodin.spot.supervise import supervise
from rodin.train import checkpoint, loop
from rodin.train.guard import DIVERGED, MARKER, Guard

GUARDED = ["--spike_window=20", "--max_skipped=2", "--ckpt_every=4", "--log_every=1", "--eval_every=100"]


def guard(**options):
    return Guard(parse_args(["--preset=test", *(f"--{k}={v}" for k, v in options.items())]))


# ---- the rules -------------------------------------------------------------------------------


def test_a_spike_is_three_steps_in_a_row_above_three_times_the_median():
    g = guard()
    assert [g.judge(s, 5.0, True) for s in range(1, 11)] == ["ok"] * 10  # the history a median needs
    assert g.judge(11, 16.0, True) == "ok" and g.judge(12, 4.0, True) == "ok"  # one high step is noise
    assert [g.judge(s, 20.0, True) for s in (13, 14, 15)] == ["ok", "ok", "rollback"]
    assert g.trouble_since == 13 and not g.may_checkpoint()  # the first step of the streak
    assert list(g.losses).count(20.0) == 0  # spiking losses do not move the median


def test_non_finite_steps_are_skipped_and_too_many_in_the_window_roll_back():
    g = guard(spike_window=10, max_skipped=2)
    assert [g.judge(s, 5.0, True) for s in range(1, 4)] == ["ok"] * 3
    assert [g.judge(s, float("nan"), False) for s in (4, 5)] == ["skip", "skip"]
    assert g.may_checkpoint()  # a skipped step left the weights as they were
    assert g.judge(20, 5.0, True) == "ok" and g.trouble_since is None and not g.bad_steps  # the window forgot them
    assert [g.judge(s, 0.0, False) for s in (21, 22, 23)] == ["skip", "skip", "rollback"] and g.skipped == 5
    assert g.trouble_since == 21  # the first of the bad steps in the window


def test_a_rollback_keeps_its_counters_takes_the_checkpoints_history_and_lowers_the_lr_until_the_spike():
    g = guard(max_rollbacks=2)
    saved = guard().state_dict()
    saved["losses"] = [4.0] * 12
    record = g.rolled_back(50, 40, saved, 30.0, 40)
    assert record["from_step"] == 50 and record["to_step"] == 40 and record["skipped_sequences"] == 40
    assert list(g.losses) == [4.0] * 12 and g.unrecovered == 1 and not g.diverged()
    assert g.lr_factor(45) == 0.5 and g.lr_factor(50) == 1.0
    assert [g.judge(s, 4.0, True) for s in range(41, 151)][-1] == "ok" and g.unrecovered == 0  # recovered
    g.rolled_back(160, 150, saved, 30.0, 40)
    g.rolled_back(160, 150, saved, 30.0, 40)
    assert g.diverged() and "diverged: 3 rollbacks, the last 2 without recovery" in g.advice(150)
    restored = Guard(g.cfg, json.loads(json.dumps(g.state_dict())))
    assert restored.state_dict() == g.state_dict()


# ---- in a run ----------------------------------------------------------------------------------


def poisoned(positions, how):
    """TrainBatches.next and loop.forward_backward (wrapping the current ones) such that batches drawn
    at these data positions (epoch, index) are poisoned: `how` is "nan" (loss and gradients not
    finite) or a factor on both; and the list of the poisoned losses, in order."""
    hit, calls = [False], []
    real_next, real_step = TrainBatches.next, loop.forward_backward

    def next_batch(self):
        hit[0] = hit[0] or (self.epoch, self.index) in positions
        return real_next(self)

    def step(model, *args, **kwargs):
        loss, norm = real_step(model, *args, **kwargs)
        if hit[0]:
            hit[0] = False
            factor = float("nan") if how == "nan" else how
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
            calls.append(float(loss))
            return loss * factor, norm * factor
        return loss, norm

    return next_batch, step, calls


def poison(monkeypatch, positions, how):
    next_batch, step, calls = poisoned(positions, how)
    monkeypatch.setattr(TrainBatches, "next", next_batch)
    monkeypatch.setattr(loop, "forward_backward", step)
    return calls


def run(demo_data, out_dir, *args):
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out_dir}", "--name=run", *GUARDED, *args]
    return train.main(argv)


def records(out_dir):
    with open(os.path.join(out_dir, "run", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(out_dir):
    return load_file(os.path.join(checkpoint.latest(os.path.join(out_dir, "run")), "model.safetensors"))


def every_checkpoint_is_finite(out_dir):
    paths = glob.glob(os.path.join(out_dir, "run", "checkpoints", "step-*", "*.safetensors"))
    assert paths
    for path in paths:
        assert all(bool(torch.isfinite(t).all()) for t in load_file(path).values()), path


def position(step, micro_batch=4):
    """The data position of the batch of a step (counted from 1) in the first epoch."""
    return (0, (step - 1) * micro_batch)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_non_finite_step_updates_nothing_and_the_run_goes_on(demo_data, tmp_path, monkeypatch, optimizer):
    calls = poison(monkeypatch, {position(7)}, "nan")
    seen = {}
    real_step = loop.forward_backward

    def watching(model, *args, **kwargs):  # the weights before steps 7 and 8: the same
        n = len(seen) + 1
        seen[n] = [p.detach().clone() for p in model.parameters()]
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", watching)
    assert run(demo_data, tmp_path, f"--optimizer={optimizer}", "--max_steps=12") == 0
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(seen[7], seen[8]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[6], seen[7]))
    rows = records(tmp_path)
    assert rows[-1]["step"] == 12 and rows[-1]["skipped_steps"] == 1 and all(r.get("loss", 0) < 10 for r in rows)
    assert [r["step"] for r in rows if r.get("skipped")] == [7]
    if optimizer == "adamw":  # AdamW counted 11 steps, not 12: its state never saw the skipped one
        state = load_file(os.path.join(checkpoint.latest(tmp_path / "run"), "optimizer.safetensors"))
        assert {float(v) for k, v in state.items() if k.endswith(".step")} == {11.0}
    every_checkpoint_is_finite(tmp_path)


def test_a_spike_rolls_back_past_its_data_and_the_run_recovers(demo_data, tmp_path, monkeypatch, webhook):
    url, events = webhook
    calls = poison(monkeypatch, {position(s) for s in (12, 13, 14)}, 20.0)  # past the 10 losses a median needs
    assert run(demo_data, tmp_path, "--max_steps=20", f"--notify={url}") == 0
    assert len(calls) == 3  # the poisoned batches were met once: the cursor moved past them
    rows = records(tmp_path)
    back = [r["rollback"] for r in rows if "rollback" in r]
    assert len(back) == 1 and back[0]["from_step"] == 14 and back[0]["to_step"] == 8  # no checkpoint at 12: a spike
    assert back[0]["skipped_sequences"] == 6 * 4 and back[0]["trouble_since"] == 12
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))  # 9-14 trained again, on fresh data
    assert all(r["loss"] < 10 for r in rows if "loss" in r)  # the spike's losses are gone from the record
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[10] == pytest.approx(0.5 * loop.lr_at(9, 1e-2, 1e-3, 2, 20, "cosine", 0))  # halved until step 14
    assert lrs[15] == pytest.approx(loop.lr_at(14, 1e-2, 1e-3, 2, 20, "cosine", 0))
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["from_step"] == 14 and rollback["to_step"] == 8 and rollback["skipped_sequences"] == 24
    assert events[-1]["event"] == "finish"
    every_checkpoint_is_finite(tmp_path)


def test_a_rolled_back_run_stopped_at_the_rollback_and_relaunched_ends_as_the_uninterrupted_one(
        demo_data, tmp_path, monkeypatch):
    spiking = {position(s) for s in (12, 13, 14)}
    poison(monkeypatch, spiking, 20.0)
    assert run(demo_data, tmp_path / "a", "--max_steps=20") == 0
    monkeypatch.undo()

    calls = poison(monkeypatch, spiking, 20.0)
    real_roll_back = loop.roll_back

    def roll_back_then_sigterm(*args, **kwargs):  # a preemption in the very step that rolls back
        os.kill(os.getpid(), signal.SIGTERM)
        return real_roll_back(*args, **kwargs)

    monkeypatch.setattr(loop, "roll_back", roll_back_then_sigterm)
    assert run(demo_data, tmp_path / "b", "--max_steps=20") == 0
    # the signal is seen at the next step: it checkpoints step 9, the rollback and the cursor past the spike in it
    stopped_at = checkpoint.latest(tmp_path / "b" / "run")
    assert checkpoint.step_of(stopped_at) == 9 and len(checkpoint.read_meta(stopped_at)["guard"]["rollbacks"]) == 1
    monkeypatch.setattr(loop, "roll_back", real_roll_back)
    assert run(demo_data, tmp_path / "b", "--max_steps=20") == 0
    assert len(calls) == 3  # the relaunch did not meet the poisoned batches again
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["step"], r["loss"]) for r in records(tmp_path / d) if "loss" in r] for d in ("a", "b")]
    assert losses[0] == losses[1]


def test_a_run_that_keeps_diverging_stops_in_one_line_and_is_not_relaunched(demo_data, tmp_path, capsys, webhook):
    url, events = webhook
    high = ["--lr=30", "--min_lr=30", "--warmup_steps=0", "--grad_clip=0", "--max_rollbacks=2", "--max_steps=60",
            f"--notify={url}"]
    assert run(demo_data, tmp_path, *high) == DIVERGED
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("diverged: 2 rollbacks, the last 2 without recovery") and "Lower --lr (now 30)" in out[-1]
    assert [e["event"] for e in events].count("rollback") == 2 and events[-1]["event"] == "diverged"
    every_checkpoint_is_finite(tmp_path)
    assert os.path.exists(tmp_path / "run" / MARKER)
    # the same command again trains nothing; the supervisor does not relaunch it
    step = checkpoint.step_of(checkpoint.latest(tmp_path / "run"))
    assert run(demo_data, tmp_path, *high) == DIVERGED
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "run")) == step
    launches = []
    code = supervise(["true"], str(tmp_path / "run"), log=launches.append)
    assert code == DIVERGED and "not relaunching" in launches[-1] and "diverged: 2 rollbacks" in launches[-1]
    # other options go on from the newest checkpoint
    assert run(demo_data, tmp_path, "--max_steps=60", "--lr=1e-2") == 0
    assert not os.path.exists(tmp_path / "run" / MARKER)
    every_checkpoint_is_finite(tmp_path)


def guarded_rank(rank, port, argv, out_dir, own_disks=False):
    """One rank of a 2-process gloo group: rank 1's batch of step 7 is not finite, rank 0's batches
    of steps 12-14 spike. own_disks: each rank a node of its own with its run in out_dir/node<rank>."""
    local_rank = "0" if own_disks else str(rank)
    if own_disks:
        argv = [*argv, f"--out_dir={os.path.join(out_dir, f'node{rank}')}"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=local_rank)
    torch.set_num_threads(1)
    positions, how = ({position(7)}, "nan") if rank == 1 else ({position(s) for s in (12, 13, 14)}, 20.0)
    TrainBatches.next, loop.forward_backward, _ = poisoned(positions, how)
    code = train.main(argv)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"code": code}, f)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_under_torchrun_trouble_on_one_rank_is_met_by_all_as_one_process_meets_it(demo_data, tmp_path, monkeypatch,
                                                                                  optimizer):
    import torch.multiprocessing as mp
    from test_distributed import free_port

    args = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}", "--name=run",
            *GUARDED, f"--optimizer={optimizer}", "--max_steps=20"]
    mp.spawn(guarded_rank, args=(free_port(), [*args, f"--out_dir={tmp_path / 'two'}", "--micro_batch_size=2"],
                                 str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["code"] for r in range(2)] == [0, 0]
    poison(monkeypatch, {position(7)}, "nan")
    poison(monkeypatch, {position(s) for s in (12, 13, 14)}, 20.0)  # on top of the first
    assert train.main([*args, f"--out_dir={tmp_path / 'one'}"]) == 0
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["rollback"]["from_step"] for r in two if "rollback" in r] == [14]
    assert [r["step"] for r in two if r.get("skipped")] == [7], two
    assert [r["step"] for r in one if r.get("skipped")] == [7], one
    assert [r["rollback"]["to_step"] for r in two if "rollback" in r] == [r["rollback"]["to_step"] for r in one if "rollback" in r]
    after = [[r["loss"] for r in rows if "loss" in r] for rows in (two, one)]
    assert after[0] == pytest.approx(after[1], rel=1e-4)
    for path in checkpoint.complete_checkpoints(tmp_path / "two" / "run"):  # distributed checkpoints, all finite
        checkpoint.load_model(path)


def test_a_rollback_on_nodes_with_their_own_disks_takes_its_checkpoint_whole_from_the_mirror(demo_data, tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    from test_distributed import free_port

    from rodin.spot.mirror import Mirror

    args = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}", "--name=run",
            *GUARDED, "--max_steps=20"]
    mp.spawn(guarded_rank, args=(free_port(), [*args, "--micro_batch_size=2", "--keep_checkpoints=9",
                                                       f"--mirror=file://{tmp_path / 'm'}"],
                                 str(tmp_path), True), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["code"] for r in range(2)] == [0, 0]
    poison(monkeypatch, {position(7)}, "nan")
    poison(monkeypatch, {position(s) for s in (12, 13, 14)}, 20.0)
    assert train.main([*args, f"--out_dir={tmp_path / 'one'}"]) == 0
    nodes, one = records(tmp_path / "node0"), records(tmp_path / "one")
    rollbacks = [(r["rollback"]["from_step"], r["rollback"]["to_step"]) for r in nodes if "rollback" in r]
    assert rollbacks == [(r["rollback"]["from_step"], r["rollback"]["to_step"]) for r in one if "rollback" in r] == [(14, 8)]
    after = [[r["loss"] for r in rows if "loss" in r] for rows in (nodes, one)]
    assert after[0] == pytest.approx(after[1], rel=1e-4)
    for node in ("node0", "node1"):  # each disk got the rollback's checkpoint whole; of the others its part
        held = checkpoint.complete_checkpoints(tmp_path / node / "run", parts=True)
        assert [os.path.basename(p) for p in held if checkpoint.is_whole(p)] == ["step-0000008"], held
    assert Mirror(str(tmp_path / "m")).complete()[-1] == "step-0000020"
