"""rodin/train/checkpoint.py: atomic checkpoints; a partial one is never loaded."""

import os

import pytest
import torch

from rodin.config import MODELS
from rodin.model import LLaMA
from rodin.train import checkpoint
from rodin.train.optim import make_optimizer


def trained_pair(tied=True):
    torch.manual_seed(0)
    model = LLaMA(MODELS["test"].__class__(**{**MODELS["test"].__dict__, "tie_embeddings": tied}))
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    _, loss = model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))
    loss.backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("tied", [True, False])
def test_model_optimizer_and_rng_come_back_exactly(tmp_path, tied):
    model, optimizer = trained_pair(tied)
    rng_before = torch.get_rng_state()
    path = checkpoint.save(tmp_path, 5, model, optimizer, {"tokens_seen": 10}, keep=2)
    expected_next_random = torch.rand(3)
    fresh = LLaMA(model.cfg)
    fresh_opt = make_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95))
    meta = checkpoint.load(path, fresh, fresh_opt)
    assert meta["step"] == 5 and meta["tokens_seen"] == 10
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert (fresh.output.weight.data_ptr() == fresh.tok_embeddings.weight.data_ptr()) == tied
    for p, q in zip(model.parameters(), fresh.parameters()):
        a, b = optimizer.state[p], fresh_opt.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.rand(3), expected_next_random)
    assert not torch.equal(rng_before, torch.get_rng_state())


def test_only_the_newest_k_checkpoints_are_kept(tmp_path):
    model, optimizer = trained_pair()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model, optimizer, {}, keep=2)
    assert [os.path.basename(p) for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]


def test_partial_and_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path):
    model, optimizer = trained_pair()
    good = checkpoint.save(tmp_path, 1, model, optimizer, {}, keep=3)
    corrupt = checkpoint.save(tmp_path, 2, model, optimizer, {}, keep=3)
    with open(os.path.join(corrupt, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    os.makedirs(os.path.join(checkpoint.checkpoint_root(tmp_path), "step-0000003.tmp"))
    with pytest.warns(UserWarning) as caught:
        assert checkpoint.latest(tmp_path) == good
    messages = " ".join(str(w.message) for w in caught)
    assert "step-0000003.tmp" in messages and "step-0000002" in messages and "wrong size" in messages


def fill_disk(monkeypatch, after_files=0, forever=True):
    """Patch the checkpoint writer: past `after_files` files it writes half a file and raises
    OSError(ENOSPC), every time (forever) or once."""
    import errno

    real, calls = checkpoint.save_file, []

    def writer(tensors, path):
        calls.append(path)
        if len(calls) > after_files and (forever or len(calls) == after_files + 1):
            real(tensors, path)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", writer)


def names(run_dir):
    return sorted(os.listdir(checkpoint.checkpoint_root(run_dir)))


def test_a_disk_full_during_a_save_prunes_early_and_the_run_continues(tmp_path, monkeypatch):
    model, optimizer = trained_pair()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, optimizer, {}, keep=2)
    fill_disk(monkeypatch, forever=False)
    with pytest.warns(UserWarning, match=r"disk full writing step 3; removed step-0000001 .*trying again"):
        path = checkpoint.save(tmp_path, 3, model, optimizer, {}, keep=2)
    assert names(tmp_path) == ["step-0000002", "step-0000003"] and checkpoint.latest(tmp_path) == path


def test_a_disk_that_stays_full_stops_with_one_line_and_the_latest_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer = trained_pair()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, optimizer, {}, keep=2)
    with open(os.path.join(checkpoint.checkpoint_root(tmp_path), "step-0000002", "model.safetensors"), "rb") as f:
        before = f.read()
    fill_disk(monkeypatch, after_files=1)
    with pytest.warns(UserWarning, match="trying again"), pytest.raises(ValueError) as stop:
        checkpoint.save(tmp_path, 3, model, optimizer, {}, keep=2)
    assert len(str(stop.value).splitlines()) == 1
    assert "disk full, checkpoint step 3 not written" in str(stop.value) and "step-0000002, is intact" in str(stop.value)
    assert names(tmp_path) == ["step-0000002"]  # no step-0000003.tmp left behind
    assert checkpoint.latest(tmp_path).endswith("step-0000002")
    with open(os.path.join(checkpoint.latest(tmp_path), "model.safetensors"), "rb") as f:
        assert f.read() == before


def test_a_run_whose_disk_fills_once_goes_on_and_ends_as_an_uninterrupted_run(demo_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import train

    def run(out_dir):
        argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                f"--out_dir={out_dir}", "--name=run", "--max_steps=8", "--ckpt_every=2", "--eval_every=100"]
        assert train.main(argv) == 0
        return checkpoint.latest(out_dir / "run")

    straight = run(tmp_path / "straight")
    fill_disk(monkeypatch, after_files=7, forever=False)  # the third checkpoint (step 6) hits a full disk once
    with pytest.warns(UserWarning, match="disk full writing step 6; removed step-0000002"):
        full = run(tmp_path / "full")
    assert names(tmp_path / "full" / "run") == ["step-0000006", "step-0000008"]
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (straight, full))
    assert all(a[k].equal(b[k]) for k in a)


def test_a_global_batch_the_new_topology_cannot_split_is_refused_with_the_process_counts_that_can(monkeypatch):
    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint.dist, "get_world_size", lambda: 3)
    meta = {"world_size": 2, "global_batch": 4, "config": {"micro_batch_size": 2, "grad_accum_steps": 1}}
    with pytest.raises(ValueError, match=r"step-0000008: its global batch of 4 sequences cannot be split over 3 processes; "
                                         r"resume on a number of processes that divides it \(1, 2, 4, ...\)"):
        checkpoint.check_world_size("step-0000008", meta, 3, new_run="--init_from=step-0000008 --init_optimizer=false")


def train_with_rank_1_disk_full_once(rank, port, argv, out):
    """One rank of a 2-process gloo group: rank 1's disk is full for its third checkpoint file."""
    import errno
    import json
    import warnings

    import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    real, calls = checkpoint.save_file, []

    def writer(tensors, path):
        calls.append(path)
        if rank == 1 and len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(tensors, path)

    checkpoint.save_file = writer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = train.main(argv)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"code": code, "warnings": [str(w.message) for w in caught if "disk full" in str(w.message)]}, f)


def test_under_torchrun_a_disk_full_on_one_rank_is_met_by_all_and_the_run_goes_on(demo_data, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}",
            "--name=run", "--micro_batch_size=2", "--max_steps=6", "--ckpt_every=2", "--eval_every=100"]
    mp.spawn(train_with_rank_1_disk_full_once, args=(port, argv, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in results] == [0, 0]
    assert all(len(r["warnings"]) == 1 and "disk full writing step 6; removed step-0000002" in r["warnings"][0] for r in results)
    assert names(tmp_path / "run") == ["step-0000004", "step-0000006"]
    assert checkpoint.is_dcp(checkpoint.latest(tmp_path / "run"))


def test_a_disk_full_inside_torch_distributed_checkpoint_is_recognised_on_every_rank():
    import errno

    from torch.distributed.checkpoint import CheckpointException

    full = CheckpointException("save failed", {1: (OSError(errno.ENOSPC, "No space left on device"), None)})
    other = CheckpointException("save failed", {1: (RuntimeError("bug"), None)})
    assert checkpoint.is_disk_full(full) and not checkpoint.is_disk_full(other)
