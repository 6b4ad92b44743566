"""rodin/spot/lifeline.py with several nodes, each with its own disk, and one mirror: two torchrun
"nodes" on this machine (c10d rendezvous on 127.0.0.1, one gloo process each, a run directory
each), killed together, restored on two empty nodes and on one process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

import train
from rodin.spot.mirror import Mirror
from rodin.train import checkpoint

STEPS = 24


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(demo_data, tmp_path, nodes, mirror, *args):
    """Two torchrun agents, one process each, as two machines: node k trains into tmp_path/<nodes[k]>."""
    port = free_port()
    procs = []
    for k, node in enumerate(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={nodes[0]}",
               os.path.join(ROOT, "train.py"), "--preset=test", f"--data_dir={demo_data['dir']}",
               f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path / node}", "--name=run",
               f"--mirror=file://{mirror}", "--micro_batch_size=2", f"--max_steps={STEPS}", "--ckpt_every=4",
               "--eval_every=12", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, env=dict(os.environ, PYTHONPATH=ROOT)))
    return procs


def kill(procs):
    """SIGKILL each torchrun agent and its workers (each worker in a session of its own)."""
    for p in procs:
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            workers = [int(c) for c in f.read().split()]
        for pid in workers:
            os.killpg(pid, signal.SIGKILL)
        os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def finish(procs, timeout=120):
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:  # a node that never met the other would wait for it forever
        kill([p for p in procs if p.poll() is None])
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    return outs


def rank_0_dir(tmp_path, nodes):
    """The run directory of the node c10d made rank 0 (the one holding metrics.jsonl)."""
    return next(tmp_path / n / "run" for n in nodes if (tmp_path / n / "run" / "metrics.jsonl").exists())


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r[k]) for r in map(json.loads, f) for k in ("loss", "val_loss") if k in r]


def test_two_nodes_with_their_own_disks_killed_continue_exactly_from_the_mirror_on_two_new_nodes_or_one(
        demo_data, tmp_path):
    straight = tmp_path / "mirror-straight"
    finish(launch_nodes(demo_data, tmp_path, ["a0", "a1"], straight))

    mirror = tmp_path / "mirror"
    procs = launch_nodes(demo_data, tmp_path, ["b0", "b1"], mirror)
    deadline = time.time() + 120
    while time.time() < deadline and not (mirror / "step-0000008" / "MANIFEST.json").exists():
        time.sleep(0.02)
    kill(procs)  # both machines reclaimed at once, their disks with them
    killed = time.time()
    shutil.copytree(mirror, tmp_path / "mirror-copy")  # for the one-process restore below
    newest = Mirror(f"file://{mirror}").complete()[-1]
    assert "step-0000008" <= newest < f"step-{STEPS:07d}"  # killed mid-run

    # each node uploaded only the files its rank wrote; the marker lists both parts
    manifest = json.loads((mirror / newest / "MANIFEST.json").read_text())
    parts = [json.loads((mirror / newest / "parts" / name).read_text()) for name in sorted(os.listdir(mirror / newest / "parts"))]
    assert len(parts) == 2 and set(parts[0]) | set(parts[1]) == set(manifest["files"])
    assert Mirror(f"file://{mirror}").complete()[-1] == newest  # nothing of the killed run lives on
    total = sum(f["size"] for f in manifest["files"].values())
    uploaded = [sum(f["size"] for f in part.values()) for part in parts]
    print(f"\ncheckpoint {newest}: {total} bytes; uploaded per node: {uploaded}")

    # two empty machines: each restores the whole checkpoint from the mirror and they go on
    procs = launch_nodes(demo_data, tmp_path, ["c0", "c1"], mirror)
    first_step = None
    while any(p.poll() is None for p in procs) and first_step is None:
        for n in ("c0", "c1"):
            path = tmp_path / n / "run" / "metrics.jsonl"
            if path.exists() and any(json.loads(line)["step"] > checkpoint.step_of(newest) for line in path.read_text().splitlines()
                                     if line.strip().endswith("}")):
                first_step = time.time()
        time.sleep(0.02)
    outs = finish(procs)
    assert any(f"restored {tmp_path}" in out and "from the mirror" in out for out in outs)
    print(f"kill to the first step on the fresh nodes: {first_step - killed:.1f} s")
    assert losses(rank_0_dir(tmp_path, ["c0", "c1"])) == losses(rank_0_dir(tmp_path, ["a0", "a1"]))
    for n in ("c0", "c1"):  # each disk holds its node's part of the newest checkpoints, the mirror the whole
        assert checkpoint.latest(tmp_path / n / "run") is None
        assert [os.path.basename(p) for p in checkpoint.complete_checkpoints(tmp_path / n / "run", parts=True)] == \
            ["step-0000020", f"step-{STEPS:07d}"]

    # the final checkpoints, whole in the mirrors, are the same to the bit
    a = Mirror(f"file://{straight}").restore_latest(tmp_path / "check-a")
    c = Mirror(f"file://{mirror}").restore_latest(tmp_path / "check-c")
    assert os.path.basename(a) == os.path.basename(c) == f"step-{STEPS:07d}"
    model_a, _, _ = checkpoint.load_model(a)
    model_c, _, _ = checkpoint.load_model(c)
    assert all(x.equal(y) for x, y in zip(model_a.state_dict().values(), model_c.state_dict().values()))

    # one process restores the two nodes' checkpoint (resharded) and ends where they did
    assert train.main(["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                       f"--out_dir={tmp_path / 'one'}", "--name=run", f"--mirror=file://{tmp_path / 'mirror-copy'}",
                       f"--max_steps={STEPS}", "--ckpt_every=4", "--eval_every=12"]) == 0
    one, two = losses(tmp_path / "one" / "run"), losses(rank_0_dir(tmp_path, ["a0", "a1"]))
    assert [s for s, _ in one] == [s for s, _ in two]
    assert [v for _, v in one] == pytest.approx([v for _, v in two], rel=1e-4)


def two_nodes(rank, scenarios, out):
    """One rank of a 2-process gloo group, each rank the first of its "node" (LOCAL_RANK=0), running
    train.main (or the scenario's own main, sft.main) on each scenario's argv for this rank in turn,
    under the scenario's fault if it names one (a function of the rank); what happened goes to
    out/<n>-rank<r>.txt: "exit CODE", a ValueError's line, or the traceback of anything else."""
    import traceback

    import torch

    torch.set_num_threads(1)
    for n, scenario in enumerate(scenarios):
        port, argvs, main, fault = (*scenario, None, None)[:4]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
        undo = fault(rank) if fault else None
        try:
            result = f"exit {(main or train.main)(argvs[rank])}"
        except ValueError as e:
            result = str(e)
        except Exception:
            result = traceback.format_exc()
        finally:
            if undo:
                undo()
        with open(os.path.join(out, f"{n}-rank{rank}.txt"), "w") as f:
            f.write(result)


def failing(method, ranks, error, rank):
    """A fault (with functools.partial, for two_nodes): the local filesystem's `method` raises
    `error` on these ranks; returns its undo."""
    from fsspec.implementations.local import LocalFileSystem

    real = getattr(LocalFileSystem, method)

    def fail(*args, **kwargs):
        raise error

    if rank in ranks:
        setattr(LocalFileSystem, method, fail)
    return lambda: setattr(LocalFileSystem, method, real)


def test_nodes_that_disagree_or_have_local_disks_without_a_mirror_are_refused_and_a_shared_run_directory_is_allowed(
        demo_data, tmp_path):
    import torch.multiprocessing as mp

    def argv(out_dir, *args):
        return ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                f"--out_dir={tmp_path / out_dir}", "--name=run", "--micro_batch_size=2", "--max_steps=2", *args]

    scenarios = [
        (free_port(), [argv("n0", f"--mirror={tmp_path / 'm'}"), argv("n1", f"--mirror={tmp_path / 'other'}")]),
        (free_port(), [argv("n0"), argv("n1")]),  # each node its own disk, and no mirror
        (free_port(), [argv("shared"), argv("shared")]),  # two nodes, one shared run directory
    ]
    mp.spawn(two_nodes, args=(scenarios, str(tmp_path)), nprocs=2)
    said = [[(tmp_path / f"{n}-rank{r}.txt").read_text() for r in range(2)] for n in range(len(scenarios))]
    assert said[0][0] == said[0][1] and said[0][0].startswith(f"--mirror: rank 1 was launched with '{tmp_path / 'other'}', "
                                                               f"rank 0 with '{tmp_path / 'm'}'; give every node the same command")
    assert said[1][0] == said[1][1] and said[1][0].startswith("--out_dir: the ranks [1] do not see rank 0's run "
                                                               "directory (each node its own disk), so no disk holds a "
                                                               "whole checkpoint: give --mirror=URL")
    assert not (tmp_path / "n0" / "run" / "checkpoints").exists()  # refused before the first step
    assert said[2] == ["exit 0", "exit 0"]
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "shared" / "run")) == 2  # one whole checkpoint


def test_a_mirror_that_cannot_be_listed_or_restored_from_on_one_node_stops_every_node_with_one_line_and_sft_writes_config_on_each(
        demo_data, tmp_path):
    import functools

    import torch.multiprocessing as mp

    import sft
    from conftest import littre_slice, make_run, write_jsonl

    def argv(node, *args):
        return ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                f"--out_dir={tmp_path / node}", "--name=run", "--micro_batch_size=2", "--max_steps=2",
                f"--mirror=file://{tmp_path / 'm'}", *args]

    base, _ = make_run(tmp_path / "base", demo_data["tokenizer"])
    rows = write_jsonl(tmp_path / "chat.jsonl", littre_slice(40))

    def sft_argv(node):
        return ["--preset=test", f"--init_from={base}", f"--data={rows}", f"--out_dir={tmp_path / node}", "--name=sft",
                "--seq_len=128", "--val_fraction=0.1", "--micro_batch_size=2", "--max_steps=2",
                f"--mirror=file://{tmp_path / 'sft-m'}"]

    scenarios = [
        (free_port(), [argv("n0"), argv("n1")]),  # a checkpoint on the mirror, each node its part on its disk
        (free_port(), [argv("f0"), argv("f1")], None, functools.partial(failing, "ls", {0, 1}, PermissionError("denied"))),
        (free_port(), [argv("g0"), argv("g1")], None, functools.partial(failing, "get_file", {1}, ConnectionError("reset"))),
        (free_port(), [sft_argv("s0"), sft_argv("s1")], sft.main),
    ]
    mp.spawn(two_nodes, args=(scenarios, str(tmp_path)), nprocs=2)
    said = [[(tmp_path / f"{n}-rank{r}.txt").read_text() for r in range(2)] for n in range(len(scenarios))]
    assert said[0] == ["exit 0", "exit 0"]
    # the listing fails on rank 0, which alone lists: both ranks say it, neither hangs
    assert said[1][0] == said[1][1] == (f"--mirror=file://{tmp_path / 'm'}: cannot list its checkpoints (PermissionError: "
                                        "denied) on rank 0; check the URL, its credentials and the network from every "
                                        "node, then relaunch the same command")
    # the download fails on rank 1 alone: rank 0, which restored, stops with rank 1's line
    assert said[2][0] == said[2][1] and said[2][0].startswith(f"--mirror=file://{tmp_path / 'm'}: cannot restore "
                                                              "step-0000002 (ConnectionError: reset) on rank 1;")
    assert not (tmp_path / "g1" / "run" / "checkpoints" / "step-0000002").exists()
    # SFT on nodes with their own disks: each disk has the run's config.json (rodin supervise reads it there)
    assert said[3] == ["exit 0", "exit 0"]
    for node in ("s0", "s1"):
        assert json.loads((tmp_path / node / "sft" / "config.json").read_text())["max_steps"] == 2
