"""A Hugging Face Llama directory (config.json + safetensors) read into our LLaMA: the names, the
shape, the weights, and where the directory is (a path, or `hf:ORG/NAME[@revision]` from the Hub).

Frozen decisions:
- config.json gives the shape (GQA, tied or untied embeddings, vocabulary, context, RoPE θ);
  a feature our LLaMA lacks (sliding window, biases, RoPE scaling, another activation) is
  refused naming the field, never dropped: it would silently change every logit.
- Weights map one to one by name (both use the rotate-half RoPE layout); single or sharded
  safetensors, any float dtype, never a pickle.
- A Hub id is fetched by huggingface_hub.snapshot_download into its own cache: config and
  tokenizer alone when only the shape is wanted, the weights when they are loaded. A model's
  origin is the id, the revision (the snapshot's commit) and the sha256 of each of its files.
"""

import json
import os
import re

import torch
from safetensors import safe_open

from rodin.io import sha256
from rodin.model import LLaMA, ModelConfig, rope_cos_sin

HUB_PREFIX = "hf:"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(name):
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for parameter {name}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def rodin_name(hf):
    reverse = {hf_name(k): k for k in _TOP_NAMES}
    if hf in reverse:
        return reverse[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    if not m or m.group(2) not in inverse:
        raise KeyError(f"unknown Hugging Face Llama parameter {hf}")
    return f"layers.{m.group(1)}.{inverse[m.group(2)]}.weight"


def from_hf_state_dict(tensors):
    return {rodin_name(k): v for k, v in tensors.items()}


# ---- config.json ---------------------------------------------------------------------------------

# model types whose weights are a Llama's when the features refused below are off
LLAMA_LIKE = ("llama", "mistral")


def model_config_from_hf(config):
    """Our ModelConfig from a transformers LlamaConfig (or its config.json as a dict); ValueError
    naming the field for anything our LLaMA cannot represent."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("model_type", "llama") not in LLAMA_LIKE:
        raise ValueError(f"model_type={get('model_type')!r} is not a Llama (rodin reads {', '.join(LLAMA_LIKE)}; "
                         "Qwen2 adds biases to q/k/v)")
    rope = get("rope_parameters") or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) and "rope_theta" in rope else get("rope_theta", 10000.0)
    scaling = get("rope_scaling") or {}  # transformers v4's name for a non-default RoPE
    for r in (rope, scaling):
        kind = r.get("rope_type", r.get("type", "default")) if isinstance(r, dict) else "default"
        if kind not in ("default", None):
            raise ValueError(f"rope_scaling: RoPE scaling {kind!r} is not supported by rodin's model")
    for field in ("attention_bias", "mlp_bias"):
        if get(field, False):
            raise ValueError(f"{field}=true: rodin's LLaMA has no biases")
    window, context = get("sliding_window"), get("max_position_embeddings")
    if window is not None and context is not None and window < context:
        raise ValueError(f"sliding_window={window}: rodin's LLaMA attends to the whole context of {context} tokens")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={get('hidden_act')!r}: rodin's LLaMA uses SwiGLU (silu)")
    if get("head_dim") and get("head_dim") != get("hidden_size") // get("num_attention_heads"):
        raise ValueError(f"head_dim={get('head_dim')}: rodin's LLaMA has head_dim = hidden_size / num_attention_heads")
    return ModelConfig(dim=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
                       n_kv_heads=get("num_key_value_heads") or get("num_attention_heads"), ffn_dim=get("intermediate_size"),
                       vocab_size=get("vocab_size"), max_seq_len=context, rope_theta=float(theta),
                       norm_eps=get("rms_norm_eps"), tie_embeddings=bool(get("tie_word_embeddings", False)),
                       init_std=get("initializer_range", 0.02))


def read_config(path):
    """ModelConfig of an HF Llama directory's config.json; one-line ValueError otherwise."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not a readable Hugging Face config ({e}); give a Llama checkpoint's directory") from None
    try:
        return model_config_from_hf(config)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{config_path}: incomplete Llama config ({e})") from None
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}; only Llama-architecture checkpoints load into rodin") from None


# ---- where it is, and what it was -----------------------------------------------------------------

def parse_hub_id(spec):
    """hf:ORG/NAME[@revision] -> (ORG/NAME, revision or None)."""
    repo, _, revision = spec[len(HUB_PREFIX):].partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"--init_from={spec}: a Hub model is named hf:ORG/NAME or hf:ORG/NAME@revision")
    return repo, revision or None


def fetch(spec, weights=True):
    """The local directory of --init_from: a directory as is, a Hub id downloaded into the Hub
    cache (config and tokenizer, and the weights if asked; a second call finds them there)."""
    if not spec.startswith(HUB_PREFIX):
        return spec
    from huggingface_hub import snapshot_download

    repo, revision = parse_hub_id(spec)
    patterns = ["config.json", *TOKENIZER_FILES] + (["*.safetensors", "model.safetensors.index.json"] if weights else [])
    return snapshot_download(repo, revision=revision, allow_patterns=patterns)


def origin(spec, path):
    """Where a run's weights came from: the --init_from it was given, the Hub revision (the
    snapshot's commit) when from the Hub, and the sha256 of every file of the model."""
    record = {"init_from": spec, "path": os.path.abspath(path)}
    if spec.startswith(HUB_PREFIX):
        record["repo"], record["revision"] = parse_hub_id(spec)[0], os.path.basename(os.path.normpath(path))
    names = sorted(n for n in os.listdir(path) if n == "config.json" or n in TOKENIZER_FILES or n.endswith(".safetensors"))
    record["files"] = {n: sha256(os.path.join(path, n)) for n in names}
    return record


# ---- weights --------------------------------------------------------------------------------------

def read_hf_tensors(path):
    """{HF name: tensor} from model.safetensors or the shards of model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(download the safetensors weights of the checkpoint)")
    tensors = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def rodin_tensors(path, cfg):
    """The weights of an HF Llama directory, in our names (a tied output left out)."""
    tensors = {k: v for k, v in read_hf_tensors(path).items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    try:
        return from_hf_state_dict(tensors)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}; only Llama-architecture checkpoints load into rodin") from None


def with_new_rows(tensors, new_ids, vocab_size):
    """The embedding and (untied) output matrices grown to vocab_size rows, the rows of new_ids (new
    tokens) set to the mean of the rows before the first of them: a new token starts as the average
    token, its logit near the average logit, rather than as noise that the first steps would chase."""
    if not new_ids:
        return tensors
    tensors = dict(tensors)
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in tensors:
            old = tensors[name]
            grown = torch.cat([old, old.new_zeros(max(0, vocab_size - old.shape[0]), old.shape[1])])
            grown[list(new_ids)] = old[: min(new_ids)].float().mean(0).to(old.dtype)
            tensors[name] = grown
    return tensors


def load_hf_model(path, dtype=torch.float32, device="cpu"):
    """Our LLaMA with the weights of an HF LlamaForCausalLM directory, e.g. a downloaded RODIN-1B
    or Lucie-7B (publish reads its own uploads back with it)."""
    cfg = read_config(path)
    state = rodin_tensors(path, cfg)
    with torch.device("meta"):
        model = LLaMA(cfg)
    model = model.to_empty(device=device)  # no random init of weights that are overwritten below
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
        state["output.weight"] = state["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(dtype)
