"""Train the SentencePiece BPE tokenizer, then write its fertility report next to the model.

    python data/train_tokenizer.py data/littre-citations.txt.gz --model=demo --out=data/demo/tokenizer.model
    python data/train_tokenizer.py --mixture=data/mix.json --out=data/tok/tokenizer.model   # vocab 64,000

Validation documents (see rodin.data.text.is_validation) are left out, so the held-out loss is honest.
With --mixture the input is a stratified sample of the mixture's training documents (each source
in proportion to its share, --sample_bytes in all). The fertility report (<model>.fertility.json
and .md) gives tokens per word and per byte on held-out documents of each source (or file).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from rodin.config import MODELS  # noqa: E402
from rodin.io import atomic_write_text  # noqa: E402
from rodin.data.mixture import load_manifest, sample, source_documents  # noqa: E402
from rodin.data.text import is_validation, read_documents  # noqa: E402
from rodin.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def chunks(texts, max_chars=16_000):
    """Documents cut at line ends into pieces SentencePiece accepts (it skips sentences over 64 KiB:
    whole books would never be seen)."""
    for text in texts:
        while len(text) > max_chars:
            cut = text.rfind("\n", 0, max_chars) + 1 or max_chars
            yield text[:cut]
            text = text[cut:]
        if text:
            yield text


def fertility(tok, held_out, max_docs=2000):
    """held_out: {name: iterable of texts} -> {name: tokens/word, tokens/byte, bytes/token}."""
    report = {}
    for name, texts in held_out.items():
        docs = words = n_bytes = tokens = 0
        for text in texts:
            docs += 1
            words += len(text.split())
            n_bytes += len(text.encode("utf-8"))
            tokens += len(tok.encode(text))
            if docs == max_docs:
                break
        report[name] = {"docs": docs, "words": words, "bytes": n_bytes, "tokens": tokens,
                        "tokens_per_word": round(tokens / max(words, 1), 4), "tokens_per_byte": round(tokens / max(n_bytes, 1), 4),
                        "bytes_per_token": round(n_bytes / max(tokens, 1), 3)}
    return report


def fertility_markdown(model_path, vocab_size, report):
    lines = [f"# Fertility of {os.path.basename(model_path)} ({vocab_size} pieces), held-out documents", "",
             "| source | docs | tokens/word | tokens/byte | bytes/token |", "|---|---:|---:|---:|---:|"]
    for name, r in report.items():
        lines.append(f"| {name} | {r['docs']} | {r['tokens_per_word']:.3f} | {r['tokens_per_byte']:.4f} | {r['bytes_per_token']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help=".txt/.jsonl files, gzipped or not (or use --mixture)")
    parser.add_argument("--mixture", default=None, help="manifest made by data/mix.py")
    parser.add_argument("--out", required=True, help="path of the .model file to write")
    parser.add_argument("--vocab_size", type=int, default=None, help="default: the vocab size of --model")
    parser.add_argument("--model", default="rodin-1b", choices=sorted(MODELS), help="model preset whose vocab size to fill")
    parser.add_argument("--val_fraction", type=float, default=0.02, help="files mode; a mixture has its own")
    parser.add_argument("--sample_bytes", type=float, default=2e9, help="mixture mode: bytes of the stratified sample")
    parser.add_argument("--max_sentences", type=int, default=2_000_000, help="sample at most this many documents")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.mixture):
        parser.error("give input files or --mixture=manifest.json, not both")
    vocab_size = args.vocab_size or MODELS[args.model].vocab_size

    if args.mixture:
        manifest = load_manifest(args.mixture)
        training = (text for _, text in sample(manifest, args.sample_bytes))
        held_out = {name: (t for split, t in source_documents(info, manifest["val_fraction"]) if split == "val")
                    for name, info in manifest["sources"].items()}
    else:
        training = (d for path in args.inputs for d in read_documents(path) if not is_validation(d, args.val_fraction))
        held_out = {os.path.basename(path): (d for d in read_documents(path) if is_validation(d, args.val_fraction))
                    for path in args.inputs}

    start = time.time()
    training = tqdm(training, desc="tokenizer: reading the sample", unit="doc")
    train_tokenizer(chunks(training), args.out, vocab_size, num_threads=args.threads, input_sentence_size=args.max_sentences)
    tok = Tokenizer(args.out)
    print(f"tokenizer: {tok.vocab_size} pieces -> {args.out} ({time.time() - start:.0f} s)")
    report = fertility(tok, held_out)
    stem = os.path.splitext(args.out)[0]
    atomic_write_text(stem + ".fertility.json", json.dumps(report, indent=1))
    atomic_write_text(stem + ".fertility.md", fertility_markdown(args.out, tok.vocab_size, report))
    for name, r in report.items():
        print(f"{name}: {r['tokens_per_word']:.2f} tokens/word, {r['bytes_per_token']:.2f} bytes/token on {r['docs']} held-out docs")


if __name__ == "__main__":
    main()
