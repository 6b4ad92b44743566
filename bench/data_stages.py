"""Throughput of each data stage on the shipped corpus, and the scaling of tokenization with processes.

    python bench/data_stages.py            # the whole corpus (6.3 MB), appends a line to bench/RESULTS.md
    python bench/data_stages.py --quick    # 10,000 lines, for CI

MB/s is of input text bytes per wall-clock second, the whole stage included (worker start-up,
model loading); the clean stage relaxes Gopher's 50-word minimum, the corpus being one-line quotations.
"""

import argparse
import gzip
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.results import report  # noqa: E402
from data import clean, download, encode, mix, train_tokenizer  # noqa: E402
from rodin.data.tokenizer import Tokenizer  # noqa: E402

CORPUS = os.path.join(ROOT, "data", "littre-citations.txt.gz")


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(work, lines, vocab_size, repeats):
    corpus = os.path.join(work, "corpus", "littre.txt")
    os.makedirs(os.path.dirname(corpus))
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f, open(corpus, "w", encoding="utf-8") as out:
        out.writelines(itertools.islice(f, lines))
    mb = os.path.getsize(corpus) / 1e6
    registry = os.path.join(work, "registry.json")
    with open(registry, "w") as f:
        json.dump({"sources": {"littre": {"local": [corpus], "text_field": "text"}}}, f)
    tok = os.path.join(work, "tok", "tokenizer.model")
    seconds = {
        "download": timed(download.main, [f"--registry={registry}", f"--out_dir={work}/raw", "--shard_bytes=1M"]),
        "clean": timed(clean.main, [f"{work}/raw", f"--out_dir={work}/clean", "--set=min_words.min=3", "--ocr_sources="]),
        "mix": timed(mix.main, [f"{work}/clean", f"--out={work}/mix.json"]),
        "tokenizer": timed(train_tokenizer.main, [f"--mixture={work}/mix.json", f"--out={tok}", f"--vocab_size={vocab_size}"]),
    }
    seconds["encode"] = timed(encode.main, [corpus, f"--tokenizer={tok}", f"--out_dir={work}/tokens", "--shard_tokens=10000000"])
    # scaling: the encoding loop alone (documents already in memory), 1 and 2 processes alternated and
    # the median kept, so that load from other programs on the machine hits both alike
    docs = list(encode.file_documents([corpus], "train", 0.02))
    runs = {1: [], 2: []}
    for r in range(repeats):
        for workers in (1, 2):
            out = os.path.join(work, f"scaling-{workers}-{r}")
            os.makedirs(out)
            runs[workers].append(timed(encode.encode_split, "train", iter(docs), Tokenizer(tok), tok, out, 10**9, workers))
    train_mb = sum(len(text.encode("utf-8")) for _, text in docs) / 1e6
    figures = {stage: round(mb / s, 3) for stage, s in seconds.items()}
    for workers, times in runs.items():
        figures[f"encode_loop_{workers}p"] = round(train_mb / statistics.median(times), 3)
    figures["encode_speedup_2p"] = round(statistics.median(runs[1]) / statistics.median(runs[2]), 2)
    return mb, figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 lines and a 1,000-piece vocabulary")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        mb, figures = run(work, 10_000 if args.quick else 10**9, 1000 if args.quick else 8000, 1 if args.quick else 7)
    report("data_stages" + (" --quick" if args.quick else ""), {"corpus_mb": round(mb, 1), **figures}, args.results)
    return figures


if __name__ == "__main__":
    main()
