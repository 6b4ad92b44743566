"""Benchmark a model with EleutherAI's lm-evaluation-harness, through its Hugging Face form.

    python -m rodin.eval runs/NAME          # the run's newest checkpoint, french_bench 3-shot
    python -m rodin.eval HF_DIR --tasks=littre_cloze,french_bench_hellaswag --num_fewshot=3

Frozen decisions:
- The harness sees the model exactly as users will: a transformers LlamaForCausalLM directory
  (a run's checkpoint is first written as one into runs/NAME/eval/hf-step-N/), through its `hf` model.
- Default tasks: `french_bench`, 3-shot, as RODIN's model card reports. Those fetch their data from
  the Hub; `littre_cloze` (rodin/eval_tasks/) is shipped and runs offline.
- Results go to runs/NAME/eval/<label>.json (the harness's own dict) and <label>.md (its table).
"""

import argparse
import functools
import json
import os
import shutil
import sys

import torch

from rodin.io import atomic_write_text

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks")


def write_hf_dir(model, tokenizer, out_dir):
    """The export of export.py (rodin.hf.write_hf), written under a temporary name and renamed
    when complete, so an interrupted export is never evaluated."""
    from rodin.hf import write_hf

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf(tmp, model, tokenizer, name=os.path.basename(os.path.dirname(os.path.dirname(out_dir.rstrip("/")))))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def export_latest_checkpoint(run_dir):
    """The run's newest checkpoint as an HF directory in run_dir/eval/hf-step-N (made once)."""
    from rodin import checkpoint
    from rodin.tokenizer import Tokenizer

    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to evaluate; train first (python train.py ...)")
    meta = checkpoint.read_meta(ckpt)
    out = os.path.join(run_dir, "eval", f"hf-step-{meta['step']:07d}")
    if not os.path.exists(os.path.join(out, "config.json")):
        model, _, _ = checkpoint.load_model(ckpt)
        write_hf_dir(model, Tokenizer(meta["config"]["tokenizer"]), out)
    return out, f"step-{meta['step']:07d}"


def resolve(path):
    """(HF directory, directory for the results, label) for a run directory or an HF directory."""
    if os.path.exists(os.path.join(path, "checkpoints")):
        hf_dir, label = export_latest_checkpoint(path)
        return hf_dir, os.path.join(path, "eval"), label
    weights = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards and their index
    if os.path.exists(os.path.join(path, "config.json")) and any(os.path.exists(os.path.join(path, w)) for w in weights):
        return path, os.path.join(path, "eval"), "model"
    raise FileNotFoundError(f"{path}: neither a run directory (with checkpoints/) nor a Hugging Face model directory "
                            "(config.json + model.safetensors)")


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
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype={dtype}", tasks=list(tasks), num_fewshot=num_fewshot,
        limit=limit, batch_size=batch_size, device=device, task_manager=task_manager(),
        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:
        raise RuntimeError("lm_eval returned no results (not rank 0?)")
    return results


def write_results(results, out_dir, label):
    """<out_dir>/<label>.json and .md; returns their paths."""
    from lm_eval.utils import handle_non_serializable, make_table

    results = {k: v for k, v in results.items() if k != "samples"}
    json_path, md_path = os.path.join(out_dir, f"{label}.json"), os.path.join(out_dir, f"{label}.md")
    atomic_write_text(json_path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
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
    args = parser.parse_args(argv)
    hf_dir, out_dir, label = resolve(args.path)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_lm_eval(hf_dir, args.tasks.split(","), args.num_fewshot, limit, args.batch_size, args.device, args.dtype)
    json_path, md_path = write_results(results, args.out or out_dir, label)
    for task, metrics in scores(results).items():
        print(f"{task}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
