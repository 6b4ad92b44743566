"""export.py: Hugging Face and GGUF exports, proven by transformers and llama.cpp themselves.

Tiny models (dim 64, 2 layers, the 512-piece tokenizer of the demo_data fixture), tied and untied,
GQA and not; weights drawn wide (std 0.1) so the logits have clear argmaxes, as a trained model's.
"""

import json
import os
import re
import sys

import pytest
import torch
from conftest import make_run

import export
from rodin.config import MODELS
from rodin.data import chatml
from rodin.data.tokenizer import Tokenizer
from rodin.ship import verify
from rodin.ship.gguf_export import ffn_warning, pad_ffn, permute_rotary
from rodin.ship.hf import hf_config, write_hf
from rodin.train.hf_llama import load_hf_model
from rodin.train import checkpoint
from rodin.train.optim import make_optimizer

SHAPES = [pytest.param(True, 4, id="tied-mha"), pytest.param(False, 2, id="untied-gqa")]


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return Tokenizer(demo_data["tokenizer"])


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory):
    """A run of train.py (80 steps, untied, GQA): its peaked logits are what quantization must keep."""
    import train

    out = tmp_path_factory.mktemp("trained")
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={out}",
            "--name=trained", "--max_steps=80", "--eval_every=80", "--ckpt_every=80", "--model.tie_embeddings=false"]
    assert train.main(argv) == 0
    return str(out / "trained")


# ---- Hugging Face ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tied,kv_heads", SHAPES)
def test_hf_export_loads_as_llama_in_transformers_with_our_logits(demo_data, tmp_path, tied, kv_heads):
    transformers = pytest.importorskip("transformers")
    run_dir, model = make_run(tmp_path, demo_data["tokenizer"], tied, kv_heads)
    out = str(tmp_path / "hf")
    assert export.main([run_dir, "--format=hf", "--dtype=f32", f"--out={out}", "--no-verify"]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings == tied
    assert hf.config.num_key_value_heads == kv_heads
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[0], atol=1e-4, rtol=0)
    card = open(os.path.join(out, "README.md")).read()
    assert "LlamaForCausalLM" in card and "license: apache-2.0" in card and f"| layers | {model.cfg.n_layers} |" in card


def test_hf_tokenizer_gives_our_ids_and_chat_template(demo_data, tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    _, model = make_run(tmp_path, demo_data["tokenizer"])
    write_hf(str(tmp_path / "hf"), model, tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in verify.FRENCH_TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf_tok(text)["input_ids"] == [tokenizer.bos_id] + ids  # add_bos_token, as pretraining
        assert hf_tok.decode(ids) == text
    for conv in verify.CONVERSATIONS:
        for prompt in (False, True):
            assert hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt) == chatml.render(conv, prompt)
            ids = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=prompt)["input_ids"]
            assert ids == chatml.encode(tokenizer, conv, prompt)[0]
    # typed by a user, chat tokens stay text for our tokenizer; HF does the same when asked not to parse them
    assert hf_tok("<|im_start|>", add_special_tokens=False, split_special_tokens=True)["input_ids"] == tokenizer.encode("<|im_start|>")
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<s>", "</s>", "<pad>")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_export_verification_passes_for_transformers(demo_data, tmp_path, tokenizer, dtype, capsys):
    pytest.importorskip("transformers")
    run_dir, _ = make_run(tmp_path, demo_data["tokenizer"], tied=False, kv_heads=2)
    assert export.main([run_dir, "--format=hf", f"--dtype={dtype}", f"--out={tmp_path / 'hf'}"]) == 0
    out = capsys.readouterr().out
    assert f"transformers ({dtype}): token ids identical" in out and "argmax 100.00%" in out, out


def test_weights_are_sharded_above_the_shard_size_and_load_back_exactly(demo_data, tmp_path, tokenizer):
    _, model = make_run(tmp_path, demo_data["tokenizer"], tied=False, kv_heads=2)
    out = str(tmp_path / "hf")
    write_hf(out, model, tokenizer, max_shard_bytes=100_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1 and all(os.path.exists(os.path.join(out, s)) for s in shards)
    back = load_hf_model(out)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    write_hf(out, model, tokenizer)  # exporting again unsharded leaves no stale shard behind
    assert [f for f in os.listdir(out) if f.startswith("model")] == ["model.safetensors"]


@pytest.mark.parametrize("tied,kv_heads", SHAPES)
def test_a_transformers_llama_loads_into_rodin_with_the_same_logits(tmp_path, tied, kv_heads):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                      rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(str(tmp_path / "downloaded"))
    ours = load_hf_model(str(tmp_path / "downloaded")).eval()
    assert ours.cfg.tie_embeddings == tied and ours.cfg.n_kv_heads == kv_heads and ours.cfg.rope_theta == 500000.0
    tokens = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], hf(tokens).logits, atol=1e-4, rtol=0)


def test_hf_directories_rodin_cannot_load_are_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="incomplete Llama config"):
        load_hf_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(MODELS["test"])))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_model(str(tmp_path))
    # a Llama 3.1 RoPE scaling would silently change every position: refused, not ignored
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config(MODELS["test"]), rope_scaling={"rope_type": "llama3", "factor": 8.0})))
    with pytest.raises(ValueError, match="RoPE scaling 'llama3'"):
        load_hf_model(str(tmp_path))


# ---- GGUF and llama.cpp ---------------------------------------------------------------------------

def gguf_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("tied,kv_heads", SHAPES)
def test_gguf_holds_the_sentencepiece_vocabulary_one_to_one(demo_data, tmp_path, tokenizer, tied, kv_heads):
    run_dir, model = make_run(tmp_path, demo_data["tokenizer"], tied, kv_heads)
    out = tmp_path / "gguf"
    assert export.main([run_dir, "--format=gguf", "--dtype=f16", f"--out={out}", "--no-verify"]) == 0
    fields, tensors = gguf_fields(str(out / "run-f16.gguf"))
    sp = tokenizer.sp
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.sp.unk_id()] == 2  # UNKNOWN
    assert {types[i] for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.im_start_id, tokenizer.im_end_id)} == {3}
    assert all(types[i] == 6 for i in range(sp.get_piece_size()) if re.fullmatch(r"<0x[0-9A-F]{2}>", sp.id_to_piece(i)))
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.chat_template"] == chatml.CHAT_TEMPLATE
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["llama.attention.head_count_kv"] == kv_heads
    assert ("output.weight" in tensors) == (not tied)
    assert tensors["blk.0.attn_q.weight"] == "F16" and tensors["blk.0.attn_norm.weight"] == "F32"


def test_rotary_permutation_turns_rotate_half_into_interleaved_pairs():
    n_heads, head_dim = 2, 8
    rows = torch.arange(n_heads * head_dim).float()[:, None]
    permuted = permute_rotary(rows, n_heads).flatten().tolist()
    # head 0 pairs (0, 4), (1, 5), ...: llama.cpp rotates adjacent rows together
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def render_go_template(template, messages):
    """Ollama's Go template, rendered by substitution: our template uses only range, .Role, .Content."""
    body, tail = re.fullmatch(r"\{\{- range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, re.S).groups()
    return "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages) + tail


def test_modelfile_renders_the_prompt_of_our_chat_template(demo_data, tmp_path):
    run_dir, _ = make_run(tmp_path, demo_data["tokenizer"])
    out = tmp_path / "gguf"
    assert export.main([run_dir, "--format=gguf", "--dtype=q8_0", f"--out={out}", "--no-verify"]) == 0
    text = (out / "Modelfile").read_text()
    assert "FROM ./run-q8_0.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 128" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    for conv in verify.CONVERSATIONS:
        prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
        # llama.cpp adds <s> itself (add_bos_token), Ollama does not repeat it
        assert "<s>" + render_go_template(template, prompt) == chatml.render(prompt, add_generation_prompt=True)


def test_padding_the_ffn_changes_no_logit(demo_data, tmp_path):
    _, model = make_run(tmp_path, demo_data["tokenizer"], ffn_dim=136)
    assert ffn_warning(model.cfg) and "--pad_ffn" in ffn_warning(model.cfg)
    padded = pad_ffn(model)
    assert padded.cfg.ffn_dim == 256 and ffn_warning(padded.cfg) is None
    tokens = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(padded(tokens)[0], model(tokens)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied,kv_heads", SHAPES)
def test_llama_cpp_runs_the_f32_gguf_with_our_tokens_logits_and_greedy_text(demo_data, tmp_path, tokenizer, tied, kv_heads):
    pytest.importorskip("llama_cpp")
    run_dir, model = make_run(tmp_path, demo_data["tokenizer"], tied, kv_heads)
    out = tmp_path / "gguf"
    assert export.main([run_dir, "--format=gguf", "--dtype=f32", f"--out={out}", "--no-verify"]) == 0
    report = verify.check_llama_cpp(str(out / "run-f32.gguf"), model, tokenizer, "f32", threads=1)
    assert report["token_mismatches"] == [] and report["token_checks"] == len(verify.FRENCH_TEXTS) + len(verify.CONVERSATIONS)
    assert report["max_logit_diff"] < 1e-3, report
    assert report["argmax_agreement"] == 1.0 and report["greedy_same"] == report["greedy_total"], report


def test_llama_cpp_q8_0_of_a_trained_run_agrees_on_99_percent_of_argmaxes(trained_run, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    assert export.main([trained_run, "--format=gguf", "--dtype=q8_0", f"--out={tmp_path / 'gguf'}", "--threads=1"]) == 0
    printed = capsys.readouterr().out
    agreement = float(re.search(r"argmax ([\d.]+)%", printed).group(1))
    assert "llama.cpp (q8_0): token ids identical" in printed and agreement >= 99.0, printed
    assert os.path.exists(tmp_path / "gguf" / "trained-q8_0.gguf")


def test_k_quants_go_through_llama_cpp_and_warn_about_the_ffn(demo_data, tmp_path, tokenizer, capsys):
    pytest.importorskip("llama_cpp")
    run_dir, model = make_run(tmp_path, demo_data["tokenizer"], dim=256, kv_heads=4, ffn_dim=320)
    out = tmp_path / "gguf"
    assert export.main([run_dir, "--format=gguf", "--dtype=q6_k", f"--out={out}", "--threads=1", "--no-verify"]) == 0
    assert "ffn_dim=320 is not a multiple of 256" in capsys.readouterr().out
    _, tensors = gguf_fields(str(out / "run-q6_k.gguf"))
    assert tensors["blk.0.attn_q.weight"] == "Q6_K" and tensors["blk.0.ffn_down.weight"] != "Q6_K"
    assert export.main([run_dir, "--format=gguf", "--dtype=q6_k", f"--out={out}", "--pad_ffn", "--threads=1", "--no-verify"]) == 0
    _, tensors = gguf_fields(str(out / "run-q6_k.gguf"))
    assert tensors["blk.0.ffn_down.weight"] == "Q6_K"
    # the padded, quantized file still speaks our tokenizer (random weights: logits are not compared)
    llm = verify.load_llama_cpp(str(out / "run-q6_k.gguf"), n_ctx=128, threads=1)
    assert verify.llama_cpp_token_mismatches(llm, tokenizer) == ([], len(verify.FRENCH_TEXTS) + len(verify.CONVERSATIONS))
    llm.close()


def test_a_model_vocabulary_wider_than_the_tokenizer_is_padded_with_unused_pieces(demo_data, tmp_path, tokenizer):
    pytest.importorskip("llama_cpp")
    run_dir, model = make_run(tmp_path, demo_data["tokenizer"], vocab_size=544)
    out = tmp_path / "gguf"
    assert export.main([run_dir, "--format=gguf", "--dtype=f32", f"--out={out}", "--threads=1"]) == 0
    fields, _ = gguf_fields(str(out / "run-f32.gguf"))
    assert len(fields["tokenizer.ggml.tokens"]) == 544 and fields["tokenizer.ggml.token_type"][512:] == [5] * 32


def test_k_quants_without_llama_cpp_say_what_to_install(demo_data, tmp_path, monkeypatch):
    run_dir, _ = make_run(tmp_path, demo_data["tokenizer"])
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(ValueError, match="pip install llama-cpp-python"):
        export.main([run_dir, "--format=gguf", "--dtype=q4_k_m", f"--out={tmp_path / 'g'}"])
    assert not any(name.endswith(".gguf") for name in os.listdir(tmp_path / "g"))


# ---- refusals -------------------------------------------------------------------------------------

def test_a_checkpoint_of_another_vocabulary_is_refused_in_one_line(demo_data, tmp_path, corpus_slice):
    from rodin.data.tokenizer import train_tokenizer

    run_dir, _ = make_run(tmp_path, demo_data["tokenizer"])
    other = str(tmp_path / "other.model")
    with open(corpus_slice, encoding="utf-8") as f:
        train_tokenizer(f.read().splitlines()[:2000], other, vocab_size=400, num_threads=1)
    with pytest.raises(ValueError, match="not the vocabulary") as e:
        export.main([run_dir, "--format=gguf", f"--tokenizer={other}", f"--out={tmp_path / 'g'}"])
    assert "\n" not in str(e.value) and other in str(e.value) and "--tokenizer" in str(e.value)
    assert not os.path.exists(tmp_path / "g")


def test_a_corrupt_checkpoint_is_refused_in_one_line(demo_data, tmp_path):
    run_dir, _ = make_run(tmp_path, demo_data["tokenizer"])
    weights = os.path.join(checkpoint.latest(run_dir), "model.safetensors")
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 16)  # same size, so the manifest still matches: the damage is inside
    with pytest.raises(ValueError, match="unreadable weights") as e:
        export.main([run_dir, "--format=hf", f"--out={tmp_path / 'hf'}"])
    assert "\n" not in str(e.value) and weights in str(e.value)
    with open(weights, "r+b") as f:
        f.truncate(100)  # wrong size: the checkpoint is not complete any more
    with pytest.raises(ValueError, match="no complete checkpoint"), pytest.warns(UserWarning, match="skipping checkpoint"):
        export.main([run_dir, "--format=hf", f"--out={tmp_path / 'hf'}"])


def test_non_finite_weights_are_refused(demo_data, tmp_path):
    run_dir, model = make_run(tmp_path, demo_data["tokenizer"])
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = float("nan")
    ckpt = checkpoint.latest(run_dir)
    checkpoint.save(run_dir, 4, model, make_optimizer(model, 1e-3, 0.1, (0.9, 0.95)), checkpoint.read_meta(ckpt), keep=2)
    with pytest.raises(ValueError, match="layers.1.feed_forward.w2.weight holds NaN"):
        export.main([run_dir, "--format=gguf", f"--out={tmp_path / 'g'}"])
