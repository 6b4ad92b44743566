"""rodin/data/tokenizer.py: a SentencePiece BPE that keeps French text exactly, with chat tokens reserved;
a published model's tokenizer.json read behind the same interface."""

import os

import pytest

from rodin.data.tokenizer import REQUIRED_CHARS, JsonTokenizer, Tokenizer, open_tokenizer, train_tokenizer, with_required_chars

FRENCH = [
    "L'œuvre de Molière, « Le Misanthrope », date de 1666.",
    "Prix\u00a0: 12,50\u202f€ — déjà payé…",
    "deux  espaces,\ttabulation\net retour à la ligne",
    "  commence par des espaces et finit par une émoticône 🙂",
    "ÇA, C'EST DU FRANÇAIS ! Où est l'île ? Noël, maïs, cœur.",
]


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return Tokenizer(demo_data["tokenizer"])


@pytest.mark.parametrize("text", FRENCH)
def test_french_text_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split_and_rare_characters_fall_back_to_bytes(tokenizer):
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("1666 « œ »")]
    assert pieces[:4] == ["1", "6", "6", "6"]
    assert "«" in "".join(pieces) and not any(p.startswith("<0x") for p in pieces)
    assert all(p.startswith("<0x") for p in (tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("🙂")))


def test_required_characters_are_fed_alone_first_and_again_so_a_sample_keeps_them():
    fed = list(with_required_chars((f"phrase {i}" for i in range(25)), every=10))
    singles = list(REQUIRED_CHARS)
    assert fed[:len(singles)] == singles  # one character per sentence: no pair, so no merge
    assert fed.count("€") == 3 and len(fed) == 25 + 3 * len(singles)
    assert [s for s in fed if s.startswith("phrase")] == [f"phrase {i}" for i in range(25)]


def test_required_characters_absent_from_the_text_are_whole_pieces(tmp_path):
    # SentencePiece 0.2.2 aborted on this text (no « œ € in it): "Check failed: freq > 0"
    text = [f"le chat numéro {i} dort près de la fenêtre" for i in range(300)]
    train_tokenizer(text, tmp_path / "t.model", vocab_size=360, num_threads=1)
    tok = Tokenizer(tmp_path / "t.model")
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("« œ € »")]
    assert not any(p.startswith("<0x") for p in pieces)


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (4, 5)


def test_chat_tokens_are_single_ids_that_plain_text_cannot_produce(tokenizer):
    for token, token_id in (("<|im_start|>", tokenizer.im_start_id), ("<|im_end|>", tokenizer.im_end_id)):
        assert tokenizer.sp.piece_to_id(token) == token_id
        assert tokenizer.sp.is_control(token_id)
        typed = tokenizer.encode(token)
        assert len(typed) > 1 and token_id not in typed


def test_documents_are_wrapped_in_bos_and_eos(tokenizer):
    ids = tokenizer.encode_document("Bonjour")
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id


def test_a_file_that_is_not_a_model_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model: not a readable SentencePiece model"):
        Tokenizer(bad)


def test_ids_past_the_vocabulary_of_a_padded_model_decode_to_nothing(tokenizer):
    ids = tokenizer.encode("Bonjour")
    assert tokenizer.decode(ids + [tokenizer.vocab_size, tokenizer.vocab_size + 7]) == "Bonjour"


def test_a_run_copied_elsewhere_without_data_still_chats_exports_evaluates_and_fine_tunes(demo_data, tmp_path, monkeypatch):
    """The run directory keeps its tokenizer: nothing needs the data/ it was trained from, nor its folder."""
    import json
    import os
    import shutil

    from conftest import littre_slice, write_jsonl

    import export
    import sft
    import train
    from rodin.eval import chat
    from rodin.eval.harness import main as evaluate
    from rodin.train import checkpoint

    work = tmp_path / "work"
    shutil.copytree(demo_data["dir"], work / "data")
    monkeypatch.chdir(work)  # relative paths, as `make pretrain` records them
    common = ["--preset=test", "--out_dir=runs", "--max_steps=3", "--eval_every=100"]
    assert train.main(common + ["--data_dir=data", "--tokenizer=data/tokenizer.model", "--name=base", "--model.max_seq_len=128"]) == 0
    conversations = write_jsonl(tmp_path / "chat.jsonl", littre_slice(40))
    assert sft.main(common + ["--init_from=runs/base", f"--data={conversations}", "--name=chat", "--seq_len=128",
                              "--val_fraction=0.2"]) == 0
    assert open("runs/base/tokenizer.model", "rb").read() == open("data/tokenizer.model", "rb").read()
    assert open("runs/chat/tokenizer.model", "rb").read() == open("data/tokenizer.model", "rb").read()

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(work / "runs", elsewhere / "runs")
    shutil.rmtree(work)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    base, chat_run = str(elsewhere / "runs" / "base"), str(elsewhere / "runs" / "chat")
    with open(os.path.join(base, "config.json")) as f:
        assert json.load(f)["tokenizer"] == "data/tokenizer.model"  # recorded, and gone

    assert chat.main([chat_run, "--prompt=Que veut dire « ardu » ?", "--max_new_tokens=4", "--temperature=0"]) == 0
    assert export.main([base, "--format=hf", "--dtype=f32", f"--out={tmp_path / 'hf'}"]) == 0
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert evaluate([chat_run, "--tasks=littre_cloze", "--num_fewshot=0", "--limit=4", "--batch_size=16"]) == 0
    assert sft.main(common + [f"--init_from={base}", f"--data={conversations}", "--name=again", "--seq_len=128",
                              "--val_fraction=0.2", "--max_steps=1"]) == 0
    assert checkpoint.read_meta(checkpoint.latest("runs/again"))["init_from"].startswith(base)

    os.remove(os.path.join(base, "tokenizer.model"))  # a run from before the copy, its data gone: one clear line
    with pytest.raises(ValueError, match=r"tokenizer \(fingerprint \w+\) is neither .*base/tokenizer.model nor data/tokenizer.model"):
        export.main([base, "--format=hf", f"--out={tmp_path / 'hf2'}"])


# ---- a published model's tokenizer.json (JsonTokenizer), Lucie-7B's kind ---------------------------

def test_a_tokenizer_json_gives_the_ids_of_transformers_and_round_trips_french(transformers_llama_json):
    import transformers

    hf_dir = transformers_llama_json[0]
    tok, theirs = open_tokenizer(hf_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert isinstance(tok, JsonTokenizer) and tok.vocab_size == 512 and not tok.has_chat_tokens
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    for text in FRENCH:
        ids = tok.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"] and tok.decode(ids) == text
    document = tok.encode_document("Bonjour")
    assert (document[0], document[-1]) == (tok.bos_id, tok.eos_id) and tok.is_byte(tok.encode("🙂")[-1])


def test_special_tokens_typed_in_a_text_of_a_tokenizer_json_stay_text(lucie_like_tokenizer):
    tok = JsonTokenizer(lucie_like_tokenizer)
    ids = tok.encode("<s> et </s>")
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.decode(ids) == "<s> et </s>"


def test_a_run_keeps_a_tokenizer_json_with_its_config_and_finds_it_again(transformers_llama_json, tmp_path):
    from rodin.data.tokenizer import checkpoint_tokenizer, copy_into_run

    tok = open_tokenizer(transformers_llama_json[0])
    assert copy_into_run(tok, tmp_path) == str(tmp_path / "tokenizer.json")
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    ckpt = tmp_path / "checkpoints" / "step-0000001"
    meta = {"tokenizer": tok.fingerprint, "config": {"tokenizer": "gone/tokenizer.json"}}
    assert checkpoint_tokenizer(ckpt, meta).fingerprint == tok.fingerprint


def test_a_tokenizer_json_rodin_cannot_read_is_refused_naming_the_file_and_the_fix(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    gpt2 = HFTokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1, "a": 2}, merges=[]))
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel()
    gpt2.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"^\S*tokenizer.json: a BPE tokenizer without byte fallback \(GPT-2 byte-level\?\); rodin reads"):
        open_tokenizer(tmp_path)
    HFTokenizer(models.BPE(vocab={"a": 0, "<0x61>": 1}, merges=[], byte_fallback=True)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer.json: no bos_token '<s>' in the vocabulary; name it in tokenizer_config.json"):
        open_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a readable tokenizer.json"):
        open_tokenizer(tmp_path / "tokenizer.json")
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"no tokenizer.model or tokenizer.json in this directory; give the tokenizer's file"):
        open_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["tokenizer.model", "tokenizer.json"])
def test_chat_tokens_added_to_a_tokenizer_take_the_next_two_ids_and_leave_text_as_it_was(kind, corpus_slice,
                                                                                          lucie_like_tokenizer, tmp_path):
    if kind == "tokenizer.model":  # SentencePiece's defaults reserve no chat tokens
        import sentencepiece as spm

        spm.SentencePieceTrainer.train(input=corpus_slice, model_prefix=str(tmp_path / "plain"), vocab_size=300,
                                       model_type="bpe", minloglevel=2)
        plain = Tokenizer(tmp_path / "plain.model")
    else:
        plain = JsonTokenizer(lucie_like_tokenizer)
    chat = plain.with_chat_tokens(tmp_path / "run" / kind)
    assert not plain.has_chat_tokens and (chat.im_start_id, chat.im_end_id) == (plain.vocab_size, plain.vocab_size + 1)
    assert chat.vocab_size == plain.vocab_size + 2 and chat.is_special(chat.im_start_id) and chat.is_special(chat.im_end_id)
    assert chat.piece(chat.im_end_id) == "<|im_end|>" and chat.fingerprint != plain.fingerprint
    for text in FRENCH + ["<|im_start|>user"]:
        assert chat.encode(text) == plain.encode(text)
