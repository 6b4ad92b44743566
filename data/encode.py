"""Encode text into token shards (train-00000.bin, ..., val-00000.bin, ...) for the trainer.

    python data/encode.py data/littre-citations.txt.gz --tokenizer=data/demo/tokenizer.model --out_dir=data/demo
    python data/encode.py --mixture=data/mix.json --tokenizer=data/tok/tokenizer.model --out_dir=data/tokens
    python data/encode.py corpus.jsonl --tokenizer=path/to/Lucie-7B --out_dir=data/lucie   # its tokenizer.json

Frozen decisions:
- each document becomes <s> tokens </s>; the split is by document hash (rodin.data.text.is_validation,
  or the mixture's own split); a mixture's train documents come repeated by their weights;
- every core encodes (a pool over batches of documents; results are written in input order, so
  the shards do not depend on the number of workers); a shard closes past --shard_tokens;
- after each shard, <split>-NNNNN.idx.json (token ranges -> source) is published, then
  encode_state.json (shards and documents done): a re-run skips finished shards' documents
  (read again, not re-encoded) and continues with the next shard.
"""

import argparse
import glob
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from rodin.io import atomic_write_text  # noqa: E402
from rodin.data.mixture import documents, load_manifest  # noqa: E402
from rodin.data.shards import ShardWriter, dtype_for_vocab  # noqa: E402
from rodin.data.text import FILES_VAL_FRACTION, is_validation, read_documents  # noqa: E402
from rodin.data.tokenizer import open_tokenizer  # noqa: E402

_tokenizer = None


def _init_worker(path):
    global _tokenizer
    _tokenizer = open_tokenizer(path)


def _encode_batch(batch):
    """One flat array and the document lengths: far cheaper to send back than lists of ints."""
    ids = [_tokenizer.encode_document(text) for _, text in batch]
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype_for_vocab(_tokenizer.vocab_size))
    return [source for source, _ in batch], np.cumsum([0] + [len(d) for d in ids]), flat


def file_documents(paths, split, val_fraction):
    """(source, text) of plain files: the source is the file's name."""
    for path in paths:
        for doc in read_documents(path):
            if is_validation(doc, val_fraction) == (split == "val"):
                yield os.path.basename(path), doc


def batched(iterator, size):
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def encode_split(split, docs, tok, tokenizer_path, out_dir, shard_tokens, workers, inputs=None, batch_size=256):
    """Write the shards of one split from an iterator of (source, text); resumes from encode_state.json
    when it was written for the same tokenizer and inputs."""
    state_path = os.path.join(out_dir, "encode_state.json")
    state = {}
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("fingerprint") != tok.fingerprint or state.get("inputs") != inputs:
            print(f"{state_path}: for other inputs or another tokenizer; encoding from the start")
            state = {}
    state["fingerprint"], state["inputs"] = tok.fingerprint, inputs
    done = state.setdefault(split, {"shards": 0, "docs": 0, "tokens": 0, "complete": False})
    if done["complete"]:
        return done
    if done["shards"] == 0:  # a fresh start: shards of an older run would be read by the trainer too
        stale = glob.glob(os.path.join(out_dir, f"{split}-*.bin")) + glob.glob(os.path.join(out_dir, f"{split}-*.idx.json"))
        for path in stale + [p for p in [os.path.join(out_dir, f"{split}.bin")] if os.path.exists(p)]:
            os.unlink(path)
    docs = itertools.islice(docs, done["docs"], None)  # documents of finished shards
    writer, ranges, n_docs = None, [], 0

    def publish():
        nonlocal writer, ranges, n_docs
        name = f"{split}-{done['shards']:05d}"
        checks = writer.seal()  # the index before the shard: a published shard always has its checks
        atomic_write_text(os.path.join(out_dir, name + ".idx.json"),
                          json.dumps({"shard": name + ".bin", **checks, "ranges": ranges}))
        writer.close()
        done.update(shards=done["shards"] + 1, docs=done["docs"] + n_docs, tokens=done["tokens"] + writer.n_tokens)
        atomic_write_text(state_path, json.dumps(state, indent=1))
        writer, ranges, n_docs = None, [], 0

    bar = tqdm(desc=f"encode {split}", unit="tok", unit_scale=True, initial=done["tokens"])
    with mp.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        # imap keeps the input order and feeds the workers ahead of the writer
        for sources, bounds, flat in pool.imap(_encode_batch, batched(docs, batch_size)):
            i = 0
            while i < len(sources):  # whole runs of documents per write: the writer must keep up with the pool
                if writer is None:
                    writer = ShardWriter(os.path.join(out_dir, f"{split}-{done['shards']:05d}.bin"), tok.vocab_size, tok.fingerprint)
                # up to and including the document that takes the shard past shard_tokens
                j = int(np.searchsorted(bounds, bounds[i] + shard_tokens - writer.n_tokens, side="left"))
                j = min(max(j, i + 1), len(sources))
                offset = writer.n_tokens - int(bounds[i])
                writer.write(flat[bounds[i] : bounds[j]])
                for source, run in itertools.groupby(range(i, j), key=sources.__getitem__):
                    run = list(run)
                    start, end = offset + int(bounds[run[0]]), offset + int(bounds[run[-1] + 1])
                    if ranges and ranges[-1][2] == source and ranges[-1][1] == start:
                        ranges[-1][1] = end
                    else:
                        ranges.append([start, end, source])
                n_docs += j - i
                bar.update(int(bounds[j] - bounds[i]))
                if writer.n_tokens >= shard_tokens:
                    publish()
                i = j
    if writer is not None:
        publish()
    bar.close()
    done["complete"] = True
    atomic_write_text(state_path, json.dumps(state, indent=1))
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help=".txt/.jsonl files, gzipped or not (or use --mixture)")
    parser.add_argument("--mixture", default=None, help="manifest made by data/mix.py")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model (rodin's), a tokenizer.json, or a model directory with either")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--val_fraction", type=float, default=FILES_VAL_FRACTION, help="files mode; a mixture has its own")
    parser.add_argument("--shard_tokens", type=int, default=500_000_000, help="a shard closes past this many tokens (1 GB in uint16)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.mixture):
        parser.error("give input files or --mixture=manifest.json, not both")

    tok = open_tokenizer(args.tokenizer)
    os.makedirs(args.out_dir, exist_ok=True)
    manifest = load_manifest(args.mixture) if args.mixture else None
    start = time.time()
    for split in ("train", "val"):
        docs = documents(manifest, split) if manifest else file_documents(args.inputs, split, args.val_fraction)
        # what the resume cursor is valid for: the same files, unchanged
        inputs = [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in ([args.mixture] if args.mixture else args.inputs)]
        done = encode_split(split, docs, tok, args.tokenizer, args.out_dir, args.shard_tokens, args.workers, inputs)
        print(f"{split}: {done['docs']} documents, {done['tokens']} tokens in {done['shards']} shards -> {args.out_dir}/{split}-*.bin")
    print(f"encoded in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
