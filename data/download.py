"""Download sources of the registry (data/sources.json) into gzipped JSONL shards, resumably.

    python data/download.py --sources=wikipedia,legi --out_dir=data/raw --max_bytes=2G

Frozen decisions:
- a source is a Hub dataset streamed with `datasets` (streaming=True) or local files/folders;
  output is OUT/<source>/00000.jsonl.gz, ... of {"text", "source"} records, text as stored
  (normalising is data/clean.py's job), each shard published whole (temporary name, rename);
- after each shard, OUT/<source>/state.json records the cursor past its last document (the
  IterableDataset.state_dict() of a Hub stream, or (file, row) of local files) and the counts:
  a re-run resumes at the exact next document and rewrites at most the shard that was cut;
- bad rows (non-UTF-8, missing text field, empty, oversized, truncated file) are counted, not fatal,
  unless a source's first MISSING_FIELD_LIMIT rows all lack its text field: a wrong field name would
  otherwise stream a whole dataset for nothing (the other sources still download).
"""

import argparse
import json
import os
import re
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from rodin.io import atomic_write_text  # noqa: E402
from rodin.data.records import JsonlShardWriter, list_files, read_rows  # noqa: E402

REGISTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sources.json")
MISSING_FIELD_LIMIT = 1000


def parse_size(text):
    """'2G', '500M', '1.5T', '1000' -> bytes (decimal units, like the Hub's sizes)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r}: not a size; write e.g. 500M, 2G or 1.5T")
    return int(float(match[1]) * 1000 ** " KMGT".index(match[2].upper() or " "))


def load_registry(path):
    try:
        with open(path, encoding="utf-8") as f:
            registry = json.load(f)
    except ValueError as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); see data/sources.json for the format") from None
    base = os.path.dirname(os.path.abspath(path))
    for name, spec in registry["sources"].items():
        if not spec.get("hub") and not spec.get("local"):
            raise SystemExit(f"{path}: source {name!r} names neither 'hub' nor 'local' files")
        if spec.get("local"):
            spec["local"] = [p if os.path.isabs(p) else os.path.join(base, p) for p in spec["local"]]
    return registry["sources"]


class LocalSource:
    """Rows of local files in sorted order; the cursor is (file index, next row)."""

    def __init__(self, spec, stats, cursor=None, max_doc_bytes=32 << 20):
        self.files = list_files(spec["local"])
        self.text_field, self.stats, self.max_doc_bytes = spec.get("text_field", "text"), stats, max_doc_bytes
        self.position = dict(cursor or {"file": 0, "row": 0})

    def __iter__(self):
        for i in range(self.position["file"], len(self.files)):
            start = self.position["row"] if i == self.position["file"] else 0
            for row, text in read_rows(self.files[i], self.text_field, start, self.max_doc_bytes, self.stats):
                self.position = {"file": i, "row": row + 1}
                yield text
            self.position = {"file": i + 1, "row": 0}

    def cursor(self):
        return self.position


class HubSource:
    """A streamed Hub dataset; the cursor is IterableDataset.state_dict(), exact to the document."""

    def __init__(self, spec, stats, cursor=None, max_doc_bytes=32 << 20):
        import datasets

        # parquet sources can skip their other columns (Légifrance carries embeddings)
        columns = {"columns": [spec.get("text_field", "text")]} if spec.get("text_only_columns") else {}
        self.dataset = datasets.load_dataset(spec["hub"], spec.get("config"), split=spec.get("split") or "train",
                                             data_files=spec.get("data_files"), revision=spec.get("revision"),
                                             streaming=True, **columns)
        if cursor is not None:
            self.dataset.load_state_dict(cursor)
        self.text_field, self.stats, self.max_doc_bytes = spec.get("text_field", "text"), stats, max_doc_bytes

    def __iter__(self):
        for example in self.dataset:
            text = example.get(self.text_field)
            if not isinstance(text, str):
                self.stats["missing_field"] += 1
                text = None
            elif len(text) > self.max_doc_bytes:
                self.stats["oversized"] += 1
                text = None
            elif not text.strip():
                self.stats["empty"] += 1
                text = None
            yield text

    def cursor(self):
        return self.dataset.state_dict()


def download_source(name, spec, out_dir, max_bytes=None, shard_bytes=100_000_000, stop_after_shards=None, max_doc_bytes=32 << 20):
    """Stream one source into shards until its budget; returns its state (also saved as state.json)."""
    folder = os.path.join(out_dir, name)
    state_path = os.path.join(folder, "state.json")
    state = {"source": name, "shards": 0, "docs": 0, "bytes": 0, "cursor": None, "done": False, "bad": {}}
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    budget = max_bytes if max_bytes is not None else spec.get("budget_bytes")
    if state["done"] or (budget is not None and state["bytes"] >= budget):
        return state
    stats = Counter(state["bad"])
    source = (HubSource if spec.get("hub") else LocalSource)(spec, stats, state["cursor"], max_doc_bytes)
    bar = tqdm(total=budget, initial=state["bytes"], unit="B", unit_scale=True, desc=name)
    writer, written_shards = None, 0

    def publish():
        nonlocal writer, written_shards
        writer.close()
        state.update(shards=state["shards"] + 1, docs=state["docs"] + writer.n_docs, bytes=state["bytes"] + writer.n_bytes,
                     cursor=source.cursor(), bad={k: v for k, v in stats.items() if k != "errors"})
        state["errors"] = stats.get("errors", [])[-20:]
        atomic_write_text(state_path, json.dumps(state, ensure_ascii=False, indent=1))
        writer, written_shards = None, written_shards + 1

    for text in source:
        if text is None:
            if state["docs"] == 0 and writer is None and stats["missing_field"] >= MISSING_FIELD_LIMIT:
                raise ValueError(f"source {name!r}: none of its first {MISSING_FIELD_LIMIT} rows has the text field "
                                 f"{spec.get('text_field', 'text')!r}; set its text_field to the column that holds the text")
            continue
        if writer is None:
            writer = JsonlShardWriter(os.path.join(folder, f"{state['shards']:05d}.jsonl.gz"))
        writer.write({"text": text, "source": name})
        bar.update(len(text.encode("utf-8")))
        full = budget is not None and state["bytes"] + writer.n_bytes >= budget
        if writer.n_bytes >= shard_bytes or full:
            publish()
            if full or (stop_after_shards is not None and written_shards >= stop_after_shards):
                break
    else:
        if writer is not None:
            publish()
        state.update(done=True, bad={k: v for k, v in stats.items() if k != "errors"}, errors=stats.get("errors", [])[-20:])
        atomic_write_text(state_path, json.dumps(state, ensure_ascii=False, indent=1))
    bar.close()
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default=REGISTRY, help="JSON source registry")
    parser.add_argument("--sources", default=None, help="comma-separated names (default: all in the registry)")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--max_bytes", default=None, help="budget per source in bytes of text, e.g. 2G (overrides the registry's budget_bytes)")
    parser.add_argument("--shard_bytes", default="100M", help="text bytes per output shard")
    parser.add_argument("--max_doc_bytes", default="32M", help="longer documents are counted as oversized and skipped")
    args = parser.parse_args(argv)

    registry = load_registry(args.registry)
    names = args.sources.split(",") if args.sources else list(registry)
    for name in names:
        if name not in registry:
            raise SystemExit(f"{args.registry}: no source {name!r}; known: {', '.join(registry)}")
    max_bytes = parse_size(args.max_bytes) if args.max_bytes else None
    start, states, failed = time.time(), {}, {}
    for name in names:
        try:
            states[name] = download_source(name, registry[name], args.out_dir, max_bytes, parse_size(args.shard_bytes),
                                           max_doc_bytes=parse_size(args.max_doc_bytes))
        except FileNotFoundError as e:  # one missing local source must not stop the others
            failed[name] = str(e)
        except ValueError as e:
            failed[name] = f"{args.registry}: {e}"
    atomic_write_text(os.path.join(args.out_dir, "download_report.json"), json.dumps(states, ensure_ascii=False, indent=1))
    for name, s in states.items():
        bad = ", ".join(f"{k} {v}" for k, v in sorted(s["bad"].items())) or "none"
        print(f"{name}: kept {s['docs']} docs, {s['bytes'] / 1e6:.1f} MB in {s['shards']} shards"
              f"{'' if s['done'] else ' (budget reached)'}; dropped bad rows: {bad}")
    print(f"downloaded in {time.time() - start:.0f} s -> {args.out_dir}")
    if failed:
        raise SystemExit("not downloaded: " + "; ".join(failed.values()))


if __name__ == "__main__":
    main()
