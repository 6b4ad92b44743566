"""Keep a training run alive on a spot machine: relaunch it after a crash or a preemption, with
backoff, until it is complete — and give up when it keeps failing at the same step.

    rodin supervise --run_dir=runs/rodin-1b -- torchrun --nproc_per_node=8 --max-restarts=3 train.py --preset=b200

torchrun's --max-restarts restarts workers inside one launch; this supervisor restarts the launch
itself. A run is complete when its newest checkpoint has reached the config's max_steps. A run
whose newest checkpoint records that it has spent its --max_cost (rodin/train/budget.py) is not relaunched:
only a higher cap, given by a person, continues it; nor is a run the guard stopped as diverged
(rodin/train/guard.py): only other options continue it. A launch that ends without the checkpoint step
advancing counts as a failure; max_failures of those in a row (a NaN loss, a bad node, a full disk)
stop the loop instead of burning money.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from rodin.train import budget, checkpoint
from rodin.train.guard import DIVERGED, MARKER


def run_progress(run_dir):
    """(step of the newest complete checkpoint, max_steps of its run), (0, None) when none. On a
    node with a disk of its own (torchrun --nnodes) that is its part of the newest checkpoint, and
    max_steps the one of the run's config.json."""
    path = checkpoint.latest(run_dir)
    if path is not None:
        meta = checkpoint.read_meta(path)
        return meta["step"], meta.get("config", {}).get("max_steps")
    parts = checkpoint.complete_checkpoints(run_dir, parts=True)
    if not parts:
        return 0, None
    config, max_steps = os.path.join(run_dir, "config.json"), None
    if os.path.exists(config):
        with open(config) as f:
            max_steps = json.load(f).get("max_steps")
    return checkpoint.step_of(parts[-1]), max_steps


def spent_budget(run_dir):
    """The budget record of the newest complete checkpoint if the run has spent its cap, else None."""
    path = checkpoint.latest(run_dir)
    record = checkpoint.read_meta(path).get("budget") if path else None
    return record if budget.reached(record) else None


def diverged_line(run_dir):
    """The guard's line if the run stopped as diverged (rodin/train/guard.py), else None."""
    path = os.path.join(run_dir, MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["line"]


def supervise(command, run_dir, max_failures=3, backoff_s=10.0, max_backoff_s=600.0, log=print):
    """Run `command` until the run completes or has spent its budget; returns 0, DIVERGED when the
    guard stopped it, or 1 after max_failures launches in a row that made no progress."""
    failures, launches = 0, 0
    child = None

    def forward(signum, frame):
        if child is not None and child.poll() is None:
            child.send_signal(signum)  # the trainer checkpoints and exits 0; we stop with it
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while True:
            step_before, _ = run_progress(run_dir)
            launches += 1
            log(f"supervise: launch {launches} at step {step_before}: {' '.join(command)}")
            child = subprocess.Popen(command)
            code = child.wait()
            step_after, max_steps = run_progress(run_dir)
            if code == 0 and max_steps is not None and step_after >= max_steps:
                log(f"supervise: run complete at step {step_after} after {launches} launch(es)")
                return 0
            diverged = diverged_line(run_dir)
            if diverged is not None:  # the same command would diverge again: a person changes the options
                log(f"supervise: the run diverged (exit code {code}); not relaunching. {diverged}")
                return DIVERGED
            spent = spent_budget(run_dir)
            if spent is not None:  # relaunching would train nothing: only a higher cap continues
                log(f"supervise: the run spent its budget ({spent['cost']:.2f} of --max_cost={spent['max_cost']:g}) at "
                    f"step {step_after} (exit code {code}); not relaunching. To continue, relaunch with a higher --max_cost")
                return 0
            failures = 0 if step_after > step_before else failures + 1
            if failures >= max_failures:
                log(f"supervise: giving up: {failures} launches in a row ended at step {step_after} "
                    f"(last exit code {code}); look at the run's log before relaunching")
                return 1
            delay = min(max_backoff_s, backoff_s * 2 ** max(0, failures - 1))
            log(f"supervise: exit code {code} at step {step_after}; relaunching in {delay:.0f} s")
            time.sleep(delay)
    except KeyboardInterrupt:
        if child is not None:
            child.wait()
        log("supervise: stopped by a signal; the trainer wrote its checkpoint")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="rodin supervise --run_dir=runs/NAME [options] -- COMMAND ...")
    parser.add_argument("--run_dir", required=True, help="the run directory the command trains into")
    parser.add_argument("--max_failures", type=int, default=3, help="launches in a row without progress before giving up")
    parser.add_argument("--backoff_s", type=float, default=10.0)
    parser.add_argument("--max_backoff_s", type=float, default=600.0)
    if "--" not in argv:
        parser.parse_args(argv)  # --help prints the options; anything else lacks the command
        parser.error("give the command to supervise after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    return supervise(argv[split + 1:], args.run_dir, args.max_failures, args.backoff_s, args.max_backoff_s)
