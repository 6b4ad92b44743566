"""rodin/eval/needle.py: the haystack is built exactly (length in tokens, needle at its depth), the
answer's log-likelihood is transformers', and `rodin.eval.harness --needle` writes its table and heat map."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_run

from rodin.data.tokenizer import Tokenizer
from rodin.eval import needle
from rodin.train import checkpoint


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return Tokenizer(demo_data["tokenizer"])


@pytest.mark.parametrize("chat", [False, True], ids=["base", "chat"])
def test_the_needle_sits_at_the_stated_depth_in_a_prompt_of_exactly_the_stated_length(tokenizer, chat):
    prefix, suffix = needle.frame(tokenizer, chat)
    needle_ids = tokenizer.encode(needle.NEEDLE.format(answer=4817))
    filler = needle.haystack_stream(tokenizer, needle.held_out_documents(), 3000)
    assert len(filler) == 3000
    for length in (len(prefix) + len(needle_ids) + len(suffix), 301, 1000, 2999):
        n_filler = length - len(prefix) - len(needle_ids) - len(suffix)
        for depth in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            ids, at = needle.place(prefix, filler, needle_ids, suffix, length, depth)
            assert len(ids) == length
            assert at == len(prefix) + round(depth * n_filler)
            assert ids[:len(prefix)] == prefix and ids[len(ids) - len(suffix):] == suffix
            assert ids[at : at + len(needle_ids)] == needle_ids
            # around the needle, the haystack is the held-out stream, uncut and in order
            assert ids[len(prefix) : at] + ids[at + len(needle_ids) : len(ids) - len(suffix)] == filler[:n_filler]
        assert needle.place(prefix, filler, needle_ids, suffix, length, 0.0)[1] == len(prefix)
        assert needle.place(prefix, filler, needle_ids, suffix, length, 1.0)[1] == length - len(suffix) - len(needle_ids)
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        needle.place(prefix, filler, needle_ids, suffix, len(prefix) + len(suffix), 0.5)


def test_the_chat_frame_is_a_chatml_user_turn_with_the_generation_prompt(tokenizer):
    prefix, suffix = needle.frame(tokenizer, chat=True)
    assert prefix[:2] == [tokenizer.bos_id, tokenizer.im_start_id] and tokenizer.decode(prefix[2:]) == "user\n"
    assert suffix.count(tokenizer.im_end_id) == 1 and suffix[-1 - len(tokenizer.encode("assistant\n"))] == tokenizer.im_start_id
    assert tokenizer.decode(suffix[-len(tokenizer.encode("assistant\n")):]) == "assistant\n"


def test_the_haystack_is_the_held_out_split_of_the_shipped_corpus():
    from data import encode
    from rodin.eval.tasks.littre_cloze import CORPUS

    held_out = [doc for _, doc in encode.file_documents([CORPUS], "val", 0.02)]
    assert needle.held_out_documents() == held_out and len(held_out) > 1000


def test_candidate_log_likelihoods_read_from_the_kv_cache_are_those_of_transformers(demo_data, tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    from rodin.ship.hf import write_hf

    _, model = make_run(tmp_path, demo_data["tokenizer"], max_seq_len=256)
    write_hf(str(tmp_path / "hf"), model, tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()
    prefix, suffix = needle.frame(tokenizer, chat=False)
    filler = needle.haystack_stream(tokenizer, needle.held_out_documents(), 400)
    prompt, _ = needle.place(prefix, filler, tokenizer.encode(needle.NEEDLE.format(answer=1234)), suffix, 240, 0.5)
    candidates = [tokenizer.encode(needle.ANSWER.format(answer=n)) for n in (1234, 5678, 9012, 3456)]
    ours = needle.candidate_logprobs(model, prompt, candidates)
    theirs = []
    with torch.no_grad():
        for ids in candidates:
            logprobs = F.log_softmax(hf(torch.tensor([prompt + ids])).logits[0].float(), dim=-1)
            theirs.append(float(sum(logprobs[len(prompt) - 1 + j, t] for j, t in enumerate(ids))))
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert all(layer.attention.cache is None for layer in model.layers)  # the cache is freed


@pytest.mark.parametrize("sft", [False, True], ids=["base", "sft"])
def test_eval_needle_writes_the_grid_table_and_heat_map(demo_data, tmp_path, sft):
    from rodin.eval.harness import main

    meta = {"init_from": "runs/base/checkpoints/step-0000003"} if sft else {}
    run_dir, _ = make_run(tmp_path, demo_data["tokenizer"], max_seq_len=256, meta=meta)
    assert checkpoint.is_sft(checkpoint.read_meta(checkpoint.latest(run_dir))) == sft
    assert main([run_dir, "--needle", "--lengths=150,230", "--depths=0,0.5,1", "--trials=2"]) == 0
    base = os.path.join(run_dir, "eval", "needle-step-0000003")
    with open(base + ".json") as f:
        result = json.load(f)
    assert result["mode"] == ("chat" if sft else "log-likelihood") and result["lengths"] == [150, 230]
    assert [(c["length"], c["depth"]) for c in result["cells"]] == [(n, d) for n in (150, 230) for d in (0.0, 0.5, 1.0)]
    for cell in result["cells"]:
        assert cell["trials"] == 2 and cell["retrieved"] == cell["hits"] / 2
        assert len(cell["replies"] if sft else cell["answer_logprob"]) == 2
    table = open(base + ".md").read()
    assert "| depth \\ length | 150 | 230 |" in table and "| 50% |" in table
    assert open(base + ".png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="exceed the model's context of 256"):
        main([run_dir, "--needle", "--lengths=256", "--trials=1"])
