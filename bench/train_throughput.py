"""Training-step throughput of rodin's LLaMA against transformers' LlamaForCausalLM, in one run.

    python bench/train_throughput.py                        # CPU: `demo` model; GPU: rodin-1b, context 2048, bf16
    python bench/train_throughput.py --memory_cap_gib=24    # GPU: as if the card had 24 GiB (RTX 3090)
    python bench/train_throughput.py --compile=both         # both compiled, ours as train.py compiles it (rodin: ours only)
    python bench/train_throughput.py --compile=both --scope=blocks   # ours compiled block by block (FSDP's way)
    python bench/train_throughput.py --clock=cpu --threads=1 --profile   # CPU: where the step goes, the ratio's ceiling

Frozen decisions:
- Both models get the same shape, batch, autocast dtype, fp32 cross-entropy and AdamW, and go
  through the same step as train.py (rodin.train.loop.train_step: forward, backward, clip, step).
- On CPU the two alternate, repeat after repeat, so a busy neighbour slows both alike; on a GPU
  they run one after the other, each alone in memory (two 1B models with AdamW do not fit a cap).
- Figures are medians over repeats; ratio = our tokens/s / transformers'; MFU (GPU only, with the
  FLOPs of LLaMA.flops_per_token) is against the datasheet's dense bf16 peak (rodin.train.device.peak_flops)
  and, as *_mfu_achievable, against a bf16 matmul measured on the card in the same run.
- On a CPU shared with other jobs, wall-clock time swings 3x from repeat to repeat: --clock=cpu
  --threads=1 times the process's own CPU seconds instead, which stays within a few percent.
- --profile (CPU): the shares of each step spent in matmuls and in the attention kernel, both of
  which the two models share, and ratio_ceiling, the ratio ours would reach if every other op of
  ours cost nothing: the most any rewrite of the model could gain without other kernels or dtype.
"""

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.results import report  # noqa: E402
from rodin.config import MODELS  # noqa: E402
from rodin.train.device import autocast, measured_matmul_flops, peak_flops, pick_device, resolve_dtype  # noqa: E402
from rodin.ship.hf import hf_config  # noqa: E402
from rodin.train import fp8  # noqa: E402
from rodin.train.distributed import compile_scope  # noqa: E402
from rodin.train.loop import train_step  # noqa: E402
from rodin.model import LLaMA  # noqa: E402
from rodin.train.optim import make_optimizer  # noqa: E402


class HFCausalLM(nn.Module):
    """transformers' LlamaForCausalLM behind our forward(tokens, targets) -> (logits, loss)."""

    def __init__(self, cfg, attn_implementation):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        fields = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}
        self.model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation=attn_implementation))

    def forward(self, tokens, targets):
        logits = self.model(input_ids=tokens, use_cache=False).logits
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build(name, cfg, device, attn_implementation, compile_model, scope="auto", fp8_recipe="off"):
    """A contender and its AdamW; compiled, ours as train.py compiles it on one process (scope:
    rodin.train.distributed.compile_scope), transformers' whole. fp8_recipe: ours with FP8 matmuls."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaMA(cfg) if name == "rodin" else HFCausalLM(cfg, attn_implementation)
    if name == "rodin" and fp8_recipe != "off":
        fp8.convert(model, fp8_recipe)
    model.train()
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    if compile_model and name == "rodin" and compile_scope(SimpleNamespace(compile_scope=scope), device, 1) == "blocks":
        for block in model.layers:
            block.compile()
        return model, optimizer
    return (torch.compile(model) if compile_model else model), optimizer


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


class Contender:
    """One model and its optimizer, timed over `steps` training steps at a time."""

    def __init__(self, name, args, cfg, device):
        self.name, self.args, self.cfg, self.device = name, args, cfg, device
        self.model = self.optimizer = None
        self.tokens_per_s, self.peak_mem_gib, self.oom = [], 0.0, False
        g = torch.Generator().manual_seed(1)
        batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
        self.inputs, self.targets = batch[:, :-1].to(device), batch[:, 1:].to(device)

    def setup(self):
        compile_model = self.args.compile == "both" or (self.args.compile == "rodin" and self.name == "rodin")
        self.model, self.optimizer = build(self.name, self.cfg, self.device, self.args.attn, compile_model, self.args.scope,
                                           self.args.fp8)
        self.run(self.args.warmup)

    def teardown(self):
        self.model = self.optimizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, steps):
        amp = autocast(self.device, self.args.dtype)
        for _ in range(steps):
            train_step(self.model, self.optimizer, lambda: (self.inputs, self.targets), 1, 1.0, self.device, amp)

    def time(self):
        if self.oom:
            return
        try:
            if self.model is None:
                self.setup()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            clock = time.process_time if self.args.clock == "cpu" else time.perf_counter
            start = clock()
            self.run(self.args.steps)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                self.peak_mem_gib = max(self.peak_mem_gib, torch.cuda.max_memory_allocated(self.device) / 2**30)
            self.tokens_per_s.append(self.args.steps * self.args.batch * self.args.seq_len / (clock() - start))
        except torch.cuda.OutOfMemoryError:
            self.oom = True
            self.teardown()

    def kernel_shares(self):
        """(matmul, attention) shares of this contender's CPU time over `steps` profiled steps."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.run(self.args.steps)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
        return matmul / total, attention / total

    def median(self):
        return statistics.median(self.tokens_per_s) if self.tokens_per_s else None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, choices=sorted(MODELS), help="default: rodin-1b on a GPU, demo on CPU")
    parser.add_argument("--seq_len", type=int, default=None, help="default: 2048 on a GPU, 256 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 4 on a GPU, 8 on CPU)")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 autocast on a GPU or a CPU with native bf16, else fp32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default="sdpa", help="transformers' attn_implementation")
    parser.add_argument("--compile", default="none", choices=("none", "both", "rodin"),
                        help="torch.compile both models, or ours alone (as train.py would run it against stock transformers)")
    parser.add_argument("--scope", default="auto", choices=("auto", "blocks", "whole"),
                        help="how ours is compiled (train.py's --compile_scope): auto is whole on a CPU, blocks on CUDA")
    parser.add_argument("--fp8", default="off", choices=("off", "tensorwise", "rowwise"),
                        help="ours with the blocks' matmuls in FP8 (train.py's --fp8; MFU stays against the bf16 peak)")
    parser.add_argument("--memory_cap_gib", type=float, default=0, help="GPU: cap this process's memory")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="cpu: CPU seconds of this process (CPU only)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="CPU: matmul and attention shares of the step, and the ratio's ceiling")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="the `test` model, a few tiny steps (for the test suite)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    gpu = pick_device(args.device).type == "cuda"
    if gpu and args.clock == "cpu":
        parser.error("--clock=cpu measures CPU work: use it with --device=cpu")
    if gpu and args.profile:
        parser.error("--profile measures CPU kernels: use it with --device=cpu")
    if args.quick:
        defaults = dict(model="test", seq_len=32, batch=2, steps=2, repeats=2, warmup=1)
    else:
        defaults = dict(model="rodin-1b" if gpu else "demo", seq_len=2048 if gpu else 256, batch=4 if gpu else 8)
    for key, value in defaults.items():
        if getattr(args, key) is None or (args.quick and key in ("steps", "repeats", "warmup")):
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(MODELS[args.model], max_seq_len=max(args.seq_len, MODELS[args.model].max_seq_len))
    if args.memory_cap_gib and device.type != "cuda":
        print("note: --memory_cap_gib caps CUDA memory only; ignored on CPU")
    if args.memory_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)
    ours, theirs = Contender("rodin", args, cfg, device), Contender("transformers", args, cfg, device)
    if device.type == "cpu":
        for _ in range(args.repeats):
            ours.time()
            theirs.time()
    else:
        for contender in (ours, theirs):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.repeats):
                contender.time()
            contender.teardown()

    with torch.device("meta"):  # the shape alone: no memory for rodin-1b's weights
        flops_per_token = LLaMA(cfg).flops_per_token(args.seq_len)
    peak = peak_flops(device)
    # the card's achievable peak, measured in this run: MFU against it beside MFU against the datasheet
    achievable = measured_matmul_flops(device) if device.type == "cuda" else None
    figures = {"model": args.model, "seq_len": args.seq_len, "batch": args.batch,
               "dtype": resolve_dtype(device, args.dtype),
               "compile": args.compile, "repeats": args.repeats}
    if args.compile != "none":
        figures["scope"] = compile_scope(SimpleNamespace(compile_scope=args.scope), device, 1)
    if args.fp8 != "off":
        figures["fp8"] = args.fp8
    if device.type == "cpu":
        figures.update(threads=torch.get_num_threads(), clock=args.clock)
    if args.memory_cap_gib and device.type == "cuda":
        figures["cap_gib"] = args.memory_cap_gib
    for c in (ours, theirs):
        figures[f"{c.name}_tok_s"] = "OOM" if c.oom else c.median()
        if peak and not c.oom:
            figures[f"{c.name}_mfu"] = c.median() * flops_per_token / peak
        if achievable and not c.oom:
            figures[f"{c.name}_mfu_achievable"] = c.median() * flops_per_token / achievable
        if device.type == "cuda":
            figures[f"{c.name}_peak_gib"] = c.peak_mem_gib
    if achievable:
        figures["matmul_tflops"] = achievable / 1e12
    if not ours.oom and not theirs.oom:
        figures["ratio"] = ours.median() / theirs.median()
    if args.profile:
        for c in (ours, theirs):
            figures[f"{c.name}_matmul_share"], figures[f"{c.name}_attention_share"] = c.kernel_shares()
        # our step with only its matmuls and attention left, against transformers' whole step
        figures["ratio_ceiling"] = figures["ratio"] / (figures["rodin_matmul_share"] + figures["rodin_attention_share"])
    report("train_throughput", figures, args.results, device)
    return figures


if __name__ == "__main__":
    main()
