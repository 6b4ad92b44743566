"""What keeps a run alive beyond its machine, the same for pretraining and SFT: the checkpoint
mirror (rodin/spot/mirror.py), held by rank 0 and by the first rank of each node with a disk of
its own (rodin.train.checkpoint.directory_owners), and the webhook (rodin/spot/notify.py), rank 0's.

    with Lifeline(cfg, run_dir) as lifeline:   # an exception is reported as a "crash" event
        lifeline.restore()                       # a fresh machine: the newest mirrored checkpoint
        lifeline.send("start", step=0)
        lifeline.checkpointed(path, step, **figures)  # after every save: event + background upload
        lifeline.mirror_status()                 # with each logged step: backlog; mirror_down/back events
        lifeline.wait_for_uploads()              # before exiting, at most --mirror_timeout_s
        lifeline.stopped(reason, step, ...)      # a run that stops before its end says why: an event too
"""

import os

from rodin.config import config_to_dict
from rodin.spot.mirror import Mirror, open_url
from rodin.spot.notify import Notifier
from rodin.train import checkpoint, distributed
from rodin.train.guard import diverged_before, mark_diverged

# paths each node may give its own way (its local disk); every other option must be the same on all ranks
LOCAL_OPTIONS = ("out_dir", "data_dir", "tokenizer")
STOP_EVENTS = {"budget": "budget", "stop_at_step": "paused", "diverged": "diverged"}  # any other reason: a signal


class Lifeline:
    def __init__(self, cfg, run_dir):
        main, rank = distributed.is_main(), distributed.rank()
        self.run_dir, self.mirror_url, self.timeout_s = run_dir, cfg.mirror, cfg.mirror_timeout_s
        if cfg.mirror:
            open_url(cfg.mirror)  # every rank, before anything: a URL fsspec cannot open is refused everywhere
        distributed.check_same_config(config_to_dict(cfg), LOCAL_OPTIONS)
        self.owners = checkpoint.directory_owners(run_dir)
        if len(self.owners) > 1 and not cfg.mirror:
            raise ValueError(f"--out_dir: the ranks {self.owners[1:]} do not see rank 0's run directory (each "
                             "node its own disk), so no disk holds a whole checkpoint: give --mirror=URL, one place every "
                             "node can reach, or put the run directory on storage all nodes share")
        self.notifier = Notifier(cfg.notify if main else "", cfg.name)
        self.mirror = None
        if cfg.mirror and rank in self.owners:
            self.mirror = Mirror(cfg.mirror, cfg.keep_checkpoints, cfg.keep_every, rank=rank, owners=self.owners,
                                 parts_timeout_s=cfg.mirror_timeout_s)
        self.down = False

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None:
            self.notifier.send("crash", error=f"{kind.__name__}: {error}")
        self.notifier.close()
        return False

    def restore(self):
        """With no checkpoint on this disk (the last machine took it along), fetch the newest
        complete one from the mirror, and the run's record (metrics.jsonl, samples.md, loss.png)
        it carries. Nodes with their own disks each fetch the one rank 0 names: the newest in the
        mirror, unless every node holds a newer one whole. Every rank waits for it; returns a
        message or None."""
        restored, problem = None, None
        if len(self.owners) > 1:
            restored, problem = self.restore_on_every_disk()
        elif self.mirror is not None and checkpoint.latest(self.run_dir) is None:
            restored, problem = self.mirror_call("restore from it", lambda: self.mirror.restore_latest(self.run_dir))
        self.raise_on_every_rank(problem)
        if restored:
            checkpoint.restore_record(restored, self.run_dir)  # the curve too, not only the weights
        distributed.barrier()
        restored = distributed.from_rank_0(restored)
        return f"restored {restored} from the mirror {self.mirror_url}" if restored else None

    def restore_on_every_disk(self):
        """(this node's path of the checkpoint it fetched or None, a line if that failed)."""
        local = checkpoint.latest(self.run_dir) if self.mirror is not None else None
        names = distributed.gather_objects(local and os.path.basename(local))
        held = {names[r] for r in self.owners}
        newest_everywhere = held.pop() if len(held) == 1 else None
        choice, problem = None, None
        if distributed.is_main():
            complete, problem = self.mirror_call("list its checkpoints", self.mirror.complete)
            choice = max(filter(None, [newest_everywhere, complete[-1] if complete else None]), default=None)
        name, problem = distributed.from_rank_0((choice, problem))
        if problem or name is None or name == newest_everywhere:
            return None, problem
        if self.mirror is None or (local and os.path.basename(local) == name):
            return None, None
        return self.mirror_call(f"restore {name}", lambda: self.mirror.download(name, self.run_dir))

    @staticmethod
    def raise_on_every_rank(problem):
        """This rank's line or None: the first rank's line is raised on every rank (a collective)."""
        problems = [p for p in distributed.gather_objects(problem) if p]
        if problems:
            raise ValueError(problems[0])

    def mirror_call(self, what, call):
        """(call(), None), or (None, one line naming --mirror, what failed and the fix) when the
        mirror raises, whatever its filesystem raises."""
        try:
            return call(), None
        except Exception as e:
            return None, (f"--mirror={self.mirror_url}: cannot {what} ({type(e).__name__}: {checkpoint.first_line(e)}) "
                          f"on rank {distributed.rank()}; check the URL, its credentials and the network from every node, "
                          "then relaunch the same command")

    def checkpoint_before(self, step):
        """The guard's rollback target: this node's path of the newest whole checkpoint before
        `step`, the same on every rank, or None. Nodes with their own disks hold only their part of
        each: they wait for their uploads (at most --mirror_timeout_s) and fetch it from the mirror."""
        if len(self.owners) == 1:
            return checkpoint.newest_before(self.run_dir, step)
        if self.mirror is not None:
            self.mirror.wait(self.timeout_s)
        choice, problem = None, None
        if distributed.is_main():
            complete, problem = self.mirror_call("list its checkpoints", self.mirror.complete)
            choice = next((n for n in reversed(complete or []) if checkpoint.step_of(n) < step), None)
        name, problem = distributed.from_rank_0((choice, problem))
        if name is None or problem:
            self.raise_on_every_rank(problem)
            return None
        path = os.path.join(checkpoint.checkpoint_root(self.run_dir), name)
        if self.mirror is not None and not (checkpoint.verify(path) is None and checkpoint.is_whole(path)):
            _, problem = self.mirror_call(f"restore {name}", lambda: self.mirror.download(name, self.run_dir))
        self.raise_on_every_rank(problem)
        return path

    def send(self, event, **fields):
        self.notifier.send(event, **fields)

    def checkpointed(self, path, step, **fields):
        self.notifier.send("checkpoint", step=step, path=path, **fields)
        if self.mirror is not None:
            self.mirror.submit(path, on_done=lambda remote: self.notifier.send("mirrored", step=step, url=remote))

    def diverged_before(self, config):
        """The line of an earlier launch with these very options that diverged (train no step, say
        it, exit DIVERGED), or None."""
        return distributed.from_rank_0(diverged_before(self.run_dir, config) if distributed.is_main() else None)

    def stopped(self, reason, step, steps_left, budget, outcome="checkpoint written", guard=None, config=None):
        """Say (on rank 0) why the run stops at `step` before its end, run_steps' reason, and send the
        event: budget, paused, diverged (marked in the run directory, with the run's config) or
        preempted, with the money figures of the Budget."""
        if reason == "budget":
            line = budget.stop_line(step, steps_left, outcome)
        elif reason == "diverged":
            line = guard.advice(step)
            if distributed.is_main():
                mark_diverged(self.run_dir, step, line, config)
        else:
            line = f"{reason}: {outcome} at step {step}; relaunch the same command to resume"
        if distributed.is_main():
            print(line)
        extra = {"rollbacks": len(guard.rollbacks), "skipped_steps": guard.skipped} if reason == "diverged" else {}
        self.notifier.send(STOP_EVENTS.get(reason, "preempted"), step=step, reason=reason, **extra, **budget.figures(steps_left))

    def mirror_status(self):
        """The mirror's backlog for metrics.jsonl and the progress bar ({} without one), with
        "mirror_down" once it has taken no checkpoint for --mirror_timeout_s; the webhook hears
        mirror_down when that starts and mirror_back when the backlog is uploaded."""
        if self.mirror is None:
            return {}
        status = self.mirror.status()
        down = status["mirror_backlog"] > 0 and status["mirror_behind_s"] > self.timeout_s
        if down and not self.down:
            self.notifier.send("mirror_down", url=self.mirror_url, **status)
        elif self.down and status["mirror_backlog"] == 0:
            self.notifier.send("mirror_back", url=self.mirror_url)
        self.down = down
        return dict(status, mirror_down=down)

    def wait_for_uploads(self):
        """Wait at most --mirror_timeout_s for the queued uploads; a mirror that does not take them
        is said (and sent), and the checkpoints stay on this disk."""
        if self.mirror is None:
            return
        say = print if distributed.is_main() else (lambda *a, **k: None)
        say(f"waiting for the upload to {self.mirror_url} (at most --mirror_timeout_s={self.timeout_s:g} s)")
        status = self.mirror.status()
        if not self.mirror.close(timeout=self.timeout_s):
            print(f"rank {distributed.rank()}: " if not distributed.is_main() else "", end="")
            print(f"the mirror {self.mirror_url} did not take the last {status['mirror_backlog']} checkpoint(s) within "
                  f"--mirror_timeout_s={self.timeout_s:g} s: they are on this disk only ({self.run_dir}); "
                  "relaunch here, or copy them to the mirror, before this machine goes")
            self.notifier.send("mirror_down", url=self.mirror_url, **status)
