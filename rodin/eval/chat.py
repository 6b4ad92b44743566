"""Chat with a trained model from the terminal, streaming its reply token by token.

    rodin chat runs/demo-sft                      # interactive; /reset clears, Ctrl-D quits
    rodin chat runs/demo-sft --prompt="Que veut dire « ardu » ?"   # one reply, then exit

The prompt is the ChatML of rodin.data.chatml with the generation prompt; a reply ends at <|im_end|>
(or </s>, or max_new_tokens). Text is printed as soon as it is whole: a character split over
byte-fallback pieces waits for its last byte. Older turns are dropped when the context is full.
"""

import argparse
import sys

import torch

from rodin.data import chatml
from rodin.data.tokenizer import checkpoint_tokenizer
from rodin.train import checkpoint
from rodin.train.device import pick_device


def open_chat_tokenizer(ckpt, meta, tokenizer_path=None):
    """The tokenizer a checkpoint was trained with, refused unless it has the chat tokens."""
    tokenizer = checkpoint_tokenizer(ckpt, meta, tokenizer_path)
    if not tokenizer.has_chat_tokens:
        raise ValueError(f"{ckpt}: its tokenizer {tokenizer.path} has no <|im_start|>/<|im_end|> tokens, so chat "
                         "turns cannot be marked as single tokens; train a tokenizer with rodin's "
                         "data/train_tokenizer.py (it reserves them), then pretrain again")
    return tokenizer


def load_chat_model(path, device="cpu", tokenizer_path=None):
    """(model in eval mode, tokenizer, checkpoint path) of a run or checkpoint directory."""
    model, meta, ckpt = checkpoint.load_model(path, device)
    return model, open_chat_tokenizer(ckpt, meta, tokenizer_path), ckpt


class StreamDecoder:
    """Turns ids into text increments. A piece may be one byte of a multi-byte character (byte
    fallback), so the text of all ids so far is decoded and only a whole-character tail is let out."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives
        new, self.shown = text[len(self.shown):], text
        return new

    def flush(self):
        text = self.tokenizer.decode(self.ids)
        new, self.shown = text[len(self.shown):], text
        return new


def fit_context(tokenizer, messages, budget):
    """Prompt ids of the conversation, oldest non-system turns dropped until it fits budget tokens."""
    messages = list(messages)
    while True:
        ids, _ = chatml.encode(tokenizer, messages, add_generation_prompt=True)
        droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
        if len(ids) <= budget or not droppable:
            return ids
        del messages[droppable[0]]


@torch.no_grad()
def chat_reply(model, tokenizer, messages, max_new_tokens=200, temperature=0.7, top_k=50, top_p=None,
               generator=None, on_text=None):
    """The assistant's reply to messages: (text, stopped), stopped meaning it ended on <|im_end|>
    or </s> by itself. on_text, if given, receives the text as it is generated."""
    room = model.cfg.max_seq_len - min(max_new_tokens, model.cfg.max_seq_len // 2)
    prompt = fit_context(tokenizer, messages, room)
    if len(prompt) >= model.cfg.max_seq_len:
        raise ValueError(f"the message is longer than the model's context of {model.cfg.max_seq_len} tokens")
    decoder, stopped = StreamDecoder(tokenizer), False
    stop_tokens = (tokenizer.im_end_id, tokenizer.eos_id)
    for token_id in model.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 stop_tokens=stop_tokens, generator=generator):
        if token_id in stop_tokens:
            stopped = True
            break
        piece = decoder.add(token_id)
        if piece and on_text:
            on_text(piece)
    tail = decoder.flush()
    if tail and on_text:
        on_text(tail)
    return decoder.shown, stopped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="a system message opening the conversation")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help="default: the run directory's copy, else the path its config recorded")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    model, tokenizer, ckpt = load_chat_model(args.run, device, args.tokenizer)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed) if args.seed is not None else generator.seed()
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, generator=generator)
    opening = [{"role": "system", "content": args.system}] if args.system else []

    def show(text):
        print(text, end="", flush=True)

    if args.prompt is not None:
        _, stopped = chat_reply(model, tokenizer, opening + [{"role": "user", "content": args.prompt}],
                                on_text=show, **sampling)
        print()
        if not stopped:
            print(f"[no <|im_end|> within {args.max_new_tokens} tokens]", file=sys.stderr)
        return 0

    print(f"{ckpt}: {model.num_params():,} parameters, context {model.cfg.max_seq_len} tokens. "
          "/reset starts over, Ctrl-D quits.", file=sys.stderr)
    history = list(opening)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = list(opening)
            continue
        history.append({"role": "user", "content": line})
        text, _ = chat_reply(model, tokenizer, history, on_text=show, **sampling)
        print()
        history.append({"role": "assistant", "content": text.strip() or "…"})
