"""rodin/data/shards.py: token shards with a header that refuses foreign or truncated data."""

import numpy as np
import pytest

from rodin.data.shards import ShardWriter, open_shard


def write(path, ids, vocab_size=512, fingerprint="0123456789abcdef"):
    with ShardWriter(path, vocab_size, fingerprint) as w:
        w.write(ids[:10])
        w.write(ids[10:])


def test_tokens_round_trip_through_a_shard(tmp_path):
    ids = np.arange(100) % 512
    write(tmp_path / "a.bin", ids)
    header, tokens = open_shard(tmp_path / "a.bin", "0123456789abcdef")
    assert header["n_tokens"] == 100 and tokens.dtype == np.uint16
    assert np.array_equal(tokens, ids)


def test_a_vocabulary_above_65536_uses_uint32(tmp_path):
    write(tmp_path / "big.bin", np.array([0, 70000, 99999]), vocab_size=100000)
    _, tokens = open_shard(tmp_path / "big.bin")
    assert tokens.dtype == np.uint32 and list(tokens) == [0, 70000, 99999]


def test_a_shard_of_another_tokenizer_is_refused(tmp_path):
    write(tmp_path / "a.bin", np.arange(10))
    with pytest.raises(ValueError, match="a.bin: made with tokenizer 0123456789abcdef"):
        open_shard(tmp_path / "a.bin", "fedcba9876543210")


def test_truncated_and_foreign_files_are_refused(tmp_path):
    write(tmp_path / "a.bin", np.arange(100))
    data = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="cut.bin: .* truncated"):
        open_shard(tmp_path / "cut.bin")
    (tmp_path / "foreign.bin").write_bytes(b"x" * 200)
    with pytest.raises(ValueError, match="foreign.bin: not a rodin token shard"):
        open_shard(tmp_path / "foreign.bin")


def test_a_failed_write_leaves_no_shard_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "a.bin", 512, "0123456789abcdef") as w:
            w.write([1, 2, 3])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
