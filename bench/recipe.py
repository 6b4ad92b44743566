"""Learning efficiency of the training recipes: the same model, data and seed trained with each.

    python bench/recipe.py                         # cpu-demo, 500 steps: adamw-fp32, adamw-auto, muon-auto
    python bench/recipe.py --preset=gpu-demo --steps=1500 --eval_every=50
    python bench/recipe.py --recipes=adamw-fp32,muon-bf16 --args="--warmup_steps=50"

Frozen decisions:
- Each recipe is train.py itself (train.main) on the preset with its options (RECIPES), eager
  (compile is a speed switch of its own, bench/train_throughput.py), every recipe the same number
  of steps. The reference is the first recipe (AdamW in fp32 at its lr, the default before
  Muon); every recipe is scored by the steps and the training seconds it needs to reach the
  reference's final held-out bpb (linear between evaluations).
- Seconds are training time only, from each log interval's tokens / tokens_per_s (evaluation
  excluded): on a shared machine they are as noisy as its load (written in the row); steps are not.
- Without the preset's shards, or with --quick, a small tokenizer and shards are made from the
  shipped corpus in a temporary directory (bench/data_loader.py's make_data).
"""

import argparse
import json
import math
import os
import shlex
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from bench.data_loader import make_data  # noqa: E402
from bench.results import RESULTS, report  # noqa: E402
from rodin.config import PRESETS, parse_args  # noqa: E402
from rodin.train.device import pick_device, resolve_dtype  # noqa: E402

# the recipes compared, each with what it changes in the preset. AdamW keeps its best learning
# rate (cpu-demo, 500 steps in bf16: held-out bpb 1.769 at 1.5e-3, 1.748 at 3e-3, 1.983 at 6e-3);
# Muon takes the preset's lr (6e-3, rodin/config.py's cpu-demo comment).
MUON_PLAIN = ["--optimizer=muon", "--dtype=auto", "--muon_normuon=false", "--muon_momentum=0.9",
              "--muon_momentum_warmup_steps=0"]  # torch.optim.Muon's Newton-Schulz: cpu-demo before NorMuon
RECIPES = {
    "adamw-fp32": ["--optimizer=adamw", "--dtype=fp32", "--lr=3e-3", "--min_lr=3e-4"],  # the default before Muon
    "adamw-auto": ["--optimizer=adamw", "--dtype=auto", "--lr=3e-3", "--min_lr=3e-4"],  # bf16 where the CPU has it
    "muon-auto": ["--optimizer=muon", "--dtype=auto"],  # the preset's Muon as it is (cpu-demo: NorMuon, momentum warm-up)
    "muon-plain": MUON_PLAIN,
    # Muon's 2026 variants (issue 22), each alone on top of plain Muon; kept only where they measure better
    "muon-polar": MUON_PLAIN + ["--muon_orthogonalise=polar_express"],
    "muon-normuon": MUON_PLAIN + ["--muon_normuon=true"],
    "muon-cautious": MUON_PLAIN + ["--muon_cautious_weight_decay=true"],
    "muon-wsd": MUON_PLAIN + ["--schedule=wsd", "--decay_steps=100"],  # the last fifth decays
    # the tied embedding at AdamW's own best lr (3e-3, half of Muon's), and modded-nanogpt's momentum warm-up
    "muon-embed-lr": MUON_PLAIN + ["--embedding_lr_scale=0.5"],
    "muon-momentum-warmup": MUON_PLAIN + ["--muon_momentum=0.95", "--muon_momentum_start=0.85",
                                          "--muon_momentum_warmup_steps=300"],
    # the two best alone (steps: NorMuon; final bpb: the momentum warm-up), together (cpu-demo's since
    # 2026-12-06), and NorMuon with Polar Express
    "muon-normuon-momentum-warmup": MUON_PLAIN + ["--muon_normuon=true", "--muon_momentum=0.95",
                                                  "--muon_momentum_start=0.85", "--muon_momentum_warmup_steps=300"],
    "muon-normuon-polar": MUON_PLAIN + ["--muon_normuon=true", "--muon_orthogonalise=polar_express"],
}


def recipe_args(recipe):
    """A recipe's options: a name of RECIPES, or optimizer-dtype ('muon-bf16') at the preset's lr."""
    if recipe in RECIPES:
        return RECIPES[recipe]
    optimizer, _, dtype = recipe.partition("-")
    return [f"--optimizer={optimizer}", f"--dtype={dtype or 'auto'}"]


def train_curve(recipe, base_args, out_dir):
    """[(step, train seconds so far, val_bpb)] of one recipe trained by train.py."""
    name = recipe.replace("/", "_")
    argv = [*base_args, *recipe_args(recipe), f"--out_dir={out_dir}", f"--name={name}", "--wandb=disabled",
            "--ckpt_every=1000000", "--sample_tokens=0", "--compile=off"]
    if train.main(argv) != 0:
        raise RuntimeError(f"{recipe}: train.py failed")
    with open(os.path.join(out_dir, name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    curve, seconds, last_tokens = [], 0.0, 0
    for r in records:
        if "tokens_per_s" in r:
            seconds += (r["tokens_seen"] - last_tokens) / r["tokens_per_s"]
            last_tokens = r["tokens_seen"]
        if "val_bpb" in r:
            curve.append((r["step"], seconds, r["val_bpb"]))
    return curve


def reach(curve, target):
    """(steps, seconds) at which a curve first gets down to target bpb, linear between evaluations;
    None if it never does."""
    for (s0, t0, b0), (s1, t1, b1) in zip(curve, curve[1:]):
        if b1 <= target:
            w = 1.0 if b0 == b1 else (b0 - target) / (b0 - b1)
            w = min(max(w, 0.0), 1.0)
            return s0 + w * (s1 - s0), t0 + w * (t1 - t0)
    return None


def plot(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for recipe, curve in curves.items():
        steps, seconds, bpb = zip(*curve)
        axes[0].plot(steps, bpb, "o-", ms=3, label=recipe)
        axes[1].plot(seconds, bpb, "o-", ms=3, label=recipe)
    target = curves[next(iter(curves))][-1][2]
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out bits per byte")
    axes[0].set_ylim(top=min(max(b for c in curves.values() for _, _, b in c), target + 2.5))
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--steps", type=int, default=500, help="every recipe's max_steps (500: cpu-demo's before Muon)")
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--recipes", default="adamw-fp32,adamw-auto,muon-auto",
                        help=f"names of RECIPES ({', '.join(RECIPES)}) or optimizer-dtype; the first is the reference")
    parser.add_argument("--args", default="", help="more train.py options for every recipe, e.g. '--lr=2e-3'")
    parser.add_argument("--plot", default=None, help="the PNG (default: recipe.png beside the results file)")
    parser.add_argument("--quick", action="store_true", help="the `test` preset, a few steps (for the test suite)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    preset = "test" if args.quick else args.preset
    steps = 12 if args.quick else args.steps
    eval_every = 4 if args.quick else args.eval_every
    recipes = args.recipes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PRESETS[preset]
        data_dir, tokenizer = cfg.data_dir, cfg.tokenizer
        if args.quick or not os.path.exists(os.path.join(data_dir, "train-00000.bin")):
            data_dir, tokenizer = make_data(tmp, cfg.model.vocab_size, 2000 if args.quick else 60000)
        base = [f"--preset={preset}", f"--data_dir={data_dir}", f"--tokenizer={tokenizer}", f"--max_steps={steps}",
                f"--eval_every={eval_every}", f"--log_every={math.gcd(eval_every, 10)}", "--tqdm=false",
                *shlex.split(args.args)]
        parse_args(base)  # bad options stop here, before any training
        curves = {recipe: train_curve(recipe, base, os.path.join(tmp, "runs")) for recipe in recipes}
    target = curves[recipes[0]][-1][2]
    auto = resolve_dtype(pick_device(PRESETS[preset].device), "auto")
    figures = {"preset": preset, "steps": steps, "auto_dtype": auto, "target_bpb": target}
    for recipe, curve in curves.items():
        key = recipe.replace("-", "_")
        reached = reach(curve, target)
        figures[f"{key}_final_bpb"] = curve[-1][2]
        if reached is not None and recipe != recipes[0]:
            figures[f"{key}_steps"], figures[f"{key}_seconds"] = reached
            figures[f"{key}_step_ratio"] = reached[0] / steps
            figures[f"{key}_time_ratio"] = reached[1] / curves[recipes[0]][-1][1]
    plot(curves, args.plot or os.path.join(os.path.dirname(args.results or RESULTS), "recipe.png"),
         f"{preset}: held-out bpb, same model, data and seed")
    report("recipe", figures, args.results)
    return figures


if __name__ == "__main__":
    main()
