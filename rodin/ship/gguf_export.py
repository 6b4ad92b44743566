"""Our LLaMA -> a GGUF file for llama.cpp and Ollama, written with the `gguf` package (llama.cpp's
own gguf-py), plus the Ollama Modelfile beside it.

Frozen decisions:
- The SentencePiece vocabulary is copied 1:1 (pieces, scores, piece types; tokenizer.ggml.model =
  "llama"), with add_space_prefix mirroring the model's add_dummy_prefix: llama.cpp then splits
  text exactly as we do, chat tokens included (CONTROL pieces, parsed only from templates).
- A tokenizer.json (SentencePiece-style BPE, an imported model's) is written as llama.cpp's
  convert_hf_to_gguf.py writes it (gguf.LlamaHfVocab: a "llama" vocabulary, <0xNN> BYTE, special
  tokens CONTROL), but for the scores: the converter gives every piece -1000, so llama.cpp would
  merge the leftmost pair first; here a piece scores minus the rank of the merge that makes it,
  so llama.cpp merges in the BPE's order and splits text as transformers does.
- Q and K rows are permuted from our rotate-half RoPE layout into llama.cpp's interleaved one, as
  llama.cpp's convert_hf_to_gguf.py does (K with n_kv_heads). A tied output.weight is left out.
- f32/f16/bf16/q8_0 are written here; 1-D tensors (norms) stay f32, as llama.cpp's converter does.
  K-quants go through llama.cpp's own quantizer (llama-cpp-python) from an f32 GGUF.
- K-quant blocks span 256 inputs: a tensor whose rows are not a multiple of 256 (RODIN-1B's
  ffn_down, FFN 5461) falls back to another type; pad_ffn() pads the FFN with zeros, exactly.
"""

import dataclasses
import json
import os
import tempfile

import torch

from rodin.data import chatml
from rodin.model import LLaMA

PYTHON_TYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers
QK_K = 256

_LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}


def gguf_name(name):
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def permute_rotary(weight, n_heads):
    """Rows of each head from rotate-half order (x0..x_{d/2-1}, x_{d/2}..) to interleaved pairs
    (x0, x_{d/2}, x1, x_{d/2+1}, ...): llama.cpp's LLAMA rope turns adjacent pairs."""
    out_dim = weight.shape[0]
    return weight.reshape(n_heads, 2, out_dim // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def pad_ffn(model, multiple=QK_K):
    """The same function with ffn_dim rounded up to a multiple: zero gate/up rows give silu(0) * 0 = 0,
    and zero down columns add nothing, so the logits do not change."""
    cfg = model.cfg
    ffn = -(-cfg.ffn_dim // multiple) * multiple
    if ffn == cfg.ffn_dim:
        return model
    padded = LLaMA(dataclasses.replace(cfg, ffn_dim=ffn))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    extra = ffn - cfg.ffn_dim
    for key, value in list(state.items()):
        if key.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
            state[key] = torch.cat([value, value.new_zeros(extra, value.shape[1])])
        elif key.endswith("feed_forward.w2.weight"):
            state[key] = torch.cat([value, value.new_zeros(value.shape[0], extra)], dim=1)
    padded.load_state_dict(state)
    return padded.to(model.output.weight.dtype).eval()


# gguf.TokenType's numbers (SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def vocabulary(tokenizer, vocab_size):
    """(pieces, scores, types, add_space_prefix) of the tokenizer, padded with UNUSED pieces up to
    the model's vocab_size (as llama.cpp's converter pads)."""
    if not hasattr(tokenizer, "sp"):
        return json_vocabulary(tokenizer, vocab_size)
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_bytes)
    pieces = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's type numbers are gguf.TokenType's
    pad_vocabulary(pieces, scores, types, vocab_size)
    return pieces, scores, types, proto.normalizer_spec.add_dummy_prefix


def pad_vocabulary(pieces, scores, types, vocab_size):
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(UNUSED)


def merge_ranks(spec):
    """{piece: rank of the first merge that makes it} of a tokenizer.json's BPE ("a b" or [a, b])."""
    ranks = {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    return ranks


def adds_space_prefix(spec):
    """Whether a tokenizer.json puts "▁" before a text (SentencePiece's dummy prefix): a Prepend
    normalizer, or a Metaspace pre-tokenizer that prepends."""
    normalizer = spec.get("normalizer") or {}
    if any(n.get("type") == "Prepend" for n in normalizer.get("normalizers", [normalizer])):
        return True
    pre = spec.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return False


def json_vocabulary(tokenizer, vocab_size):
    """(pieces, scores, types, add_space_prefix) of a tokenizer.json: every id's piece, scored by
    its merge rank (pieces no merge makes score below them all)."""
    spec = json.loads(tokenizer.model_bytes)
    ranks = merge_ranks(spec)
    user_defined = {t["id"] for t in spec.get("added_tokens", []) if not t.get("special")}
    pieces, scores, types = [], [], []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.piece(i)
        if piece is None:  # a hole in the ids
            pieces.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(UNUSED)
            continue
        pieces.append(piece.encode("utf-8"))
        scores.append(-float(ranks.get(piece, len(ranks))))
        types.append(UNKNOWN if i == tokenizer.unk_id else BYTE if tokenizer.is_byte(i) else CONTROL if tokenizer.is_special(i)
                     else USER_DEFINED if i in user_defined else NORMAL)
    pad_vocabulary(pieces, scores, types, vocab_size)
    return pieces, scores, types, adds_space_prefix(spec)


def tensor_data(t, dtype):
    """(array, raw_dtype, type written) for GGUFWriter.add_tensor; q8_0 falls back to f16 where rows
    do not fit its 32-wide blocks, as llama.cpp's converter does."""
    import gguf

    t = t.detach().to("cpu", torch.float32)
    if t.ndim == 1 or dtype == "f32":
        return t.numpy(), None, "f32"
    if dtype == "f16":
        return t.to(torch.float16).numpy(), None, "f16"
    if dtype == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16, "bf16"
    if t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        return t.to(torch.float16).numpy(), None, "f16"
    return gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0, "q8_0"


def ffn_warning(cfg):
    if cfg.ffn_dim % QK_K == 0:
        return None
    return (f"ffn_dim={cfg.ffn_dim} is not a multiple of {QK_K}: llama.cpp cannot K-quantize ffn_down "
            f"and stores it in a fallback type (bigger, or less accurate); export with --pad_ffn to pad the "
            f"FFN with zeros to {-(-cfg.ffn_dim // QK_K) * QK_K} (same outputs), or train with an FFN multiple of {QK_K}")


def write_gguf(path, model, tokenizer, dtype="f32", name="rodin", license="apache-2.0", progress=True):
    """Write model + tokenizer to path (atomically). Returns {gguf type: number of tensors}."""
    import gguf
    from tqdm import tqdm

    if dtype not in PYTHON_TYPES:
        raise ValueError(f"--dtype={dtype} cannot be written in Python; choose from {', '.join(PYTHON_TYPES)} "
                         f"(or {', '.join(K_QUANTS)} through llama.cpp)")
    cfg = model.cfg
    pieces, scores, types, dummy_prefix = vocabulary(tokenizer, cfg.vocab_size)
    writer = gguf.GGUFWriter(path + ".tmp", "llama")
    writer.add_name(name)
    writer.add_license(license)
    writer.add_languages(["fr"])
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.unk_id is not None:
        writer.add_unk_token_id(tokenizer.unk_id)
    if tokenizer.pad_id >= 0:
        writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.has_chat_tokens:
        writer.add_eot_token_id(tokenizer.im_end_id)  # llama.cpp ends a chat turn here
        writer.add_chat_template(chatml.CHAT_TEMPLATE)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(dummy_prefix)

    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("output.weight")  # llama.cpp reuses token_embd when output is absent
    counts = {}
    for key, value in tqdm(state.items(), desc=f"gguf {dtype}", unit="tensor", disable=not progress):
        if key.endswith("attention.wq.weight"):
            value = permute_rotary(value, cfg.n_heads)
        elif key.endswith("attention.wk.weight"):
            value = permute_rotary(value, cfg.n_kv_heads)
        data, raw_dtype, kind = tensor_data(value, dtype)
        counts[kind] = counts.get(kind, 0) + 1
        writer.add_tensor(gguf_name(key), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".tmp", path)
    return counts


def k_quantize(src, dst, kind, threads=None):
    """Quantize an f32/f16 GGUF with llama.cpp's quantizer (Q4_K_M, Q5_K_M, Q6_K); with src None,
    only check that the quantizer is there."""
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"--dtype={kind} needs llama.cpp's quantizer: pip install llama-cpp-python "
                         "(or export f16 and run llama.cpp's llama-quantize yourself)") from None
    if src is None:
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[kind]
    params.nthread = threads or os.cpu_count()
    if llama_cpp.llama_model_quantize(src.encode(), (dst + ".tmp").encode(), params) != 0:
        raise ValueError(f"{src}: llama.cpp failed to quantize to {kind}")
    os.replace(dst + ".tmp", dst)


def write_gguf_file(out, model, tokenizer, dtype, name, license, threads=None):
    """out/NAME-DTYPE.gguf, written by the gguf package or, for K-quants, by llama.cpp's quantizer
    from an f32 GGUF; returns its path."""
    path = os.path.join(out, f"{name}-{dtype}.gguf")
    if dtype in K_QUANTS:
        k_quantize(None, None, dtype)  # fails early, with the fix, when llama.cpp is missing
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            source = os.path.join(tmp, f"{name}-f32.gguf")
            write_gguf(source, model, tokenizer, "f32", name, license)
            k_quantize(source, path, dtype, threads)
    else:
        counts = write_gguf(path, model, tokenizer, dtype, name, license)
        if dtype == "q8_0" and counts.get("f16"):
            print(f"note: {counts['f16']} tensors with rows not a multiple of 32 stored as f16 (q8_0 blocks hold 32)")
    return path


def modelfile(gguf_file, tokenizer, num_ctx):
    """Ollama's Modelfile: the GGUF, our chat template in Go syntax, the end-of-turn stop token."""
    stop = tokenizer.piece(tokenizer.im_end_id) if tokenizer.has_chat_tokens else tokenizer.piece(tokenizer.eos_id)
    lines = [f"FROM ./{os.path.basename(gguf_file)}"]
    if tokenizer.has_chat_tokens:
        lines.append(f'TEMPLATE """{chatml.OLLAMA_TEMPLATE}"""')
    lines += [f'PARAMETER stop "{stop}"', f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"
