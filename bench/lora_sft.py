"""LoRA against full fine-tuning: the demo model fine-tuned into a chat model from its own HF export.

    python bench/lora_sft.py --base=runs/demo                 # make pretrain's model; 300 SFT steps each
    python bench/lora_sft.py                                  # pretrains a cpu-demo base first (1130 steps, ~8 min on 2 cores)
    python bench/lora_sft.py --base=runs/demo --lora_lrs=1e-3,3e-3,1e-2 --full_adamw_lr=3e-3 --steps=600

Frozen decisions:
- The base is exported by export.py --format=hf --dtype=f32 (verified in transformers) and every
  fine-tune starts from that directory (--init_from=DIR): the pretrained weights unrounded, so two
  fine-tunes differ by their method alone. Same SFT preset, data, seed, steps, batch and schedule.
- Full fine-tuning is the SFT preset as `make sft` runs it (Muon at its lr), the reference of the
  goal (issue 21: LoRA's names-the-word rate at least 0.9x full fine-tuning's). LoRA is rank 16,
  alpha 32 (2 x rank, lucie-7b-lora-3090's) on attn,ffn with AdamW at each --lora_lrs, every lr tried
  reported; --full_adamw_lr adds a full fine-tune with AdamW, to tell the optimizer from the adapters.
- Scores: the final held-out loss (the run's own split) and bench/sft_replies.py's names-the-word
  rate on the first --n held-out questions, greedy.
- Memory: each fine-tune is its own sft.py process, its peak RSS (os.wait4) less that of a process
  that only imports sft.py: CPU bytes, the tokenized data and activations included. Beside it, the
  estimate of a GPU step (rodin.train.memory: bf16 autocast, a LoRA base in bf16) for the demo and
  for lucie-7b at lucie-7b-lora-3090's micro-batch of 4 x 2048, fully fine-tuned with that preset's
  AdamW. Seconds are training seconds from metrics.jsonl, as noisy as the machine's load.
"""

import argparse
import dataclasses
import gzip
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import export  # noqa: E402
import train  # noqa: E402
from bench.data_loader import make_data  # noqa: E402
from bench.results import report  # noqa: E402
from bench.sft_replies import score  # noqa: E402
from rodin.config import MODELS, PRESETS, SFT_PRESETS  # noqa: E402
from rodin.model import LLaMA, ModelConfig  # noqa: E402
from rodin.train import lora  # noqa: E402
from rodin.train.memory import estimate, with_micro_batch  # noqa: E402

SFT_DATA = os.path.join(ROOT, "data", "littre-sft.jsonl.gz")
RANK, ALPHA = 16, 32.0
BIG = "lucie-7b-lora-3090"  # the preset whose model, context and micro-batch the big estimates take


def pretrain(tmp, quick, steps):
    """A cpu-demo base (the `test` model with --quick) pretrained on shards of the shipped corpus."""
    preset = "test" if quick else "cpu-demo"
    model = MODELS["test"] if quick else MODELS["demo"]
    os.makedirs(os.path.join(tmp, "data"))
    data_dir, tokenizer = make_data(os.path.join(tmp, "data"), model.vocab_size, 2000 if quick else 60000)
    argv = [f"--preset={preset}", f"--data_dir={data_dir}", f"--tokenizer={tokenizer}", f"--out_dir={tmp}", "--name=base",
            f"--max_steps={steps}", "--wandb=disabled", "--tqdm=false", "--sample_tokens=0"]
    if quick:
        argv.append("--model.max_seq_len=128")  # room for a question and its answer
    if train.main(argv) != 0:
        raise RuntimeError("pretraining the base failed")
    return os.path.join(tmp, "base")


def short_conversations(path, n, max_chars=160):
    """The first n conversations of the shipped SFT data short enough for the `test` model's context."""
    with gzip.open(SFT_DATA, "rt", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        fits = (line for line in f if sum(len(m["content"]) for m in json.loads(line)["messages"]) <= max_chars)
        out.writelines(itertools.islice(fits, n))
    return path


def peak_rss_mib(argv):
    """(exit code, peak resident set size in MiB) of `python argv` run from the repository root."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_maxrss / 1024  # KiB on Linux


def training_seconds(run_dir):
    """Seconds spent in training steps (each log interval's tokens / tokens_per_s, evaluations excluded),
    and the held-out losses of the run in order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    seconds, last_tokens = 0.0, 0
    for r in records:
        if "tokens_per_s" in r:
            seconds += (r["tokens_seen"] - last_tokens) / r["tokens_per_s"]
            last_tokens = r["tokens_seen"]
    return seconds, [r["val_loss"] for r in records if "val_loss" in r]


def run_config(run_dir):
    """The run's resolved config (config.json) as an SFTConfig."""
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(SFT_PRESETS["test"])}
    cfg = {k: v for k, v in saved.items() if k in fields}
    return dataclasses.replace(SFT_PRESETS["test"], **{**cfg, "model": ModelConfig(**saved["model"])})


def trainable(cfg):
    """Parameters the run trains: all of them, or the adapters'."""
    with torch.device("meta"):
        model = LLaMA(cfg.model)
    if cfg.lora_rank:
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha, lora.parse_targets(cfg.lora_targets), cfg.seed)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def gpu_estimate(cfg):
    """GiB at the peak of a GPU step of cfg (rodin.train.memory), its accumulation as the run's."""
    if cfg.global_batch:
        cfg = with_micro_batch(cfg, cfg.micro_batch_size, 1)
    return estimate(cfg)["peak"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="a pretraining run to fine-tune (default: pretrain a cpu-demo base)")
    parser.add_argument("--base_steps", type=int, default=PRESETS["cpu-demo"].max_steps,
                        help="steps of the base pretrained without --base (cpu-demo's)")
    parser.add_argument("--preset", default="cpu-demo", help="the SFT preset of every fine-tune")
    parser.add_argument("--steps", type=int, default=None, help="every fine-tune's max_steps (default: the preset's)")
    parser.add_argument("--lora_lrs", default="3e-3,1e-2", help="LoRA's AdamW learning rates, each a run")
    parser.add_argument("--full_adamw_lr", type=float, default=None, help="also fully fine-tune with AdamW at this lr")
    parser.add_argument("--lora_args", default="", help="more sft.py options for every LoRA run, e.g. '--lora_train_embeddings=true'")
    parser.add_argument("--n", type=int, default=100, help="held-out questions scored by bench/sft_replies.py")
    parser.add_argument("--quick", action="store_true", help="the `test` model, a few steps (for the test suite)")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    preset = "test" if args.quick else args.preset
    steps = 6 if args.quick else (args.steps or SFT_PRESETS[preset].max_steps)
    n, max_new_tokens = (4, 8) if args.quick else (args.n, 64)
    lora_lrs = [float(lr) for lr in args.lora_lrs.split(",") if lr]
    methods = {"full": []}  # name: what it adds to the preset
    if args.full_adamw_lr:
        methods[f"full_adamw_lr{args.full_adamw_lr:g}"] = ["--optimizer=adamw", f"--lr={args.full_adamw_lr}",
                                                            f"--min_lr={args.full_adamw_lr / 10}"]
    for lr in lora_lrs:
        methods[f"lora{RANK}_lr{lr:g}"] = [f"--lora_rank={RANK}", f"--lora_alpha={ALPHA}", "--optimizer=adamw",
                                           f"--lr={lr}", f"--min_lr={lr / 10}", *shlex.split(args.lora_args)]

    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or pretrain(tmp, args.quick, 20 if args.quick else args.base_steps)
        hf = os.path.join(tmp, "hf")
        # --quick leaves the check to tests/ship: importing transformers costs more than its whole run
        if export.main([base, "--format=hf", "--dtype=f32", f"--out={hf}", "--no-verify" if args.quick else "--verify"]) != 0:
            raise RuntimeError(f"{base}: its HF export does not match it")
        data = short_conversations(os.path.join(tmp, "chat.jsonl"), 80) if args.quick else SFT_DATA
        common = [f"--preset={preset}", f"--init_from={hf}", f"--data={data}", f"--out_dir={tmp}", f"--max_steps={steps}",
                  "--wandb=disabled", "--tqdm=false", f"--ckpt_every={steps}"]
        if args.quick:
            common += ["--seq_len=128", "--val_fraction=0.2", "--eval_every=3"]
        code, import_mib = peak_rss_mib(["-c", "import sft"])
        figures = {"preset": preset, "base": os.path.basename(os.path.normpath(base)), "steps": steps, "rank": RANK,
                   "alpha": ALPHA, "lora_args": args.lora_args.replace(" ", ",") or "none", "questions": 0,
                   "import_rss_mib": import_mib}
        for name, extra in methods.items():
            code, peak_mib = peak_rss_mib(["sft.py", *common, f"--name={name}", *extra])
            if code != 0:
                raise RuntimeError(f"{name}: sft.py exited with {code}")
            run_dir = os.path.join(tmp, name)
            cfg = run_config(run_dir)
            seconds, val = training_seconds(run_dir)
            scores = score(run_dir, n, max_new_tokens)
            figures["before_val_loss"] = val[0]  # every method's step 0 is the base's
            figures["questions"] = scores["questions"]
            figures.update({f"{name}_val_loss": val[-1], f"{name}_names_the_word": scores["names_the_word"],
                            f"{name}_ends_with_im_end": scores["ends_with_im_end"], f"{name}_trainable": trainable(cfg),
                            f"{name}_rss_mib": peak_mib - import_mib, f"{name}_est_gib": gpu_estimate(cfg),
                            f"{name}_train_s": seconds})
    best = max(lora_lrs, key=lambda lr: figures[f"lora{RANK}_lr{lr:g}_names_the_word"])
    full_rate = figures["full_names_the_word"]
    figures["lora_best_lr"] = best
    figures["lora_over_full_rate"] = figures[f"lora{RANK}_lr{best:g}_names_the_word"] / full_rate if full_rate else float("nan")

    big = SFT_PRESETS[BIG]
    if args.quick:  # the big model's estimate takes minutes: the `test` model stands for it
        big = dataclasses.replace(big, model=MODELS["test"], seq_len=64, loss_chunk=64)
    figures["big_model"] = "test" if args.quick else "lucie-7b"
    figures["big_micro_batch"], figures["big_seq_len"] = big.micro_batch_size, big.seq_len
    figures["big_full_trainable"] = trainable(dataclasses.replace(big, lora_rank=0))
    figures["big_lora_trainable"] = trainable(big)
    figures["big_full_est_gib"] = gpu_estimate(dataclasses.replace(big, lora_rank=0))
    figures["big_lora_est_gib"] = gpu_estimate(big)
    report("lora_sft", figures, args.results)
    return figures


if __name__ == "__main__":
    main()
