"""Benchmark a model with EleutherAI's lm-evaluation-harness, through its Hugging Face form; draw
learning curves over a run's checkpoints; check its long context with needles in haystacks.

    rodin eval runs/NAME          # the run's newest checkpoint, french_bench 3-shot
    rodin eval HF_DIR --tasks=littre_cloze,french_bench_hellaswag --num_fewshot=3
    rodin eval runs/NAME --every_checkpoint --tasks=littre_cloze    # eval/curve.csv, curve-TASK.png
    rodin eval runs/NAME --needle [--lengths=1024,4096 --depths=0,0.5,1 --trials=3]

Frozen decisions:
- The harness sees the model exactly as users will: a transformers LlamaForCausalLM directory
  (a run's checkpoint is first written as one into runs/NAME/eval/hf-step-N/), through its `hf` model.
- Default tasks: `french_bench`, 3-shot, as RODIN's model card reports. Those fetch their data from
  the Hub (offline, one line says so and names the shipped task); `littre_cloze` (rodin/eval/tasks/)
  is shipped and runs offline.
- Results go to runs/NAME/eval/<label>.json (the harness's own dict; tasks of a later call on the
  same checkpoint are merged in) and <label>.md (its table).
- --every_checkpoint scores each kept checkpoint not yet in eval/curve.csv (rodin.eval.curves) and then
  deletes its HF copy, but the newest's; --needle runs rodin.eval.needle on our own model.
"""

import argparse
import functools
import glob
import json
import os
import re
import shutil
import socket
import urllib.parse

import torch

from rodin.data.tokenizer import checkpoint_tokenizer
from rodin.eval import curves, needle
from rodin.io import atomic_write_text
from rodin.train import checkpoint
from rodin.train.device import autocast, pick_device

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
# per-task dicts of the harness's results, merged when a checkpoint is evaluated again on other tasks
PER_TASK = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def write_hf_dir(model, tokenizer, out_dir):
    """The export of export.py (rodin.ship.hf.write_hf), written under a temporary name and renamed
    when complete, so an interrupted export is never evaluated."""
    from rodin.ship.hf import write_hf

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf(tmp, model, tokenizer, name=os.path.basename(os.path.dirname(os.path.dirname(out_dir.rstrip("/")))))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def export_checkpoint(run_dir, ckpt):
    """A checkpoint as an HF directory in run_dir/eval/hf-step-N (made once): (directory, label, meta)."""
    meta = checkpoint.read_meta(ckpt)
    label = f"step-{meta['step']:07d}"
    out = os.path.join(run_dir, "eval", f"hf-{label}")
    if not os.path.exists(os.path.join(out, "config.json")):
        model, tokenizer, meta, _ = checkpoint.load_run(ckpt)
        write_hf_dir(model, tokenizer, out)
    return out, label, meta


def resolve(path):
    """(HF directory, directory for the results, label) for a run directory or an HF directory."""
    if os.path.exists(os.path.join(path, "checkpoints")):
        ckpt = checkpoint.latest(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no complete checkpoint to evaluate; train first (python train.py ...)")
        hf_dir, label, _ = export_checkpoint(path, ckpt)
        return hf_dir, os.path.join(path, "eval"), label
    weights = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards and their index
    if os.path.exists(os.path.join(path, "config.json")) and any(os.path.exists(os.path.join(path, w)) for w in weights):
        return path, os.path.join(path, "eval"), "model"
    raise FileNotFoundError(f"{path}: neither a run directory (with checkpoints/) nor a Hugging Face model directory "
                            "(config.json + model.safetensors)")


# ---- the Hub, or not -------------------------------------------------------------------------------

def local_tasks():
    """Names of the shipped tasks (rodin/eval/tasks/*.yaml): they need no network."""
    names = set()
    for path in glob.glob(os.path.join(TASKS_DIR, "*.yaml")):
        with open(path, encoding="utf-8") as f:
            names.update(re.findall(r"^task:\s*(\S+)", f.read(), re.M))
    return names


def hub_reachable(timeout=3.0):
    from huggingface_hub import constants

    try:
        socket.create_connection((urllib.parse.urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_message(tasks):
    remote = [t for t in tasks if t not in local_tasks()]
    return (f"{', '.join(remote)} needs the Hugging Face Hub, which cannot be reached (the harness downloads its "
            f"datasets from it); offline, run the shipped task: --tasks={','.join(sorted(local_tasks()))} "
            "(make eval TASKS=littre_cloze)")


def check_hub(tasks):
    """Fail in one line before any work when a task needs the Hub and the Hub is out of reach, unless
    the datasets are declared cached (HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    declared = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    if any(t not in local_tasks() for t in tasks) and not declared and not hub_reachable():
        raise ValueError(offline_message(tasks))


# ---- lm-evaluation-harness -------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def task_manager():
    """The harness's tasks plus ours (indexing them takes seconds: done once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=TASKS_DIR)


def run_lm_eval(hf_dir, tasks, num_fewshot=3, limit=None, batch_size=8, device=None, dtype=None, seed=1234,
                log_samples=False):
    """lm_eval.simple_evaluate on an HF directory; returns the harness's results dict."""
    import lm_eval

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={hf_dir},dtype={dtype}", tasks=list(tasks), num_fewshot=num_fewshot,
            limit=limit, batch_size=batch_size, device=device, task_manager=task_manager(),
            log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError:  # a dataset the harness could not download
        raise ValueError(offline_message(tasks)) from None
    if results is None:
        raise RuntimeError("lm_eval returned no results (not rank 0?)")
    return results


def merge_results(old, new):
    """new, with the per-task entries of old that new does not replace."""
    merged = dict(new)
    for key in PER_TASK:
        if isinstance(old.get(key), dict):
            merged[key] = {**old[key], **new.get(key, {})}
    return merged


def write_results(results, out_dir, label):
    """<out_dir>/<label>.json and .md (merged with the tasks already there); returns their paths."""
    from lm_eval.utils import handle_non_serializable, make_table

    results = {k: v for k, v in results.items() if k != "samples"}
    json_path, md_path = os.path.join(out_dir, f"{label}.json"), os.path.join(out_dir, f"{label}.md")
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    if os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as f:
            results = merge_results(json.load(f), results)
    atomic_write_text(json_path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    table = make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
    atomic_write_text(md_path, f"# lm-evaluation-harness: {label}\n\n{table}\n")
    return json_path, md_path


def scores(results):
    """{task: {metric: value}} from a results dict, stderr and aliases left out."""
    out = {}
    for task, metrics in results["results"].items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"}
    return out


# ---- learning curves -------------------------------------------------------------------------------

def evaluate_every_checkpoint(run_dir, tasks, num_fewshot=3, limit=None, batch_size=8, device=None, dtype=None):
    """Score every kept checkpoint that eval/curve.csv lacks, oldest first; then draw a PNG per task.
    Returns (curve.csv path, {task: PNG path})."""
    ckpts = checkpoint.complete_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to evaluate; --every_checkpoint takes a run directory")
    out_dir = os.path.join(run_dir, "eval")
    curve = os.path.join(out_dir, "curve.csv")
    done = curves.scored(curves.read_curve(curve))
    for ckpt in ckpts:
        step = checkpoint.read_meta(ckpt)["step"]
        todo = [t for t in tasks if (step, t, num_fewshot) not in done]
        if not todo:
            print(f"{ckpt}: already in {curve}")
            continue
        hf_dir, label, meta = export_checkpoint(run_dir, ckpt)
        results = run_lm_eval(hf_dir, todo, num_fewshot, limit, batch_size, device, dtype)
        write_results(results, out_dir, label)
        curves.append_rows(curve, curves.rows_from_results(results, step, meta.get("tokens_seen", 0), num_fewshot, todo))
        print(f"{ckpt}: " + "; ".join(f"{t} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()) for t, m in scores(results).items()))
    for ckpt in ckpts[:-1]:  # a copy of the weights per checkpoint would fill the disk; the newest's is reused
        shutil.rmtree(os.path.join(out_dir, f"hf-step-{checkpoint.read_meta(ckpt)['step']:07d}"), ignore_errors=True)
    return curve, curves.plot_curves([("", curves.read_curve(curve))], out_dir)


# ---- needle in a haystack --------------------------------------------------------------------------

def evaluate_needle(path, lengths=None, depths=needle.DEPTHS, trials=3, mode="auto", haystack=None, device="auto", seed=0):
    """rodin.eval.needle on a run's newest checkpoint (or a checkpoint directory): writes
    RUN/eval/needle-step-N.json, .md and .png; returns the JSON path."""
    device = pick_device(device)
    model, meta, ckpt = checkpoint.load_model(path, device)
    tokenizer = checkpoint_tokenizer(ckpt, meta)
    chat = checkpoint.is_sft(meta) if mode == "auto" else mode == "chat"
    if chat and not tokenizer.has_chat_tokens:
        raise ValueError(f"{ckpt}: --needle_mode=chat needs a tokenizer with chat tokens; use --needle_mode=loglik")
    lengths = lengths or needle.default_lengths(model.cfg.max_seq_len, chat)
    with autocast(device):
        cells = needle.run(model, tokenizer, needle.held_out_documents(haystack), lengths, depths, trials, chat, seed)
    result = {"kind": "needle", "checkpoint": ckpt, "step": meta["step"], "tokens_seen": meta.get("tokens_seen", 0),
              "mode": "chat" if chat else "log-likelihood", "lengths": list(lengths), "depths": list(depths),
              "trials": trials, "haystack": haystack or "data/littre-citations.txt.gz, validation split", "cells": cells}
    out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.normpath(ckpt))), "eval")
    base = os.path.join(out_dir, f"needle-step-{meta['step']:07d}")
    atomic_write_text(base + ".json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    how = ("the greedy reply to a chat question contains the number" if chat else
           f"the number is likelier than {needle.N_DISTRACTORS} others after the question")
    atomic_write_text(base + ".md", f"# Needle in a haystack: step {meta['step']}\n\nRetrieved ({how}), share of "
                                    f"{trials} trials; haystack: {result['haystack']}.\n\n{needle.table(result)}\n")
    needle.heat_map(result, base + ".png")
    print(needle.table(result))
    return base + ".json"


def numbers(text, kind):
    return [kind(x) for x in text.split(",")] if text else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run directory (its newest checkpoint is evaluated) or a Hugging Face model directory")
    parser.add_argument("--tasks", default="french_bench", help="comma-separated lm-eval tasks or groups")
    parser.add_argument("--num_fewshot", type=int, default=3)
    parser.add_argument("--limit", type=float, default=None, help="at most this many items per task (or a fraction)")
    parser.add_argument("--batch_size", default="8")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", default=None, help="directory for the results (default: <run>/eval)")
    parser.add_argument("--every_checkpoint", action="store_true",
                        help="score every kept checkpoint not yet scored: <run>/eval/curve.csv and curve-TASK.png")
    parser.add_argument("--needle", action="store_true", help="needle-in-a-haystack check of the newest checkpoint")
    parser.add_argument("--lengths", default=None, help="needle: prompt lengths in tokens (default: four up to the context)")
    parser.add_argument("--depths", default=",".join(map(str, needle.DEPTHS)), help="needle: depths in [0, 1]")
    parser.add_argument("--trials", type=int, default=3, help="needle: numbers hidden per cell")
    parser.add_argument("--needle_mode", choices=["auto", "loglik", "chat"], default="auto",
                        help="needle: auto is chat for an SFT run, log-likelihood otherwise")
    parser.add_argument("--haystack", default=None, help="needle: held-out text file (default: the shipped corpus's validation split)")
    args = parser.parse_args(argv)
    if args.needle:
        depths = numbers(args.depths, float)
        if not all(0 <= d <= 1 for d in depths):
            raise ValueError(f"--depths={args.depths}: depths are fractions of the haystack, between 0 and 1")
        path = evaluate_needle(args.path, numbers(args.lengths, int), depths, args.trials, args.needle_mode,
                               args.haystack, args.device or "auto")
        print(f"wrote {path} and its .md and .png")
        return 0
    tasks = args.tasks.split(",")
    check_hub(tasks)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    if args.every_checkpoint:
        curve, plots = evaluate_every_checkpoint(args.path, tasks, args.num_fewshot, limit, args.batch_size, args.device, args.dtype)
        print(f"wrote {curve} and {', '.join(plots.values())}")
        return 0
    hf_dir, out_dir, label = resolve(args.path)
    results = run_lm_eval(hf_dir, tasks, args.num_fewshot, limit, args.batch_size, args.device, args.dtype)
    json_path, md_path = write_results(results, args.out or out_dir, label)
    for task, metrics in scores(results).items():
        print(f"{task}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"wrote {json_path} and {md_path}")
    return 0
