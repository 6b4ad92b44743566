"""Peak GPU memory of a preset's training step, estimated on any machine, GPU or not.

    python bench/memory_estimate.py --preset=3090                       # does RODIN-1B fit a 24 GiB card?
    python bench/memory_estimate.py --preset=3090 --micro_batch_size=4 --cap_gib=16
    python bench/memory_estimate.py --preset=b200 --activation_checkpointing=ops --cap_gib=180
    python bench/memory_estimate.py --sft_preset=lucie-7b-lora-3090      # Lucie-7B with LoRA on a 24 GiB card

Frozen decisions:
- The estimate is rodin.train.memory's (the one --micro_batch_size=auto fits with): train.py's own
  step run twice on fake tensors, live storages added up by kind. It counts tensors, not the
  allocator: fragmentation, the CUDA context and cuBLAS workspaces come on top, hence the
  headroom figure against the cap, and the `gpu` test that compares this estimate with
  torch.cuda.max_memory_allocated on a real card.
- --world_size=N adds per_gpu_gib for FSDP2 under torchrun: weights, gradients and optimizer
  state divided by N, activations and temporaries whole (a faked FSDP2 run was tried: torch
  2.13's FSDPMemTracker counted whole optimizer moments on fake DTensors).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results import report  # noqa: E402
from rodin.config import MODELS, SFT_PRESETS, parse_args  # noqa: E402
from rodin.train.memory import estimate, per_device_gib, with_micro_batch  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap_gib", type=float, default=24.0, help="the card's memory (RTX 3090/4090: 24)")
    parser.add_argument("--world_size", type=int, default=1, help="FSDP2 over this many GPUs: adds per_gpu_gib")
    parser.add_argument("--quick", action="store_true", help="the `test` preset (for the test suite)")
    parser.add_argument("--sft_preset", help="an SFT preset of sft.py instead (e.g. lucie-7b-lora-3090)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args, overrides = parser.parse_known_args(argv)
    if args.sft_preset:
        cfg = parse_args([f"--preset={args.sft_preset}"] + overrides, presets=SFT_PRESETS)
    else:
        cfg = parse_args((["--preset=test"] if args.quick else ["--preset=3090"]) + overrides)
    if cfg.global_batch:  # the accumulation the run would derive: a step that accumulates keeps whole gradients
        if not cfg.micro_batch_size:
            sys.exit("error: --micro_batch_size=auto is fitted at the start of a run; estimate one size with --micro_batch_size=N")
        cfg = with_micro_batch(cfg, cfg.micro_batch_size, args.world_size)
    gib = estimate(cfg)
    figures = {"model": next((name for name, shape in MODELS.items() if shape == cfg.model), "custom"),
               "optimizer": cfg.optimizer, "micro_batch": cfg.micro_batch_size, "grad_accum_steps": cfg.grad_accum_steps,
               "seq_len": cfg.seq_len,
               "checkpointing": cfg.activation_checkpointing, "optimizer_in_backward": cfg.optimizer_in_backward,
               "loss_chunk": cfg.loss_chunk, **({"lora_rank": cfg.lora_rank} if cfg.lora_rank else {}),
               **{f"{k}_gib": v for k, v in gib.items()}, "cap_gib": args.cap_gib,
               "headroom_gib": args.cap_gib - gib["peak"]}
    if args.world_size > 1:
        figures["world_size"] = args.world_size
        figures["per_gpu_gib"] = per_device_gib(gib, args.world_size)
        figures["headroom_gib"] = args.cap_gib - figures["per_gpu_gib"]
    report("memory_estimate", figures, args.results)
    return figures


if __name__ == "__main__":
    main()
