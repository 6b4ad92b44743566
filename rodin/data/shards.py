"""Token shards: a flat array of token ids behind a 64-byte header, read with np.memmap.

The header (magic, version, bytes per token, vocab size, token count, tokenizer fingerprint)
lets the trainer refuse shards made with another tokenizer, or cut short by a crash.
uint16 while the vocabulary fits (RODIN's 64,000 does), uint32 above.
"""

import os
import struct

import numpy as np

from rodin.io import fsync_dir

MAGIC = b"RODINTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIIQ16s")
HEADER_SIZE = 64


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

    def write(self, ids):
        array = np.asarray(ids, dtype=self.dtype)
        self.file.write(array.tobytes())
        self.n_tokens += array.size

    def close(self):
        header = HEADER.pack(MAGIC, VERSION, np.dtype(self.dtype).itemsize, self.vocab_size, self.n_tokens,
                             self.fingerprint.encode("ascii"))
        self.file.seek(0)
        self.file.write(header.ljust(HEADER_SIZE, b"\0"))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
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


def open_shard(path, tokenizer_fingerprint=None):
    """Header and a read-only memmap of the tokens; refuses a shard of another tokenizer."""
    header = read_header(path)
    if tokenizer_fingerprint is not None and header["fingerprint"] != tokenizer_fingerprint:
        raise ValueError(f"{path}: made with tokenizer {header['fingerprint']}, not the run's {tokenizer_fingerprint}; re-encode the data")
    dtype = np.uint16 if header["itemsize"] == 2 else np.uint32
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(header["n_tokens"],))
    return header, tokens
