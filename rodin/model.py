"""A LLaMA decoder in one file: the model of RODIN-1B and Lucie-7B.

Frozen decisions:
- RoPE uses the rotate-half layout of Hugging Face's LlamaForCausalLM, so our weights are HF's
  weights one to one; the GGUF export permutes Q/K into llama.cpp's interleaved layout.
- RMSNorm runs in fp32 and casts back before the weight, exactly as HF does, so bf16 runs agree.
- No biases, no dropout: neither model uses them, and dropout would break bit-exact resume.
- Only torch is imported here; data, checkpoints and devices live elsewhere in rodin/.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    dim: int = 2048
    n_layers: int = 22
    n_heads: int = 16
    n_kv_heads: int = 16
    ffn_dim: int = 5461
    vocab_size: int = 64000
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics: in bf16 the mean of squares loses the small components
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_cos_sin(head_dim, max_seq_len, theta, device=None):
    """cos/sin tables of shape (max_seq_len, head_dim), halves repeated (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, heads, T, head_dim); cos/sin: (T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache(nn.Module):
    """Keys and values of past positions for one layer, preallocated for max_seq_len."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos, k, v):
        end = start_pos + k.size(2)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        # the compute dtype, which can differ from the weights' (FSDP2 gathers fp32 weights as bf16)
        return self.k[:, :, :end].to(k.dtype), self.v[:, :, :end].to(v.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # a KVCache while generating. A module slot from the start: assigning a KVCache would move
        # the attribute into _modules for good, and a compiled block would recompile for it
        self.register_module("cache", None)

    def forward(self, x, cos, sin, start_pos=0, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        # GQA: query head h reads kv head h // n_rep, the grouping of HF's repeat_kv
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1 and (mask is not None or start_pos > 0):
            # with a mask, SDPA's enable_gqa falls back to the O(T^2) math kernel: copy K and V instead
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:
            # CPU's flash-attention kernel runs its backward 1.3x faster in fp32 than in bf16 (demo
            # shape, bench/train_throughput.py); autocast would cast fp32 inputs back to bf16
            with torch.autocast("cpu", enabled=False):
                y = attend(q.float(), k.float(), v.float(), start_pos, mask).to(q.dtype)
        else:
            y = attend(q, k, v, start_pos, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, start_pos=0, mask=None):
    """Scaled dot-product attention of (B, heads, T, head_dim) queries on keys and values that
    have as many heads or fewer (GQA), causal, within a mask, or after a cached prefix."""
    n_rep = q.size(1) // k.size(1)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if start_pos == 0:
        # enable_gqa: SDPA groups the heads itself, no copies of K and V (5 % of a CPU step)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    # decoding after a prefix: query i sits at absolute position start_pos + i
    past_and_new = torch.arange(k.size(2), device=q.device)
    mask = past_and_new[None, :] <= (start_pos + torch.arange(q.size(2), device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, start_pos=0, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class LLaMA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, std) everywhere, residual projections scaled by 1/sqrt(2 * n_layers) (GPT-2)
        so the residual stream does not grow with depth. Also recomputes the RoPE tables (init_rope)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self):
        """Recompute the RoPE tables in place. They are not in checkpoints (non-persistent), so a
        model built on the meta device and then allocated with to_empty() needs them computed."""
        if self.rope_cos.device.type != "meta":
            cos, sin = rope_cos_sin(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied matrix is counted once

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L d T, where N
        counts the matrices that are multiplied (the input embedding is a lookup, not a matmul)."""
        cfg = self.cfg
        seq_len = seq_len or cfg.max_seq_len
        n_matmul = self.num_params() - sum(p.numel() for n, p in self.named_parameters() if n.endswith("norm.weight"))
        if not cfg.tie_embeddings:
            n_matmul -= self.tok_embeddings.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len

    def forward(self, tokens, targets=None, start_pos=0, doc_ids=None, loss_fn=None):
        """tokens: (B, T) ids. Returns (logits, loss); loss ignores targets equal to -100.
        doc_ids: (B, T) ids of the documents packed into each row; a token then attends only to
        its own document, with positions counted from the document's start, exactly as if each
        document were alone. loss_fn(hidden, output_weight, targets): computes the loss from the
        final hidden states instead (rodin/train/loss.py), and logits are returned as None."""
        T = tokens.size(1)
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        mask = None
        if doc_ids is None:
            cos, sin = self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T]
        else:
            positions = document_positions(doc_ids)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same_doc & torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()).unsqueeze(1)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos, mask)
        x = self.norm(x)
        if targets is not None and loss_fn is not None:
            return None, loss_fn(x, self.output.weight, targets)
        logits = self.output(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    # ---- generation -------------------------------------------------------------------------

    def setup_cache(self, batch_size, max_seq_len=None):
        cfg, p = self.cfg, self.output.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    @torch.no_grad()
    def stream(self, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(), generator=None, use_cache=True):
        """Yields new token ids for one prompt (a list of ids), one at a time. temperature 0 is greedy."""
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.output.weight.device)
        max_new_tokens = min(max_new_tokens, self.cfg.max_seq_len - tokens.size(1))
        if use_cache:
            self.setup_cache(batch_size=1)
        try:
            start_pos, step_input = 0, tokens
            for _ in range(max_new_tokens):
                if use_cache:
                    logits, _ = self(step_input, start_pos=start_pos)
                    start_pos += step_input.size(1)
                else:
                    logits, _ = self(tokens)
                next_id = sample(logits[0, -1].float(), temperature, top_k, top_p, generator)
                yield next_id
                if next_id in stop_tokens:
                    return
                step_input = torch.tensor([[next_id]], device=tokens.device)
                tokens = torch.cat([tokens, step_input], dim=1)
        finally:
            if use_cache:
                self.clear_cache()

    def generate(self, prompt, max_new_tokens, **kwargs):
        """The prompt followed by up to max_new_tokens sampled ids (see stream)."""
        return list(prompt) + list(self.stream(prompt, max_new_tokens, **kwargs))


def document_positions(doc_ids):
    """Position of each token within its document: 0 where doc_ids changes, +1 otherwise."""
    T = doc_ids.size(1)
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One id from a (vocab,) row of logits."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:
        # nucleus: keep the smallest prefix of sorted ids whose mass reaches top_p
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
