"""Every GPU figure of rodin in one command, for whoever has a CUDA machine for a few minutes:

    make bench-gpu                          # = python bench/gpu.py: all items within --budget_s (540)
    python bench/gpu.py --only=throughput,preset_3090 --budget_s=300      # a rerun of some items
    python bench/gpu.py --quick             # the same items on the CPU, test shapes (for the test suite)

Frozen decisions:
- Items, figures first: `throughput` (rodin-1b's training step at context 2048, micro-batch 8,
  bf16, against transformers' LlamaForCausalLM in the same run: tokens/s, MFU, peak memory,
  eager); `preset_3090` (train.py --preset=3090 under a 24 GiB cap: tokens/s, MFU, peak);
  `memory` (the quick estimate of rodin/preflight.py and bench/memory_estimate.py's fake-tensor
  one against torch.cuda.max_memory_allocated, eager, 3090 and b200 presets);
  `throughput_compiled` (ours compiled per block as train.py does, against stock transformers);
  `tests` (pytest -m gpu); `fsdp` (train.py --preset=b200 under torchrun over every GPU: NCCL,
  bf16, FSDP2; 2 GPUs or more). What the budget leaves out, a second call runs with --only.
- Each item runs in its own process with a timeout, so an out-of-memory error or a hang ends that
  item only, and leaves a row in bench/RESULTS.md whatever happens (figures, or failed/timed
  out/skipped and why): a lease that ends early still leaves a record of what was measured.
- Data: a tokenizer and shards made from the first 6,000 quotations of the shipped corpus, once,
  in a temporary folder: no download, no `make data`.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.results import report  # noqa: E402

GIB = 2**30
# name: (seconds it may take on an H100/H200, what it measures)
ITEMS = {
    "throughput": (120, "rodin-1b vs transformers, eager"),
    "preset_3090": (180, "train.py --preset=3090 under a 24 GiB cap"),
    "memory": (200, "memory estimates against the allocator"),
    "throughput_compiled": (180, "rodin-1b compiled per block vs transformers"),
    "tests": (240, "pytest -m gpu"),
    "fsdp": (180, "train.py --preset=b200 under torchrun, NCCL"),
}


def run_args(args, data):
    """train.py options of a short measured run on the bench's data."""
    quick = ["--model=test", "--device=cpu", "--seq_len=32", "--micro_batch_size=2", "--grad_accum_steps=1",
             "--loss_chunk=16"] if args.quick else []
    return [f"--data_dir={data['dir']}", f"--tokenizer={data['tokenizer']}", f"--out_dir={data['runs']}",
            "--eval_every=100000", "--eval_batches=1", "--ckpt_every=100000", "--sample_tokens=4", "--log_every=5",
            "--warmup_steps=5", "--wandb=disabled", "--tqdm=false", *quick]


def steady_figures(run_dir):
    """tokens/s and MFU (medians of the records after the first, which holds the compilation),
    and the peak memory of a run directory's metrics; the run directory is removed (RODIN-1B's
    checkpoint is 14 GB)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "tokens_per_s" in r]
    shutil.rmtree(run_dir)
    steady = records[1:] or records
    figures = {"steps": records[-1]["step"], "tok_s": statistics.median(r["tokens_per_s"] for r in steady),
               "peak_gib": max(r["peak_mem_gib"] for r in records), "loss": records[-1]["loss"]}
    if "mfu" in records[-1]:
        figures["mfu"] = statistics.median(r["mfu"] for r in steady)
    return figures


def item_tests(args, data):
    def has_gpu_tests(name):
        with open(os.path.join(ROOT, "tests", name)) as f:
            return "pytest.mark.gpu" in f.read()

    # only the files that hold gpu tests: the others may import packages this machine lacks
    files = sorted(os.path.join("tests", n) for n in os.listdir(os.path.join(ROOT, "tests")) if n.startswith("test_")
                   and n.endswith(".py") and has_gpu_tests(n))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-2000:])
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    failed = re.findall(r"^FAILED (\S+)", done.stdout, re.M)
    return {"files": len(files), **counts, "failed_tests": ",".join(f.split("::")[-1] for f in failed) or "none"}


def item_throughput(args, data, compiled=False):
    from bench import train_throughput

    argv = ["--quick", "--device=cpu"] if args.quick else ["--batch=8", "--repeats=3", "--steps=5"]
    train_throughput.main(argv + (["--compile=rodin"] if compiled else []) + [f"--results={args.results}"])


def item_preset_3090(args, data):
    import torch

    import train

    cap = 24
    if not args.quick:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total))
        torch.cuda.reset_peak_memory_stats()
    steps = 10 if args.quick else 30
    assert train.main(["--preset=3090", "--name=preset_3090", f"--max_steps={steps}", *run_args(args, data)]) == 0
    return {"preset": "3090", "cap_gib": cap, **steady_figures(os.path.join(data["runs"], "preset_3090"))}


def item_memory(args, data):
    import torch

    import train
    from bench.memory_estimate import estimate
    from rodin.config import PRESETS, parse_args
    from rodin.preflight import estimate_peak_gib

    for preset in ("3090", "b200"):
        # two micro-batches, so that accumulated gradients count (not with a step in backward)
        accumulation = 1 if PRESETS[preset].optimizer_in_backward else 2
        options = [f"--preset={preset}", "--compile=off", "--max_steps=2", f"--grad_accum_steps={accumulation}",
                   f"--name=memory_{preset}", *run_args(args, data)]
        cfg = parse_args(options)
        quick = estimate_peak_gib(cfg)
        figures = {"preset": preset, "micro_batch": cfg.micro_batch_size, "checkpointing": cfg.activation_checkpointing,
                   "quick_gib": quick}
        if args.quick:  # the CPU has no allocator peak: the estimates alone
            figures["fake_gib"] = estimate(cfg)["peak"]
            report("gpu_memory", figures, args.results)
            continue
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        if quick > 0.9 * total:
            report("gpu_memory", dict(figures, status=f"skipped: needs ~{quick:.0f} of {total:.0f} GiB"), args.results, "cuda")
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        assert train.main(options) == 0
        allocated = torch.cuda.max_memory_allocated() / GIB
        shutil.rmtree(os.path.join(data["runs"], f"memory_{preset}"))  # its 14 GB checkpoint
        fake = estimate(cfg)["peak"]
        report("gpu_memory", dict(figures, allocated_gib=allocated, quick_error=quick / allocated - 1, fake_gib=fake,
                                  fake_error=fake / allocated - 1), args.results, "cuda")


def item_fsdp(args, data):
    import torch

    gpus = 2 if args.quick else torch.cuda.device_count()
    if gpus < 2:
        return {"status": f"skipped: {gpus} GPU (FSDP2 over NCCL needs 2 or more)"}
    options = ["--preset=b200", "--name=fsdp", "--max_steps=20", "--grad_accum_steps=1", *run_args(args, data)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           os.path.join(ROOT, "train.py"), *options]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout[-2000:], done.stderr[-3000:])
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}")
    return {"preset": "b200", "world_size": gpus, "backend": "gloo" if args.quick else "nccl",
            **steady_figures(os.path.join(data["runs"], "fsdp"))}


def run_item(args, data):
    """In the item's own process: measure, and report the figures the item returns, if any."""
    name = args.item
    functions = {"tests": item_tests, "throughput": item_throughput,
                 "throughput_compiled": lambda a, d: item_throughput(a, d, compiled=True),
                 "preset_3090": item_preset_3090, "memory": item_memory, "fsdp": item_fsdp}
    figures = functions[name](args, data)
    if figures:
        report(f"gpu_{name}", figures, args.results, None if args.quick else "cuda")


def make_data(folder):
    from bench.data_loader import make_data as corpus_shards

    data_dir, tokenizer = corpus_shards(folder, 512, 6000)
    return {"dir": data_dir, "tokenizer": tokenizer, "runs": os.path.join(folder, "runs")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated items: {', '.join(ITEMS)}")
    parser.add_argument("--budget_s", type=float, default=540, help="stop starting items after this many seconds")
    parser.add_argument("--quick", action="store_true", help="the items on the CPU with test shapes (for the test suite)")
    parser.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--item", default=None, help=argparse.SUPPRESS)  # inside an item's own process
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.item:
        return run_item(args, json.loads(args.data))
    import torch

    if not args.quick and not torch.cuda.is_available():
        sys.exit("error: bench/gpu.py measures a CUDA device and torch sees none (--quick runs its items on the CPU)")
    unknown = set(args.only.split(",")) - set(ITEMS)
    if unknown:
        sys.exit(f"error: --only: unknown item(s) {', '.join(sorted(unknown))}; choose from {', '.join(ITEMS)}")
    device = None if args.quick else "cuda"
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="rodin-bench-gpu-") as folder:
        data = None
        for name in [n for n in ITEMS if n in args.only.split(",")]:
            limit, what = ITEMS[name]
            left = args.budget_s - (time.time() - start)
            if left < 30:
                report(f"gpu_{name}", {"status": f"skipped: {args.budget_s:.0f} s budget spent"}, args.results, device)
                continue
            data = data or make_data(folder)
            print(f"== {name}: {what} (at most {min(limit, left):.0f} s)", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), f"--item={name}", f"--data={json.dumps(data)}",
                   f"--results={args.results}"] + (["--quick"] if args.quick else [])
            began = time.time()
            try:
                done = subprocess.run(cmd, cwd=ROOT, timeout=min(limit, left), stderr=subprocess.PIPE, text=True)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                    print(done.stderr[-4000:], file=sys.stderr)
                    report(f"gpu_{name}", {"status": "failed", "error": last[:300]}, args.results, device)
            except subprocess.TimeoutExpired:
                report(f"gpu_{name}", {"status": f"timed out after {time.time() - began:.0f} s"}, args.results, device)
    print(f"bench-gpu: {time.time() - start:.0f} s; figures appended to {args.results}")


if __name__ == "__main__":
    main()
