"""The data pipeline on a local mini "hub" in the formats of RODIN's sources:
download -> clean -> mix -> tokenizer -> encode, resumption, bad input, near-dedup."""

import gzip
import itertools
import json
import os
import random
import subprocess
import sys
from unittest.mock import ANY

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CORPUS, ROOT

from data import clean, download, encode, mix, train_tokenizer
from rodin.config import PRESETS
from rodin.data.dedup import MinHasher, find_duplicates
from rodin.data.mixture import documents, load_manifest
from rodin.data.records import read_jsonl
from rodin.data.shards import ShardWriter, open_shard
from rodin.data.tokenizer import CHAT_TOKENS, Tokenizer
from rodin.train import checkpoint


def french_documents(n, lines_per_doc=10, skip=0):
    """Documents of ten Littré quotations each, one per line: French prose that passes the rules."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in itertools.islice(f, skip, skip + n * lines_per_doc)]
    return ["\n".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]


def near_copy(text, rng):
    words = text.split(" ")
    for i in rng.sample(range(len(words)), 2):
        words[i] = "toutefois"
    return " ".join(words)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Files shaped like the real sources, a registry naming them, and the planted duplicates."""
    root = tmp_path_factory.mktemp("hub")
    docs = french_documents(240)
    rng = random.Random(0)
    wiki, books, web, legi = docs[:80], docs[80:120], docs[120:200], docs[200:240]
    (root / "wikipedia").mkdir()
    for i, part in enumerate((wiki[:50], wiki[50:])):
        table = pa.table({"id": [str(j) for j in range(len(part))], "url": ["https://fr.wikipedia.org/"] * len(part),
                          "title": ["Titre"] * len(part), "text": part})
        pq.write_table(table, root / "wikipedia" / f"train-{i:05d}-of-00002.parquet", row_group_size=16)
    (root / "pleias_books").mkdir()
    # a page of OCR debris: letters read as digits in every other word
    debris = " ".join(w.replace("e", "3").replace("o", "0") if i % 2 else w for i, w in enumerate(docs[0].split(" ")))
    books = books + [debris]
    pq.write_table(pa.table({"identifier": [f"bpt6k{j}" for j in range(len(books))], "complete_text": books,
                             "word_count": [len(b.split()) for b in books]}), root / "pleias_books" / "books.parquet", row_group_size=8)
    planted_near = [near_copy(wiki[3], rng), near_copy(books[5], rng)]
    planted_exact = [legi[7].upper()]  # exact dedup folds case and punctuation
    (root / "hplt").mkdir()
    with gzip.open(root / "hplt" / "fra_Latn-0.jsonl.gz", "wt", encoding="utf-8") as f:
        for j, text in enumerate(web[:40] + planted_near + web[40:] + planted_exact):
            f.write(json.dumps({"id": j, "text": text, "lang": ["fra_Latn"]}, ensure_ascii=False) + "\n")
    (root / "legi").mkdir()
    with open(root / "legi" / "legi.jsonl", "w", encoding="utf-8") as f:
        for text in legi:
            f.write(json.dumps({"cid": "LEGITEXT", "text": text}, ensure_ascii=False) + "\n")
    registry = {"sources": {
        "wikipedia": {"local": ["wikipedia"], "text_field": "text", "licence": "CC-BY-SA-4.0"},
        "pleias_books": {"local": ["pleias_books"], "text_field": "complete_text", "licence": "PD", "ocr": True},
        "legi": {"local": ["legi"], "text_field": "text", "licence": "etalab-2.0"},
        "hplt": {"local": ["hplt"], "text_field": "text", "licence": "CC0-1.0"},
    }}
    (root / "registry.json").write_text(json.dumps(registry), encoding="utf-8")
    return {"root": root, "registry": str(root / "registry.json"), "n_planted": len(planted_near) + len(planted_exact)}


def shard_records(folder):
    return [r for path in sorted(folder.glob("*.jsonl.gz")) for r in read_jsonl(str(path))]


def test_download_after_a_crash_resumes_at_the_exact_document(hub, tmp_path, monkeypatch):
    args = [f"--registry={hub['registry']}", "--shard_bytes=20K"]
    download.main(args + [f"--out_dir={tmp_path / 'straight'}"])
    original, calls = download.JsonlShardWriter.write, itertools.count()

    def crash_mid_shard(self, record):
        if next(calls) == 57:
            raise KeyboardInterrupt("killed")
        original(self, record)

    monkeypatch.setattr(download.JsonlShardWriter, "write", crash_mid_shard)
    with pytest.raises(KeyboardInterrupt):
        download.main(args + [f"--out_dir={tmp_path / 'crashed'}"])
    monkeypatch.setattr(download.JsonlShardWriter, "write", original)
    download.main(args + [f"--out_dir={tmp_path / 'crashed'}"])
    for source in ("wikipedia", "pleias_books", "legi", "hplt"):
        straight = shard_records(tmp_path / "straight" / source)
        assert straight and shard_records(tmp_path / "crashed" / source) == straight
    assert len(shard_records(tmp_path / "straight" / "wikipedia")) == 80


def test_a_hub_stream_resumes_from_its_state_dict(hub, tmp_path):
    # the same code path as the Hub: datasets streaming, here from local parquet files
    files = sorted(str(p) for p in (hub["root"] / "wikipedia").glob("*.parquet"))
    spec = {"hub": "parquet", "data_files": files, "split": "train", "text_field": "text", "text_only_columns": True}
    download.download_source("wiki", spec, str(tmp_path / "straight"), shard_bytes=15_000)
    state = download.download_source("wiki", spec, str(tmp_path / "resumed"), shard_bytes=15_000, stop_after_shards=2)
    assert not state["done"] and state["shards"] == 2
    download.download_source("wiki", spec, str(tmp_path / "resumed"), shard_bytes=15_000)
    straight = shard_records(tmp_path / "straight" / "wiki")
    assert len(straight) == 80 and shard_records(tmp_path / "resumed" / "wiki") == straight


def test_the_registry_states_what_each_card_states_and_what_is_left_to_confirm():
    with open(download.REGISTRY, encoding="utf-8") as f:
        registry = json.load(f)
    sources = download.load_registry(download.REGISTRY)
    assert set(sources) == set(registry["sources"])
    for name, spec in sources.items():
        assert set(spec["verified"]).isdisjoint(spec["unconfirmed"]), name  # read on the card, or still to confirm
        assert spec.get("hub") or spec.get("local"), name
    assert sources["wikipedia"]["licence"] == "CC-BY-SA-3.0 and GFDL"
    assert all(sources[p]["licence"].startswith("public domain") for p in ("pleias_books", "pleias_newspapers"))
    assert sources["hplt3"]["hub"] == "HPLT/HPLT3.0" and sources["hplt3"]["config"] == "fra_Latn"
    assert {"config", "text_field"} <= set(sources["hplt3"]["unconfirmed"])
    assert sources["cc100"]["hub"] is None and sources["cc100"]["local"] and "No Hub route works" in sources["cc100"]["notes"]
    assert "refs/convert/parquet" not in sources["cc100"].get("data_files", "")
    assert sources["legi"]["data_files"] == "data/legi-latest/**"  # the latest snapshot only, never several mixed
    for name, shipped in registry["files"].items():  # the corpora in data/, for the model card
        assert os.path.exists(os.path.join(os.path.dirname(download.REGISTRY), name)) and shipped["licence"], name


def test_a_pinned_hub_source_reads_only_its_files_at_its_revision(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or [])
    spec = dict(download.load_registry(download.REGISTRY)["legi"], revision="0123abc")
    download.HubSource(spec, {})
    (args, kwargs), = calls
    assert args == ("AgentPublic/legi", None) and kwargs["data_files"] == "data/legi-latest/**"
    assert kwargs["revision"] == "0123abc" and kwargs["columns"] == ["text"] and kwargs["streaming"] is True


def test_bad_input_is_counted_and_the_good_documents_kept(tmp_path):
    good = french_documents(6)
    folder = tmp_path / "bad"
    folder.mkdir()
    with open(folder / "a.txt", "wb") as f:
        f.write(good[0].replace("\n", " ").encode() + b"\n" + b"caf\xe9 cr\xe8me latin-1\n" + b"\n   \n")
        f.write(b"x" * 50_000_000 + b"\n")  # a 50 MB single line
        f.write(good[1].replace("\n", " ").encode() + b"\n")
    with open(folder / "b.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"content": "no text field"}) + "\n{not json\n" + json.dumps({"text": good[2]}) + "\n")
    with gzip.open(folder / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in good[3:5] * 200:
            f.write(json.dumps({"text": text}) + "\n")
    data = (folder / "c.jsonl.gz").read_bytes()
    (folder / "c.jsonl.gz").write_bytes(data[: len(data) // 2])
    pq.write_table(pa.table({"text": good[:4] * 50}), folder / "d.parquet", row_group_size=20)
    data = (folder / "d.parquet").read_bytes()
    (folder / "d.parquet").write_bytes(data[: len(data) // 2])
    pq.write_table(pa.table({"body": good[:2]}), folder / "e.parquet")
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"sources": {"bad": {"local": [str(folder)], "text_field": "text"}}}))
    download.main([f"--registry={registry}", f"--out_dir={tmp_path / 'out'}"])
    state = json.loads((tmp_path / "out" / "bad" / "state.json").read_text())
    assert state["done"]
    assert state["bad"] == {"non_utf8": 1, "empty": 2, "oversized": 1, "missing_field": 3, "bad_json": 1, "truncated_file": 2}
    kept = [r["text"] for r in shard_records(tmp_path / "out" / "bad")]
    assert kept[:3] == [good[0].replace("\n", " "), good[1].replace("\n", " "), good[2]]
    assert len(kept) > 3 + 50  # what was readable before the truncation of c.jsonl.gz


def test_a_source_whose_text_field_is_wrong_stops_early_and_the_others_still_download(hub, tmp_path):
    rows = download.MISSING_FIELD_LIMIT + 500
    pq.write_table(pa.table({"body": ["Un texte que personne ne lira."] * rows}), tmp_path / "wrong.parquet", row_group_size=100)
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"sources": {
        "wrong": {"hub": "parquet", "data_files": [str(tmp_path / "wrong.parquet")], "split": "train", "text_field": "text"},
        "legi": {"local": [str(hub["root"] / "legi")], "text_field": "text"}}}))
    with pytest.raises(SystemExit, match=r"source 'wrong': none of its first 1000 rows has the text field 'text'"):
        download.main([f"--registry={registry}", f"--out_dir={tmp_path / 'raw'}"])
    assert len(shard_records(tmp_path / "raw" / "legi")) == 40


def test_near_dedup_finds_the_planted_near_duplicates(tmp_path):
    docs = french_documents(150)
    rng = random.Random(1)
    planted = {}
    for i in range(12):
        original = rng.randrange(150)
        planted[len(docs)] = original
        docs.append(near_copy(docs[original], rng) if i % 2 else "  " + docs[original].lower() + " !")
    hasher, files = MinHasher(), []
    for part in range(3):  # keys of three shards, spread over four buckets
        path = tmp_path / f"{part}.npy"
        np.save(path, np.stack([hasher.keys(d) for d in docs[part::3]]))
        files.append(str(path))
    order = [i for part in range(3) for i in range(part, len(docs), 3)]
    roots, _ = find_duplicates(files, str(tmp_path / "work"), n_buckets=4)
    position = {doc: g for g, doc in enumerate(order)}
    dropped = {order[g]: order[roots[g]] for g in range(len(order)) if roots[g] != g}
    # of each planted pair exactly one is dropped, the one that comes later, in favour of the other
    expected = {max(pair, key=position.get): min(pair, key=position.get) for pair in planted.items()}
    assert dropped == expected


@pytest.fixture(scope="module")
def pipeline(hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    download.main([f"--registry={hub['registry']}", f"--out_dir={out / 'raw'}", "--shard_bytes=30K"])
    report = clean.main([str(out / "raw"), f"--out_dir={out / 'clean'}", "--workers=1", "--sources=wikipedia,pleias_books,legi,hplt"])
    mix.main([str(out / "clean"), f"--out={out / 'mix.json'}", "--weights=legi=2.5,hplt=0.5", "--val_fraction=0.1"])
    tokenizer = str(out / "tok" / "tokenizer.model")
    train_tokenizer.main([f"--mixture={out / 'mix.json'}", f"--out={tokenizer}", "--vocab_size=1000", "--threads=1"])
    encode.main([f"--mixture={out / 'mix.json'}", f"--tokenizer={tokenizer}", f"--out_dir={out / 'tokens'}",
                 "--shard_tokens=20000", "--workers=2"])
    return {"out": out, "report": report, "tokenizer": tokenizer, "manifest": load_manifest(out / "mix.json")}


def test_clean_drops_the_planted_duplicates_and_reports_every_drop(pipeline, hub):
    report = pipeline["report"]["sources"]
    dropped = sum(report["hplt"]["dropped"].get(rule, (0, 0))[0] for rule in ("exact_dup", "near_dup"))
    assert dropped == hub["n_planted"]
    assert report["wikipedia"]["docs_kept"] == 80 and report["legi"]["docs_kept"] == 40  # good French stays
    assert report["pleias_books"]["docs_kept"] == 40 and report["pleias_books"]["dropped"] == {"ocr_noise": [1, ANY]}
    for source in report.values():
        assert source["docs_in"] == source["docs_kept"] + sum(d for d, _ in source["dropped"].values())
        for rule in source["dropped"]:
            assert source["examples"][rule]
    markdown = (pipeline["out"] / "clean" / "clean_report.md").read_text()
    assert "| hplt | exact_dup | 1 |" in markdown and "pleias_books" in markdown


def test_shards_round_trip_to_the_mixture_documents_with_a_source_index(pipeline):
    tok, folder = Tokenizer(pipeline["tokenizer"]), pipeline["out"] / "tokens"
    for split in ("train", "val"):
        expected = list(documents(pipeline["manifest"], split))
        decoded, sources = [], []
        shards = sorted(folder.glob(f"{split}-*.bin"))
        assert len(shards) >= (3 if split == "train" else 1)
        for shard in shards:
            header, tokens = open_shard(shard, tok.fingerprint)
            tokens = np.asarray(tokens).tolist()
            index = json.loads(shard.with_suffix(".idx.json").read_text())["ranges"]
            assert index[0][0] == 0 and index[-1][1] == header["n_tokens"]
            for start, end, source in index:
                docs = _split_documents(tokens[start:end], tok)
                decoded += [tok.decode(d) for d in docs]
                sources += [source] * len(docs)
        assert decoded == [text for _, text in expected]
        assert sources == [source for source, _ in expected]
    weights = {s: i["weight"] for s, i in pipeline["manifest"]["sources"].items()}
    train = list(documents(pipeline["manifest"], "train"))
    legi_docs = pipeline["manifest"]["sources"]["legi"]["docs"]["train"]
    assert weights["legi"] == 2.5 and 2 * legi_docs < sum(s == "legi" for s, _ in train) < 3 * legi_docs


def _split_documents(tokens, tok):
    docs, current = [], None
    for t in tokens:
        if t == tok.bos_id:
            current = []
        elif t == tok.eos_id:
            docs.append(current)
        else:
            current.append(t)
    return docs


def test_the_pipeline_tokenizer_has_single_id_special_tokens_and_a_fertility_report(pipeline):
    tok = Tokenizer(pipeline["tokenizer"])
    assert tok.vocab_size == 1000
    for i, piece in enumerate(["<unk>", "<s>", "</s>", "<pad>", *CHAT_TOKENS]):
        assert tok.sp.id_to_piece(i) == piece and tok.sp.piece_to_id(piece) == i
    assert tok.encode("<|im_start|>") != [tok.im_start_id]  # typed text cannot forge a control token
    fertility = json.loads((pipeline["out"] / "tok" / "tokenizer.fertility.json").read_text())
    assert set(fertility) == {"wikipedia", "pleias_books", "legi", "hplt"}
    for r in fertility.values():
        assert r["docs"] > 0 and 1 < r["tokens_per_word"] < 4 and r["tokens_per_byte"] == pytest.approx(r["tokens"] / r["bytes"], abs=1e-3)
    assert (pipeline["out"] / "tok" / "tokenizer.fertility.md").exists()


def test_encode_after_a_crash_resumes_per_shard_and_matches_an_uninterrupted_run(pipeline, corpus_slice, tmp_path, monkeypatch):
    args = [corpus_slice, f"--tokenizer={pipeline['tokenizer']}", "--shard_tokens=30000", "--val_fraction=0.05"]
    encode.main(args + [f"--out_dir={tmp_path / 'straight'}", "--workers=2"])
    original, calls = ShardWriter.close, itertools.count()

    def crash_on_third_shard(self):
        if next(calls) == 2:
            raise KeyboardInterrupt("killed")
        original(self)

    monkeypatch.setattr(ShardWriter, "close", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        encode.main(args + [f"--out_dir={tmp_path / 'crashed'}", "--workers=1"])
    assert len(list((tmp_path / "crashed").glob("train-*.bin"))) == 2
    monkeypatch.setattr(ShardWriter, "close", original)
    encode.main(args + [f"--out_dir={tmp_path / 'crashed'}", "--workers=1"])
    names = sorted(p.name for p in (tmp_path / "straight").glob("*-*.*"))
    assert len([n for n in names if n.startswith("train") and n.endswith(".bin")]) >= 4
    assert names == sorted(p.name for p in (tmp_path / "crashed").glob("*-*.*") if not p.name.endswith(".tmp"))
    for name in names:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "crashed" / name).read_bytes(), name


def test_clean_after_a_crash_continues_and_matches_an_uninterrupted_run(pipeline, tmp_path, monkeypatch):
    raw, args = str(pipeline["out"] / "raw"), ["--workers=1", "--sources=wikipedia,legi"]
    original, calls = clean.write_kept, itertools.count()

    def crash_on_second_shard(*a):
        if next(calls) == 1:
            raise KeyboardInterrupt("killed")
        return original(*a)

    monkeypatch.setattr(clean, "write_kept", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        clean.main([raw, f"--out_dir={tmp_path / 'crashed'}"] + args)
    monkeypatch.setattr(clean, "filter_shard", None)  # pass 1 is complete: a re-run must not redo it
    monkeypatch.setattr(clean, "write_kept", original)
    resumed = clean.main([raw, f"--out_dir={tmp_path / 'crashed'}"] + args)
    monkeypatch.undo()
    straight = clean.main([raw, f"--out_dir={tmp_path / 'straight'}"] + args)
    assert resumed["sources"] == straight["sources"]
    for source in ("wikipedia", "legi"):
        assert shard_records(tmp_path / "crashed" / source) == shard_records(tmp_path / "straight" / source)


def test_minhash_agreement_estimates_the_exact_jaccard_similarity():
    from rodin.data.dedup import normalise

    hasher, rng = MinHasher(), random.Random(2)
    for doc in french_documents(8, skip=5000):
        copy = " ".join(w if rng.random() > 0.04 else "toutefois" for w in doc.split(" "))
        a, b = normalise(doc).split(), normalise(copy).split()
        sa, sb = ({" ".join(w[i : i + 5]) for i in range(len(w) - 4)} for w in (a, b))
        jaccard = len(sa & sb) / len(sa | sb)
        agreement = (hasher.signature(normalise(doc)) == hasher.signature(normalise(copy))).mean()
        assert abs(agreement - jaccard) < 0.15, (agreement, jaccard)


@pytest.mark.parametrize("stage", [download, clean, mix, train_tokenizer, encode])
def test_every_stage_is_a_command_with_help(stage, capsys):
    with pytest.raises(SystemExit) as exit:
        stage.main(["--help"])
    assert exit.value.code == 0 and "usage:" in capsys.readouterr().out


def test_a_token_budget_becomes_a_weight_through_the_fertility_report(pipeline, tmp_path):
    fertility = pipeline["out"] / "tok" / "tokenizer.fertility.json"
    manifest = mix.main([str(pipeline["out"] / "clean"), f"--out={tmp_path / 'mix.json'}", "--val_fraction=0.1",
                         "--token_budget=legi=20000", f"--fertility={fertility}"])
    legi = manifest["sources"]["legi"]
    bytes_per_token = json.loads(fertility.read_text())["legi"]["bytes_per_token"]
    assert legi["weight"] == pytest.approx(20000 * bytes_per_token / legi["bytes"]["train"], rel=1e-3)


def test_encode_from_the_start_removes_stale_shards_the_trainer_would_read(pipeline, corpus_slice, tmp_path):
    for stale in ("train.bin", "train-00007.bin", "train-00007.idx.json", "val.bin"):
        (tmp_path / stale).write_bytes(b"old")
    encode.main([corpus_slice, f"--tokenizer={pipeline['tokenizer']}", f"--out_dir={tmp_path}", "--workers=1"])
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["train-00000.bin", "val-00000.bin"]


STAGES = ("data/download.py", "data/clean.py", "data/mix.py", "data/train_tokenizer.py", "data/encode.py")


def make(*args, tmp_path):
    """`make ARGS` in the repository, with a stand-in for the set-up stamp (the tests' Python is set up),
    on one process and without the variables of a `make test` that runs this test."""
    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    (venv / ".installed").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-C", ROOT, "NPROC=1", "ARGS=", *args, f"VENV={venv}", f"PY={sys.executable}"],
                          capture_output=True, text=True, timeout=300, env=env)


def test_make_pretrain_3090_builds_the_french_corpus_in_five_stages_then_trains_and_skips_them_once_done(hub, tmp_path):
    # the Hub is the local mini hub; the budget is 30 KB a source, the vocabulary the test model's
    corpus = [f"FR_DATA={tmp_path / 'fr'}", f"FR_WORK={tmp_path / 'work'}", f"REGISTRY={hub['registry']}",
              "FR_SOURCES=wikipedia,legi,hplt", "VOCAB=512", "MIX_ARGS=--val_fraction=0.1"]
    # the 3090 preset (Muon, recomputed blocks, chunked loss, accumulation to the global batch) with the test model's shape
    shrink = (f"ARGS=--model=test --seq_len=32 --micro_batch_size=4 --max_steps=2 --warmup_steps=1 --eval_batches=1 "
              f"--sample_tokens=8 --device=cpu --wandb=disabled --tqdm=false --out_dir={tmp_path / 'runs'}")
    done = make("pretrain", "PRESET=3090", *corpus, "MAX_BYTES=30K", shrink, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(stage in done.stdout for stage in STAGES)
    for source in ("wikipedia", "hplt"):  # stopped by the byte budget, not by the end of the source
        state = json.loads((tmp_path / "work" / "raw" / source / "state.json").read_text())
        assert not state["done"] and 30_000 <= state["bytes"] < 40_000, state
    meta = checkpoint.read_meta(checkpoint.latest(tmp_path / "runs" / "rodin-1b"))
    assert meta["step"] == 2 and meta["config"]["data_dir"] == str(tmp_path / "fr")
    assert meta["config"]["optimizer"] == "muon" and meta["config"]["activation_checkpointing"] == "full"
    assert meta["config"]["global_batch"] == 512  # RODIN-1B's batch, accumulated on the small card
    assert meta["tokenizer"] == Tokenizer(str(tmp_path / "fr" / "tokenizer.model")).fingerprint

    again = make("pretrain", "PRESET=3090", *corpus, "MAX_BYTES=30K", shrink, tmp_path=tmp_path)
    assert again.returncode == 0 and not any(stage in again.stdout for stage in STAGES)  # every stage is done
    # a larger budget: the download continues, and every stage after it is redone
    more = make("-n", "data", "PRESET=b200", *corpus, "MAX_BYTES=60K", tmp_path=tmp_path)
    assert all(stage in more.stdout for stage in STAGES) and f"rm -rf {tmp_path / 'work' / 'clean'}" in more.stdout


def test_make_builds_the_french_corpus_for_the_presets_that_train_on_it_and_the_demo_data_as_before(tmp_path):
    for name, cfg in PRESETS.items():
        dry = make("-n", "pretrain", f"PRESET={name}", f"DEMO={tmp_path / 'demo'}", f"FR_WORK={tmp_path / 'work'}",
                   tmp_path=tmp_path)
        commands = [line.split(" ", 1)[1] for line in dry.stdout.splitlines() if line.startswith(sys.executable)]
        if cfg.data_dir == "data/fr":
            assert [c.split()[0] for c in commands] == [*STAGES, "train.py"], name
            assert commands[-1].split() == ["train.py", f"--preset={name}", "--data_dir=data/fr", f"--tokenizer={cfg.tokenizer}"]
        elif cfg.data_dir == "data/demo":  # what make pretrain has always run
            assert commands == [f"data/train_tokenizer.py data/littre-citations.txt.gz --model=demo --out={tmp_path}/demo/tokenizer.model",
                                f"data/encode.py data/littre-citations.txt.gz --tokenizer={tmp_path}/demo/tokenizer.model --out_dir={tmp_path}/demo",
                                f"train.py --preset={name}  "], name
