"""rodin/model.py: the LLaMA of RODIN-1B and Lucie-7B, checked against independent computations
and against transformers' LlamaForCausalLM."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from rodin.config import MODELS
from rodin.model import LLaMA, ModelConfig, apply_rope, rope_cos_sin, sample

TINY = dataclasses.replace(MODELS["test"], vocab_size=97, max_seq_len=48)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return LLaMA(dataclasses.replace(TINY, **overrides)).eval()


def test_rodin_1b_has_exactly_1_238_415_360_parameters():
    with torch.device("meta"):
        model = LLaMA(MODELS["rodin-1b"])
    assert model.num_params() == 1_238_415_360


def test_lucie_7b_has_exactly_6_706_958_336_parameters():
    with torch.device("meta"):
        model = LLaMA(MODELS["lucie-7b"])
    assert model.num_params() == 6_706_958_336


def test_flops_per_token_is_6n_plus_attention():
    with torch.device("meta"):
        model = LLaMA(MODELS["rodin-1b"])
    cfg = model.cfg
    matmul_params = 1_238_415_360 - (2 * cfg.n_layers + 1) * cfg.dim  # tied matrix counted once, as the head
    assert model.flops_per_token(2048) == 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * 2048


def test_changing_a_token_changes_no_earlier_logit():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def reference_attention(attn, x, cos, sin):
    """Plain multi-head attention written out: softmax(QK^T / sqrt(d) + causal mask) V."""
    B, T, _ = x.shape
    h, d = attn.n_heads, attn.head_dim
    q = attn.wq(x).view(B, T, h, d).transpose(1, 2)
    k = attn.wk(x).view(B, T, h, d).transpose(1, 2)
    v = attn.wv(x).view(B, T, h, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.wo(y.transpose(1, 2).reshape(B, T, h * d))


def test_attention_with_as_many_kv_heads_as_heads_is_plain_multi_head_attention():
    model = tiny_model(n_kv_heads=TINY.n_heads)
    attn = model.layers[0].attention
    x = torch.randn(2, 10, TINY.dim)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_multi_head_attention_with_shared_kv_heads():
    gqa = tiny_model(n_kv_heads=2)
    mha = tiny_model(n_kv_heads=TINY.n_heads)
    a, m = gqa.layers[0].attention, mha.layers[0].attention
    n_rep, d = TINY.n_heads // 2, TINY.head_dim
    with torch.no_grad():
        m.wq.weight.copy_(a.wq.weight)
        m.wo.weight.copy_(a.wo.weight)
        # query head h of the GQA layer reads kv head h // n_rep
        m.wk.weight.copy_(a.wk.weight.view(2, d, -1).repeat_interleave(n_rep, 0).reshape(-1, TINY.dim))
        m.wv.weight.copy_(a.wv.weight.view(2, d, -1).repeat_interleave(n_rep, 0).reshape(-1, TINY.dim))
        x = torch.randn(2, 10, TINY.dim)
        cos, sin = gqa.rope_cos[:10], gqa.rope_sin[:10]
        torch.testing.assert_close(a(x, cos, sin), m(x, cos, sin), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == TINY.vocab_size * TINY.dim


def test_rope_matches_a_complex_number_reference():
    head_dim, T, theta = 16, 12, 500000.0
    x = torch.randn(1, 3, T, head_dim)
    cos, sin = rope_cos_sin(head_dim, T, theta)
    ours = apply_rope(x, cos, sin)
    # reference: pair (x_i, x_{i+d/2}) is the complex number x_i + j x_{i+d/2}, turned by m * theta^(-2i/d)
    half = head_dim // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freqs = torch.tensor([theta ** (-2 * i / head_dim) for i in range(half)], dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
    turned = z * torch.polar(torch.ones_like(angles), angles)
    reference = torch.cat([turned.real, turned.imag], dim=-1).float()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_rms_norm_is_computed_in_fp32_for_bf16_inputs():
    model = tiny_model()
    x = torch.randn(4, TINY.dim) * 1e-3
    norm = model.norm.bfloat16()
    # the small components' squares would underflow the bf16 mean; fp32 keeps them
    expected = (x / x.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()).bfloat16()
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x.bfloat16()), expected)


def test_bf16_attention_on_cpu_runs_in_fp32_under_autocast_and_returns_bf16(monkeypatch):
    # CPU's flash-attention backward is faster in fp32 (bench/train_throughput.py); autocast would
    # otherwise cast the fp32 inputs back down to bf16
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    model = tiny_model()
    attn = model.layers[0].attention
    x = torch.randn(2, 10, TINY.dim)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with bf16, torch.no_grad():
        y = attn(x, cos, sin)
        q, k, v = bf16_qkv(attn, x, cos, sin)
    with torch.no_grad():
        attended = sdpa(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True).bfloat16()
    with bf16, torch.no_grad():
        expected = attn.wo(attended.transpose(1, 2).reshape(2, 10, -1))
    assert seen[0] == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)


def bf16_qkv(attn, x, cos, sin):
    """The bf16 queries, keys and values an Attention layer computes under CPU autocast."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cache_generation_gives_the_tokens_of_full_recomputation(kv_heads):
    model = tiny_model(n_kv_heads=kv_heads)
    prompt = [1, 5, 9, 22, 7]
    cached = model.generate(prompt, 25, temperature=0)
    full = model.generate(prompt, 25, temperature=0, use_cache=False)
    assert cached == full and len(cached) == 30
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled_cached = model.generate(prompt, 25, temperature=1.0, top_k=20, top_p=0.9, generator=g1)
    sampled_full = model.generate(prompt, 25, temperature=1.0, top_k=20, top_p=0.9, generator=g2, use_cache=False)
    assert sampled_cached == sampled_full


def test_generation_stops_at_a_stop_token_and_at_the_context_length():
    model = tiny_model()
    greedy = model.generate([1, 2, 3], 10, temperature=0)
    stop = greedy[5]
    assert model.generate([1, 2, 3], 10, temperature=0, stop_tokens=(stop,))[-1] == stop
    assert len(model.generate([1] * 40, 100, temperature=0)) == TINY.max_seq_len


def test_top_k_and_top_p_restrict_sampling_to_the_most_likely_ids():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, top_k=2, generator=g) for _ in range(200)} == {0, 1}
    # probabilities ~ .64 .23 .09 .03 .01: top_p=0.8 keeps the first two
    assert {sample(logits, 1.0, top_p=0.8, generator=g) for _ in range(200)} == {0, 1}
    assert sample(logits, 0) == 0


def test_a_tiny_model_overfits_one_batch():
    model = tiny_model().train()
    tokens = torch.randint(0, TINY.vocab_size, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_loss_ignores_targets_of_minus_100():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (1, 9))
    targets = tokens[:, 1:].clone()
    targets[:, :4] = -100
    logits, loss = model(tokens[:, :-1], targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, 4:], targets[0, 4:]))


def test_bad_shapes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model()(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("tied,kv_heads", [(True, 4), (False, 2)])
def test_logits_match_transformers_llama_for_causal_lm(tied, kv_heads):
    transformers = pytest.importorskip("transformers")
    from rodin.ship.hf import hf_config, to_hf_state_dict

    model = tiny_model(tie_embeddings=tied, n_kv_heads=kv_heads, rope_theta=500000.0)
    config = transformers.LlamaConfig(**{k: v for k, v in hf_config(model.cfg).items() if k not in ("architectures", "model_type")})
    reference = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = reference.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    tokens = torch.randint(0, TINY.vocab_size, (2, 30))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = reference(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_packed_documents_give_the_logits_of_each_document_alone():
    model = tiny_model(n_kv_heads=2)
    a, b, c = (torch.randint(0, TINY.vocab_size, (1, n)) for n in (7, 12, 5))
    packed = torch.cat([a, b, c], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 12 + [2] * 5])
    with torch.no_grad():
        logits, _ = model(packed, doc_ids=doc_ids)
        alone = torch.cat([model(a)[0], model(b)[0], model(c)[0]], dim=1)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
