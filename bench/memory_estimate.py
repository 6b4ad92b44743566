"""Peak GPU memory of a preset's training step, estimated on any machine, GPU or not.

    python bench/memory_estimate.py --preset=3090                       # does RODIN-1B fit a 24 GiB card?
    python bench/memory_estimate.py --preset=3090 --micro_batch_size=4 --cap_gib=16
    python bench/memory_estimate.py --preset=b200 --activation_checkpointing=ops --cap_gib=180

Frozen decisions:
- The step is train.py's own (rodin.loop.train_step with the preset's memory savers, bf16
  autocast, fused AdamW) run twice on fake tensors (FakeTensorMode: shapes, no data, no FLOPs),
  so the second step has the optimizer's moments; torch's MemTracker adds up live storages,
  rounded to the CUDA allocator's 512 bytes, by kind: parameters, gradients, optimizer state,
  activations, temporaries. A CPU build of torch cannot fake CUDA tensors, so the fake tensors
  sit on the CPU with CPU autocast: the same casts, the same saved tensors.
- It counts tensors, not the allocator: fragmentation, the CUDA context and cuBLAS workspaces come
  on top, and torch.compile (on by default on a GPU) may save other activations. Hence the
  headroom figure against the cap, and the `gpu` test that compares this estimate with
  torch.cuda.max_memory_allocated on a real card.
- One device. --world_size=N adds per_gpu_gib for FSDP2 under torchrun: weights, gradients and
  moments divided by N, activations and temporaries whole; the one or two blocks FSDP gathers
  at a time come on top (a faked FSDP2 run was tried: torch 2.13's FSDPMemTracker counted
  whole optimizer moments on fake DTensors).
"""

import argparse
import dataclasses
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.results import report  # noqa: E402
from rodin import activation_checkpoint  # noqa: E402
from rodin.config import MODELS, parse_args  # noqa: E402
from rodin.device import autocast  # noqa: E402
from rodin.loop import train_step  # noqa: E402
from rodin.loss import make_loss_fn  # noqa: E402
from rodin.model import LLaMA  # noqa: E402
from rodin.optim import optimizer_for  # noqa: E402

GIB = 2**30
KINDS = {"Parameter": "params", "Gradient": "grads", "Optstate": "optimizer", "Activation": "activations", "Temp": "temporaries"}


def estimate(cfg):
    """GiB by kind at the peak of two training steps of cfg, and the peak itself ("peak")."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device("cpu")
    # the peak of 2 accumulated micro-batches is that of any more: the gradients are whole from the second
    cfg = dataclasses.replace(cfg, grad_accum_steps=min(cfg.grad_accum_steps, 2))
    with FakeTensorMode():
        model = LLaMA(cfg.model)
        activation_checkpoint.apply(model, cfg.activation_checkpointing)
        optimizer = optimizer_for(model, cfg, fused=True)
        # ids are never read by a fake embedding: zeros are as good as a batch
        tokens = torch.zeros((cfg.micro_batch_size, cfg.seq_len), dtype=torch.long)
        amp = autocast(device, "bf16", cache=cfg.activation_checkpointing == "none")  # as train.py on a GPU
        tracker = MemTracker()
        tracker.track_external(model)

        def next_batch():
            tracker.reset_mod_stats()  # per-module figures are one forward's; the overall peak stays
            return tokens, tokens

        with tracker, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Expected a tensor")  # MemTracker meets checkpoint's None outputs
            for _ in range(2):
                train_step(model, optimizer, next_batch, cfg.grad_accum_steps, cfg.grad_clip, device, amp,
                           make_loss_fn(cfg.loss_chunk))
        snapshot = tracker.get_tracker_snapshot("peak")[device]
    figures = {name: snapshot.get(kind, 0) / GIB for kind, name in KINDS.items()}
    figures["peak"] = snapshot["Total"] / GIB
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap_gib", type=float, default=24.0, help="the card's memory (RTX 3090/4090: 24)")
    parser.add_argument("--world_size", type=int, default=1, help="FSDP2 over this many GPUs: adds per_gpu_gib")
    parser.add_argument("--quick", action="store_true", help="the `test` preset (for the test suite)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args, overrides = parser.parse_known_args(argv)
    cfg = parse_args((["--preset=test"] if args.quick else ["--preset=3090"]) + overrides)
    gib = estimate(cfg)
    figures = {"model": next((name for name, shape in MODELS.items() if shape == cfg.model), "custom"),
               "micro_batch": cfg.micro_batch_size, "seq_len": cfg.seq_len,
               "checkpointing": cfg.activation_checkpointing, "optimizer_in_backward": cfg.optimizer_in_backward,
               "loss_chunk": cfg.loss_chunk, **{f"{k}_gib": v for k, v in gib.items()}, "cap_gib": args.cap_gib,
               "headroom_gib": args.cap_gib - gib["peak"]}
    if args.world_size > 1:
        sharded = (gib["params"] + gib["grads"] + gib["optimizer"]) / args.world_size
        figures["world_size"] = args.world_size
        figures["per_gpu_gib"] = sharded + gib["activations"] + gib["temporaries"]
        figures["headroom_gib"] = args.cap_gib - figures["per_gpu_gib"]
    report("memory_estimate", figures, args.results)
    return figures


if __name__ == "__main__":
    main()
