"""The guard of a run nobody watches: a step that is not finite is not applied, a loss spike is
rolled back past the data it came from, and a run that keeps diverging stops with one line
instead of spending its budget on a dead model.

Frozen decisions:
- A step is bad when its loss or gradient norm is not finite on any rank (the vote rides the
  step's one all-reduce). Its update is not applied: no optimizer step, so AdamW's moments and step
  count and Muon's momentum are untouched; the step and the data cursor move on; it is counted
  (skipped_steps in metrics.jsonl, `skipped` on the progress bar).
- A spike is the mean loss over ranks above spike_factor (3) x the median of the last
  spike_window (100) finite losses, for spike_steps (3) steps in a row; more than max_skipped (10)
  bad steps within spike_window steps is trouble too. PaLM saw spikes return ~100 steps after the
  bad data and restarted ~100 steps before them, skipping 200-500 batches: the same shape here.
- Trouble is answered by a rollback to the newest checkpoint that predates it: weights, optimizer
  state and RNG come back, the step and the schedule with them, but the data cursor stays where it
  is, so the batches trained on since that checkpoint (the spike's among them) are skipped. The
  LR is then multiplied by rollback_lr_factor (0.5) until the step where the trouble was seen: a
  spike that returns on fresh data is the step size's, and halving it over the stretch that
  diverged is what a person watching would try first. A `rollback` event says what was skipped.
- Checkpoints are not written during a spike (a checkpoint must predate the trouble to roll back
  to) nor from weights that are not finite (checked on every rank before each checkpoint).
- max_rollbacks (3) rollbacks without a recovery (spike_window steps past the step where the last
  trouble was seen) stop the run: exit status DIVERGED, one line saying what to change, a
  `diverged` event, and diverged.json in the run directory so that neither a relaunch of the same
  command nor the supervisor trains on; a relaunch with other options goes on.
- The guard's state (recent losses, counters, the rollbacks so far) is in every checkpoint: a
  resumed run decides exactly as the uninterrupted one.
"""

import json
import os
import statistics
from collections import deque

import torch

from rodin.io import atomic_write_text

DIVERGED = 3  # the exit status of a run the guard stopped
MIN_HISTORY = 10  # finite losses needed before a spike can be judged
MARKER = "diverged.json"


class Guard:
    """What the loop asks each step (judge) and at each checkpoint (may_checkpoint); its state
    travels in the checkpoint's meta."""

    def __init__(self, cfg, state=None):
        self.cfg = cfg
        self.losses = deque(maxlen=cfg.spike_window)  # recent finite losses, spikes left out
        self.streak, self.streak_start = 0, None  # spiking steps in a row, from this step
        self.trouble_since = None  # the first step of the trouble a rollback answers
        self.bad_steps = deque()  # steps of recent non-finite steps, within spike_window
        self.skipped, self.rollbacks, self.unrecovered = 0, [], 0
        self.recovered_at = 0  # the step past which the last rollback counts as recovered
        self.lr_scale, self.lr_scale_until = 1.0, 0
        if state:
            self.load_state_dict(state)

    def state_dict(self):
        return {"losses": list(self.losses), "streak": self.streak, "streak_start": self.streak_start,
                "trouble_since": self.trouble_since,
                "bad_steps": list(self.bad_steps), "skipped": self.skipped, "rollbacks": self.rollbacks,
                "unrecovered": self.unrecovered, "recovered_at": self.recovered_at, "lr_scale": self.lr_scale,
                "lr_scale_until": self.lr_scale_until}

    def load_state_dict(self, state):
        self.losses = deque(state["losses"], maxlen=self.cfg.spike_window)
        self.streak, self.streak_start, self.trouble_since = state["streak"], state["streak_start"], state["trouble_since"]
        self.bad_steps = deque(state["bad_steps"])
        self.skipped, self.rollbacks, self.unrecovered = state["skipped"], list(state["rollbacks"]), state["unrecovered"]
        self.recovered_at, self.lr_scale, self.lr_scale_until = state["recovered_at"], state["lr_scale"], state["lr_scale_until"]

    def lr_factor(self, step):
        """What the schedule's LR is multiplied by at `step` (after a rollback, for a while)."""
        return self.lr_scale if step < self.lr_scale_until else 1.0

    def judge(self, step, loss, finite):
        """The verdict on the step just taken (step: its number, counted from 1; loss: the mean
        over ranks; finite: no rank saw a non-finite loss or gradient norm): "ok", "skip" (do not
        apply it) or "rollback"."""
        cfg = self.cfg
        while self.bad_steps and self.bad_steps[0] <= step - cfg.spike_window:
            self.bad_steps.popleft()
        if not finite:
            self.skipped += 1
            self.bad_steps.append(step)
            if len(self.bad_steps) > cfg.max_skipped:
                self.trouble_since = self.bad_steps[0]
                return "rollback"
            return "skip"
        if len(self.losses) >= MIN_HISTORY and loss > cfg.spike_factor * statistics.median(self.losses):
            self.streak += 1
            self.streak_start = self.streak_start or step
            if self.streak >= cfg.spike_steps:
                self.trouble_since = self.streak_start
                return "rollback"
            return "ok"
        self.streak, self.streak_start = 0, None
        self.losses.append(loss)
        if self.unrecovered and step >= self.recovered_at:
            self.unrecovered = 0
        return "ok"

    def may_checkpoint(self):
        """No checkpoint during a spike: the one to roll back to must predate it."""
        return self.streak == 0

    def diverged(self):
        return self.unrecovered >= self.cfg.max_rollbacks

    def rolled_back(self, step, to_step, saved_state, loss, skipped_sequences):
        """After a rollback from `step` to the checkpoint at `to_step` (whose guard state was
        saved_state): the loss history of then, the counters of now. Returns the record."""
        record = {"from_step": step, "to_step": to_step, "loss": loss, "skipped_sequences": skipped_sequences,
                  "trouble_since": self.trouble_since, "skipped_steps": self.skipped}
        rollbacks, skipped, unrecovered = self.rollbacks + [record], self.skipped, self.unrecovered + 1
        self.__init__(self.cfg, saved_state)
        self.rollbacks, self.skipped, self.unrecovered = rollbacks, skipped, unrecovered
        self.recovered_at = step + self.cfg.spike_window
        self.lr_scale, self.lr_scale_until = self.cfg.rollback_lr_factor, step
        return record

    def advice(self, step):
        """The one line a diverged run ends with."""
        fix = (f"Lower --lr (now {self.cfg.lr:g}) or lengthen --warmup_steps (now {self.cfg.warmup_steps}), or look at "
               "the data past the cursor; relaunching with other options goes on from the newest checkpoint")
        if not self.diverged():
            return (f"diverged: trouble at step {self.trouble_since} and no checkpoint before it to roll back to; "
                    f"stopped at step {step}. {fix}")
        last = self.rollbacks[-1]
        what = f"loss {last['loss']:.3g}" if last["loss"] is not None else "steps not finite"
        return (f"diverged: {len(self.rollbacks)} rollbacks, the last {self.unrecovered} without recovery (the latest "
                f"from step {last['from_step']} to {last['to_step']}, {what}); stopped at step {step}. {fix}")


def guard_for(cfg, meta=None):
    """The run's Guard (None with --guard=false), continuing from a checkpoint's meta when resuming."""
    return Guard(cfg, (meta or {}).get("guard")) if cfg.guard else None


def finite_weights(model):
    """Whether this rank's weights (its shards under FSDP2) are all finite."""
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local).all()):
            return False
    return True


def mark_diverged(run_dir, step, line, config):
    """diverged.json: the line, the step and the options of the run that diverged."""
    atomic_write_text(os.path.join(run_dir, MARKER), json.dumps({"step": step, "line": line, "config": config}, indent=2))


def diverged_before(run_dir, config):
    """The line of a run that diverged with these very options (then relaunching would diverge
    again), else None; a relaunch with other options clears the mark."""
    path = os.path.join(run_dir, MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record["config"] == config:
        return record["line"]
    os.unlink(path)
    return None
