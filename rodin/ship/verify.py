"""An export checked by the programs people run: transformers and llama.cpp against our own model.

Frozen decisions:
- The reference is our model with its weights rounded to the exported type (f16/bf16), so a
  transformers load agrees to float32 rounding whatever the type; quantized types are compared
  with the original weights, by argmax agreement.
- Token ids are compared on French text that trips tokenizers (NBSP, narrow NBSP, œ, «», "…",
  digits, tabs, newlines, repeated spaces, emoji through byte fallback) and on rendered chat turns.
- llama.cpp runs with an f32 KV cache (type_k = type_v = 0): its default f16 cache adds ~1e-2.
"""

import copy

import torch

from rodin.data import chatml

FRENCH_TEXTS = [
    "Le cœur a ses raisons que la raison ne connaît point.",
    "« Bonjour », dit-elle\u00a0: «\u00a0Où est l’Œuvre\u00a0?\u00a0»",
    "Il naquit le 14 juillet 1789 ; il avait 3,14 € et 1\u202f000 livres.",
    "Attendez…  trois   espaces, puis\tune tabulation.",
    "Première ligne\nseconde ligne\n\n\tretrait",
    "Ça s’écrit « naïf », « Noël », « aïeul » — et l’ÉTÉ, À BIENTÔT !",
    "Les emojis 🎉🇫🇷 et les idéogrammes 日本 passent par les octets.",
    " Un espace au début et à la fin ",
    "Quoi ?! L’a-t-il vu ? Oui… peut-être.",
    "Ex-æquo, sœur, œil, bœuf ; Æsope et Œdipe.",
    "2024-05-01\u202f: 12\u00a0h\u00a030, 99,9\u00a0%",
    "Le Rhône\u2009; l’Aÿ",
]

CONVERSATIONS = [
    [{"role": "system", "content": "Tu es un assistant qui répond en français."},
     {"role": "user", "content": "Qui a écrit «\u00a0Les Misérables\u00a0» ?"},
     {"role": "assistant", "content": "Victor Hugo, en 1862."}],
    [{"role": "user", "content": "Donne deux vers…\n\tpuis un chiffre : 7"},
     {"role": "assistant", "content": "Demain, dès l’aube,\nà l’heure où blanchit la campagne.\n7 🎉"},
     {"role": "user", "content": "Merci\u202f!"}],
]

# per checker and type: (max |logit diff| / logit scale, argmax agreement, greedy identical); None: not checked
THRESHOLDS = {
    "transformers": {"f32": (1e-4, 1.0, True), "f16": (1e-4, 1.0, True), "bf16": (1e-4, 1.0, True)},
    "llama.cpp": {"f32": (1e-3, 1.0, True), "f16": (3e-2, 0.99, False), "bf16": (1e-1, 0.98, False),
                  "q8_0": (None, 0.98, False), "q4_k_m": (None, 0.8, False), "q5_k_m": (None, 0.85, False),
                  "q6_k": (None, 0.9, False)},
}
GREEDY_TOKENS = 16


def reference_model(model, dtype):
    """Our model with weights rounded to the exported float type (computed in float32)."""
    if dtype not in ("f16", "bf16"):
        return model
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to({"f16": torch.float16, "bf16": torch.bfloat16}[dtype]).float())
    return rounded


def prompts(model, tokenizer):
    """Token ids of the French texts and of the chat prompts, cut to leave room for the greedy run."""
    room = model.cfg.max_seq_len - GREEDY_TOKENS
    texts = [[tokenizer.bos_id] + tokenizer.encode(t) for t in FRENCH_TEXTS]
    if tokenizer.has_chat_tokens:
        texts += [chatml.encode(tokenizer, c, add_generation_prompt=True)[0] for c in CONVERSATIONS]
    return [ids[:room] for ids in texts]


@torch.no_grad()
def our_logits(model, ids):
    return model(torch.tensor([ids]))[0][0].float()


def compare(ours, theirs, greedy_ours, greedy_theirs):
    """Figures of one checker over all prompts: lists of (T, vocab) logits and greedy id lists."""
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    scale = max(1.0, max(float(a.abs().max()) for a in ours))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ours, theirs))
    total = sum(a.shape[0] for a in ours)
    same = sum(x == y for g, h in zip(greedy_ours, greedy_theirs) for x, y in zip(g, h))
    return {"max_logit_diff": diff, "logit_scale": scale, "argmax_agreement": agree / total, "positions": total,
            "greedy_same": same, "greedy_total": sum(len(g) for g in greedy_ours)}


def failures(report, checker, dtype):
    """Reasons the figures fall outside THRESHOLDS (empty when the export passes)."""
    max_rel, min_argmax, greedy = THRESHOLDS[checker][dtype]
    problems = [f"token ids differ on {n}" for n in report["token_mismatches"]]
    if max_rel is not None and report["max_logit_diff"] > max_rel * report["logit_scale"]:
        problems.append(f"max |logit diff| {report['max_logit_diff']:.2e} > {max_rel:g} x {report['logit_scale']:.1f}")
    if report["argmax_agreement"] < min_argmax:
        problems.append(f"argmax agreement {report['argmax_agreement']:.2%} < {min_argmax:.0%}")
    if greedy and report["greedy_same"] != report["greedy_total"]:
        problems.append(f"greedy continuations differ ({report['greedy_same']}/{report['greedy_total']} tokens)")
    return problems


def summary(checker, dtype, report):
    return (f"{checker} ({dtype}): token ids {'identical' if not report['token_mismatches'] else 'DIFFER'} on "
            f"{report['token_checks']} strings | max |logit diff| {report['max_logit_diff']:.2e} "
            f"(logits up to {report['logit_scale']:.1f}) | argmax {report['argmax_agreement']:.2%} of "
            f"{report['positions']} positions | greedy {report['greedy_same']}/{report['greedy_total']} tokens")


# ---- transformers --------------------------------------------------------------------------------

@torch.no_grad()
def check_transformers(hf_dir, model, tokenizer, dtype):
    try:
        import transformers
    except ImportError:
        raise ValueError("--verify needs transformers: pip install transformers (or pass --no-verify)") from None
    ref = reference_model(model, dtype).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    mismatches, checks = [], 0
    for text in FRENCH_TEXTS:
        checks += 1
        ours = tokenizer.encode(text)
        if hf_tok(text)["input_ids"] != [tokenizer.bos_id] + ours or hf_tok.decode(ours) != text:
            mismatches.append(repr(text))
    if tokenizer.has_chat_tokens:
        for conv in CONVERSATIONS:
            checks += 1
            ids = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers v5 returns a BatchEncoding
            text = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            if list(ids) != chatml.encode(tokenizer, conv, True)[0] or text != chatml.render(conv, True):
                mismatches.append(f"chat {conv[0]['content'][:20]!r}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    ours, theirs, greedy_ours, greedy_theirs = [], [], [], []
    for ids in prompts(model, tokenizer):
        ours.append(our_logits(ref, ids))
        theirs.append(hf(torch.tensor([ids])).logits[0].float())
        greedy_ours.append(ref.generate(ids, GREEDY_TOKENS, temperature=0)[len(ids):])
        greedy_theirs.append(hf_greedy(hf, ids, GREEDY_TOKENS))
    report = compare(ours, theirs, greedy_ours, greedy_theirs)
    return dict(report, token_mismatches=mismatches, token_checks=checks)


def hf_greedy(hf, ids, n):
    """n argmax tokens, no stop token (as our generate), with transformers' own KV cache."""
    out = hf(torch.tensor([ids]), use_cache=True)
    new = []
    for _ in range(n):
        new.append(int(out.logits[0, -1].argmax()))
        out = hf(torch.tensor([[new[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return new


# ---- llama.cpp -----------------------------------------------------------------------------------

def load_llama_cpp(gguf_path, n_ctx, threads=None):
    try:
        import llama_cpp
    except ImportError:
        raise ValueError("--verify of a GGUF needs llama-cpp-python: pip install llama-cpp-python "
                         "(or pass --no-verify)") from None
    return llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0,
                           n_threads=threads, n_batch=n_ctx, verbose=False)


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy()).float()


def llama_cpp_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(n):
        new.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([new[-1]])
    return new


def llama_cpp_tokens(llm, text, special=False, add_bos=False):
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)


def llama_cpp_text(llm, ids):
    """The text of ids by llama.cpp's own llama_detokenize (llama-server's way): it drops the space a
    dummy prefix put first, where llama-cpp-python's Llama.detokenize keeps it unless <s> leads."""
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 8 * len(ids) + 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, size, False, False)
    if n < 0:  # the buffer was too small: -n bytes are needed
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, -n, False, False)
    return buf.raw[:n].decode("utf-8", "replace")


def llama_cpp_token_mismatches(llm, tokenizer):
    """(strings llama.cpp tokenizes differently from us, number of strings checked)."""
    mismatches = []
    for text in FRENCH_TEXTS:
        ours = tokenizer.encode(text)
        if llama_cpp_tokens(llm, text) != ours or llama_cpp_tokens(llm, text, add_bos=True) != [tokenizer.bos_id] + ours \
                or llama_cpp_text(llm, ours) != text:
            mismatches.append(repr(text))
    conversations = CONVERSATIONS if tokenizer.has_chat_tokens else []
    for conv in conversations:
        # the rendered template, chat tokens parsed as llama.cpp parses its own chat template's output
        rendered = chatml.render(conv, add_generation_prompt=True)
        if llama_cpp_tokens(llm, rendered, special=True) != chatml.encode(tokenizer, conv, True)[0]:
            mismatches.append(f"chat {conv[0]['content'][:20]!r}")
    return mismatches, len(FRENCH_TEXTS) + len(conversations)


def check_llama_cpp(gguf_path, model, tokenizer, dtype, threads=None):
    ref = reference_model(model, dtype).eval()
    llm = load_llama_cpp(gguf_path, model.cfg.max_seq_len, threads)
    try:
        mismatches, checks = llama_cpp_token_mismatches(llm, tokenizer)
        ours, theirs, greedy_ours, greedy_theirs = [], [], [], []
        for ids in prompts(model, tokenizer):
            ours.append(our_logits(ref, ids))
            theirs.append(llama_cpp_logits(llm, ids))
            greedy_ours.append(ref.generate(ids, GREEDY_TOKENS, temperature=0)[len(ids):])
            greedy_theirs.append(llama_cpp_greedy(llm, ids, GREEDY_TOKENS))
    finally:
        llm.close()
    report = compare(ours, theirs, greedy_ours, greedy_theirs)
    return dict(report, token_mismatches=mismatches, token_checks=checks)
