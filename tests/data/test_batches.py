"""rodin/data/batches.py: shuffled windows whose order is restored from a two-integer cursor."""

import json

import numpy as np
import pytest
import torch

from rodin.data.batches import TrainBatches, Windows, eval_batches, held_out_sets
from rodin.data.shards import ShardWriter


@pytest.fixture
def windows(tmp_path):
    paths = []
    for i, n in enumerate((1000, 513)):
        path = tmp_path / f"train-{i}.bin"
        with ShardWriter(path, 65536, "0123456789abcdef") as w:
            w.write(np.arange(n) + 10000 * i)
        paths.append(path)
    return Windows(paths, seq_len=16)


def test_windows_are_inputs_and_targets_shifted_by_one_within_a_shard(windows):
    assert len(windows) == 999 // 16 + 512 // 16
    x, y = windows.get([0, len(windows) - 1])
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[0], torch.arange(1, 17))
    assert x[1, 0] == 10000 + 31 * 16  # the last window of the second shard


def test_an_epoch_visits_every_window_once(windows):
    batches = TrainBatches(windows, batch_size=5, seed=1)
    seen = [int(x[i, 0]) for _ in range(len(windows) // 5) for x, _ in [batches.next()] for i in range(5)]
    assert len(set(seen)) == len(seen) == (len(windows) // 5) * 5


def test_restoring_the_cursor_continues_with_the_same_batches(windows):
    straight = TrainBatches(windows, batch_size=4, seed=7)
    expected = [straight.next()[0] for _ in range(30)]  # crosses an epoch boundary
    first = TrainBatches(windows, batch_size=4, seed=7)
    got = [first.next()[0] for _ in range(11)]
    resumed = TrainBatches(windows, batch_size=4, seed=0)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next()[0] for _ in range(19)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_ranks_split_the_global_batch_of_a_single_process(windows):
    single = TrainBatches(windows, batch_size=6, seed=3)
    ranks = [TrainBatches(windows, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        assert torch.equal(single.next()[0], torch.cat([r.next()[0] for r in ranks]))


def test_a_cursor_for_other_data_is_refused(windows):
    state = TrainBatches(windows, batch_size=4, seed=1).state_dict()
    state["n_windows"] += 1
    with pytest.raises(ValueError, match="same data and seq_len"):
        TrainBatches(windows, batch_size=4, seed=1).load_state_dict(state)


def test_evaluation_batches_are_the_same_every_time(windows):
    a = [x for x, _ in eval_batches(windows, 8, 3)]
    b = [x for x, _ in eval_batches(windows, 8, 3)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b))


def write_index(shard_path, ranges):
    with open(str(shard_path)[: -len(".bin")] + ".idx.json", "w") as f:
        json.dump({"shard": shard_path.name, "ranges": ranges}, f)


def test_held_out_windows_are_split_by_the_source_of_their_first_token(windows, tmp_path):
    assert held_out_sets(windows, 4) == {"": (windows, 4)}  # no index beside the shards: one held-out set
    write_index(tmp_path / "train-0.bin", [[0, 500, "wiki"], [500, 1000, "books"]])
    write_index(tmp_path / "train-1.bin", [[0, 513, "wiki"]])
    sources = windows.sources()
    # shard 0: windows 0..31 start at 0, 16, ..., 496 (wiki), 32..61 at 512.. (books); shard 1: all wiki
    assert sorted(sources) == ["books", "wiki"]
    assert list(sources["books"]) == list(range(32, 62))
    assert list(sources["wiki"]) == list(range(0, 32)) + list(range(62, len(windows)))
    sets = held_out_sets(windows, 4)
    books, n_batches = sets["books"]
    assert n_batches == 2 and len(books) == 30
    x, _ = books.get([0])
    assert x[0, 0] == 512  # the first books window of shard 0
    with open(tmp_path / "train-1.idx.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="train-1.idx.json: not a shard index"):
        windows.sources()
