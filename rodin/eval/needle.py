"""Needle in a haystack: does the model find one French sentence hidden in long held-out text?
The check of a context-extension phase, as Lucie-7B's up to 32k tokens.

Frozen decisions:
- The haystack is held-out text (the shipped corpus's validation split, which `make pretrain` never
  trains on, or a file given with --haystack), as one token stream, repeated if too short. Prompts
  are cut from it at the token level, so a prompt of length L holds exactly L tokens and the needle
  starts exactly at token len(prefix) + round(depth x filler tokens).
- The needle states a four-digit number; digits are split into single tokens by the tokenizer.
- A base model is scored by log-likelihood: retrieved when, after the question, the hidden number is
  likelier than N_DISTRACTORS other numbers. A chat (SFT) model gets haystack and question as a user
  turn and is retrieved when its greedy reply contains the number.
- A cell of the depth x length grid is the fraction of `trials` retrieved, a new number each trial.
- Long prompts are prefilled into the KV cache in chunks: logits of a 32k prompt never exist at once.
"""

import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rodin.io import figure, save_figure

NEEDLE = "\nLe nombre secret du bibliothécaire de Littré est {answer}.\n"
QUESTION = "\nQuel est le nombre secret du bibliothécaire de Littré ? Le nombre secret du bibliothécaire de Littré est"
CHAT_QUESTION = "\n\nQuestion : quel est le nombre secret du bibliothécaire de Littré ? Réponds par le nombre seul."
ANSWER = " {answer}"
N_DISTRACTORS = 3
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
REPLY_TOKENS = 16  # room kept after a chat prompt for the reply
ANSWER_TOKENS = 8  # room kept after a base prompt for " 1234" (at most 5 pieces)
PREFILL_CHUNK = 1024


def held_out_documents(path=None, val_fraction=None):
    """The haystack's documents: the shipped corpus's validation split, or every document of path."""
    from rodin.data.text import FILES_VAL_FRACTION, is_validation, read_documents
    from rodin.eval.tasks.littre_cloze import CORPUS

    if path:
        return list(read_documents(path))
    fraction = FILES_VAL_FRACTION if val_fraction is None else val_fraction
    return [doc for doc in read_documents(CORPUS) if is_validation(doc, fraction)]


def haystack_stream(tokenizer, documents, n_tokens):
    """At least n_tokens ids of the documents, one per line, the stream repeated if it is too short."""
    ids = tokenizer.encode("\n".join(documents))
    if not ids:
        raise ValueError("the haystack has no text")
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def place(prefix, filler, needle, suffix, length, depth):
    """(ids, needle start): exactly `length` ids, prefix + filler with the needle inserted at `depth`
    (0: first thing after the prefix, 1: last thing before the suffix) + suffix."""
    n_filler = length - len(prefix) - len(needle) - len(suffix)
    if n_filler < 0:
        raise ValueError(f"--lengths: {length} tokens cannot hold the prompt, needle and question "
                         f"({length - n_filler} tokens); use longer lengths")
    if n_filler > len(filler):
        raise ValueError(f"the haystack has {len(filler)} tokens, {n_filler} are needed")
    at = round(depth * n_filler)
    return prefix + filler[:at] + needle + filler[at:n_filler] + suffix, len(prefix) + at


def frame(tokenizer, chat):
    """(prefix, suffix) ids around the haystack: <s> ... question for a base model, a ChatML user
    turn ending with the assistant's header for a chat model (as rodin.data.chatml encodes it)."""
    if not chat:
        return [tokenizer.bos_id], tokenizer.encode(QUESTION)
    prefix = [tokenizer.bos_id, tokenizer.im_start_id] + tokenizer.encode("user\n")
    suffix = (tokenizer.encode(CHAT_QUESTION) + [tokenizer.im_end_id] + tokenizer.encode("\n")
              + [tokenizer.im_start_id] + tokenizer.encode("assistant\n"))
    return prefix, suffix


@torch.no_grad()
def prefill(model, ids, chunk=PREFILL_CHUNK):
    """Fill a fresh KV cache with ids, chunk by chunk (the caller clears it)."""
    device = model.output.weight.device
    model.setup_cache(batch_size=1)
    for start in range(0, len(ids), chunk):
        model(torch.tensor([ids[start : start + chunk]], device=device), start_pos=start)


@torch.no_grad()
def candidate_logprobs(model, prompt, candidates):
    """log p(candidate | prompt) for each candidate (lists of ids). The prompt but its last token is
    cached once; each candidate is then read from the same cache position, overwriting the last."""
    device = model.output.weight.device
    prefill(model, prompt[:-1])
    try:
        out = []
        for ids in candidates:
            logits, _ = model(torch.tensor([[prompt[-1]] + ids[:-1]], device=device), start_pos=len(prompt) - 1)
            logprobs = F.log_softmax(logits[0].float(), dim=-1)
            out.append(float(logprobs[torch.arange(len(ids)), torch.tensor(ids)].sum()))
        return out
    finally:
        model.clear_cache()


@torch.no_grad()
def greedy_reply(model, tokenizer, prompt, max_new_tokens=REPLY_TOKENS):
    """The greedy continuation of prompt up to <|im_end|> or </s>, as text."""
    device = model.output.weight.device
    prefill(model, prompt[:-1])
    try:
        new, last = [], prompt[-1]
        for pos in range(len(prompt) - 1, min(len(prompt) - 1 + max_new_tokens, model.cfg.max_seq_len)):
            logits, _ = model(torch.tensor([[last]], device=device), start_pos=pos)
            last = int(logits[0, -1].argmax())
            if last in (tokenizer.im_end_id, tokenizer.eos_id):
                break
            new.append(last)
        return tokenizer.decode(new)
    finally:
        model.clear_cache()


def answer_room(chat):
    return REPLY_TOKENS if chat else ANSWER_TOKENS


def default_lengths(max_seq_len, chat):
    """Four lengths up to the model's context, each leaving room for the answer."""
    top = max_seq_len - answer_room(chat)
    return sorted({top // 8, top // 4, top // 2, top})


def run(model, tokenizer, documents, lengths, depths=DEPTHS, trials=3, chat=False, seed=0, progress=True):
    """The grid: a list of cells {length, depth, needle_at, retrieved (fraction of trials), ...}."""
    prefix, suffix = frame(tokenizer, chat)
    room = answer_room(chat)
    if max(lengths) + room > model.cfg.max_seq_len:
        raise ValueError(f"--lengths: {max(lengths)} + {room} tokens of answer exceed the model's context of "
                         f"{model.cfg.max_seq_len}")
    filler = haystack_stream(tokenizer, documents, max(lengths))
    rng = random.Random(seed)
    cells = []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc="needle", unit="prompt", disable=not progress)
    for length in lengths:
        for depth in depths:
            cell = {"length": length, "depth": depth, "hits": 0, "trials": trials, "answer_logprob": [], "replies": []}
            for _ in range(trials):
                numbers = [str(n) for n in rng.sample(range(1000, 10000), 1 + N_DISTRACTORS)]
                needle = tokenizer.encode(NEEDLE.format(answer=numbers[0]))
                ids, cell["needle_at"] = place(prefix, filler, needle, suffix, length, depth)
                if chat:
                    reply = greedy_reply(model, tokenizer, ids)
                    cell["hits"] += numbers[0] in reply
                    cell["replies"].append(reply)
                else:
                    scores = candidate_logprobs(model, ids, [tokenizer.encode(ANSWER.format(answer=n)) for n in numbers])
                    cell["hits"] += scores[0] > max(scores[1:])
                    cell["answer_logprob"].append(scores[0])
                bar.update(1)
            cell["retrieved"] = cell["hits"] / trials
            cells.append(cell)
    bar.close()
    return cells


def table(result):
    """Markdown: depths down, lengths across, the share of trials retrieved."""
    lengths, depths = result["lengths"], result["depths"]
    value = {(c["length"], c["depth"]): c["retrieved"] for c in result["cells"]}
    rows = ["| depth \\ length | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for d in depths:
        rows.append(f"| {d:.0%} | " + " | ".join(f"{value[(n, d)]:.0%}" for n in lengths) + " |")
    return "\n".join(rows)


def heat_map(result, path):
    """The depth x length grid as a PNG, each cell annotated with its share retrieved."""
    lengths, depths = result["lengths"], result["depths"]
    value = {(c["length"], c["depth"]): c["retrieved"] for c in result["cells"]}
    grid = [[value[(n, d)] for n in lengths] for d in depths]
    fig, ax = figure(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"needle in a haystack ({result['mode']}, {result['trials']} trials a cell)")
    fig.colorbar(image, ax=ax, label="retrieved")
    return save_figure(fig, path)
