"""rodin/spot/supervise.py: relaunch after a crash until the run is complete; give up when stuck."""

import os
import sys
import textwrap

from conftest import ROOT

from rodin.spot.supervise import supervise
from rodin.train import checkpoint


def test_the_supervisor_relaunches_after_a_sigkill_and_stops_when_the_run_is_complete(demo_data, tmp_path):
    # first launch: train to a checkpoint at step 6, then die by SIGKILL as a reclaimed spot VM would
    flaky = tmp_path / "flaky.py"
    flaky.write_text(textwrap.dedent(f"""
        import os, signal, subprocess, sys
        marker = {str(tmp_path / 'killed-once')!r}
        args = sys.argv[1:]
        if not os.path.exists(marker):
            open(marker, "w").close()
            subprocess.run([sys.executable, {os.path.join(ROOT, 'train.py')!r}, *args, "--stop_at_step=6"], check=True)
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(subprocess.run([sys.executable, {os.path.join(ROOT, 'train.py')!r}, *args]).returncode)
    """))
    run_dir = tmp_path / "run"
    command = [sys.executable, str(flaky), "--preset=test", f"--data_dir={demo_data['dir']}",
               f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}", "--name=run", "--max_steps=12",
               "--ckpt_every=3"]
    messages = []
    assert supervise(command, run_dir, max_failures=2, backoff_s=0.01, log=messages.append) == 0
    assert sum(m.startswith("supervise: launch") for m in messages) == 2 and "exit code -9" in " ".join(messages)
    assert checkpoint.read_meta(checkpoint.latest(run_dir))["step"] == 12


def test_the_supervisor_gives_up_after_n_launches_that_make_no_progress(tmp_path):
    messages = []
    command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    assert supervise(command, tmp_path / "run", max_failures=3, backoff_s=0.01, log=messages.append) == 1
    assert sum(m.startswith("supervise: launch") for m in messages) == 3 and "giving up" in messages[-1]


def test_the_supervisor_does_not_relaunch_a_run_stopped_by_its_budget(demo_data, tmp_path):
    # a cap that the first step's seconds already exceed: the run checkpoints, exits 0, and stays stopped
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--preset=test", f"--data_dir={demo_data['dir']}",
               f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={tmp_path}", "--name=run", "--max_steps=12",
               "--price_per_hour=1", "--max_cost=1e-9"]
    messages = []
    assert supervise(command, tmp_path / "run", max_failures=3, backoff_s=0.01, log=messages.append) == 0
    assert sum(m.startswith("supervise: launch") for m in messages) == 1
    assert "spent its budget" in messages[-1] and "not relaunching" in messages[-1] and "exit code 0" in messages[-1]
    assert checkpoint.read_meta(checkpoint.latest(tmp_path / "run"))["step"] == 1


def test_on_a_node_with_its_own_disk_progress_is_its_part_of_the_newest_checkpoint(tmp_path):
    import json

    from rodin.spot.supervise import run_progress

    part = tmp_path / "checkpoints" / "step-0000012"  # rank 1's shards of step 12, as its node committed them
    part.mkdir(parents=True)
    (part / "__1_0.distcp").write_bytes(b"x" * 10)
    (part / "MANIFEST.json").write_text(json.dumps({"step": 12, "whole": False, "files": {"__1_0.distcp": 10}}))
    (tmp_path / "config.json").write_text(json.dumps({"max_steps": 12}))
    assert checkpoint.latest(tmp_path) is None and run_progress(tmp_path) == (12, 12)
