"""Batches of token windows from shards, in an order that a checkpoint can restore exactly.

Each shard is cut into windows of seq_len + 1 tokens (input and shifted target). An epoch visits
every window once in the order of a permutation seeded by (seed, epoch); the cursor is
(epoch, index into that permutation), two integers: resuming never replays data to fast-forward.
With several ranks, a global batch is the next world_size * batch_size windows, rank r taking
the r-th slice, so the global batch is the same for any world size.
"""

import glob
import json
import os

import numpy as np
import torch

from rodin.data.shards import open_shard


def find_shards(data_dir, split):
    paths = sorted(glob.glob(os.path.join(data_dir, f"{split}*.bin")))
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no {split}*.bin shards; prepare data first (make data)")
    return paths


class Windows:
    """All windows of seq_len + 1 tokens of a list of shards, addressed by one global index."""

    def __init__(self, paths, seq_len, tokenizer_fingerprint=None):
        self.paths, self.seq_len = [str(p) for p in paths], seq_len
        self.shards = [open_shard(p, tokenizer_fingerprint)[1] for p in paths]
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.starts = np.cumsum([0] + counts)
        if self.starts[-1] == 0:
            raise ValueError(f"{paths[0]}: fewer than {seq_len + 1} tokens, too little data for seq_len={seq_len}")

    def __len__(self):
        return int(self.starts[-1])

    def get(self, indices):
        rows = []
        for i in indices:
            shard = int(np.searchsorted(self.starts, i, side="right") - 1)
            offset = (int(i) - int(self.starts[shard])) * self.seq_len
            rows.append(np.asarray(self.shards[shard][offset : offset + self.seq_len + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]


    def sources(self):
        """{source: indices of its windows}, each window counted for the source of its first token,
        from the <shard>.idx.json that data/encode.py writes beside each shard; {} if one is missing."""
        by_source = {}
        for shard, path in enumerate(self.paths):
            index = path[: -len(".bin")] + ".idx.json"
            if not os.path.exists(index):
                return {}
            try:
                with open(index, encoding="utf-8") as f:
                    ranges = json.load(f)["ranges"]
                range_starts = np.array([int(start) for start, _, _ in ranges])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a shard index of (start, end, source) ranges ({e})") from None
            first_tokens = np.arange(self.starts[shard + 1] - self.starts[shard]) * self.seq_len
            which = np.searchsorted(range_starts, first_tokens, side="right") - 1
            for k, (_, _, source) in enumerate(ranges):
                windows = np.nonzero(which == k)[0] + self.starts[shard]
                if len(windows):
                    by_source.setdefault(source, []).append(windows)
        return {source: np.concatenate(parts) for source, parts in by_source.items()}


class WindowSubset:
    """Some windows of a Windows, renumbered from 0 (e.g. the held-out windows of one source)."""

    def __init__(self, windows, indices):
        self.windows, self.indices, self.seq_len = windows, np.asarray(indices), windows.seq_len

    def __len__(self):
        return len(self.indices)

    def get(self, indices):
        return self.windows.get(self.indices[np.asarray(indices, dtype=np.int64)])


class TrainBatches:
    """Shuffled windows, epoch after epoch; state_dict() is the data cursor of a checkpoint."""

    def __init__(self, windows, batch_size, seed, rank=0, world_size=1):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if self.global_batch > len(windows):
            raise ValueError(f"a global batch of {self.global_batch} windows exceeds the {len(windows)} in the data")
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def order(self):
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows))
            self._order_epoch = self.epoch
        return self._order

    def next(self):
        if self.index + self.global_batch > len(self.windows):
            self.epoch, self.index = self.epoch + 1, 0  # drop the ragged tail of the epoch
        chosen = self.order()[self.index : self.index + self.global_batch]
        self.index += self.global_batch
        mine = chosen[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.windows.get(mine)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_windows": len(self.windows),
                "seq_len": self.windows.seq_len}

    def load_state_dict(self, state):
        if (state["n_windows"], state["seq_len"]) != (len(self.windows), self.windows.seq_len):
            raise ValueError(f"checkpoint data cursor is for {state['n_windows']} windows of {state['seq_len']} tokens, "
                             f"the data now has {len(self.windows)} of {self.windows.seq_len}: same data and seq_len needed to resume")
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]


def held_out_sets(windows, n_batches):
    """{name: (windows, n_batches)} to evaluate: one per source when the shards' index names several
    (each its share of n_batches, at least one), else {"": all of them}. The first windows in
    order would otherwise all come from whichever source was encoded first."""
    sources = windows.sources()
    if len(sources) < 2:
        return {"": (windows, n_batches)}
    share = max(1, n_batches // len(sources))
    return {name: (WindowSubset(windows, indices), share) for name, indices in sorted(sources.items())}


def eval_batches(windows, batch_size, n_batches, rank=0, world_size=1):
    """The first n_batches * batch_size * world_size windows in order: the same held-out tokens at
    every evaluation, whatever the world size. Rank r takes every world_size-th window from r."""
    n = min(len(windows), batch_size * n_batches * world_size) // world_size * world_size
    mine = range(rank, n, world_size)
    for start in range(0, len(mine), batch_size):
        yield windows.get(mine[start : start + batch_size])
