"""Exact and MinHash near-duplicate detection that does not hold the keys in RAM.

Frozen decisions:
- exact key: 64-bit hash of the text lower-cased with punctuation and whitespace runs folded;
- near key: MinHash of word 5-grams, 14 bands of 8 rows (FineWeb's 112 permutations: pairs
  above about 0.75 Jaccard similarity collide in some band), one 64-bit key per band;
- keys are written per input shard to disk, then spread over bucket files by key, and each
  bucket is sorted on its own: RAM holds one bucket plus a parent array (8 bytes a document);
- clusters are joined with union-find, the root being the smallest document id: the first
  document seen (in source order of the registry) is the one kept.
"""

import glob
import hashlib
import os
import re
import zlib

import numpy as np

_PUNCT = re.compile(r"[\W_]+", re.UNICODE)
KEY_DTYPE = np.dtype([("column", "<u2"), ("key", "<u8"), ("doc", "<u8")])


def normalise(text):
    return _PUNCT.sub(" ", text.lower()).strip()


def hash64(data):
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _mix(x):
    """splitmix64's finaliser: a non-linear 64-bit mix. The textbook (a*h + b) mod p family is not
    min-wise enough here: a document's smallest shingle hash won most permutations (measured:
    near copies agreeing on 6 % of them instead of 90 %)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class MinHasher:
    def __init__(self, bands=14, rows=8, ngram=5, seed=1):
        self.bands, self.rows, self.ngram = bands, rows, ngram
        # one "permutation" per seed: mix(shingle hash XOR seed)
        self.seeds = np.random.default_rng(seed).integers(0, 1 << 63, bands * rows, dtype=np.uint64)[:, None]

    def signature(self, normalised):
        words = normalised.split() or [""]
        n = min(self.ngram, len(words))
        word_hashes = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), np.uint64, len(words))
        shingles = np.zeros(len(words) - n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):  # a polynomial hash of the n word hashes, modulo 2^64
            for k in range(n):
                shingles = shingles * np.uint64(1_000_003) + word_hashes[k : len(words) - n + 1 + k]
        hashes = np.unique(shingles)
        signature = np.full(self.bands * self.rows, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(hashes), 8192):  # bounded memory on book-length documents
            block = _mix(hashes[None, start : start + 8192] ^ self.seeds)
            np.minimum(signature, block.min(axis=1), out=signature)
        return signature

    def keys(self, text):
        """[exact key, band 1 key, ..., band B key] of a document, as uint64."""
        normalised = normalise(text)
        signature = self.signature(normalised).reshape(self.bands, self.rows)
        keys = [hash64(normalised.encode("utf-8"))] + [hash64(band.tobytes()) for band in signature]
        return np.array(keys, dtype=np.uint64)


def _find(parent, i):
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def find_duplicates(key_files, work_dir, n_buckets=16):
    """key_files: .npy arrays (n_docs, 1 + bands) in document order. Returns (root of every document,
    exact key of every document): a document is a duplicate when its root is not itself."""
    os.makedirs(work_dir, exist_ok=True)
    for old in glob.glob(os.path.join(work_dir, "bucket-*.bin")):
        os.unlink(old)
    buckets = [open(os.path.join(work_dir, f"bucket-{b:04d}.bin"), "wb") for b in range(n_buckets)]
    n_docs, exact = 0, []
    for path in key_files:
        keys = np.load(path, mmap_mode="r")
        exact.append(np.array(keys[:, 0]))
        doc_ids = np.arange(n_docs, n_docs + len(keys), dtype=np.uint64)
        for column in range(keys.shape[1]):
            records = np.empty(len(keys), KEY_DTYPE)
            records["column"], records["key"], records["doc"] = column, keys[:, column], doc_ids
            which = records["key"] % np.uint64(n_buckets)
            for b in range(n_buckets):
                records[which == b].tofile(buckets[b])
        n_docs += len(keys)
    for f in buckets:
        f.close()

    parent = np.arange(n_docs, dtype=np.int64)
    for b in range(n_buckets):
        path = os.path.join(work_dir, f"bucket-{b:04d}.bin")
        records = np.fromfile(path, KEY_DTYPE)
        os.unlink(path)
        if len(records) < 2:
            continue
        records = records[np.lexsort((records["doc"], records["key"], records["column"]))]
        same = (records["column"][1:] == records["column"][:-1]) & (records["key"][1:] == records["key"][:-1])
        starts = np.where(np.concatenate([[True], ~same]), np.arange(len(records)), 0)
        first = records["doc"][np.maximum.accumulate(starts)]
        for a, d in zip(first[1:][same].tolist(), records["doc"][1:][same].tolist()):
            ra, rd = _find(parent, a), _find(parent, d)
            if ra != rd:
                parent[max(ra, rd)] = min(ra, rd)
    while True:  # pointer jumping: every document points at its root
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            break
        parent = jumped
    return parent, (np.concatenate(exact) if exact else np.zeros(0, np.uint64))
