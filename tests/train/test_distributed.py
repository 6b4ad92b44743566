"""train.py under torchrun (2 processes, gloo, FSDP2): the losses of one process, exact resume
from a distributed checkpoint, a stop on SIGTERM that all ranks agree on, and a model built
sharded from the start with the initial weights of one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT

import train
from rodin.config import MODELS, parse_args
from rodin.model import LLaMA
from rodin.train import checkpoint, distributed
from rodin.train.optim import make_optimizer, optimizer_for


def common(demo_data, out_dir, name):
    return ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out_dir}", f"--name={name}"]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(ROOT, "train.py"), *args]


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r[k] for r in map(json.loads, f) for k in ("loss", "val_loss") if k in r]


def test_fsdp_on_two_processes_interrupted_and_resumed_gives_the_losses_of_one_process(demo_data, tmp_path, capsys):
    # the same global batch of 4 sequences: 2 ranks x 2, or 1 process x 4
    args = ["--max_steps=8", "--eval_every=4", "--ckpt_every=100", "--micro_batch_size=2"]
    for stop in ("--stop_at_step=3", "--stop_at_step=0"):
        done = subprocess.run(torchrun(*common(demo_data, tmp_path, "fsdp"), *args, stop), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from" in done.stdout and "(FSDP2)" in done.stdout
    sharded = tmp_path / "fsdp"
    assert checkpoint.is_dcp(checkpoint.latest(sharded))

    assert train.main(common(demo_data, tmp_path, "single") + ["--max_steps=8", "--eval_every=4"]) == 0
    assert losses(sharded) == pytest.approx(losses(tmp_path / "single"), rel=1e-5)

    # a new phase reshards the distributed checkpoint into one process: it starts where FSDP ended
    assert train.main(common(demo_data, tmp_path, "phase") + ["--max_steps=1", f"--init_from={sharded}"]) == 0
    assert losses(tmp_path / "phase")[0] == pytest.approx(losses(sharded)[-1], rel=1e-5)

    # another world size resumes the same run if the global batch stays 4 sequences (DCP reshards)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) with a global batch of 4 sequences"):
        train.main(common(demo_data, tmp_path, "fsdp") + ["--max_steps=10", "--micro_batch_size=2"])
    capsys.readouterr()
    assert train.main(common(demo_data, tmp_path, "fsdp") + ["--max_steps=10", "--eval_every=4"]) == 0
    assert "resharded from 2 to 1 process(es)" in capsys.readouterr().out
    assert train.main(common(demo_data, tmp_path, "single") + ["--max_steps=10", "--eval_every=4"]) == 0
    assert losses(sharded) == pytest.approx(losses(tmp_path / "single"), rel=1e-5)


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def worker_of_rank(torchrun_pid, rank):
    for child in children(torchrun_pid):
        with open(f"/proc/{child}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return child
    raise AssertionError(f"no worker of rank {rank} under {torchrun_pid}")


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step_with_a_checkpoint_and_exit_0(demo_data, tmp_path):
    cmd = torchrun(*common(demo_data, tmp_path, "run"), "--max_steps=100000", "--ckpt_every=100000",
                   "--eval_every=100000", "--micro_batch_size=2",
                   "--activation_checkpointing=ops", "--loss_chunk=40")  # and the memory savers work under FSDP
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_path = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics_path.exists() or len(metrics_path.read_text().splitlines()) < 4):
        time.sleep(0.2)
    os.kill(worker_of_rank(proc.pid, 1), signal.SIGTERM)  # a spot notice that reached one process only
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "stop on another rank: checkpoint written" in out  # rank 0 agreed with rank 1
    latest = checkpoint.latest(tmp_path / "run")
    meta = checkpoint.read_meta(latest)
    assert 3 <= meta["step"] < 100000 and meta["world_size"] == 2
    assert sorted(n for n in os.listdir(latest) if n.startswith("rng-")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    model = LLaMA(MODELS["test"])
    before = model.layers[0].attention.wq.weight.clone()
    checkpoint.load(latest, model, make_optimizer(model, 1e-3, 0.1, (0.9, 0.95)), restore_rng_state=False)
    assert not model.layers[0].attention.wq.weight.equal(before)  # the trained weights, gathered from both shards


def build_on_two_ranks(rank, port, out_dir):
    """One rank of a 2-process gloo group: build the test model with distributed.build_model and
    write what this rank saw into out_dir/rank{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    built_on = []  # the device of every LLaMA this process constructs
    llama_init = LLaMA.__init__

    def recording_init(self, cfg):
        llama_init(self, cfg)
        built_on.append(self.tok_embeddings.weight.device.type)

    LLaMA.__init__ = recording_init
    cfg = parse_args(["--preset=test"])
    device = distributed.setup("cpu")
    model = distributed.build_model(cfg, device)
    seen = {
        "built_on": list(built_on),
        "local_shapes": {n: tuple(p.to_local().shape) for n, p in model.named_parameters()},
        "weights": {n: p.full_tensor() for n, p in model.named_parameters()},  # gathered here, for the comparison
        "rope": (model.rope_cos.clone(), model.rope_sin.clone()),
        "tied": model.output.weight is model.tok_embeddings.weight,
    }
    with torch.no_grad():
        seen["logits"] = model(torch.arange(32).reshape(2, 16) % cfg.model.vocab_size)[0]
    built_on.clear()
    distributed.build_model(cfg, device, init_weights=False)  # a checkpoint is loaded next: nothing to draw
    seen["built_on_for_a_checkpoint"] = built_on
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.teardown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_only_rank_0_builds_the_whole_model_and_every_rank_starts_from_one_process_weights(tmp_path):
    mp.spawn(build_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    cfg = parse_args(["--preset=test"])
    torch.manual_seed(cfg.seed)
    single = LLaMA(cfg.model)  # what `python train.py --preset=test` starts from
    with torch.no_grad():
        single_logits, _ = single(torch.arange(32).reshape(2, 16) % cfg.model.vocab_size)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # rank 1 only ever had the model on the meta device; rank 0 also drew the initial weights on the CPU
    assert ranks[0]["built_on"] == ["meta", "cpu"] and ranks[1]["built_on"] == ["meta"]
    assert ranks[0]["built_on_for_a_checkpoint"] == ranks[1]["built_on_for_a_checkpoint"] == ["meta"]
    for seen in ranks:
        for name, p in single.named_parameters():
            assert seen["local_shapes"][name][0] == p.shape[0] // 2, name  # each rank holds half of every matrix
            assert seen["weights"][name].equal(p), name
        assert seen["rope"][0].equal(single.rope_cos) and seen["rope"][1].equal(single.rope_sin)
        assert seen["tied"]
        torch.testing.assert_close(seen["logits"], single_logits, rtol=1e-5, atol=1e-5)


def test_muon_under_torchrun_interrupted_and_resumed_gives_the_losses_of_one_process(demo_data, tmp_path, capsys):
    args = ["--max_steps=6", "--eval_every=3", "--ckpt_every=100", "--optimizer=muon"]
    for stop in ("--stop_at_step=3", "--stop_at_step=0"):
        done = subprocess.run(torchrun(*common(demo_data, tmp_path, "fsdp"), *args, "--micro_batch_size=2", stop),
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from" in done.stdout
    assert train.main(common(demo_data, tmp_path, "single") + args) == 0
    # float tolerance: Newton–Schulz runs in bf16, where the last bits of the reduction can flip a rounding
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)

    # the distributed checkpoint holds Muon's momentum for every block matrix, as one process's does
    sharded, single = checkpoint.latest(tmp_path / "fsdp"), checkpoint.latest(tmp_path / "single")
    assert checkpoint.is_dcp(sharded) and not checkpoint.is_dcp(single)
    cfg = parse_args(["--preset=test", "--optimizer=muon"])
    states = []
    for path in (sharded, single):
        model = LLaMA(cfg.model)
        optimizer = optimizer_for(model, cfg)
        checkpoint.load(path, model, optimizer, restore_rng_state=False)
        states.append(optimizer.state_dict()["state"])
    assert states[0].keys() == states[1].keys()
    momenta = [{i: s["momentum_buffer"] for i, s in state.items() if "momentum_buffer" in s} for state in states]
    assert len(momenta[0]) == cfg.model.n_layers * 7
    for i, m in momenta[1].items():
        assert (momenta[0][i] - m).norm() < 0.02 * m.norm()
    # and the run continues on one process (DCP reshards the momentum)
    capsys.readouterr()
    assert train.main(common(demo_data, tmp_path, "fsdp") + ["--max_steps=8", "--eval_every=4", "--optimizer=muon"]) == 0
    assert "resharded from 2 to 1 process(es)" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "normuon"])
def test_a_run_moves_from_one_process_to_two_ranks_and_back_with_the_losses_of_one_process(demo_data, tmp_path, optimizer):
    """1 process -> 2 gloo ranks (restored from the mirror on a fresh disk) -> 1 process, the global
    batch kept at 4 sequences: the losses of an uninterrupted single-process run. NorMuon's second
    moment is resharded with Muon's momentum: its rows split as the matrix's, a wide matrix's columns whole."""
    import shutil

    mirror = tmp_path / "mirror"
    optimizer_args = ["--optimizer=muon", "--muon_normuon=true"] if optimizer == "normuon" else [f"--optimizer={optimizer}"]
    args = ["--max_steps=9", "--eval_every=3", "--ckpt_every=100", *optimizer_args, f"--mirror={mirror}"]
    assert train.main(common(demo_data, tmp_path, "moving") + args + ["--stop_at_step=3"]) == 0
    shutil.rmtree(tmp_path / "moving")  # the machine is gone; its checkpoint is in the mirror
    done = subprocess.run(torchrun(*common(demo_data, tmp_path, "moving"), *args, "--micro_batch_size=2", "--stop_at_step=6"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored" in done.stdout and "resharded from 1 to 2 process(es)" in done.stdout
    assert checkpoint.is_dcp(checkpoint.latest(tmp_path / "moving"))
    assert train.main(common(demo_data, tmp_path, "moving") + args) == 0
    assert train.main(common(demo_data, tmp_path, "straight") + args[:-1]) == 0
    # float tolerance where the two ranks' gradients are summed in another order (and, for Muon,
    # where that flips a rounding of its bf16 Newton–Schulz); steps and data are the same. The first
    # machine's metrics.jsonl came back from the mirror with its checkpoint: the whole curve is there
    moved, straight = losses(tmp_path / "moving"), losses(tmp_path / "straight")
    assert len(moved) == len(straight) == 9 + 4
    assert moved == pytest.approx(straight, rel=1e-5 if optimizer == "adamw" else 1e-4)


def train_on_two_ranks_with_rank_0_slowed(rank, port, argv, out_dir):
    """One rank of a 2-process gloo group running train.main(argv). Only rank 0's clock moves, 2
    minutes a step: checkpoints by the clock and the budget are rank 0's to decide, for both."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from rodin.train import budget, loop

    now = [0.0]
    real_step = loop.forward_backward

    def timed_step(*args, **kwargs):
        now[0] += 120.0 if rank == 0 else 0.0
        return real_step(*args, **kwargs)

    loop.clock = budget.clock = lambda: now[0]
    loop.forward_backward = timed_step
    code = train.main(argv)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"code": code, "clock": now[0]}, f)


def test_all_ranks_follow_rank_0_clock_for_checkpoints_and_budget_within_the_step_all_reduce(demo_data, tmp_path):
    # 2 GPUs x 2 minutes x 15 an hour = 1 a step; a checkpoint every 5 minutes; a cap of 7
    argv = common(demo_data, tmp_path, "run") + ["--micro_batch_size=2", "--max_steps=20", "--ckpt_every=1000",
                                                 "--ckpt_every_minutes=5", "--keep_checkpoints=5",
                                                 "--price_per_hour=15", "--max_cost=7"]
    ranks = mp.spawn(train_on_two_ranks_with_rank_0_slowed, args=(free_port(), argv, str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 120
    while not ranks.join(timeout=5):  # ranks that disagreed would wait on each other's collectives forever
        if time.time() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the ranks did not stop together (a collective one of them never joined)")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in results] == [0, 0] and results[1]["clock"] == 0.0  # rank 1 never saw time pass
    run_dir = tmp_path / "run"
    # by the clock after steps 3 and 6 (6 minutes each time), and at the cap after step 7, on both ranks (DCP)
    assert [checkpoint.step_of(p) for p in checkpoint.complete_checkpoints(run_dir)] == [3, 6, 7]
    meta = checkpoint.read_meta(checkpoint.latest(run_dir))
    assert meta["world_size"] == 2 and meta["budget"]["cost"] == pytest.approx(7.0)
