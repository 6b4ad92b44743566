"""Plan the mixture: per-source weights or byte budgets over cleaned data, a train/val split, a manifest.

    python data/mix.py data/clean --out=data/mix.json --weights=wikipedia=2,legi=3 --budget=hplt=20G

Writes the manifest (JSON, read by data/train_tokenizer.py and data/encode.py --mixture) and a
Markdown table beside it: per source and split, documents and bytes before and after weighting.
Weights are passes over a source (2 = upsampled twice, 0.5 = half); see rodin/data/mixture.py. A token
budget needs the tokenizer's fertility report: mix in bytes, train the tokenizer, mix again in tokens.
"""

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from data.download import parse_size  # noqa: E402
from rodin.io import atomic_write_text  # noqa: E402
from rodin.data.mixture import source_documents  # noqa: E402


def parse_pairs(text, convert):
    pairs = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"{item!r}: write source=value, e.g. wikipedia=2")
        pairs[name] = convert(value)
    return pairs


def plan(in_dir, weights=None, budgets=None, val_fraction=0.005, seed=0, sources=None):
    names = sources or sorted(d for d in os.listdir(in_dir) if d != "work" and glob.glob(os.path.join(in_dir, d, "*.jsonl.gz")))
    for name in list(weights or {}) + list(budgets or {}):
        if name not in names:
            raise SystemExit(f"{in_dir}: no cleaned source {name!r}; found {', '.join(names)}")
    manifest = {"val_fraction": val_fraction, "seed": seed, "sources": {}}
    for name in names:
        files = sorted(os.path.abspath(p) for p in glob.glob(os.path.join(in_dir, name, "*.jsonl.gz")))
        info = {"files": files, "docs": {"train": 0, "val": 0}, "bytes": {"train": 0, "val": 0}}
        for split, text in tqdm(source_documents(info, val_fraction), desc=f"mix: {name}", unit="doc"):
            info["docs"][split] += 1
            info["bytes"][split] += len(text.encode("utf-8"))
        if name in (budgets or {}):
            info["weight"] = budgets[name] / max(info["bytes"]["train"], 1)
        else:
            info["weight"] = (weights or {}).get(name, 1.0)
        info["mixed_train_bytes"] = int(info["bytes"]["train"] * info["weight"])
        manifest["sources"][name] = info
    total = sum(i["mixed_train_bytes"] for i in manifest["sources"].values()) or 1
    for info in manifest["sources"].values():
        info["share"] = round(info["mixed_train_bytes"] / total, 6)
    return manifest


def markdown(manifest):
    lines = ["# Mixture", "", f"validation fraction {manifest['val_fraction']}, seed {manifest['seed']}", "",
             "| source | weight | train docs | train MB | val docs | val MB | mixed train MB | share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, i in manifest["sources"].items():
        lines.append(f"| {name} | {i['weight']:.3g} | {i['docs']['train']} | {i['bytes']['train'] / 1e6:.2f} | {i['docs']['val']} | "
                     f"{i['bytes']['val'] / 1e6:.2f} | {i['mixed_train_bytes'] / 1e6:.2f} | {i['share']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_dir", help="folder made by data/clean.py")
    parser.add_argument("--out", required=True, help="manifest .json to write")
    parser.add_argument("--weights", default="", help="source=passes,... (default 1 each)")
    parser.add_argument("--budget", default="", help="source=bytes,... e.g. hplt=20G: weight = budget / available training bytes")
    parser.add_argument("--token_budget", default="", help="source=tokens,... e.g. hplt=5G: needs --fertility")
    parser.add_argument("--fertility", default=None, help="<tokenizer>.fertility.json of data/train_tokenizer.py: its bytes/token turn token budgets into bytes")
    parser.add_argument("--sources", default=None, help="comma-separated (default: every cleaned source)")
    parser.add_argument("--val_fraction", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    budgets = parse_pairs(args.budget, parse_size)
    token_budgets = parse_pairs(args.token_budget, parse_size)
    if token_budgets:
        if not args.fertility:
            raise SystemExit("--token_budget needs --fertility=<tokenizer>.fertility.json (made by data/train_tokenizer.py)")
        with open(args.fertility, encoding="utf-8") as f:
            fertility = json.load(f)
        for name, tokens in token_budgets.items():
            if name not in fertility:
                raise SystemExit(f"{args.fertility}: no fertility for source {name!r}; train the tokenizer on a mixture that has it")
            budgets[name] = int(tokens * fertility[name]["bytes_per_token"])
    manifest = plan(args.in_dir, parse_pairs(args.weights, float), budgets,
                    args.val_fraction, args.seed, args.sources.split(",") if args.sources else None)
    atomic_write_text(args.out, json.dumps(manifest, ensure_ascii=False, indent=1))
    atomic_write_text(os.path.splitext(args.out)[0] + ".md", markdown(manifest))
    for name, i in manifest["sources"].items():
        print(f"{name}: weight {i['weight']:.3g}, train {i['docs']['train']} docs {i['bytes']['train'] / 1e6:.1f} MB, "
              f"val {i['docs']['val']} docs, {i['share']:.1%} of the mixture")
    print(f"planned in {time.time() - start:.0f} s -> {args.out}")
    return manifest


if __name__ == "__main__":
    main()
