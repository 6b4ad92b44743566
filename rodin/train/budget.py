"""Money: what a run has spent over all its launches, what finishing it would cost, and its cap.

Frozen decisions:
- Spent = the sum over launches of wall-clock seconds x GPUs (the world size) x price per GPU-hour
  / 3600, each launch at its own --price_per_hour, counted from the launch's start (restore and
  set-up included). The totals travel in every checkpoint (trainer.json "budget"), so they survive
  relaunches, machines and the mirror; the minutes a crash loses after a launch's last checkpoint
  are not counted.
- The cost to finish is the steps left at the speed of the last logged interval.
- Rank 0's clock decides; run_steps makes every rank agree in its per-step all-reduce.
- At --max_cost the run stops as on a signal (checkpoint, upload, `budget` event, exit 0). A
  relaunch with the same cap trains no step, one with a cap not above what is spent is refused.
"""

import math
import time

clock = time.monotonic  # seconds of a launch; the tests replace it


def gpu_hours(seconds, world_size):
    """GPU-hours of world_size GPUs held for `seconds` of wall-clock time."""
    return seconds * world_size / 3600


def cost(hours, price_per_hour):
    """What `hours` GPU-hours cost at price_per_hour (per GPU)."""
    return hours * price_per_hour


def reached(record):
    """Whether a checkpoint's budget record (its trainer.json "budget") has hit the run's cap."""
    return bool(record) and record.get("max_cost", 0) > 0 and record["cost"] >= record["max_cost"]


class Budget:
    """The meter of one launch, started when it is built, on top of what earlier launches spent."""

    def __init__(self, price_per_hour, max_cost, world_size):
        self.price, self.max_cost, self.world = price_per_hour, max_cost, world_size
        self.started = clock()
        self.hours_before, self.cost_before, self.seconds_before = 0.0, 0.0, 0.0
        self.seconds_per_step, self._measured = None, None

    def load_state_dict(self, record):
        """Continue from a checkpoint's record. A cap that does not exceed what is already spent is
        refused, unless it is the cap the run stopped at: the run then trains no step (exhausted)."""
        self.hours_before, self.cost_before = record.get("gpu_hours", 0.0), record.get("cost", 0.0)
        self.seconds_before = record.get("seconds", 0.0)
        self.seconds_per_step = record.get("seconds_per_step")
        if self.max_cost and self.cost_before >= self.max_cost and self.max_cost != record.get("max_cost"):
            raise ValueError(f"--max_cost={self.max_cost:g} does not exceed the {self.cost_before:.2f} this run has "
                             "already spent (its newest checkpoint); raise it to continue")

    def state_dict(self):
        return {"gpu_hours": self.hours(), "seconds": self.seconds(), "cost": self.spent(), "price_per_hour": self.price,
                "max_cost": self.max_cost, "seconds_per_step": self.seconds_per_step}

    def seconds(self):
        """Wall-clock seconds over all launches so far (whatever the number of GPUs of each)."""
        return self.seconds_before + (clock() - self.started)

    def hours(self):
        """GPU-hours over all launches so far."""
        return self.hours_before + gpu_hours(clock() - self.started, self.world)

    def spent(self):
        """Money spent over all launches so far."""
        return self.cost_before + cost(gpu_hours(clock() - self.started, self.world), self.price)

    def exhausted(self):
        return self.max_cost > 0 and self.spent() >= self.max_cost

    def spent_before_launch(self):
        """Whether earlier launches already spent the cap (load_state_dict let it through: it is the
        cap the run stopped at). It reads no clock, so every rank gives the same answer."""
        return self.max_cost > 0 and self.cost_before >= self.max_cost

    def measure(self, step):
        """The speed since the previous call (run_steps calls it at the start and at every logged step)."""
        now = clock()
        if self._measured is not None and step > self._measured[1]:
            self.seconds_per_step = (now - self._measured[0]) / (step - self._measured[1])
        self._measured = (now, step)

    def figures(self, steps_left):
        """GPU-hours so far and, with a price, the money spent and the money to finish at the measured speed."""
        figures = {"gpu_hours": self.hours()}
        if self.price > 0:
            figures["cost"] = self.spent()
            if self.seconds_per_step is not None:
                figures["cost_to_finish"] = cost(gpu_hours(steps_left * self.seconds_per_step, self.world), self.price)
        return figures

    def stop_line(self, step, steps_left, outcome):
        """The line a run stopped by its cap prints; outcome: what happened at this step."""
        f = self.figures(steps_left)
        line = (f"budget: {f['cost']:.2f} spent of --max_cost={self.max_cost:g} ({f['gpu_hours']:.2f} GPU-hours) "
                f"at step {step}; {outcome}. To continue, relaunch with a higher --max_cost")
        if "cost_to_finish" in f:
            line += (f": about {f['cost_to_finish']:.2f} more finishes the run at the current speed "
                     f"(--max_cost={math.ceil(f['cost'] + f['cost_to_finish'])})")
        return line
