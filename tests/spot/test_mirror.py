"""rodin/spot/mirror.py: a durable checkpoint mirror; only complete, verified checkpoints come back."""

import json
import os

import pytest
import torch

from rodin.config import MODELS
from rodin.model import LLaMA
from rodin.spot.mirror import Mirror
from rodin.train import checkpoint
from rodin.train.optim import make_optimizer


@pytest.fixture
def run_with_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = LLaMA(MODELS["test"])
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    run_dir = tmp_path / "run"
    paths = [checkpoint.save(run_dir, step, model, optimizer, {"config": {"max_steps": 9}}, keep=5) for step in (1, 2, 3)]
    return run_dir, paths


def test_a_mirrored_checkpoint_restores_byte_for_byte_on_a_fresh_machine(tmp_path, run_with_checkpoints):
    run_dir, paths = run_with_checkpoints
    mirror = Mirror(f"file://{tmp_path / 'remote'}", keep=2)
    for path in paths:
        mirror.submit(path)
    mirror.wait()
    mirror.close()
    assert mirror.complete() == ["step-0000002", "step-0000003"]  # pruned to keep=2
    fresh = tmp_path / "fresh-machine"
    restored = mirror.restore_latest(fresh)
    assert os.path.basename(restored) == "step-0000003" and checkpoint.latest(fresh) == restored
    for name in os.listdir(paths[-1]):
        with open(os.path.join(paths[-1], name), "rb") as a, open(os.path.join(restored, name), "rb") as b:
            assert a.read() == b.read(), name


def test_a_checkpoint_without_its_manifest_is_skipped_for_the_previous_one(tmp_path, run_with_checkpoints):
    run_dir, paths = run_with_checkpoints
    mirror = Mirror(str(tmp_path / "remote"), keep=3)
    for path in paths:
        mirror.upload(path)
    os.remove(tmp_path / "remote" / "step-0000003" / "MANIFEST.json")  # as if the upload died
    with pytest.warns(UserWarning, match="step-0000003: no manifest"):
        restored = mirror.restore_latest(tmp_path / "fresh")
    assert os.path.basename(restored) == "step-0000002"


def test_a_corrupt_mirrored_file_fails_its_checksum_and_is_skipped(tmp_path, run_with_checkpoints):
    run_dir, paths = run_with_checkpoints
    mirror = Mirror(str(tmp_path / "remote"), keep=3)
    for path in paths:
        mirror.upload(path)
    target = tmp_path / "remote" / "step-0000003" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        restored = mirror.restore_latest(tmp_path / "fresh")
    assert os.path.basename(restored) == "step-0000002"
    assert not os.path.exists(tmp_path / "fresh" / "checkpoints" / "step-0000003.tmp")


def test_memory_filesystem_plays_the_remote_and_an_empty_mirror_restores_nothing(tmp_path, run_with_checkpoints):
    run_dir, paths = run_with_checkpoints
    assert Mirror("memory://rodin-empty").restore_latest(tmp_path / "fresh") is None
    mirror = Mirror("memory://rodin-test", keep=2)
    mirror.upload(paths[0])
    assert os.path.basename(mirror.restore_latest(tmp_path / "fresh")) == "step-0000001"


def test_local_pruning_does_not_break_a_queued_upload(tmp_path, run_with_checkpoints):
    run_dir, paths = run_with_checkpoints
    mirror = Mirror(str(tmp_path / "remote"), keep=2)
    mirror.submit(paths[-1])
    import shutil

    shutil.rmtree(paths[-1])  # the trainer pruned it before the upload ran
    mirror.wait()
    mirror.close()
    assert mirror.errors == [] and mirror.complete() == ["step-0000003"]


def test_a_run_killed_and_its_disk_lost_resumes_from_the_mirror_bit_identically(demo_data, tmp_path):
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT as root
    from safetensors.torch import load_file

    import train
    common = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
              "--name=run", "--max_steps=300", "--ckpt_every=4", "--eval_every=1000"]
    assert train.main(common + [f"--out_dir={tmp_path / 'straight'}"]) == 0

    remote = tmp_path / "remote"
    spot = [f"--out_dir={tmp_path / 'spot'}", f"--mirror=file://{remote}"]
    proc = subprocess.Popen([sys.executable, os.path.join(root, "train.py"), *common, *spot],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (remote / "step-0000008" / "MANIFEST.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # the spot VM is reclaimed, its disk with it
    proc.wait()
    assert Mirror(f"file://{remote}").complete()[-1] < "step-0000300"  # killed mid-run
    shutil.rmtree(tmp_path / "spot")
    assert train.main(common + spot) == 0

    straight = checkpoint.latest(tmp_path / "straight" / "run")
    resumed = checkpoint.latest(tmp_path / "spot" / "run")
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (straight, resumed))
    assert all(a[k].equal(b[k]) for k in a)
    assert Mirror(f"file://{remote}").complete()[-1] == "step-0000300"

    # the record came back with the weights: the whole curve, each row with its wall-clock time
    def curve(out_dir):
        with open(out_dir / "run" / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert all("time" in r and "elapsed_s" in r for r in rows if "loss" in r)
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]

    assert curve(tmp_path / "spot") == curve(tmp_path / "straight")
    assert (tmp_path / "spot" / "run" / "loss.png").exists()


def test_training_reports_its_events_to_a_webhook_and_ignores_a_dead_one(demo_data, tmp_path, webhook):
    import train

    url, received = webhook
    common = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
              "--max_steps=6", "--ckpt_every=3", "--eval_every=100"]
    assert train.main(common + [f"--out_dir={tmp_path}", "--name=a", f"--notify={url}"]) == 0
    assert [r["event"] for r in received] == ["start", "checkpoint", "checkpoint", "finish"]
    with pytest.warns(UserWarning, match="not delivered"):
        assert train.main(common + [f"--out_dir={tmp_path}", "--name=b", "--notify=http://127.0.0.1:9/"]) == 0
