"""What keeps a run alive beyond its machine, the same for pretraining and SFT: the checkpoint
mirror (rodin/spot/mirror.py) and the webhook (rodin/spot/notify.py), both held by rank 0 alone.

    with Lifeline(cfg, run_dir) as lifeline:   # an exception is reported as a "crash" event
        lifeline.restore()                       # a fresh machine: the newest mirrored checkpoint
        lifeline.send("start", step=0)
        lifeline.checkpointed(path, step, **figures)  # after every save: event + background upload
        lifeline.wait_for_uploads()              # before exiting, so the last checkpoint is safe
        lifeline.stopped(reason, step, ...)      # a run that stops before its end says why: an event too
"""

from rodin.spot.mirror import Mirror
from rodin.spot.notify import Notifier
from rodin.train import checkpoint, distributed
from rodin.train.guard import diverged_before, mark_diverged

STOP_EVENTS = {"budget": "budget", "stop_at_step": "paused", "diverged": "diverged"}  # any other reason: a signal


class Lifeline:
    def __init__(self, cfg, run_dir):
        main = distributed.is_main()
        self.run_dir, self.mirror_url = run_dir, cfg.mirror
        self.notifier = Notifier(cfg.notify if main else "", cfg.name)
        self.mirror = Mirror(cfg.mirror, cfg.keep_checkpoints, cfg.keep_every) if cfg.mirror and main else None

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
        it carries. Every rank waits for it; returns a message or None."""
        restored = None
        if self.mirror is not None and checkpoint.latest(self.run_dir) is None:
            restored = self.mirror.restore_latest(self.run_dir)
            if restored:
                checkpoint.restore_record(restored, self.run_dir)  # the curve too, not only the weights
        distributed.barrier()
        return f"restored {restored} from the mirror {self.mirror_url}" if restored else None

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

    def wait_for_uploads(self):
        if self.mirror is not None:
            print(f"waiting for the upload to {self.mirror_url}")
            self.mirror.close()
