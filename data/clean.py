"""Clean downloaded shards: repair, quality rules, exact and near dedup; a report of every drop.

    python data/clean.py data/raw --out_dir=data/clean --set=min_words.min=20 --disable=curly_bracket

Frozen decisions:
- input is download.py's folder (one subfolder of *.jsonl.gz per source); output mirrors it;
- three resumable passes: (1) per shard, in parallel: repair, rules, dedup keys, written under
  OUT/work/ with a per-shard report written last (a shard with a report is done); (2) dedup over
  all keys on disk (rodin/data/dedup.py), the first document of a cluster kept in source order;
  (3) per shard: the kept documents, with "cluster_size" when duplicates were removed
  (FineWeb-2 keeps it for rehydration), then OUT/clean_report.json and .md; RAM in pass 2 is
  16 bytes a document plus one bucket (--buckets=256 for a billion documents);
- rules and thresholds: rodin/data/quality.py RULES, changed with --config, --set and --disable.
"""

import argparse
import copy
import glob
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from rodin.data.dedup import MinHasher, find_duplicates  # noqa: E402
from rodin.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from rodin.data.quality import RULES, check, french_probability, remove_boilerplate_lines, repair  # noqa: E402
from rodin.data.records import JsonlShardWriter, read_jsonl  # noqa: E402

N_EXAMPLES = 3
EXAMPLE_CHARS = 300


def build_rules(config=None, overrides=(), disable=(), ocr=False):
    """RULES with a config dict ({"rules": {name: {param: value}}}), name.param=value overrides and
    disabled names applied; the OCR-noise rule on for OCR sources."""
    rules = copy.deepcopy(RULES)
    for name, params in ((config or {}).get("rules") or {}).items():
        _rule(rules, name).update(params)
    for item in overrides:
        key, _, value = item.partition("=")
        name, _, param = key.partition(".")
        if not param or not value:
            raise SystemExit(f"--set {item!r}: write rule.param=value, e.g. min_words.min=20")
        try:
            value = json.loads(value)
        except ValueError:
            pass
        _rule(rules, name)[param] = value
    if ocr:
        rules["ocr_noise"]["enabled"] = True
    for name in disable:
        _rule(rules, name)["enabled"] = False
    return rules


def _rule(rules, name):
    if name not in rules:
        raise SystemExit(f"no quality rule {name!r}; known: {', '.join(rules)} (rodin/data/quality.py)")
    return rules[name]


def _new_report(source):
    return {"source": source, "docs_in": 0, "bytes_in": 0, "docs_kept": 0, "bytes_kept": 0,
            "dropped": {}, "modified": {}, "bad": {}, "examples": {}}


def _drop(report, rule, text):
    docs, size = report["dropped"].get(rule, (0, 0))
    report["dropped"][rule] = [docs + 1, size + len(text.encode("utf-8"))]
    examples = report["examples"].setdefault(rule, [])
    if len(examples) < N_EXAMPLES:
        examples.append(text[:EXAMPLE_CHARS])


def filter_shard(task):
    """Pass 1 on one shard: kept documents, their dedup keys, and the shard's report."""
    source, in_path, work_prefix, rules = task
    report, stats, hasher = _new_report(source), Counter(), MinHasher()
    keys = []
    writer = JsonlShardWriter(work_prefix + ".jsonl.gz")
    for record in read_jsonl(in_path, stats):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats["missing_field"] += 1
            continue
        size = len(text.encode("utf-8"))
        report["docs_in"] += 1
        report["bytes_in"] += size
        text = repair(text, stats)
        cleaned = remove_boilerplate_lines(text)
        if cleaned != text:
            stats["boilerplate_lines_removed"] += text.count("\n") - cleaned.count("\n")
            text = cleaned
        rule = "empty" if not text.strip() else check(text, rules)
        if rule:
            _drop(report, rule, text)
            continue
        writer.write({"text": text, "source": source})
        keys.append(hasher.keys(text))
    writer.close()
    buffer = _npy_bytes(np.array(keys, dtype=np.uint64).reshape(len(keys), 1 + hasher.bands))
    atomic_write_bytes(work_prefix + ".keys.npy", buffer)
    report["modified"] = {k: v for k, v in stats.items() if k in ("mojibake_repaired", "boilerplate_lines_removed")}
    report["bad"] = {k: v for k, v in stats.items() if k not in report["modified"] and k != "errors"}
    report["errors"] = stats.get("errors", [])
    atomic_write_text(work_prefix + ".report.json", json.dumps(report, ensure_ascii=False))
    return report


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def find_shards(in_dir, sources=None):
    """[(source, shard path)] in source order, then shard order."""
    names = sources or sorted(d for d in os.listdir(in_dir) if os.path.isdir(os.path.join(in_dir, d)))
    shards = [(name, path) for name in names for path in sorted(glob.glob(os.path.join(in_dir, name, "*.jsonl.gz")))]
    if not shards:
        raise SystemExit(f"{in_dir}: no <source>/*.jsonl.gz shards; run data/download.py first")
    return shards


def _stem(path):
    return os.path.basename(path)[: -len(".jsonl.gz")]


def write_kept(source, work_prefix, out_path, roots, exact, sizes, offset):
    """Pass 3 on one shard: the documents that are their cluster's root."""
    report = _new_report(source)
    writer = JsonlShardWriter(out_path)
    for i, record in enumerate(read_jsonl(work_prefix + ".jsonl.gz")):
        gid = offset + i
        root = roots[gid]
        if root != gid:
            _drop(report, "exact_dup" if exact[root] == exact[gid] else "near_dup", record["text"])
            continue
        if sizes[gid] > 1:
            record["cluster_size"] = int(sizes[gid])
        writer.write(record)
        report["docs_kept"] += 1
        report["bytes_kept"] += len(record["text"].encode("utf-8"))
    writer.close()
    atomic_write_text(out_path[: -len(".jsonl.gz")] + ".report.json", json.dumps(report, ensure_ascii=False))
    return report


def merge_reports(reports):
    merged = {}
    for r in reports:
        m = merged.setdefault(r["source"], _new_report(r["source"]))
        for key in ("docs_in", "bytes_in"):
            m[key] += r[key]
        for key in ("modified", "bad"):
            for name, n in r[key].items():
                m[key][name] = m[key].get(name, 0) + n
        for rule, (docs, size) in r["dropped"].items():
            d, s = m["dropped"].get(rule, (0, 0))
            m["dropped"][rule] = [d + docs, s + size]
        for rule, texts in r["examples"].items():
            m["examples"][rule] = (m["examples"].get(rule, []) + texts)[:N_EXAMPLES]
    return merged


def markdown(report):
    lines = ["# Clean report", "", "| source | docs in | docs kept | MB in | MB kept | repaired | bad rows |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s, r in report["sources"].items():
        lines.append(f"| {s} | {r['docs_in']} | {r['docs_kept']} | {r['bytes_in'] / 1e6:.2f} | {r['bytes_kept'] / 1e6:.2f} | "
                     f"{r['modified'].get('mojibake_repaired', 0)} | {sum(r['bad'].values())} |")
    lines += ["", "## Dropped, per rule", "", "| source | rule | docs | MB |", "|---|---|---:|---:|"]
    for s, r in report["sources"].items():
        for rule, (docs, size) in sorted(r["dropped"].items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| {s} | {rule} | {docs} | {size / 1e6:.3f} |")
    lines += ["", "## Dropped examples", ""]
    for s, r in report["sources"].items():
        for rule, texts in r["examples"].items():
            for text in texts:
                lines.append(f"- **{s} / {rule}**: {json.dumps(text[:160], ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_dir", help="folder made by data/download.py")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--sources", default=None, help="comma-separated, in priority order for dedup (default: sorted)")
    parser.add_argument("--config", default=None, help='JSON file {"rules": {name: {param: value}}, "ocr_sources": [...]}')
    parser.add_argument("--set", action="append", default=[], help="rule.param=value (repeatable)")
    parser.add_argument("--disable", default="", help="comma-separated rule names to switch off")
    parser.add_argument("--ocr_sources", default=None, help="sources that get the OCR-noise rule (default: those with ocr=true in data/sources.json)")
    parser.add_argument("--no_dedup", action="store_true")
    parser.add_argument("--buckets", type=int, default=16, help="dedup bucket files; more = less RAM in pass 2")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    config = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
    if args.ocr_sources is not None:
        ocr_sources = set(filter(None, args.ocr_sources.split(",")))
    elif "ocr_sources" in config:
        ocr_sources = set(config["ocr_sources"])
    else:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sources.json"), encoding="utf-8") as f:
            ocr_sources = {n for n, s in json.load(f)["sources"].items() if s.get("ocr")}
    disable = [d for d in args.disable.split(",") if d]
    start = time.time()
    shards = find_shards(args.in_dir, args.sources.split(",") if args.sources else None)
    work = os.path.join(args.out_dir, "work")
    tasks, reports = [], {}
    for source, path in shards:
        prefix = os.path.join(work, source, _stem(path))
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        if os.path.exists(prefix + ".report.json"):
            with open(prefix + ".report.json", encoding="utf-8") as f:
                reports[prefix] = json.load(f)
        else:
            rules = build_rules(config, args.set, disable, ocr=source in ocr_sources)
            tasks.append((source, path, prefix, rules))
    if tasks:
        french_probability("")  # load the language model once, before the workers fork
        with mp.Pool(min(args.workers, len(tasks))) as pool:
            for _ in tqdm(pool.imap_unordered(filter_shard, tasks), total=len(tasks), desc="clean: rules", unit="shard"):
                pass
        for _, _, prefix, _ in tasks:
            with open(prefix + ".report.json", encoding="utf-8") as f:
                reports[prefix] = json.load(f)
    prefixes = [os.path.join(work, source, _stem(path)) for source, path in shards]

    if args.no_dedup:
        n = sum(reports[p]["docs_in"] - sum(d for d, _ in reports[p]["dropped"].values()) for p in prefixes)
        roots, exact = np.arange(n), np.zeros(n, np.uint64)
    else:
        roots_path = os.path.join(work, "roots.npy")
        if os.path.exists(roots_path):
            roots, exact = np.load(roots_path), np.load(os.path.join(work, "exact.npy"))
        else:
            roots, exact = find_duplicates([p + ".keys.npy" for p in prefixes], os.path.join(work, "buckets"), args.buckets)
            atomic_write_bytes(os.path.join(work, "exact.npy"), _npy_bytes(exact))
            atomic_write_bytes(roots_path, _npy_bytes(roots))

    sizes = np.bincount(roots, minlength=len(roots))
    final, offset = [], 0
    for (source, path), prefix in tqdm(list(zip(shards, prefixes)), desc="clean: dedup", unit="shard"):
        out_path = os.path.join(args.out_dir, source, _stem(path) + ".jsonl.gz")
        report_path = out_path[: -len(".jsonl.gz")] + ".report.json"
        if os.path.exists(report_path):
            with open(report_path, encoding="utf-8") as f:
                final.append(json.load(f))
        else:
            final.append(write_kept(source, prefix, out_path, roots, exact, sizes, offset))
            os.unlink(prefix + ".jsonl.gz")  # its documents are in out_path now; keys and report stay
        n_pass1 = reports[prefix]["docs_in"] - sum(d for d, _ in reports[prefix]["dropped"].values())
        offset += n_pass1

    merged = merge_reports([reports[p] for p in prefixes] + [dict(r, docs_in=0, bytes_in=0) for r in final])
    for r in final:
        merged[r["source"]]["docs_kept"] += r["docs_kept"]
        merged[r["source"]]["bytes_kept"] += r["bytes_kept"]
    report = {"sources": merged, "rules": build_rules(config, args.set, disable), "ocr_sources": sorted(ocr_sources),
              "seconds": round(time.time() - start, 1)}
    atomic_write_text(os.path.join(args.out_dir, "clean_report.json"), json.dumps(report, ensure_ascii=False, indent=1, default=str))
    atomic_write_text(os.path.join(args.out_dir, "clean_report.md"), markdown(report))
    for s, r in merged.items():
        drops = ", ".join(f"{rule} {docs}" for rule, (docs, _) in sorted(r["dropped"].items(), key=lambda kv: -kv[1][0]))
        print(f"{s}: kept {r['docs_kept']}/{r['docs_in']} docs, {r['bytes_kept'] / 1e6:.1f}/{r['bytes_in'] / 1e6:.1f} MB; "
              f"dropped: {drops or 'none'}; bad rows: {sum(r['bad'].values())}")
    print(f"cleaned in {time.time() - start:.0f} s -> {args.out_dir} (report: clean_report.md)")
    return report


if __name__ == "__main__":
    main()
