"""The run directory's record of a run: metrics.jsonl, loss.png, samples, and wandb.

metrics.jsonl holds one JSON object per logged step. On resume, lines past the checkpoint's
step are dropped first, so an interrupted-and-resumed run leaves the same log as a straight one.
Each line names the hardware that computed it (device, world_size): a run that moved from a 3090
to B200s says so, and its GPU-hours are counted per kind (rodin.ship.modelcard).
wandb is optional and offline by default; the local files are the record that always exists.
"""

import glob
import json
import os

from rodin.io import atomic_write_text, figure, save_figure
from rodin.train.device import hardware_name, pick_device


class RunLog:
    def __init__(self, run_dir, config_dict, wandb_mode="offline", resume_step=0):
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.hardware = {"device": hardware_name(pick_device(config_dict.get("device", "auto"))),
                         "world_size": config_dict.get("world_size", 1)}
        self.records = self._read_until(resume_step)
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project="rodin", name=os.path.basename(run_dir), dir=run_dir, mode=wandb_mode,
                                    config=config_dict, resume="allow", id=os.path.basename(run_dir))

    def _read_until(self, step):
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return [r for r in records if r["step"] <= step]

    def log(self, record):
        self.records.append(dict(record, **self.hardware))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(self.records[-1]) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def rewind(self, step):
        """Forget the records past `step` (a rollback went back there), as a resume from it would."""
        self.records = [r for r in self.records if r["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write_samples(self, step, samples):
        path = os.path.join(self.run_dir, "samples.md")
        with open(path, "a") as f:
            f.write(f"## step {step}\n\n" + "".join(f"- {s!r}\n" for s in samples) + "\n")

    def plot(self):
        plot_losses(self.records, os.path.join(self.run_dir, "loss.png"), title=os.path.basename(self.run_dir))

    def finish(self):
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(records, path, title=""):
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = figure(7, 4)
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def read_run(run_dir):
    """{'name', 'records', 'config', 'evals': [(label, lm-eval results dict)]} of a run directory:
    what train.py and rodin.eval.harness wrote there, for the report and the model card."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        raise FileNotFoundError(f"{metrics}: not found; is {run_dir} a run directory (made by train.py)?")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    config = None
    if os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    evals = []
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "*.json"))):
        with open(path) as f:
            results = json.load(f)
        if "results" in results:
            evals.append((os.path.splitext(os.path.basename(path))[0], results))
    return {"name": os.path.basename(os.path.normpath(run_dir)), "records": records, "config": config, "evals": evals}
