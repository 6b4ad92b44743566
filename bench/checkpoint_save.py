"""How long writing a checkpoint takes, and how long it holds up training.

    python bench/checkpoint_save.py                   # CPU: `demo` model; GPU: rodin-1b
    python bench/checkpoint_save.py --dir=/scratch     # the disk the run will write to

Frozen decisions:
- The checkpoint is the real one (rodin.train.checkpoint.save: model, AdamW state, RNG, fsync, manifest,
  rename) of a model that has taken a step, so the optimizer state exists.
- train.py saves synchronously, so the step is blocked for the whole save: blocked_steps is the
  save time in training steps of the same model and batch (the cost of one checkpoint).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.results import report  # noqa: E402
from rodin.train import checkpoint  # noqa: E402
from rodin.config import MODELS  # noqa: E402
from rodin.train.device import autocast, pick_device  # noqa: E402
from rodin.train.loop import train_step  # noqa: E402
from rodin.model import LLaMA  # noqa: E402
from rodin.train.optim import make_optimizer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, choices=sorted(MODELS), help="default: rodin-1b on a GPU, demo on CPU")
    parser.add_argument("--seq_len", type=int, default=None, help="of the training step compared with (default 2048 GPU, 256 CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on a GPU, 8 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="the `test` model, one save (for the test suite)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.model, args.seq_len, args.batch, args.repeats = "test", 32, 2, 1
    args.model = args.model or ("rodin-1b" if gpu else "demo")
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    args.batch = args.batch or (4 if gpu else 8)

    torch.manual_seed(0)
    cfg = MODELS[args.model]
    with torch.device(device):
        model = LLaMA(cfg)
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, min(args.seq_len, cfg.max_seq_len) + 1))
    batch = lambda: (tokens[:, :-1], tokens[:, 1:])  # noqa: E731
    amp = autocast(device)
    train_step(model, optimizer, batch, 1, 1.0, device, amp)  # warm-up, and AdamW's state exists
    step_times = []
    for _ in range(max(2, args.repeats)):
        start = time.perf_counter()
        loss, _ = train_step(model, optimizer, batch, 1, 1.0, device, amp)
        float(loss)  # waits for the device: the step is over
        step_times.append(time.perf_counter() - start)

    root = tempfile.mkdtemp(prefix="rodin-ckpt-bench-", dir=args.dir)
    save_times, size = [], 0
    try:
        meta = {"tokens_seen": 0, "data": {}, "config": {}, "tokenizer": "-"}
        for i in range(args.repeats):
            start = time.perf_counter()
            path = checkpoint.save(root, i + 1, model, optimizer, meta, keep=2)
            save_times.append(time.perf_counter() - start)
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save_s, step_s = statistics.median(save_times), statistics.median(step_times)
    figures = {"model": args.model, "params": model.num_params(), "size_mb": size / 1e6, "save_s": save_s,
               "write_mb_s": size / 1e6 / save_s, "step_s": step_s, "blocked_s": save_s,
               "blocked_steps": save_s / step_s, "repeats": args.repeats}
    report("checkpoint_save", figures, args.results, device)
    return figures


if __name__ == "__main__":
    main()
