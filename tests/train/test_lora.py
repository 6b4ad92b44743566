"""LoRA (rodin.train.lora): adapters start at the base model, train alone, are checkpointed alone
with a reference to their base, resume exactly, and are merged on export into weights that
transformers and llama.cpp run as our merged model; the memory estimate counts them as a 24 GiB card will hold them."""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, littre_slice, write_jsonl
from safetensors.torch import load_file

import export
import sft
from rodin.config import MODELS, SFT_PRESETS, parse_args
from rodin.data.tokenizer import open_tokenizer
from rodin.model import LLaMA
from rodin.train import checkpoint, lora, memory
from rodin.train.loss import make_loss_fn

SUFFIXES = lora.parse_targets("attn,ffn")


def tiny(seed=0):
    torch.manual_seed(seed)
    return LLaMA(dataclasses.replace(MODELS["test"], tie_embeddings=False, init_std=0.1)).eval()


def test_adapters_start_at_the_base_model_and_merge_into_the_same_function():
    base, model = tiny(), lora.apply(tiny(), rank=4, alpha=8, suffixes=SUFFIXES, seed=0)
    tokens = torch.randint(0, MODELS["test"].vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], base(tokens)[0])  # B = 0: the first step is the base model's
    cfg = MODELS["test"]
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = 4 * (2 * (cfg.dim + cfg.dim) + 2 * (cfg.dim + kv)) + 4 * 3 * (cfg.dim + cfg.ffn_dim)  # r (in + out) each
    assert lora.trainable_params(model) == cfg.n_layers * per_layer
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in model.named_parameters() if ".lora." in n]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        adapted = model(tokens)[0]
        merged = lora.merge(model)
        assert not any(".lora." in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(tokens)[0], adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_chat_rows_train_beside_the_adapters_in_both_losses_and_merge_into_their_rows(tied):
    """Rows 5 and 7 (sft.py: ChatML's two ids) get deltas, zero at first; the plain and the chunked
    loss both add their logits (the tied output row is the embedding row), their gradients are the
    same, and merging folds them into those rows alone."""
    torch.manual_seed(0)
    base = LLaMA(dataclasses.replace(MODELS["test"], tie_embeddings=tied, init_std=0.1))
    model = lora.apply(copy.deepcopy(base), rank=4, alpha=8, suffixes=SUFFIXES, seed=0, rows=(5, 7))
    tokens = torch.randint(0, MODELS["test"].vocab_size, (2, 16))
    tokens[0, :4] = torch.tensor([5, 7, 5, 7])
    targets = tokens.roll(-1, dims=1)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], base(tokens)[0])
    rows = [n for n, p in model.named_parameters() if p.requires_grad and ".lora." not in n]
    assert rows == ["tok_embeddings.lora_rows.delta"] + ([] if tied else ["output.lora_rows.delta"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    logits, plain = model(tokens, targets)
    grads = torch.autograd.grad(plain, [p for p in model.parameters() if p.requires_grad])
    _, chunked = model(tokens, targets, loss_fn=make_loss_fn(8, lora.output_rows(model)))
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(grads, torch.autograd.grad(chunked, [p for p in model.parameters() if p.requires_grad]), strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in grads[-len(rows):])  # the rows learn
    with torch.no_grad():
        merged = lora.merge(model)
        torch.testing.assert_close(merged(tokens)[0], logits, atol=1e-5, rtol=0)
    others = [i for i in range(MODELS["test"].vocab_size) if i not in (5, 7)]
    assert torch.equal(merged.tok_embeddings.weight[others], base.tok_embeddings.weight[others])
    assert not torch.equal(merged.tok_embeddings.weight[[5, 7]], base.tok_embeddings.weight[[5, 7]])


def test_a_rank_larger_than_a_matrix_and_unknown_targets_are_refused_in_one_line():
    # wk maps 64 to 2 KV heads x 16 = 32: a rank above 32 is no longer low
    with pytest.raises(ValueError, match=r"^--lora_rank=33 is larger than layers.0.attention.wk \(32 x 64\).*lower --lora_rank$"):
        lora.apply(tiny(), rank=33, alpha=8, suffixes=SUFFIXES, seed=0)
    with pytest.raises(ValueError, match=r"^--lora_targets=attn,mlp: choose among attn, ffn"):
        parse_args(["--preset=test", "--lora_rank=4", "--lora_targets=attn,mlp"], presets=SFT_PRESETS)
    with pytest.raises(ValueError, match=r"^--lora_rank=4 needs a base: add --init_from="):
        parse_args(["--preset=test", "--lora_rank=4"])


def run_sft(hf_dir, tmp_path, data, name, *args):
    argv = ["--preset=test", f"--init_from={hf_dir}", f"--data={data}", f"--out_dir={tmp_path}", f"--name={name}",
            "--seq_len=128", "--lora_rank=4", "--lora_alpha=8", "--val_fraction=0.2", "--eval_every=3", "--ckpt_every=3", *args]
    assert sft.main(argv) == 0
    return str(tmp_path / name)


def test_lora_sft_checkpoints_adapters_alone_resumes_exactly_and_exports_merged_weights(transformers_llama, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    base = str(tmp_path / "base")  # a copy: its config.json is changed at the end
    shutil.copytree(transformers_llama[0], base)
    data = write_jsonl(tmp_path / "chat.jsonl", littre_slice(40))
    straight = run_sft(base, tmp_path, data, "straight", "--max_steps=6")
    ckpt = checkpoint.latest(straight)
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    # the base is referenced, not copied: the adapters and the ChatML rows' deltas alone
    rows = {name for name in saved if ".lora." not in name}
    assert saved and rows == {"tok_embeddings.lora_rows.delta", "output.lora_rows.delta"}  # untied: a delta each
    assert all(saved[name].abs().sum() > 0 for name in rows)
    meta = checkpoint.read_meta(ckpt)
    chat = open_tokenizer(straight)
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": "attn,ffn", "rows": [chat.im_start_id, chat.im_end_id]}
    assert meta["origin"]["files"]["model.safetensors"] and meta["origin"]["init_from"] == base
    # stopped at step 3 and relaunched: the same adapters, optimizer state and losses as straight through
    resumed = run_sft(base, tmp_path, data, "resumed", "--max_steps=6", "--stop_at_step=3")
    run_sft(base, tmp_path, data, "resumed", "--max_steps=6")
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(os.path.join(checkpoint.latest(r), name)) for r in (straight, resumed))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    # the export merges the adapters; transformers and llama.cpp run the merged model as we do
    model = checkpoint.load_model(straight)[0]
    assert not any(".lora." in n for n, _ in model.named_parameters())
    assert export.main([straight, "--format=hf", "--dtype=f32", f"--out={tmp_path / 'hf'}"]) == 0
    assert export.main([straight, "--format=gguf", "--dtype=f32", f"--out={tmp_path / 'gguf'}", "--threads=1"]) == 0
    out = capsys.readouterr().out
    assert "transformers (f32): token ids identical" in out and "llama.cpp (f32): token ids identical" in out, out
    # a base that changed under the adapters is refused
    with open(os.path.join(base, "config.json"), "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match=r"config.json: not the base the adapters of .* were trained on \(sha256"):
        checkpoint.load_model(straight)


def test_lora_with_the_embeddings_trained_whole_checkpoints_them_beside_the_adapters_and_resumes_exactly(
        transformers_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", littre_slice(40))
    straight = run_sft(transformers_llama[0], tmp_path, data, "straight", "--max_steps=4", "--lora_train_embeddings=true")
    resumed = run_sft(transformers_llama[0], tmp_path, data, "resumed", "--max_steps=4", "--lora_train_embeddings=true",
                      "--stop_at_step=3")
    run_sft(transformers_llama[0], tmp_path, data, "resumed", "--max_steps=4", "--lora_train_embeddings=true")
    ckpt = checkpoint.latest(straight)
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    # untied: both matrices whole, the chat rows' deltas redundant then
    assert {name for name in saved if ".lora." not in name} == {"tok_embeddings.weight", "output.weight"}
    assert checkpoint.read_meta(ckpt)["lora"]["embeddings"] is True
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(os.path.join(checkpoint.latest(r), name)) for r in (straight, resumed))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    merged = checkpoint.load_model(straight)[0]
    assert torch.equal(merged.tok_embeddings.weight, saved["tok_embeddings.weight"])
    base = load_file(os.path.join(transformers_llama[0], "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.equal(merged.tok_embeddings.weight, base)  # it trained


def test_the_estimate_counts_the_frozen_base_in_bf16_and_optimizer_moments_of_the_adapters_alone():
    full = parse_args(["--preset=test", "--init_from=runs/x", "--init_optimizer=false"])
    adapted = dataclasses.replace(full, lora_rank=4)
    gib_full, gib_lora = memory.estimate(full), memory.estimate(adapted)
    model = lora.apply(LLaMA(full.model), rank=4, alpha=8, suffixes=SUFFIXES, seed=0)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trained = lora.trainable_params(model)
    mib = 2**20
    assert gib_lora["optimizer"] * 1024 == pytest.approx(trained * 8 / mib, rel=0.05)  # AdamW's two moments
    assert gib_lora["params"] * 1024 == pytest.approx((frozen * 2 + trained * 4) / mib, rel=0.05)
    assert gib_full["optimizer"] > 4 * gib_lora["optimizer"]


def test_lora_under_torchrun_interrupted_and_resumed_gives_the_losses_of_one_process(transformers_llama, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", littre_slice(40))
    # a global batch of 4 rows: 2 ranks x micro-batch 2, or 1 process x 2 x 2; the same held-out rows
    args = ["--max_steps=4", "--micro_batch_size=2", "--ckpt_every=100", "--eval_every=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "sft.py"),
           "--preset=test", f"--init_from={transformers_llama[0]}", f"--data={data}", f"--out_dir={tmp_path}", "--name=fsdp",
           "--seq_len=128", "--lora_rank=4", "--lora_alpha=8", "--val_fraction=0.2", "--eval_batches=2", *args]
    for stop in ("--stop_at_step=2", "--stop_at_step=0"):
        done = subprocess.run([*cmd, stop], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from" in done.stdout and "(FSDP2)" in done.stdout
    sharded = str(tmp_path / "fsdp")
    assert checkpoint.is_dcp(checkpoint.latest(sharded))
    single = run_sft(transformers_llama[0], tmp_path, data, "single", *args, "--grad_accum_steps=2", "--eval_batches=4")
    for a, b in zip(metrics(sharded), metrics(single), strict=True):
        for key in ("loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])
    # the adapters of the DCP checkpoint, merged over their base, are those of one process
    merged, one = checkpoint.load_model(sharded)[0], checkpoint.load_model(single)[0]
    for (name, a), b in zip(merged.state_dict().items(), one.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_continued_pretraining_with_lora_trains_adapters_alone_over_the_base(demo_data, transformers_llama, tmp_path):
    import train

    args = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--out_dir={tmp_path}", "--lora_rank=4", "--max_steps=2",
            "--ckpt_every=2", "--eval_every=2"]
    with pytest.raises(ValueError, match=r"^--init_optimizer=true: .* no optimizer state; drop it, or say --init_optimizer=false$"):
        train.main(args + [f"--init_from={transformers_llama[0]}", "--init_optimizer=true"])
    # the default (auto) starts adapters with a fresh optimizer: there is no state to take
    assert train.main(args + [f"--init_from={transformers_llama[0]}", "--name=lora"]) == 0
    assert json.load(open(tmp_path / "lora" / "config.json"))["init_optimizer"] == "false"
    ckpt = checkpoint.latest(str(tmp_path / "lora"))
    assert all(lora.is_adapter(name) for name in load_file(os.path.join(ckpt, "model.safetensors")))
    assert checkpoint.read_meta(ckpt)["lora"]["rank"] == 4
    with pytest.raises(ValueError, match=r"trained with LoRA .* resume with the same --lora_rank"):
        train.main(args + [f"--init_from={transformers_llama[0]}", "--init_optimizer=false", "--name=lora", "--lora_rank=8"])


def test_compiled_blocks_with_adapters_share_one_graph_in_bf16():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = lora.apply(tiny(), rank=4, alpha=8, suffixes=SUFFIXES, seed=0)
    for block in model.layers:
        block.compile(dynamic=True)
    tokens = torch.randint(0, MODELS["test"].vocab_size, (2, 16))
    with torch.autocast("cpu", torch.bfloat16):
        model(tokens, tokens)[1].backward()
    # the frozen embedding's output is marked as needing gradients: block 0 sees what block 1 does
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
    assert all(p.grad is not None for n, p in model.named_parameters() if lora.is_adapter(n))
    assert all(p.grad is None for n, p in model.named_parameters() if not lora.is_adapter(n))
