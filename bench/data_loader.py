"""The data loader's share of a training step: is the model waiting for batches?

    python bench/data_loader.py                           # the preset for this machine, its data
    python bench/data_loader.py --preset=gpu-demo --steps=50

Frozen decisions:
- The loader and step are train.py's own (rodin.data.batches.TrainBatches over memory-mapped shards,
  rodin.train.loop.train_step); only the time inside next_batch() is counted as loading.
- Without the preset's shards (make data), or with --quick, a small tokenizer and shards are made
  from the shipped corpus in a temporary directory, so the bench runs on a fresh clone.
"""

import argparse
import glob
import gzip
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.results import report  # noqa: E402
from rodin.config import PRESETS  # noqa: E402
from rodin.data.batches import TrainBatches, Windows, find_shards  # noqa: E402
from rodin.train.device import autocast, pick_device  # noqa: E402
from rodin.train.loop import train_step  # noqa: E402
from rodin.model import LLaMA  # noqa: E402
from rodin.train.optim import make_optimizer  # noqa: E402
from rodin.data.tokenizer import open_tokenizer  # noqa: E402

CORPUS = os.path.join(ROOT, "data", "littre-citations.txt.gz")


def make_data(out_dir, vocab_size, lines):
    """Tokenizer and shards from the first `lines` quotations of the shipped corpus."""
    from data import encode, train_tokenizer

    text = os.path.join(out_dir, "corpus.txt")
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f, open(text, "w", encoding="utf-8") as out:
        out.writelines(itertools.islice(f, lines))
    tokenizer = os.path.join(out_dir, "tokenizer.model")
    train_tokenizer.main([text, f"--vocab_size={vocab_size}", f"--out={tokenizer}", "--threads=2"])
    encode.main([text, f"--tokenizer={tokenizer}", f"--out_dir={out_dir}", "--workers=2"])
    return out_dir, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: gpu-demo on a GPU, cpu-demo on CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="the `test` preset, a few steps (for the test suite)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.quick:
        args.preset, args.steps = "test", 5
    args.preset = args.preset or ("gpu-demo" if device.type == "cuda" else "cpu-demo")
    cfg = PRESETS[args.preset]

    scratch = None
    try:
        data_dir, tokenizer_path = cfg.data_dir, cfg.tokenizer
        usable = (not args.quick and os.path.exists(tokenizer_path) and glob.glob(os.path.join(data_dir, "train*.bin"))
                  and open_tokenizer(tokenizer_path).vocab_size <= cfg.model.vocab_size)
        if not usable:
            scratch = tempfile.mkdtemp(prefix="rodin-loader-bench-")
            data_dir, tokenizer_path = make_data(scratch, cfg.model.vocab_size, 3000 if args.quick else 20000)
        fingerprint = open_tokenizer(tokenizer_path).fingerprint
        batches = TrainBatches(Windows(find_shards(data_dir, "train"), cfg.seq_len, fingerprint), cfg.micro_batch_size, 0)

        torch.manual_seed(0)
        with torch.device(device):
            model = LLaMA(cfg.model)
        optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        amp = autocast(device, cfg.dtype)
        load_times = []

        def timed_next():
            start = time.perf_counter()
            batch = batches.next()
            load_times.append(time.perf_counter() - start)
            return batch

        train_step(model, optimizer, timed_next, cfg.grad_accum_steps, cfg.grad_clip, device, amp)  # warm-up
        load_times.clear()
        step_times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loss, _ = train_step(model, optimizer, timed_next, cfg.grad_accum_steps, cfg.grad_clip, device, amp)
            float(loss)  # waits for the device: the step is over
            step_times.append(time.perf_counter() - start)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    load_per_step = sum(load_times) / len(step_times)
    tokens_per_batch = cfg.micro_batch_size * cfg.seq_len
    figures = {"preset": args.preset, "steps": args.steps, "step_ms": 1e3 * statistics.median(step_times),
               "load_ms_per_step": 1e3 * load_per_step, "load_share": sum(load_times) / sum(step_times),
               "loader_tok_s": tokens_per_batch * len(load_times) / sum(load_times)}
    report("data_loader", figures, args.results, device)
    return figures


if __name__ == "__main__":
    main()
