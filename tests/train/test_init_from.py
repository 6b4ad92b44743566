"""--init_from a Hugging Face Llama (rodin.train.init_from, hf_llama): a model made and saved by
transformers itself trains in train.py and sft.py from its exact weights, goes back to transformers
and llama.cpp, and rodin's own export comes back in; what rodin's LLaMA cannot represent is refused
in one line.

The transformers model: the test shape, GQA, untied embeddings, RoPE θ 500,000, wide weights (std
0.1, clear argmaxes), with the demo_data fixture's SentencePiece tokenizer.model beside it, or
(transformers_llama_json) with only a tokenizer.json of Lucie-7B's kind, trained here."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from conftest import littre_slice, make_run, save_transformers_llama, write_jsonl
from safetensors.torch import load_file

import export
import sft
import train
from rodin.config import MODELS, parse_args
from rodin.io import sha256
from rodin.train import checkpoint, hf_llama, init_from

pytest.importorskip("transformers")


def train_args(demo_data, out, *args):
    return ["--preset=test", f"--data_dir={demo_data['dir']}", f"--out_dir={out}", *args]


def hf_tensors_in_rodin_names(path):
    return hf_llama.rodin_tensors(path, hf_llama.read_config(path))


def test_a_bf16_sharded_transformers_llama_starts_training_from_its_exact_weights(demo_data, tmp_path):
    hf_dir = tmp_path / "bf16"
    save_transformers_llama(hf_dir, demo_data["tokenizer"], torch.bfloat16, max_shard_size="100KB")
    assert os.path.exists(hf_dir / "model.safetensors.index.json")
    # lr 0: the one step changes nothing, so the checkpoint holds the weights as loaded
    assert train.main(train_args(demo_data, tmp_path, f"--init_from={hf_dir}", "--name=run", "--max_steps=1",
                                 "--lr=0", "--min_lr=0", "--ckpt_every=1", "--eval_every=1")) == 0
    ckpt = checkpoint.latest(str(tmp_path / "run"))
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    for name, tensor in hf_tensors_in_rodin_names(str(hf_dir)).items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], tensor.float()), name
    meta = checkpoint.read_meta(ckpt)
    assert meta["config"]["model"]["n_kv_heads"] == 2 and not meta["config"]["model"]["tie_embeddings"]
    assert meta["config"]["model"]["rope_theta"] == 500000.0 and meta["config"]["model"]["max_seq_len"] == 128


def test_a_transformers_llama_continued_and_exported_reloads_in_transformers_and_llama_cpp(demo_data, transformers_llama, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    hf_dir, hf = transformers_llama
    ours = hf_llama.load_hf_model(hf_dir).eval()
    tokens = torch.randint(0, MODELS["test"].vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], hf(tokens).logits, atol=1e-4, rtol=0)
    assert train.main(train_args(demo_data, tmp_path, f"--init_from={hf_dir}", "--name=continued", "--max_steps=4",
                                 "--ckpt_every=4", "--eval_every=4")) == 0
    run = str(tmp_path / "continued")
    with open(os.path.join(run, init_from.ORIGIN)) as f:
        origin = json.load(f)
    assert origin["init_from"] == hf_dir and origin["files"]["model.safetensors"] == sha256(os.path.join(hf_dir, "model.safetensors"))
    assert checkpoint.read_meta(checkpoint.latest(run))["origin"] == origin
    continued = checkpoint.load_model(run)[0]
    assert not torch.equal(continued.layers[0].attention.wq.weight, ours.layers[0].attention.wq.weight)  # it trained
    # the export is checked by transformers and llama.cpp themselves: same token ids, logits, argmax
    assert export.main([run, "--format=hf", "--dtype=f32", f"--out={tmp_path / 'out-hf'}"]) == 0
    assert export.main([run, "--format=gguf", "--dtype=f32", f"--out={tmp_path / 'out-gguf'}", "--threads=1"]) == 0
    out = capsys.readouterr().out
    assert "transformers (f32): token ids identical" in out and "llama.cpp (f32): token ids identical" in out, out


def test_rodins_own_export_imported_back_resumes_from_identical_weights(demo_data, tmp_path):
    run, model = make_run(tmp_path, demo_data["tokenizer"], tied=True, kv_heads=2, name="demo")
    exported = str(tmp_path / "demo-hf")
    assert export.main([run, "--format=hf", "--dtype=f32", f"--out={exported}", "--no-verify"]) == 0
    assert train.main(train_args(demo_data, tmp_path, f"--init_from={exported}", "--name=again", "--max_steps=1",
                                 "--lr=0", "--min_lr=0", "--ckpt_every=1", "--eval_every=1")) == 0
    back = checkpoint.load_model(str(tmp_path / "again"))[0]
    assert back.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_hub_id_is_fetched_into_the_hub_cache_small_files_first_and_its_revision_recorded(demo_data, transformers_llama, tmp_path,
                                                                                             monkeypatch):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--org--llama" / "snapshots" / commit
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):  # the Hub, offline: its cache's layout
        calls.append((repo_id, revision, any(p.endswith(".safetensors") for p in allow_patterns)))
        shutil.copytree(transformers_llama[0], snapshot, dirs_exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    data = write_jsonl(tmp_path / "chat.jsonl", littre_slice(40))
    argv = ["--preset=test", "--init_from=hf:org/llama@v1", f"--data={data}", f"--out_dir={tmp_path}", "--name=chat",
            "--seq_len=128", "--max_steps=2", "--ckpt_every=2", "--eval_every=2", "--val_fraction=0.2"]
    assert sft.main(argv) == 0
    assert calls == [("org/llama", "v1", False), ("org/llama", "v1", True)]  # config and tokenizer, then the weights
    meta = checkpoint.read_meta(checkpoint.latest(str(tmp_path / "chat")))
    assert meta["origin"]["repo"] == "org/llama" and meta["origin"]["revision"] == commit
    assert meta["init_from"] == "hf:org/llama@v1" and meta["config"]["model"]["rope_theta"] == 500000.0
    assert sft.main(argv[:6] + ["--max_steps=3", "--ckpt_every=3", "--eval_every=3", "--val_fraction=0.2"]) == 0  # resumes
    assert len(calls) == 2 and checkpoint.read_meta(checkpoint.latest(str(tmp_path / "chat")))["origin"] == meta["origin"]


REFUSED = [
    ({"model_type": "bert"}, r"model_type='bert' is not a Llama"),
    ({"model_type": "qwen2"}, r"model_type='qwen2' is not a Llama .*biases"),
    ({"model_type": "mistral", "sliding_window": 32}, r"sliding_window=32: rodin's LLaMA attends to the whole context"),
    ({"attention_bias": True}, r"attention_bias=true: rodin's LLaMA has no biases"),
    ({"mlp_bias": True}, r"mlp_bias=true"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling: RoPE scaling 'llama3'"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"head_dim": 32}, r"head_dim=32"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=[next(iter(c)) + ("-" + str(c["model_type"]) if "model_type" in c else "")
                                                         for c, _ in REFUSED])
def test_what_rodins_llama_cannot_represent_is_refused_naming_the_field(transformers_llama, tmp_path, change, message):
    with open(os.path.join(transformers_llama[0], "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(ValueError, match=r"^\S*config.json: " + message) as caught:
        hf_llama.read_config(str(tmp_path))
    assert "\n" not in str(caught.value)


def test_bad_starts_from_an_hf_model_are_refused_in_one_line_with_the_fix(demo_data, transformers_llama, tmp_path):
    with pytest.raises(ValueError, match=r"^--init_optimizer=true: .* holds no optimizer state; drop it, or say --init_optimizer=false$"):
        train.main(["--preset=test", f"--init_from={transformers_llama[0]}", f"--data_dir={demo_data['dir']}", f"--out_dir={tmp_path}",
                    "--init_optimizer=true"])
    small = tmp_path / "small"  # a tokenizer of 512 pieces for 300 embedding rows
    shutil.copytree(transformers_llama[0], small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(config, vocab_size=300)))
    with pytest.raises(ValueError, match=r"tokenizer.model: 512 pieces do not fit the model's 300 embedding rows \(config.json's vocab_size\); use the"):
        train.main(train_args(demo_data, tmp_path, f"--init_from={small}"))
    (small / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"small/config.json: incomplete Llama config"):
        hf_llama.read_config(str(small))
    with pytest.raises(ValueError, match=r"^--init_from=hf:llama: a Hub model is named hf:ORG/NAME"):
        hf_llama.parse_hub_id("hf:llama")
    os.remove(small / "tokenizer.model")
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"small: no tokenizer.model or tokenizer.json next to config.json; download"):
        train.main(train_args(demo_data, tmp_path, f"--init_from={small}"))


# ---- a model that ships only a tokenizer.json (Lucie-7B's kind) ------------------------------------

def test_a_transformers_llama_with_a_tokenizer_json_continues_and_exports_to_transformers_and_llama_cpp(transformers_llama_json,
                                                                                                         tmp_path, capsys):
    """Its corpus encoded by data/encode.py --tokenizer=the model's directory (the fixture), its exact
    logits in rodin, a few steps on them, then the export read by transformers and llama.cpp alike."""
    pytest.importorskip("llama_cpp")
    hf_dir, hf, data = transformers_llama_json
    assert not os.path.exists(os.path.join(hf_dir, "tokenizer.model"))
    ours = hf_llama.load_hf_model(hf_dir).eval()
    tokens = torch.randint(0, MODELS["test"].vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], hf(tokens).logits, atol=1e-4, rtol=0)
    assert train.main(["--preset=test", f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_optimizer=false",
                       f"--init_from={hf_dir}", "--name=lucie", "--max_steps=4", "--ckpt_every=4", "--eval_every=4"]) == 0
    run = tmp_path / "lucie"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the run keeps its own copy
        assert (run / name).read_bytes() == open(os.path.join(hf_dir, name), "rb").read()
    continued = checkpoint.load_model(str(run))[0]
    assert not torch.equal(continued.layers[0].attention.wq.weight, ours.layers[0].attention.wq.weight)  # it trained
    assert export.main([str(run), "--format=hf", "--dtype=f32", f"--out={tmp_path / 'out-hf'}"]) == 0
    assert export.main([str(run), "--format=gguf", "--dtype=f32", f"--out={tmp_path / 'out-gguf'}", "--threads=1"]) == 0
    out = capsys.readouterr().out
    assert "transformers (f32): token ids identical" in out and "llama.cpp (f32): token ids identical" in out, out
    assert not os.path.exists(tmp_path / "out-hf" / "tokenizer.model")


def test_a_tokenizer_json_that_does_not_fit_the_embedding_rows_is_refused_naming_it(transformers_llama_json, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(transformers_llama_json[0], small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(config, vocab_size=300)))
    with pytest.raises(ValueError, match=r"^\S*small/tokenizer.json: 512 pieces do not fit the model's 300 embedding rows "
                                         r"\(config.json's vocab_size\); use the tokenizer the model was trained with$"):
        train.main(["--preset=test", f"--data_dir={transformers_llama_json[2]}", f"--out_dir={tmp_path}",
                    "--init_optimizer=false", f"--init_from={small}"])


def test_sft_of_a_model_without_chat_tokens_adds_them_with_mean_rows_and_exports_chat_to_transformers_and_llama_cpp(
        transformers_llama_json, tmp_path, capsys):
    """ChatML's two tokens join the tokenizer.json as ids 512 and 513; the embedding and the untied
    output grow by two rows, each the mean of the 512 rows before (lr 0: the checkpoint holds them as
    initialised); the export's chat turns tokenize alike in transformers and llama.cpp."""
    pytest.importorskip("llama_cpp")
    hf_dir = transformers_llama_json[0]
    data = write_jsonl(tmp_path / "chat.jsonl", littre_slice(40))
    argv = ["--preset=test", f"--init_from={hf_dir}", f"--data={data}", f"--out_dir={tmp_path}", "--name=chat",
            "--seq_len=128", "--val_fraction=0.2", "--lr=0", "--min_lr=0"]
    assert sft.main(argv + ["--max_steps=1", "--ckpt_every=1", "--eval_every=1"]) == 0
    run = str(tmp_path / "chat")
    added = json.loads(open(os.path.join(run, "tokenizer.json"), encoding="utf-8").read())["added_tokens"]
    assert {t["content"]: t["id"] for t in added if t["content"].startswith("<|")} == {"<|im_start|>": 512, "<|im_end|>": 513}
    saved = load_file(os.path.join(checkpoint.latest(run), "model.safetensors"))
    for name, hf_tensor in hf_tensors_in_rodin_names(hf_dir).items():
        if name in ("tok_embeddings.weight", "output.weight"):
            assert saved[name].shape == (514, 64) and torch.equal(saved[name][:512], hf_tensor)
            assert torch.allclose(saved[name][512:], hf_tensor.mean(0).expand(2, -1), atol=1e-6), name
    assert checkpoint.read_meta(checkpoint.latest(run))["config"]["model"]["vocab_size"] == 514
    assert sft.main(argv + ["--max_steps=2", "--ckpt_every=2", "--eval_every=2"]) == 0  # resumes on the grown tokenizer
    assert export.main([run, "--format=hf", "--dtype=f32", f"--out={tmp_path / 'out-hf'}"]) == 0
    assert export.main([run, "--format=gguf", "--dtype=f32", f"--out={tmp_path / 'out-gguf'}", "--threads=1"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|> <|im_end|> added as ids 512 and 513" in out
    # 12 French texts and 2 chat conversations, rendered by each program's own template
    assert "transformers (f32): token ids identical on 14 strings" in out and "llama.cpp (f32): token ids identical on 14" in out, out
    # under LoRA the two new rows train with the adapters, and are grown again under them on export
    lora_argv = argv[:4] + [f"--out_dir={tmp_path}", "--name=lora", "--lora_rank=4", "--seq_len=128", "--val_fraction=0.2",
                            "--max_steps=2", "--ckpt_every=2", "--eval_every=2"]
    assert sft.main(lora_argv) == 0
    merged = checkpoint.load_model(str(tmp_path / "lora"))[0]
    for name, hf_tensor in hf_tensors_in_rodin_names(hf_dir).items():
        if name in ("tok_embeddings.weight", "output.weight"):
            rows = merged.state_dict()[name]
            assert torch.equal(rows[:512], hf_tensor)
            assert not torch.allclose(rows[512:], hf_tensor.mean(0).expand(2, -1), atol=1e-6), name
    with pytest.raises(ValueError, match=r"tokenizer.json: no <\|im_start\|>/<\|im_end\|> tokens, and with --lora_chat_rows=false"):
        sft.main(lora_argv[:5] + ["--name=frozen-rows", "--lora_rank=4", "--lora_chat_rows=false"])


def test_init_optimizer_is_auto_true_or_false_and_reads_the_bool_of_older_configs():
    cfg = parse_args(["--preset=test"])
    assert cfg.init_optimizer == "auto"  # an HF model or new adapters: a fresh optimizer; a rodin run: its state
    assert dataclasses.replace(cfg, init_optimizer=True).init_optimizer == "true"  # config.json before it was tri-state
    with pytest.raises(ValueError, match=r"^--init_optimizer=maybe: choose auto, true or false$"):
        parse_args(["--preset=test", "--init_optimizer=maybe"])
