"""What a pretraining run costs: tokens and throughput -> GPU-hours, wall-clock hours and euros.

    python bench/cost.py --tokens=32e9 --preset=rodin-1b --tokens_per_s=61000 --gpu=H100 --price=2.2
    python bench/cost.py --tokens=5e9 --preset=rodin-1b --gpu=3090 --mfu=0.35

Frozen decisions:
- The anchor is RODIN-1B's run: 32 B tokens in about 140 B200-hours, about 285 EUR. Without a
  measured --tokens_per_s, throughput comes from --mfu, by default the anchor's own MFU, against
  the peak of --gpu in rodin.train.device.PEAK_BF16_FLOPS and the preset's LLaMA.flops_per_token.
- tokens_per_s is per GPU; n GPUs divide the wall-clock time, not the GPU-hours.
- The money is rodin.train.budget's accounting, the trainer's own: wall-clock seconds x GPUs x price per
  GPU-hour / 3600. So `train.py --price_per_hour=PRICE --max_cost=COST` stops a run at this
  estimate, and its progress bar and metrics.jsonl report the same figures as it goes.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.results import report  # noqa: E402
from rodin.train import budget  # noqa: E402
from rodin.config import PRESETS  # noqa: E402
from rodin.train.device import PEAK_BF16_FLOPS  # noqa: E402
from rodin.model import LLaMA  # noqa: E402

ANCHOR = {"tokens": 32e9, "gpu_hours": 140.0, "gpu": "B200", "eur": 285.0, "preset": "rodin-1b"}


def gpu_peak(name):
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(k for k, _ in PEAK_BF16_FLOPS)} (or pass --tokens_per_s)")


def flops_per_token(preset):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    with torch.device("meta"):  # the shape alone, no memory
        return LLaMA(cfg.model).flops_per_token(cfg.seq_len)


def anchor_mfu():
    """The MFU that RODIN-1B's 32 B tokens in 140 B200-hours imply."""
    tokens_per_s = ANCHOR["tokens"] / (ANCHOR["gpu_hours"] * 3600)
    return tokens_per_s * flops_per_token(ANCHOR["preset"]) / gpu_peak(ANCHOR["gpu"])


def estimate(tokens, preset, gpu, tokens_per_s=None, mfu=None, gpus=1, price=None):
    """Figures of a run of `tokens` tokens; tokens_per_s (per GPU) wins over mfu when both are given."""
    per_token = flops_per_token(preset)
    if tokens_per_s is None:
        mfu = anchor_mfu() if mfu is None else mfu
        tokens_per_s = mfu * gpu_peak(gpu) / per_token
    else:  # measured: the MFU it means, when the GPU's peak is known
        known = any(key.lower() in gpu.lower() for key, _ in PEAK_BF16_FLOPS)
        mfu = tokens_per_s * per_token / gpu_peak(gpu) if known else None
    price = ANCHOR["eur"] / ANCHOR["gpu_hours"] if price is None else price
    wall_seconds = tokens / (tokens_per_s * gpus)
    gpu_hours = budget.gpu_hours(wall_seconds, gpus)
    figures = {"tokens": f"{tokens:.3g}", "preset": preset, "gpu": gpu, "gpus": gpus, "tok_s_per_gpu": tokens_per_s}
    if mfu is not None:
        figures["mfu"] = mfu
    figures.update({"gpu_hours": gpu_hours, "wall_hours": wall_seconds / 3600, "eur_per_gpu_hour": price,
                    "cost_eur": budget.cost(gpu_hours, price)})
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=ANCHOR["tokens"], help="tokens to train on")
    parser.add_argument("--preset", default=ANCHOR["preset"], help="training preset (model shape and seq_len)")
    parser.add_argument("--gpu", default=ANCHOR["gpu"], help="a name in rodin.train.device.PEAK_BF16_FLOPS")
    parser.add_argument("--tokens_per_s", type=float, default=None, help="measured, per GPU (bench/train_throughput.py)")
    parser.add_argument("--mfu", type=float, default=None, help="assumed MFU when tokens/s is not measured (default: the anchor's)")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--price", type=float, default=None, help="EUR per GPU-hour (default: the anchor's, 285/140)")
    parser.add_argument("--quick", action="store_true", help="the anchor itself (for the test suite)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    figures = estimate(args.tokens, args.preset, args.gpu, args.tokens_per_s, args.mfu, args.gpus, args.price)
    report("cost", figures, args.results)
    return figures


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
