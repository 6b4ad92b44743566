"""rodin/spot/mirror.py: a durable checkpoint mirror; only complete, verified checkpoints come back."""

import json
import os
import re
import threading
import time

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


def wait_until(condition, timeout=20):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore:.*retrying")
def test_a_mirror_that_stops_answering_is_retried_in_the_background_and_takes_the_backlog_when_back(
        tmp_path, run_with_checkpoints, monkeypatch):
    run_dir, paths = run_with_checkpoints
    mirror = Mirror(str(tmp_path / "remote"), keep=2, retry_s=0.01, max_retry_s=0.05)
    answering, real_put = threading.Event(), mirror.fs.put_file

    def put_file(*args, **kwargs):
        if not answering.is_set():
            raise ConnectionError("mirror unreachable")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(mirror.fs, "put_file", put_file)
    start = time.time()
    for path in paths:
        mirror.submit(path)
    assert time.time() - start < 1  # the training step never waits for the mirror
    wait_until(lambda: mirror.status()["mirror_failures"] >= 3)  # retried, with backoff
    assert mirror.status()["mirror_backlog"] == 3 and mirror.complete() == []
    answering.set()
    mirror.wait()
    assert mirror.status() == {"mirror_backlog": 0, "mirror_behind_s": 0.0, "mirror_failures": 0}
    assert mirror.complete() == ["step-0000002", "step-0000003"] and "unreachable" in str(mirror.errors[0])
    assert mirror.close()


def test_a_hung_mirror_holds_the_end_of_a_run_no_longer_than_its_timeout(tmp_path, run_with_checkpoints, monkeypatch):
    run_dir, paths = run_with_checkpoints
    mirror = Mirror(str(tmp_path / "remote"))
    hung = threading.Event()
    monkeypatch.setattr(mirror.fs, "put_file", lambda *args, **kwargs: hung.wait())
    mirror.submit(paths[-1])
    start = time.time()
    assert mirror.close(timeout=0.3) is False
    assert 0.3 <= time.time() - start < 2
    hung.set()


def test_a_mirror_url_fsspec_cannot_open_is_refused_before_the_first_step(demo_data, tmp_path):
    import train

    with pytest.raises(ValueError, match=r"--mirror=nosuch://bucket/run: fsspec cannot open it .* install the filesystem"):
        train.main(["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                    f"--out_dir={tmp_path}", "--mirror=nosuch://bucket/run"])
    assert not (tmp_path / "demo").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:.*retrying")
def test_a_mirror_that_never_comes_back_is_reported_in_the_metrics_the_webhook_and_at_the_end(
        demo_data, tmp_path, webhook, monkeypatch, capsys):
    from fsspec.implementations.memory import MemoryFileSystem

    import train

    def down(*args, **kwargs):
        raise ConnectionError("mirror unreachable")

    monkeypatch.setattr(MemoryFileSystem, "put_file", down)
    url, received = webhook
    assert train.main(["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                       f"--out_dir={tmp_path}", "--name=run", "--max_steps=6", "--ckpt_every=2", "--eval_every=100",
                       "--mirror=memory://rodin-down", "--mirror_timeout_s=0", f"--notify={url}"]) == 0
    assert re.search(r"the mirror memory://rodin-down did not take the last \d checkpoint\(s\) within "
                     r"--mirror_timeout_s=0 s: they are on this disk only", capsys.readouterr().out)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if "mirror_backlog" in line]
    assert rows[-1]["mirror_backlog"] == 2 and rows[-1]["mirror_failures"] >= 1 and rows[-1]["mirror_down"]
    assert checkpoint.latest(tmp_path / "run").endswith("step-0000006")  # training went on
    events = [r["event"] for r in received]
    assert events[-1] == "finish" and "mirror_down" in events and "mirrored" not in events


@pytest.mark.filterwarnings("ignore:.*no manifest", "ignore:.*interrupted while writing")
def test_a_launch_after_one_stopped_mid_upload_and_one_stopped_mid_restore_is_exact(demo_data, tmp_path):
    import shutil

    from safetensors.torch import load_file

    import train

    def run(out_dir, *args):
        assert train.main(["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
                           f"--out_dir={out_dir}", "--name=run", "--max_steps=12", "--ckpt_every=4", "--eval_every=100",
                           *args]) == 0
        return checkpoint.latest(out_dir / "run")

    straight = run(tmp_path / "straight")
    remote = tmp_path / "remote"
    run(tmp_path / "spot", f"--mirror={remote}", "--stop_at_step=8")
    # what a SIGTERM in the middle of step 8's upload leaves: some of its files, no manifest
    os.remove(remote / "step-0000008" / "MANIFEST.json")
    os.remove(remote / "step-0000008" / "model.safetensors")
    # and one in the middle of the restore on a fresh machine: an unfinished download beside nothing
    shutil.rmtree(tmp_path / "spot")
    partial = tmp_path / "spot" / "run" / "checkpoints" / "step-0000004.tmp"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes((remote / "step-0000004" / "model.safetensors").read_bytes()[:100])
    resumed = run(tmp_path / "spot", f"--mirror={remote}")
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (straight, resumed))
    assert all(a[k].equal(b[k]) for k in a)
    assert Mirror(str(remote)).complete() == ["step-0000008", "step-0000012"]  # step 8 uploaded again
