"""rodin/data/shards.py: token shards with a header that refuses foreign or truncated data."""

import numpy as np
import pytest

from rodin.data.shards import HEADER, HEADER_SIZE, ShardWriter, open_shard


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


def write_indexed(path, ids, source="wiki.jsonl"):
    """A shard and its index, as data/encode.py publishes them (index first, with the shard's checks)."""
    import json

    writer = ShardWriter(path, 512, "0123456789abcdef")
    writer.write(ids)
    checks = writer.seal()
    index = str(path)[: -len(".bin")] + ".idx.json"
    with open(index, "w") as f:
        json.dump({"shard": path.name, **checks, "ranges": [[0, len(ids), source]]}, f)
    writer.close()


@pytest.mark.parametrize("damage", ["truncated", "tail_overwritten", "extended"])
def test_a_shard_that_differs_from_its_index_is_refused_with_its_name_and_the_fix(tmp_path, damage):
    write_indexed(tmp_path / "train-00000.bin", np.arange(100_000) % 512)
    path = tmp_path / "train-00000.bin"
    data = bytearray(path.read_bytes())
    if damage == "truncated":  # and the header rewritten to agree: only the index can tell
        data = data[:-2000]
        data[:HEADER_SIZE] = HEADER.pack(*HEADER.unpack(bytes(data[: HEADER.size]))[:4], (len(data) - HEADER_SIZE) // 2,
                                         b"0123456789abcdef").ljust(HEADER_SIZE, b"\0")
    elif damage == "tail_overwritten":
        data[-3] ^= 0xFF
    else:
        data += b"\0\0"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00000.bin: .*damaged since it was encoded; re-encode its source\(s\) "
                                         r"\(wiki.jsonl\): delete .*encode_state.json"):
        open_shard(path, "0123456789abcdef")


def test_the_middle_of_a_shard_is_checked_on_demand_only(tmp_path, capsys):
    from rodin.data.shards import END_BLOCK, main

    write_indexed(tmp_path / "train-00000.bin", np.arange(200_000) % 512)
    path = tmp_path / "train-00000.bin"
    data = bytearray(path.read_bytes())
    data[END_BLOCK + 1000] ^= 0xFF  # between the two end blocks: a start does not read it
    path.write_bytes(bytes(data))
    open_shard(path, "0123456789abcdef")
    assert main([str(tmp_path)]) == 0 and "1 shards match" in capsys.readouterr().out
    with pytest.raises(ValueError, match="train-00000.bin: its tokens differ from the checksum"):
        main([str(tmp_path), "--full"])


def test_a_damaged_shard_stops_training_before_the_first_step(demo_data, tmp_path):
    import json
    import shutil

    import train

    data = tmp_path / "data"
    shutil.copytree(demo_data["dir"], data)
    index = json.loads((data / "train-00000.idx.json").read_text())
    assert {"bytes", "ends_sha256", "tokens_sha256"} <= set(index)  # data/encode.py wrote the checks
    with open(data / "train-00000.bin", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\xff")
    with pytest.raises(ValueError, match=r"train-00000.bin: its first or last 64 KiB differ .* re-encode its source\(s\) \(slice.txt\)"):
        train.main(["--preset=test", f"--data_dir={data}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}"])
    assert not (tmp_path / "run").exists()
