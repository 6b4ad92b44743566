"""Every GPU figure of rodin in one command, for whoever has a CUDA machine for a few minutes:

    make bench-gpu PY=python3 OUT=/some/folder  # the machine's own python3, installs nothing: all items within 540 s
    python3 bench/gpu.py --out=$OUT             # the same, by hand
    python3 bench/gpu.py --only=memory,tests --budget_s=200 --out=$OUT   # a rerun of some items
    python bench/gpu.py --quick                 # the same items on the CPU, test shapes (for the test suite)

Frozen decisions:
- Items, most wanted first (what no card has measured yet goes first): `memory` (rodin/train/
  preflight.py's closed form and bench/memory_estimate.py's fake-tensor estimate against
  torch.cuda.max_memory_allocated, eager, 3090 and b200 presets, with what is live at the
  allocator's peak, summed by where it was allocated); `tests` (pytest -m gpu, a line per test);
  `fp8` (rodin-1b compiled with FP8 matmuls against transformers, and gpu-demo's loss after 200
  steps with FP8 against bf16);
  `throughput_compiled` (rodin-1b's training step at context 2048, micro-batch 8, bf16, ours
  compiled as train.py compiles it on one GPU, the whole model, against transformers'
  LlamaForCausalLM compiled whole, in the same run: tokens/s, MFU against the datasheet and
  against a bf16 matmul measured on the card, peak memory); `throughput_blocks` (the same, ours
  compiled block by block as under FSDP2); `preset_3090` (train.py --preset=3090 under a 24 GiB
  cap, two micro-batches a step so gradients accumulate as in the real run: tokens/s, MFU, peak);
  `optimizers` (Muon's step against AdamW's on rodin-1b, compiled); `guard` (the guard's share of
  a gpu-demo step, bench/guard_cost.py); `throughput` (both eager); `fsdp` (train.py
  --preset=b200 under torchrun over every GPU: NCCL, bf16, FSDP2; 2 GPUs or more). What the
  budget leaves out, a second call runs with --only.
- The runs' checkpoints (14 GB at rodin-1b) and the tests' temporary folders go to /dev/shm when it
  has room: a checkpoint written to the H200 machine's disk took most of a 150 s item.
- Imports only what a GPU machine's own python3 is likely to have (torch, transformers,
  sentencepiece, safetensors, numpy, tqdm, matplotlib, pytest): no wandb, datasets, gguf, ftfy,
  py3langid, lm_eval or llama_cpp (tests/bench/test_bench_gpu.py runs it with those blocked).
- Each item runs in its own process with a timeout, so an out-of-memory error or a hang ends that
  item only, and leaves a row in bench/RESULTS.md whatever happens (figures, or failed/timed
  out/skipped and why). The device, torch and CUDA come first in the output, and a line as each
  item ends. With --out, the whole output also goes to OUT/gpu.log and the rows this call added to
  OUT/RESULTS.md, both rewritten as each item ends: a lease that ends early still brings back what
  was measured.
- Data: a tokenizer and shards made from the first 6,000 quotations of the shipped corpus, once,
  in a temporary folder: no download, no `make data`.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.results import commit, report  # noqa: E402

GIB = 2**30
# name: (seconds it may take on an H100/H200, what it measures); the order is the order they run in
ITEMS = {
    "memory": (150, "memory estimates against the allocator, and what is live at its peak"),
    "tests": (240, "pytest -m gpu"),
    "fp8": (300, "rodin-1b with FP8 matmuls vs transformers compiled; gpu-demo's loss over 200 steps, FP8 against bf16"),
    "throughput_compiled": (200, "rodin-1b compiled as train.py on one GPU (whole) vs transformers compiled"),
    "throughput_blocks": (200, "rodin-1b compiled per block (as under FSDP2) vs transformers compiled"),
    "preset_3090": (150, "train.py --preset=3090 under a 24 GiB cap"),
    "optimizers": (120, "Muon's step against AdamW's, rodin-1b compiled"),
    "guard": (60, "the guard's share of a gpu-demo step"),
    "throughput": (120, "rodin-1b vs transformers, eager"),
    "fsdp": (180, "train.py --preset=b200 under torchrun, NCCL"),
}


def run_args(args, data):
    """train.py options of a short measured run on the bench's data."""
    quick = ["--model=test", "--device=cpu", "--seq_len=32", "--micro_batch_size=2", "--loss_chunk=16"] if args.quick else []
    return [f"--data_dir={data['dir']}", f"--tokenizer={data['tokenizer']}", f"--out_dir={data['runs']}",
            "--eval_every=100000", "--eval_batches=1", "--ckpt_every=100000", "--sample_tokens=4", "--log_every=5",
            "--warmup_steps=5", "--wandb=disabled", "--tqdm=false", *quick]


def two_micro_batches(args):
    """--global_batch of two micro-batches: gradients accumulate as in the real run (the presets'
    512 sequences are 64 micro-batches of 8, a minute a step on an H200), at 1/32 of its time."""
    return ["--global_batch=4"] if args.quick else ["--global_batch=16"]


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
    def has_gpu_tests(path):
        with open(os.path.join(ROOT, path)) as f:
            return "pytest.mark.gpu" in f.read()

    # only the files that hold gpu tests: the others may import packages this machine lacks
    files = sorted(os.path.relpath(os.path.join(folder, n), ROOT) for folder, _, names in os.walk(os.path.join(ROOT, "tests"))
                   for n in names if n.startswith("test_") and n.endswith(".py"))
    files = [f for f in files if has_gpu_tests(f)]
    # -v: a line per test as it ends, streamed to the log, so an item that runs out of time still
    # says which tests passed; the checkpoints the runs write (14 GB at rodin-1b) go to memory
    command = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", *files]
    if data.get("scratch"):
        command.append(f"--basetemp={os.path.join(data['scratch'], 'pytest')}")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    proc.wait()
    output = "".join(lines)
    summary = lines[-1] if lines else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return {"files": len(files), **counts, "failed_tests": ",".join(f.split("::")[-1] for f in failed) or "none"}


def item_throughput(args, data, compiled=False, scope="auto"):
    from bench import train_throughput

    argv = ["--quick", "--device=cpu"] if args.quick else ["--batch=8", "--repeats=3", "--steps=5"]
    train_throughput.main(argv + (["--compile=both", f"--scope={scope}"] if compiled else []) + [f"--results={args.results}"])


def item_preset_3090(args, data):
    import torch

    import train
    from rodin.train.device import measured_matmul_flops

    cap = 24
    figures = {"preset": "3090", "cap_gib": cap}
    if not args.quick:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total))
        achievable = measured_matmul_flops(torch.device("cuda"))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    steps = 10 if args.quick else 12
    assert train.main(["--preset=3090", "--name=preset_3090", f"--max_steps={steps}", *two_micro_batches(args),
                       *run_args(args, data)]) == 0
    figures.update(steady_figures(os.path.join(data["runs"], "preset_3090")))
    if not args.quick and "mfu" in figures:
        from rodin.train.device import peak_flops

        figures["mfu_achievable"] = figures["mfu"] * peak_flops(torch.device("cuda")) / achievable
    return figures


def item_memory(args, data):
    import torch

    import train
    from bench.memory_estimate import estimate
    from rodin.config import PRESETS, parse_args
    from rodin.train.preflight import estimate_peak_gib

    for preset in ("3090", "b200"):
        # two micro-batches, so that accumulated gradients count; b200's micro-batch is the one
        # its --micro_batch_size=auto picks on a B200 (16), fixed so the step is the same on any card
        batch = ["--micro_batch_size=16", "--global_batch=32"] if preset == "b200" and not args.quick else []
        if PRESETS[preset].optimizer_in_backward:  # no accumulation with a step in backward
            batch = ["--global_batch=0", "--grad_accum_steps=1"]
        options = [f"--preset={preset}", "--compile=off", "--max_steps=2", f"--name=memory_{preset}",
                   *two_micro_batches(args), *batch, *run_args(args, data)]
        cfg = parse_args(options)
        quick = estimate_peak_gib(cfg)
        figures = {"preset": preset, "micro_batch": cfg.micro_batch_size, "global_batch": cfg.global_batch,
                   "checkpointing": cfg.activation_checkpointing, "quick_gib": quick}
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
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
        assert train.main(options) == 0
        allocated = torch.cuda.max_memory_allocated() / GIB
        trace = torch.cuda.memory._snapshot()["device_traces"][0]
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, sites = live_at_peak(trace)
        print(f"{preset}: {peak / GIB:.2f} GiB live at the allocator's peak, by where it was allocated:")
        for size, site in sites:
            print(f"  {size / GIB:6.2f} GiB  {site}")
        shutil.rmtree(os.path.join(data["runs"], f"memory_{preset}"))  # its 14 GB checkpoint
        fake = estimate(cfg)["peak"]
        report("gpu_memory", dict(figures, allocated_gib=allocated, quick_error=quick / allocated - 1, fake_gib=fake,
                                  fake_error=fake / allocated - 1), args.results, "cuda")


def allocation_site(frames):
    """Where a CUDA allocation was made: its innermost Python frame and, when that is not ours, the
    innermost frame of rodin's code (train.py, rodin/) that led there."""
    def where(frame):
        path = os.path.relpath(frame["filename"], ROOT) if frame["filename"].startswith(ROOT) else os.path.basename(frame["filename"])
        return f"{path}:{frame['line']} {frame['name']}"

    ours = next((f for f in frames if f["filename"].startswith(ROOT)), None)
    sites = [where(f) for f in ([frames[0]] if frames else []) + ([ours] if ours and ours is not frames[0] else [])]
    return " <- ".join(sites) or "unknown"


def live_at_peak(trace, top=10):
    """(bytes, [(bytes, site), ...]) of the allocations live when the sum of live allocations of
    trace (torch.cuda.memory._snapshot()'s device trace) peaked, summed by allocation_site, largest first."""
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > peak:
            peak, peak_at = total, i
    live = {}
    for event in trace[:peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] in ("free_requested", "free_completed"):
            live.pop(event["addr"], None)
    by_site = {}
    for event in live.values():
        site = allocation_site(event.get("frames", []))
        by_site[site] = by_site.get(site, 0) + event["size"]
    return peak, sorted(((size, site) for site, size in by_site.items()), reverse=True)[:top]


def item_optimizers(args, data):
    """Seconds of one micro-batch's forward and backward, and of each optimizer's step, on the same
    model compiled as train.py compiles it; the step ratio is given per micro-batch and at the
    rodin-1b presets' 64 micro-batches per step, where the optimizer runs once per 64 of them."""
    import torch

    from bench.train_throughput import build
    from rodin.config import MODELS, PRESETS
    from rodin.train.device import autocast
    from rodin.train.optim import make_optimizer

    device = torch.device("cpu" if args.quick else "cuda")
    name, seq_len, batch = ("test", 32, 2) if args.quick else ("rodin-1b", 2048, 8)
    cfg, preset = MODELS[name], PRESETS["rodin-1b"]
    model, _ = build("rodin", cfg, device, "sdpa", compile_model=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    amp = autocast(device, "auto")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, repeats):
        fn()  # warm-up (compilation, optimizer state)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / repeats

    def forward_backward():
        model.zero_grad(set_to_none=False)
        with amp:
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()

    micro_batch_s = timed(forward_backward, 5)
    figures = {"model": name, "seq_len": seq_len, "micro_batch": batch, "micro_batch_s": micro_batch_s}
    muon = {"momentum": preset.muon_momentum, "nesterov": preset.muon_nesterov, "ns_steps": preset.muon_ns_steps,
            "weight_decay": preset.muon_weight_decay}
    for optimizer_name in ("adamw", "muon"):
        optimizer = make_optimizer(model, preset.lr, preset.weight_decay, (0.9, 0.95),
                                   muon=muon if optimizer_name == "muon" else None)
        figures[f"{optimizer_name}_step_s"] = timed(optimizer.step, 5)
        del optimizer
    accumulation = preset.global_batch // 8
    for label, micro_batches in (("per_micro_batch", 1), (f"at_{accumulation}_micro_batches", accumulation)):
        figures[f"muon_over_adamw_{label}"] = ((micro_batches * micro_batch_s + figures["muon_step_s"])
                                               / (micro_batches * micro_batch_s + figures["adamw_step_s"]))
    return figures


def item_fp8(args, data):
    """rodin-1b's compiled step with --fp8=tensorwise (its tokens/s against throughput_compiled's bf16
    row of the same call), then gpu-demo trained 200 steps by train.py with FP8 and without: the
    final losses' relative difference (goal: within 1 %)."""
    from bench import train_throughput

    throughput = ["--quick", "--device=cpu"] if args.quick else ["--batch=8", "--repeats=3", "--steps=5"]
    train_throughput.main(throughput + ["--compile=both", "--fp8=tensorwise", f"--results={args.results}"])
    import train

    preset = ["--preset=test", "--dtype=bf16"] if args.quick else ["--preset=gpu-demo"]
    steps = 8 if args.quick else 200
    losses = {}
    for recipe in ("off", "tensorwise"):
        name = f"fp8_{recipe}"
        assert train.main([*preset, f"--name={name}", f"--max_steps={steps}", f"--fp8={recipe}", *run_args(args, data)]) == 0
        losses[recipe] = steady_figures(os.path.join(data["runs"], name))["loss"]
    return {"preset": "test" if args.quick else "gpu-demo", "steps": steps, "bf16_loss": losses["off"],
            "fp8_loss": losses["tensorwise"], "relative_difference": losses["tensorwise"] / losses["off"] - 1}


def item_guard(args, data):
    from bench import guard_cost

    argv = ["--quick", "--device=cpu"] if args.quick else ["--preset=gpu-demo"]
    guard_cost.main(argv + [f"--results={args.results}"])


def item_fsdp(args, data):
    import torch

    gpus = 2 if args.quick else torch.cuda.device_count()
    if gpus < 2:
        return {"status": f"skipped: {gpus} GPU (FSDP2 over NCCL needs 2 or more)"}
    options = ["--preset=b200", "--name=fsdp", "--max_steps=20", *run_args(args, data)]
    options += [f"--global_batch={2 * gpus * (2 if args.quick else 16)}"] + ([] if args.quick else ["--micro_batch_size=16"])
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
                 "throughput_blocks": lambda a, d: item_throughput(a, d, compiled=True, scope="blocks"),
                 "preset_3090": item_preset_3090, "memory": item_memory, "optimizers": item_optimizers, "guard": item_guard,
                 "fsdp": item_fsdp, "fp8": item_fp8}
    figures = functions[name](args, data)
    if figures:
        report(f"gpu_{name}", figures, args.results, None if args.quick else "cuda")


def memory_scratch(quick, need_gib=64):
    """A folder in /dev/shm for the runs' checkpoints when it has room (a rodin-1b checkpoint is 14 GB:
    half a minute to a disk, seconds to memory), else None."""
    if quick or not os.path.isdir("/dev/shm") or shutil.disk_usage("/dev/shm").free < need_gib * GIB:
        return None
    return tempfile.mkdtemp(prefix="rodin-bench-gpu-", dir="/dev/shm")


def make_data(folder):
    from bench.data_loader import make_data as corpus_shards

    data_dir, tokenizer = corpus_shards(folder, 512, 6000)
    return {"dir": data_dir, "tokenizer": tokenizer, "runs": os.path.join(folder, "runs")}


class Log:
    """Everything this call prints, also written to OUT/gpu.log (line-buffered), and the rows it
    appended to the results file copied to OUT/RESULTS.md; both kept current as items end."""

    def __init__(self, out, results):
        self.out, self.results = out, results
        self.rows_before = self.rows()
        self.file = None
        if out:
            os.makedirs(out, exist_ok=True)
            self.file = open(os.path.join(out, "gpu.log"), "w", encoding="utf-8", buffering=1)
        self.lock = threading.Lock()

    def rows(self):
        if not os.path.exists(self.results):
            return []
        with open(self.results, encoding="utf-8") as f:
            return [line for line in f if line.startswith("| 20")]

    def write(self, text, stream=None):
        with self.lock:
            (stream or sys.stdout).write(text)
            (stream or sys.stdout).flush()
            if self.file:
                self.file.write(text)

    def say(self, line):
        self.write(line + "\n")

    def copy_rows(self):
        if not self.out:
            return
        new = self.rows()[len(self.rows_before):]
        tmp = os.path.join(self.out, "RESULTS.md.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("| date (UTC) | bench | machine | commit | figures |\n|---|---|---|---|---|\n" + "".join(new))
        os.replace(tmp, os.path.join(self.out, "RESULTS.md"))


def run_logged(log, cmd, timeout):
    """cmd in its own process group, its output streamed to the log; its exit status, or None when it
    ran past timeout (then the whole group is killed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    tail = []

    def pump():
        for line in proc.stdout:
            log.write(line)
            tail[:] = (tail + [line])[-40:]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, tail


def describe_machine(quick):
    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
             f"commit {commit()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / GIB:.0f} GiB, compute capability {p.major}.{p.minor}")
    else:
        lines.append("no CUDA device" + (" (--quick: the items on the CPU)" if quick else ""))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated items: {', '.join(ITEMS)}")
    parser.add_argument("--budget_s", type=float, default=540, help="stop starting items after this many seconds")
    parser.add_argument("--quick", action="store_true", help="the items on the CPU with test shapes (for the test suite)")
    parser.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--out", default=None, help="folder for gpu.log and the new rows (the folder a GPU lease brings back)")
    parser.add_argument("--item", default=None, help=argparse.SUPPRESS)  # inside an item's own process
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.item == "data":  # the tokenizer and shards, in a process of their own; the last line says where
        print(json.dumps(make_data(json.loads(args.data))), flush=True)
        return
    if args.item:
        return run_item(args, json.loads(args.data))
    start = time.time()
    unknown = set(args.only.split(",")) - set(ITEMS)
    if unknown:
        sys.exit(f"error: --only: unknown item(s) {', '.join(sorted(unknown))}; choose from {', '.join(ITEMS)}")
    log = Log(args.out, args.results)
    for line in describe_machine(args.quick):
        log.say(line)
    import torch

    if not args.quick and not torch.cuda.is_available():
        log.say("error: bench/gpu.py measures a CUDA device and torch sees none (--quick runs its items on the CPU)")
        sys.exit(1)
    device = None if args.quick else "cuda"
    scratch = memory_scratch(args.quick)
    with tempfile.TemporaryDirectory(prefix="rodin-bench-gpu-") as folder:
        data = None
        for name in [n for n in ITEMS if n in args.only.split(",")]:
            limit, what = ITEMS[name]
            left = args.budget_s - (time.time() - start)
            if left < 30:
                report(f"gpu_{name}", {"status": f"skipped: {args.budget_s:.0f} s budget spent"}, args.results, device)
                log.say(f"== {name}: skipped, {args.budget_s:.0f} s budget spent")
                log.copy_rows()
                continue
            if data is None:
                code, tail = run_logged(log, [sys.executable, os.path.abspath(__file__), "--item=data",
                                              f"--data={json.dumps(folder)}"], timeout=120)
                if code != 0:
                    log.say(f"== data: failed ({''.join(tail[-1:]).strip() or 'timed out'}); no item can run")
                    sys.exit(1)
                data = json.loads(tail[-1])
                if scratch:
                    data.update(scratch=scratch, runs=os.path.join(scratch, "runs"))
            log.say(f"== {name}: {what} (at most {min(limit, left):.0f} s)")
            cmd = [sys.executable, os.path.abspath(__file__), f"--item={name}", f"--data={json.dumps(data)}",
                   f"--results={args.results}"] + (["--quick"] if args.quick else [])
            began = time.time()
            code, tail = run_logged(log, cmd, timeout=min(limit, left))
            took = time.time() - began
            if code is None:
                status = f"timed out after {took:.0f} s"
                report(f"gpu_{name}", {"status": status}, args.results, device)
            elif code != 0:
                last = (tail[-1].strip() if tail else "") or "no message"
                status = f"failed after {took:.0f} s: {last[:300]}"
                report(f"gpu_{name}", {"status": "failed", "error": last[:300]}, args.results, device)
            else:
                status = f"done in {took:.0f} s"
            log.say(f"== {name}: {status}")
            log.copy_rows()
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    log.say(f"bench-gpu: {time.time() - start:.0f} s; figures appended to {args.results}"
            + (f", copied with this log to {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
