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


def unreachable(mirror, monkeypatch):
    """Uploads to the mirror fail until the event returned is set."""
    answering, real_put = threading.Event(), mirror.fs.put_file

    def put_file(*args, **kwargs):
        if not answering.is_set():
            raise ConnectionError("mirror unreachable")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(mirror.fs, "put_file", put_file)
    return answering


@pytest.mark.filterwarnings("ignore:.*retrying", "ignore:.*dropped")
def test_a_mirror_that_stops_answering_is_retried_in_the_background_and_takes_the_newest_checkpoint_when_back(
        tmp_path, run_with_checkpoints, monkeypatch):
    run_dir, paths = run_with_checkpoints
    mirror = Mirror(str(tmp_path / "remote"), keep=2, retry_s=0.01, max_retry_s=0.05)
    answering = unreachable(mirror, monkeypatch)
    start = time.time()
    for path in paths:
        mirror.submit(path)
    assert time.time() - start < 1  # the training step never waits for the mirror
    wait_until(lambda: mirror.status()["mirror_failures"] >= 3 and mirror.status()["mirror_backlog"] == 1)
    assert mirror.complete() == [] and mirror.status()["mirror_behind_s"] > 0  # retried with backoff; step 3 waits
    answering.set()
    mirror.wait()
    assert mirror.status() == {"mirror_backlog": 0, "mirror_behind_s": 0.0, "mirror_failures": 0}
    assert mirror.complete() == ["step-0000003"] and "unreachable" in str(mirror.errors[0])
    assert mirror.close()


@pytest.mark.filterwarnings("ignore:.*retrying")
def test_through_a_long_outage_the_disk_keeps_the_snapshots_of_the_newest_checkpoint_and_the_milestones_only(
        tmp_path, monkeypatch, recwarn):
    torch.manual_seed(0)
    model = LLaMA(MODELS["test"])
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    run_dir = tmp_path / "run"
    mirror = Mirror(str(tmp_path / "remote"), keep=2, keep_every=3, retry_s=0.01, max_retry_s=0.05)
    answering = unreachable(mirror, monkeypatch)
    for step in range(1, 8):  # the run prunes its disk to the newest 2 and the milestones (3, 6) meanwhile
        mirror.submit(checkpoint.save(run_dir, step, model, optimizer, {"config": {}}, keep=2, keep_every=3))
        staged = os.listdir(run_dir / ".mirror-staging")
        assert len([n for n in staged if checkpoint.step_of(n) % 3]) <= 2, staged
    assert sorted(os.listdir(run_dir / ".mirror-staging"))[-1] == "step-0000007"
    dropped = [str(w.message) for w in recwarn if "dropped" in str(w.message)]
    assert any("step-0000004 dropped from the upload queue, superseded by step-0000005" in line for line in dropped)
    answering.set()
    mirror.wait()
    assert mirror.complete() == ["step-0000003", "step-0000006", "step-0000007"]
    assert os.listdir(run_dir / ".mirror-staging") == [] and mirror.close()


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


@pytest.mark.filterwarnings("ignore:.*retrying", "ignore:.*dropped")
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


# ---- SIGTERM during an upload or a restore: real signals, to a run whose mirror is slowed -------

# train.py with the local filesystem's put_file (uploads) or get_file (downloads) taking a while per file
SLOWED = """import sys, time
from fsspec.implementations.local import LocalFileSystem
method, seconds, real = sys.argv[1], float(sys.argv[2]), getattr(LocalFileSystem, sys.argv[1])
def slowed(self, *args, **kwargs):
    time.sleep(seconds)
    return real(self, *args, **kwargs)
setattr(LocalFileSystem, method, slowed)
import train
sys.exit(train.main(sys.argv[3:]))
"""


def launch_slowed(method, seconds, argv):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.Popen([sys.executable, "-c", SLOWED, method, str(seconds), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def watch_for_half_checkpoints(remote, seen):
    """A thread that, until seen["stop"], checks that every mirrored checkpoint with a manifest holds
    every file it lists at its size (a checkpoint being pruned loses its manifest first)."""
    def watch():
        while not seen.get("stop"):
            for name in Mirror(str(remote)).checkpoints():
                try:
                    manifest = json.loads((remote / name / "MANIFEST.json").read_text())
                except OSError:
                    continue  # not complete (yet), or being pruned
                except ValueError:  # a manifest half written
                    seen.setdefault("half", []).append(f"{name}/MANIFEST.json")
                    continue
                for relative, expected in manifest["files"].items():
                    file = remote / name / relative
                    if not (file.exists() and file.stat().st_size == expected["size"]) and \
                            (remote / name / "MANIFEST.json").exists():
                        seen.setdefault("half", []).append(f"{name}/{relative}")
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint.latest(run_dir), "model.safetensors"))


def curve(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, f)]


def demo_args(demo_data, out_dir, *args, steps=100):
    return ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out_dir}", "--name=run", f"--max_steps={steps}", "--ckpt_every=4", "--eval_every=50", *args]


@pytest.mark.filterwarnings("ignore:.*no manifest", "ignore:.*interrupted while writing", "ignore:.*dropped")
def test_a_sigterm_during_an_upload_leaves_no_half_checkpoint_marked_complete_and_the_next_launch_is_exact(
        demo_data, tmp_path):
    import shutil
    import signal

    import train

    assert train.main(demo_args(demo_data, tmp_path / "straight")) == 0
    remote = tmp_path / "remote"
    spot = demo_args(demo_data, tmp_path / "spot", f"--mirror=file://{remote}", "--mirror_timeout_s=0.3")
    seen = {}
    watcher = watch_for_half_checkpoints(remote, seen)
    proc = launch_slowed("put_file", 0.15, spot)
    mirror = Mirror(str(remote))

    def uploading():  # a complete checkpoint on the mirror, and the files of a newer one going up
        names = mirror.checkpoints()
        return mirror.complete() and names[-1] not in mirror.complete() and any((remote / names[-1]).iterdir())

    wait_until(lambda: proc.poll() is not None or uploading(), timeout=60)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    seen["stop"] = True
    watcher.join()
    assert proc.returncode == 0, out  # the stop checkpoint is written, the upload waited for at most 0.3 s
    assert "SIGTERM: checkpoint written at step" in out and "did not take the last" in out
    stopped = checkpoint.step_of(checkpoint.latest(tmp_path / "spot" / "run"))
    assert stopped < 100 and "half" not in seen, seen.get("half")
    newest = mirror.complete()[-1]
    assert checkpoint.step_of(newest) <= stopped
    shutil.copytree(remote, tmp_path / "remote-then")

    # the next launch on the same disk goes on from the stop checkpoint, the mirror answering again
    print(f"stopped at step {stopped}, mirror at {newest}; staged: {os.listdir(tmp_path / 'spot' / 'run' / '.mirror-staging')}")
    assert train.main(spot) == 0
    assert os.listdir(tmp_path / "spot" / "run" / ".mirror-staging") == []  # the killed launch's snapshots are gone
    straight = final_weights(tmp_path / "straight" / "run")
    assert all(straight[k].equal(v) for k, v in final_weights(tmp_path / "spot" / "run").items())
    assert curve(tmp_path / "spot" / "run") == curve(tmp_path / "straight" / "run")
    assert Mirror(str(remote)).complete()[-1] == "step-0000100"

    # a fresh machine restores the newest checkpoint the signal left complete on the mirror
    fresh = demo_args(demo_data, tmp_path / "fresh", f"--mirror=file://{tmp_path / 'remote-then'}")
    assert train.main(fresh) == 0
    assert all(straight[k].equal(v) for k, v in final_weights(tmp_path / "fresh" / "run").items())
    assert curve(tmp_path / "fresh" / "run") == curve(tmp_path / "straight" / "run")


@pytest.mark.filterwarnings("ignore:.*interrupted while writing")
def test_a_sigterm_during_a_restore_from_the_mirror_leaves_nothing_taken_for_complete_and_the_next_launch_is_exact(
        demo_data, tmp_path):
    import signal

    import train

    assert train.main(demo_args(demo_data, tmp_path / "straight", steps=12)) == 0
    remote = tmp_path / "remote"
    assert train.main(demo_args(demo_data, tmp_path / "first", f"--mirror={remote}", "--stop_at_step=8", steps=12)) == 0
    fresh = demo_args(demo_data, tmp_path / "fresh", f"--mirror={remote}", steps=12)
    proc = launch_slowed("get_file", 0.15, fresh)
    partial = tmp_path / "fresh" / "run" / "checkpoints" / "step-0000008.tmp"
    wait_until(lambda: proc.poll() is not None or (partial.exists() and any(partial.iterdir())), timeout=60)
    proc.send_signal(signal.SIGTERM)  # the machine goes while the checkpoint is coming down
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGTERM, out
    assert checkpoint.latest(tmp_path / "fresh" / "run") is None and partial.exists()
    assert not (tmp_path / "fresh" / "run" / "metrics.jsonl").exists()

    assert train.main(fresh) == 0  # restores again, whole, and goes on
    straight = final_weights(tmp_path / "straight" / "run")
    assert all(straight[k].equal(v) for k, v in final_weights(tmp_path / "fresh" / "run").items())
    assert curve(tmp_path / "fresh" / "run") == curve(tmp_path / "straight" / "run")
    assert not partial.exists()
