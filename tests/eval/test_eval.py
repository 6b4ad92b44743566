"""rodin/eval/harness.py: lm-evaluation-harness on a run's checkpoint, through its transformers export,
offline, on the shipped littre_cloze task; learning curves over checkpoints; no traceback offline."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, make_run

from data import encode
from rodin.data.text import FILES_VAL_FRACTION
from rodin.data.tokenizer import Tokenizer
from rodin.eval import curves
from rodin.eval.tasks import littre_cloze

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def our_loglikelihood(model, tok, context, continuation):
    """log p(continuation | <s> context) from rodin's own model, tokenized as the harness does:
    the whole string, with the context's tokens split off the front."""
    whole, n_context = tok.encode(context + continuation), 1 + len(tok.encode(context))
    ids = torch.tensor([[tok.bos_id] + whole])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    logprobs = F.log_softmax(logits[0].float(), dim=-1)[n_context - 1 :]
    return float(logprobs.gather(1, ids[0, n_context:, None]).sum())


def test_lm_eval_scores_a_checkpoint_as_our_model_does_reproducibly(demo_data, tmp_path):
    from rodin.eval.harness import main, run_lm_eval

    run_dir, model = make_run(tmp_path, demo_data["tokenizer"], step=7, max_seq_len=512)
    assert main([run_dir, "--tasks=littre_cloze", "--num_fewshot=3", "--batch_size=32", "--limit=40"]) == 0
    with open(os.path.join(run_dir, "eval", "step-0000007.json")) as f:
        first = json.load(f)["results"]["littre_cloze"]
    assert 0.0 <= first["acc,none"] <= 1.0 and first["sample_len"] == 40
    assert "littre_cloze" in open(os.path.join(run_dir, "eval", "step-0000007.md")).read()

    # the same checkpoint again, from its export: the same score, and every log-likelihood the
    # harness computed through transformers is the one our model computes
    hf_dir = os.path.join(run_dir, "eval", "hf-step-0000007")
    again = run_lm_eval(hf_dir, ["littre_cloze"], num_fewshot=3, limit=40, batch_size=32, log_samples=True)
    assert again["results"]["littre_cloze"]["acc,none"] == first["acc,none"]
    assert again["results"]["littre_cloze"]["acc_norm,none"] == first["acc_norm,none"]
    tok = Tokenizer(demo_data["tokenizer"])
    samples = again["samples"]["littre_cloze"]
    assert len(samples) == 40
    for sample in samples[:5]:
        theirs = [ll for (ll, _greedy) in sample["filtered_resps"]]
        ours = [our_loglikelihood(model, tok, context, cont) for context, cont in sample["arguments"]]
        assert ours == pytest.approx(theirs, abs=1e-3)


def test_eval_of_a_directory_without_a_model_says_what_it_expects(tmp_path):
    from rodin.eval.harness import resolve

    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        resolve(str(tmp_path))


def test_the_offline_task_is_every_usable_quotation_of_the_corpus_validation_split():
    with open(littre_cloze.ITEMS, encoding="utf-8") as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == littre_cloze.make_items()  # the committed file is what the script builds
    test = [i for i in shipped if i["split"] == "test"]
    assert len(test) >= 500 and sum(i["split"] == "train" for i in shipped) == 4
    # exactly the held-out quotations data/encode.py sets aside, none of the training ones
    held_out = {text for split, text, _ in littre_cloze.quotations() if split == "val"}
    assert {i["context"] for i in test} == held_out
    for item in test:
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
    # each test item is a quotation data/encode.py holds out, cut before its last word
    held_out_docs = [doc for _, doc in encode.file_documents([littre_cloze.CORPUS], "val", FILES_VAL_FRACTION)]
    for item in test:
        answer = item["choices"][item["label"]]
        assert any(doc.startswith(f"{item['context']} {answer}") for doc in held_out_docs), item


def test_learning_curve_grows_with_the_checkpoints_and_is_never_recomputed(demo_data, tmp_path, monkeypatch):
    import rodin.eval.harness

    for step in (2, 4):
        run_dir, _ = make_run(tmp_path, demo_data["tokenizer"], step=step, seed=step, keep=10, meta={"tokens_seen": 100 * step})
    args = [run_dir, "--every_checkpoint", "--tasks=littre_cloze", "--num_fewshot=0", "--limit=12", "--batch_size=32"]
    calls = []
    real = rodin.eval.harness.run_lm_eval
    monkeypatch.setattr(rodin.eval.harness, "run_lm_eval", lambda hf_dir, *a, **k: calls.append(hf_dir) or real(hf_dir, *a, **k))
    assert rodin.eval.harness.main(args) == 0
    curve = os.path.join(run_dir, "eval", "curve.csv")
    first = curves.read_curve(curve)
    assert {(r["step"], r["tokens_seen"]) for r in first} == {(2, 200), (4, 400)}
    assert {r["metric"] for r in first} == {"acc", "acc_norm"} and {r["request"] for r in first} == {"littre_cloze"}
    assert all(r["samples"] == 12 and r["num_fewshot"] == 0 for r in first)
    assert open(os.path.join(run_dir, "eval", "curve-littre_cloze.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the HF copy of an older checkpoint is gone once scored; the newest is kept for a plain eval
    assert not os.path.exists(os.path.join(run_dir, "eval", "hf-step-0000002"))
    assert os.path.exists(os.path.join(run_dir, "eval", "hf-step-0000004", "config.json"))
    assert len(calls) == 2

    assert rodin.eval.harness.main(args) == 0  # nothing new: nothing scored
    assert len(calls) == 2 and curves.read_curve(curve) == first

    make_run(tmp_path, demo_data["tokenizer"], step=6, seed=6, keep=10, meta={"tokens_seen": 600})
    assert rodin.eval.harness.main(args) == 0  # one new checkpoint: one harness run, rows appended
    assert len(calls) == 3 and calls[-1].endswith("hf-step-0000006")
    assert sorted(n for n in os.listdir(os.path.join(run_dir, "eval")) if n.startswith("hf-")) == ["hf-step-0000006"]
    grown = curves.read_curve(curve)
    assert grown[: len(first)] == first and {r["step"] for r in grown[len(first):]} == {6}


def test_make_eval_without_the_hub_says_so_in_one_line(demo_data, tmp_path):
    run_dir, _ = make_run(tmp_path, demo_data["tokenizer"])
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: the Hub is out of reach
    done = subprocess.run([sys.executable, "-m", "rodin", "eval", run_dir, "--tasks=french_bench", "--num_fewshot=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: french_bench needs the Hugging Face Hub")
    assert "--tasks=littre_cloze" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(os.path.join(run_dir, "eval"))  # refused before any export
