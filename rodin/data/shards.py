"""Token shards: a flat array of token ids behind a 64-byte header, read with np.memmap.

The header (magic, version, bytes per token, vocab size, token count, tokenizer fingerprint)
lets the trainer refuse shards made with another tokenizer, or cut short by a crash.
uint16 while the vocabulary fits (RODIN's 64,000 does), uint32 above.
The shard's index (<shard>.idx.json, written by data/encode.py) records its size, a sha256 of its
first and last 64 KiB, and a sha256 of all its tokens. At every start each shard's size and its
two end blocks are checked (128 KiB read a shard: under a second for the ~300 shards of 32 B
tokens); every byte only on demand, `rodin shards DIR --full`, which reads the whole data set.
"""

import argparse
import hashlib
import json
import os
import struct

import numpy as np

from rodin.io import fsync_dir

MAGIC = b"RODINTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIIQ16s")
HEADER_SIZE = 64
END_BLOCK = 64 << 10  # the bytes at each end of a shard whose checksum is checked at every start


def dtype_for_vocab(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class ShardWriter:
    """Append token arrays; close() publishes the shard atomically (temporary name, fsync, rename)."""

    def __init__(self, path, vocab_size, fingerprint):
        self.path, self.vocab_size, self.fingerprint = str(path), vocab_size, fingerprint
        self.dtype = dtype_for_vocab(vocab_size)
        self.tmp = self.path + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.file.write(b"\0" * HEADER_SIZE)
        self.n_tokens = 0
        self.tokens_sha256 = hashlib.sha256()  # hashed as written: the full checksum costs no second read
        self.checks = None

    def write(self, ids):
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.tokens_sha256.update(data)
        self.n_tokens += len(data) // np.dtype(self.dtype).itemsize

    def seal(self):
        """Write the header and fsync; returns the checks for the shard's index (size, checksums)."""
        if self.checks is None:
            header = HEADER.pack(MAGIC, VERSION, np.dtype(self.dtype).itemsize, self.vocab_size, self.n_tokens,
                                 self.fingerprint.encode("ascii"))
            self.file.seek(0)
            self.file.write(header.ljust(HEADER_SIZE, b"\0"))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.checks = {"bytes": os.path.getsize(self.tmp), "ends_sha256": ends_sha256(self.tmp),
                           "tokens_sha256": self.tokens_sha256.hexdigest()}
        return self.checks

    def close(self):
        self.seal()
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.file.close()
            os.unlink(self.tmp)


def read_header(path):
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER.size:
        raise ValueError(f"{path}: too short to be a rodin token shard")
    magic, version, itemsize, vocab_size, n_tokens, fingerprint = HEADER.unpack(raw[: HEADER.size])
    if magic != MAGIC:
        raise ValueError(f"{path}: not a rodin token shard (bad magic); encode text with data/encode.py")
    if version != VERSION:
        raise ValueError(f"{path}: shard format version {version}, this rodin reads version {VERSION}")
    expected = HEADER_SIZE + n_tokens * itemsize
    actual = os.path.getsize(path)
    if actual != expected:
        raise ValueError(f"{path}: {actual} bytes but the header promises {expected}: truncated or corrupt shard")
    return {"itemsize": itemsize, "vocab_size": vocab_size, "n_tokens": n_tokens, "fingerprint": fingerprint.decode("ascii")}


def ends_sha256(path):
    """sha256 of a file's first and last END_BLOCK bytes: catches a shard cut, extended or
    rewritten at either end without reading the rest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(END_BLOCK))
        f.seek(max(0, os.path.getsize(path) - END_BLOCK))
        digest.update(f.read(END_BLOCK))
    return digest.hexdigest()


def tokens_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_path(path):
    return str(path)[: -len(".bin")] + ".idx.json"


def check_shard(path, full=False):
    """Refuse a shard that differs from its index: size always, the end blocks' checksum always,
    every token's checksum when full. Shards without an index, or with an index of before these
    checks, pass unchecked."""
    index = index_path(path)
    if not os.path.exists(index):
        return
    with open(index, encoding="utf-8") as f:
        record = json.load(f)
    if "bytes" not in record:
        return
    problem = None
    if os.path.getsize(path) != record["bytes"]:
        problem = f"{os.path.getsize(path)} bytes, its index {index} says {record['bytes']}"
    elif ends_sha256(path) != record["ends_sha256"]:
        problem = f"its first or last {END_BLOCK >> 10} KiB differ from the checksum in {index}"
    elif full and tokens_sha256(path) != record["tokens_sha256"]:
        problem = f"its tokens differ from the checksum in {index}"
    if problem:
        sources = sorted({source for _, _, source in record.get("ranges", [])})
        raise ValueError(f"{path}: {problem}: damaged since it was encoded; re-encode its source(s) "
                         f"({', '.join(sources) or 'unknown'}): delete {os.path.dirname(os.path.abspath(path))}"
                         "/encode_state.json and run data/encode.py again")


def open_shard(path, tokenizer_fingerprint=None):
    """Header and a read-only memmap of the tokens; refuses a shard of another tokenizer, or one
    that does not match its index (check_shard)."""
    check_shard(path)  # first: its message names the sources to re-encode
    header = read_header(path)
    if tokenizer_fingerprint is not None and header["fingerprint"] != tokenizer_fingerprint:
        raise ValueError(f"{path}: made with tokenizer {header['fingerprint']}, not the run's {tokenizer_fingerprint}; re-encode the data")
    dtype = np.uint16 if header["itemsize"] == 2 else np.uint32
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(header["n_tokens"],))
    return header, tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check token shards against their index (size and end blocks; "
                                     "--full: every token, a read of the whole data set).")
    parser.add_argument("data_dir", help="the folder of the shards (data/encode.py's --out_dir)")
    parser.add_argument("--full", action="store_true", help="check every token's checksum, not only sizes and end blocks")
    args = parser.parse_args(argv)
    paths = sorted(p for p in os.listdir(args.data_dir) if p.endswith(".bin"))
    if not paths:
        raise FileNotFoundError(f"{args.data_dir}: no .bin shards; give data/encode.py's --out_dir")
    for name in paths:
        read_header(os.path.join(args.data_dir, name))
        check_shard(os.path.join(args.data_dir, name), full=args.full)
    print(f"{args.data_dir}: {len(paths)} shards match their index ({'every token' if args.full else 'sizes and end blocks'})")
    return 0
