"""What the guard (rodin/train/guard.py) costs a training step, as a share of the step.

    python bench/guard_cost.py                  # cpu-demo on CPU, gpu-demo on a GPU, 30 steps
    python bench/guard_cost.py --quick          # the `test` preset, a few steps (for the test suite)

Frozen decisions:
- The step is the loop's own (rodin.train.loop.forward_backward, then the optimizer), on the
  preset's model, micro-batch, dtype and clipping. What the guard adds is timed apart, step by
  step: reading the loss and the gradient norm (it waits for the device), the gradient norm
  itself when the preset does not clip, its verdict (the median of the recent losses), and the
  check of the weights before each checkpoint, spread over the preset's ckpt_every steps.
- guard_share = guard seconds / step seconds, medians over the steps (goal: < 1 %). The reads
  are timed after the step has finished: on a GPU, the wait for the device they add to a loop that
  would otherwise run ahead is not in this figure (one sync a step; the step's all-reduce already
  holds one under torchrun).
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

from bench.data_loader import make_data  # noqa: E402
from bench.results import report  # noqa: E402
from rodin.config import PRESETS  # noqa: E402
from rodin.data.batches import TrainBatches, Windows, find_shards  # noqa: E402
from rodin.data.tokenizer import Tokenizer  # noqa: E402
from rodin.model import LLaMA  # noqa: E402
from rodin.train.device import autocast, pick_device  # noqa: E402
from rodin.train.guard import Guard, finite_weights  # noqa: E402
from rodin.train.loop import forward_backward  # noqa: E402
from rodin.train.optim import optimizer_for  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: gpu-demo on a GPU, cpu-demo on CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="the `test` preset, a few steps (for the test suite)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.quick:
        args.preset, args.steps = "test", 5
    args.preset = args.preset or ("gpu-demo" if device.type == "cuda" else "cpu-demo")
    cfg = PRESETS[args.preset]
    scratch = tempfile.mkdtemp(prefix="rodin-guard-bench-")
    try:
        data_dir, tokenizer_path = make_data(scratch, cfg.model.vocab_size, 3000 if args.quick else 20000)
        windows = Windows(find_shards(data_dir, "train"), cfg.seq_len, Tokenizer(tokenizer_path).fingerprint)
        batches = TrainBatches(windows, cfg.micro_batch_size, cfg.seed)
        torch.manual_seed(0)
        with torch.device(device):
            model = LLaMA(cfg.model)
        optimizer = optimizer_for(model, cfg)
        amp = autocast(device, cfg.dtype)
        guard = Guard(cfg)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        step_times, guard_times = [], []
        for step in range(1, args.steps + 2):
            sync()
            start = time.perf_counter()
            loss, norm = forward_backward(model, batches.next, cfg.grad_accum_steps, cfg.grad_clip, device, amp)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            stepped = time.perf_counter()
            finite = bool(torch.isfinite(loss) & torch.isfinite(norm))
            guard.judge(step, float(loss), finite)
            if cfg.grad_clip <= 0:  # the norm the guard computes when the preset does not clip
                torch.nn.utils.get_total_norm([p.detach() for p in model.parameters()])
            checked = time.perf_counter()
            finite_weights(model)
            weights = (time.perf_counter() - checked) / cfg.ckpt_every
            if step > 1:  # the first step warms up
                step_times.append(stepped - start)
                guard_times.append(checked - stepped + weights)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures = {"preset": args.preset, "steps": args.steps, "step_ms": 1e3 * statistics.median(step_times),
               "guard_ms": 1e3 * statistics.median(guard_times),
               "guard_share": statistics.median(guard_times) / statistics.median(step_times)}
    report("guard_cost", figures, args.results, device)
    return figures


if __name__ == "__main__":
    main()
