"""Our LLaMA -> Hugging Face LlamaForCausalLM: config, tokenizer and the export directory (the
names, and reading an HF Llama back into our model, are rodin.train.init_from's: training starts
from one).

Frozen decisions:
- Both use the rotate-half RoPE layout, so weights map one to one by name, with no permutation.
- The export needs no transformers: config/tokenizer JSON written here, tokenizer.json built with
  the `tokenizers` library from the SentencePiece model (BPE merges ordered by piece score, byte
  fallback, " " -> "▁" and nothing else, as our identity-normalised, no-dummy-prefix tokenizer).
- tokenizer.model is copied too (transformers v5 does not write it; llama.cpp converters read it).
  A model that came with a tokenizer.json (an imported one) exports that file as it is, but for
  the <s> that every text starts with (tokenizer_config's add_bos_token, as ours).
- Weights are sharded above max_shard_bytes with model.safetensors.index.json, as transformers does.
"""

import json
import os
import re

import torch
from safetensors.torch import save_file

from rodin.data import chatml
from rodin.io import atomic_write_bytes, atomic_write_text, fsync_file
from rodin.model import ModelConfig
from rodin.train.hf_llama import hf_name

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

def to_hf_state_dict(model):
    """HF-named tensors; a tied lm_head is left out, as transformers itself saves it."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("output.weight")
    return {hf_name(k): v for k, v in state.items()}


def hf_config(cfg: ModelConfig, bos_id=1, eos_id=2, pad_id=None, torch_dtype="float32"):
    """config.json of a LlamaForCausalLM with our shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": torch_dtype,
    }


# ---- tokenizer ----------------------------------------------------------------------------------

def hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` that splits text exactly as our SentencePiece model does.

    SentencePiece BPE keeps no merge list: it joins the adjacent pair whose joined piece scores
    highest. Listing, for every piece, each split into two pieces, ranked by the joined piece's
    score (its id), gives the same merges to HF's BPE. Control pieces (<s>, chat tokens) become
    special added tokens: parsed from rendered chat templates, never produced by plain text."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_bytes)
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ValueError(f"{tokenizer.path}: only SentencePiece BPE models are exported (this one is not BPE)")
    spec = proto.normalizer_spec
    if spec.name != "identity" or spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        raise ValueError(f"{tokenizer.path}: export needs identity normalisation, no dummy prefix and whitespace kept; "
                         "retrain the tokenizer with data/train_tokenizer.py")
    pieces = [(p.piece, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    normal = {piece for piece, kind in pieces if kind == proto.SentencePiece.NORMAL}
    ranked = []
    for piece in normal:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = [piece for piece, kind in pieces if kind in (proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN)]
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special])
    # <s> before a text when the caller asks for special tokens (tokenizer_config's add_bos_token)
    bos = proto.pieces[proto.trainer_spec.bos_id].piece
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, proto.trainer_spec.bos_id)])
    return tok


def imported_hf_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` of a tokenizer.json, with <s> put before a text when the caller
    asks for special tokens (its own post-processor may add </s> too, as Lucie-7B's does)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tokenizer.model_bytes.decode("utf-8"))
    bos = tokenizer.piece(tokenizer.bos_id)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tokenizer.bos_id)])
    return tok


def tokenizer_files(tokenizer, max_seq_len):
    """{file name: bytes} of the tokenizer as transformers reads it (AutoTokenizer)."""
    piece = tokenizer.piece
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id)}
    if tokenizer.unk_id is not None:
        special["unk_token"] = piece(tokenizer.unk_id)
    if tokenizer.pad_id >= 0:
        special["pad_token"] = piece(tokenizer.pad_id)
    sentencepiece = hasattr(tokenizer, "sp")
    tok = hf_tokenizer(tokenizer) if sentencepiece else imported_hf_tokenizer(tokenizer)
    added = {str(tok.token_to_id(p)): {"content": p, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True}
             for p in sorted({piece(i) for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)})}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,  # as our pretraining documents: <s> text </s>
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        "added_tokens_decoder": added,
        "extra_special_tokens": {},
    }
    if tokenizer.has_chat_tokens:
        config["chat_template"] = chatml.CHAT_TEMPLATE
    files = {
        "tokenizer.json": tok.to_str(pretty=True).encode(),
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode(),
    }
    if sentencepiece:
        files["tokenizer.model"] = tokenizer.model_bytes
    return files


# ---- writing an HF directory ----------------------------------------------------------------------

def shard(tensors, max_shard_bytes):
    """Split {name: tensor} into consecutive groups of at most max_shard_bytes (a bigger tensor alone)."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current] if current else shards


def write_weights(out_dir, tensors, max_shard_bytes):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    shards = shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for stale in os.listdir(out_dir):  # a previous export's shards or index would shadow this one
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", stale) and stale not in names:
            os.remove(os.path.join(out_dir, stale))
    for name, part in zip(names, shards):
        tmp = os.path.join(out_dir, f".tmp-{name}")
        save_file(part, tmp, metadata={"format": "pt"})
        fsync_file(tmp)
        os.replace(tmp, os.path.join(out_dir, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
        atomic_write_text(os.path.join(out_dir, "model.safetensors.index.json"), json.dumps(index, indent=2) + "\n")
    return names


def generation_config(tokenizer, max_seq_len):
    stop = [tokenizer.eos_id] + ([tokenizer.im_end_id] if tokenizer.has_chat_tokens else [])
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop if len(stop) > 1 else stop[0],
            "pad_token_id": tokenizer.pad_id if tokenizer.pad_id >= 0 else None, "do_sample": True,
            "temperature": 0.7, "top_p": 0.9, "max_length": max_seq_len}


def architecture(cfg, num_params, dtype):
    """(label, value) rows describing the model, for model cards."""
    heads = f"{cfg.n_heads} heads" + (f", {cfg.n_kv_heads} KV heads (GQA)" if cfg.n_kv_heads != cfg.n_heads else "")
    return [("parameters", f"{num_params:,}"), ("layers", cfg.n_layers), ("hidden size", cfg.dim),
            ("attention", heads), ("feed-forward (SwiGLU)", cfg.ffn_dim), ("vocabulary", f"{cfg.vocab_size:,}"),
            ("context", cfg.max_seq_len), ("RoPE θ", cfg.rope_theta),
            ("tied embeddings", "yes" if cfg.tie_embeddings else "no"), ("weights", dtype)]


def model_card(name, cfg, num_params, dtype, info):
    """README.md of the export: what the model is, how it was trained, how to run it."""
    info = dict(info)
    table = "\n".join(f"| {k} | {v} |" for k, v in architecture(cfg, num_params, dtype))
    licence = info.pop("license", "apache-2.0")
    data = info.pop("data", "unspecified")
    trained = ", ".join(f"{k}: {v}" for k, v in info.items())
    return f"""---
license: {licence}
language:
- fr
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- rodin
---

# {name}

A French LLaMA trained from scratch with rodin (pure PyTorch), exported as
`LlamaForCausalLM`: no `trust_remote_code` needed.

| | |
|---|---|
{table}

**Training data:** {data}.
**Training:** {trained or "see the run directory"}.
**Licence:** {licence}.

The tokenizer is SentencePiece BPE with byte fallback and no normalisation (text is NFC-normalised
before training), so transformers, llama.cpp and the original `tokenizer.model` give the same ids.
Chat turns use ChatML (`<|im_start|>` / `<|im_end|>`), in `tokenizer_config.json`'s chat template.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
ids = tokenizer("La Fontaine écrivit", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))
```

This is a small research model: it can be wrong, biased or offensive. Do not rely on its output.
"""


def write_hf(out_dir, model, tokenizer, dtype="f32", name="rodin", info=(), max_shard_bytes=5 * 2**30):
    """A directory that transformers' AutoModelForCausalLM / AutoTokenizer load with no remote code."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype} is not available for Hugging Face export; choose from {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.cfg
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else None
    config = hf_config(cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=pad, torch_dtype=HF_DTYPE_NAMES[torch_dtype])
    tensors = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in to_hf_state_dict(model).items()}
    write_weights(out_dir, tensors, max_shard_bytes)
    files = {"config.json": json.dumps(config, indent=2) + "\n",
             "generation_config.json": json.dumps(generation_config(tokenizer, cfg.max_seq_len), indent=2) + "\n",
             "README.md": model_card(name, cfg, model.num_params(), dtype, info)}
    for file, text in files.items():
        atomic_write_text(os.path.join(out_dir, file), text)
    for file, data in tokenizer_files(tokenizer, cfg.max_seq_len).items():
        atomic_write_bytes(os.path.join(out_dir, file), data)
    return out_dir
