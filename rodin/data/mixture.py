"""A data mixture: per-source weights (epochs) over cleaned shards, and the documents it yields.

Frozen decisions:
- a weight is a number of passes over a source's training documents: 2.0 repeats every
  document twice (upsampling, as Lucie did for its best sources), 0.3 keeps 30 % of them; a
  byte budget is turned into the weight budget / available bytes (RODIN's per-source budgets);
- every choice is a hash of (seed, pass, document), not of a position or an RNG stream, so the
  same manifest yields the same documents in the same order on any machine;
- the validation split is rodin.data.text.is_validation (a hash of the document): never upsampled,
  never seen by the tokenizer, the same documents whatever the weights.
"""

import hashlib
import json
import math

from rodin.data.records import read_jsonl
from rodin.data.text import is_validation


def load_manifest(path):
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if "sources" not in manifest:
        raise ValueError(f"{path}: not a mixture manifest (no 'sources'); make one with data/mix.py")
    return manifest


def uniform(seed, *parts):
    """A number in [0, 1) fixed by its arguments."""
    digest = hashlib.blake2b("\x1f".join(map(str, (seed,) + parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def source_documents(info, val_fraction):
    """(split, text) of every document of one source, in file order."""
    for path in info["files"]:
        for record in read_jsonl(path):
            text = record.get("text")
            if isinstance(text, str) and text.strip():
                yield ("val" if is_validation(text, val_fraction) else "train"), text


def documents(manifest, split):
    """(source, text) of a split: train documents repeated by their source's weight, val once."""
    seed, val_fraction = manifest["seed"], manifest["val_fraction"]
    for name, info in manifest["sources"].items():
        weight = info["weight"]
        passes = 1 if split == "val" else math.ceil(weight)
        for p in range(passes):
            for doc_split, text in source_documents(info, val_fraction):
                if doc_split != split:
                    continue
                if split == "train" and weight - p < 1 and uniform(seed, p, text) >= weight - p:
                    continue
                yield name, text


def sample(manifest, max_bytes):
    """(source, text) of a stratified sample of the training mixture, about max_bytes in all, each
    source in proportion to its share of the mixture, no document twice: the tokenizer's input."""
    seed, val_fraction = manifest["seed"], manifest["val_fraction"]
    total = sum(i["bytes"]["train"] * i["weight"] for i in manifest["sources"].values()) or 1
    for name, info in manifest["sources"].items():
        share = info["bytes"]["train"] * info["weight"] / total
        rate = min(1.0, max_bytes * share / max(info["bytes"]["train"], 1))
        for doc_split, text in source_documents(info, val_fraction):
            if doc_split == "train" and uniform(seed, "sample", text) < rate:
                yield name, text
