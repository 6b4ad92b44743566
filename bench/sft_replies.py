"""Does the chat model answer the question it was asked? Held-out questions of an SFT run, scored.

    python bench/sft_replies.py runs/demo-sft            # the first 100 held-out questions
    python bench/sft_replies.py runs/demo-sft --n=300

Frozen decisions:
- The questions are the run's own held-out conversations (its config's data, seed and
  val_fraction, split as sft.py splits them), first user turn only, answered greedily as sft.py's
  samples are.
- The shipped SFT set asks about one word in « guillemets » per question (définition,
  étymologie); a reply "names the word" when it contains that word, case and accents ignored
  (the dictionary's own spellings drop accents, e.g. « Metaphysiologie »). Questions without a
  quoted word are not scored. The figure is the share of scored replies that name their word.
"""

import argparse
import json
import os
import re
import sys
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.results import report  # noqa: E402
from rodin.eval.chat import chat_reply, load_chat_model  # noqa: E402
from rodin.data.sft_rows import read_conversations, shuffled, split_conversations  # noqa: E402
from sft import held_out_prompts  # noqa: E402

QUOTED = re.compile(r"«\s*([^»]+?)\s*»")


def folded(text):
    """Lower case without accents: « Bétonnage » and « betonnage » are the same word."""
    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if not unicodedata.combining(c))


def asked_word(question):
    """The word in « » of a question, or None."""
    found = QUOTED.search(question)
    return found.group(1) if found else None


def names_word(reply, word):
    return folded(word) in folded(reply)


def run_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def held_out_questions(run_dir, n):
    """The first n held-out questions of the run's SFT data, split and cut as sft.py's samples."""
    saved = run_config(run_dir)
    conversations = shuffled(list(read_conversations(saved["data"], saved["data_split"])), saved["seed"])
    _, val_convs = split_conversations(conversations, saved["val_fraction"])
    return held_out_prompts(val_convs, n)


def score(run_dir, n=100, max_new_tokens=64, show=0):
    """{checkpoint, questions scored, names_the_word (share of scored replies that name their
    word), ends_with_im_end (share of replies)} of a run's first n held-out questions, answered
    greedily on the CPU; the first `show` replies are printed."""
    model, tokenizer, ckpt = load_chat_model(run_dir, "cpu")
    questions = held_out_questions(run_dir, n)
    if not questions:
        raise SystemExit(f"{run_dir}: no held-out question to answer")
    named = scored = stopped_count = 0
    for i, messages in enumerate(questions):
        question = messages[-1]["content"]
        with torch.no_grad():
            reply, stopped = chat_reply(model, tokenizer, messages, max_new_tokens, temperature=0)
        stopped_count += stopped
        word = asked_word(question)
        if word is not None:
            scored += 1
            named += names_word(reply, word)
        if i < show:
            print(f"{question} -> {reply}" + ("" if stopped else " [no <|im_end|>]"))  # as sft.py's samples
    if not scored:
        raise SystemExit(f"{run_dir}: no held-out question with a word in « »; nothing to score")
    return {"checkpoint": os.path.basename(ckpt), "questions": scored, "names_the_word": named / scored,
            "ends_with_im_end": stopped_count / len(questions)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/demo-sft")
    parser.add_argument("--n", type=int, default=100, help="held-out questions to answer")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--show", type=int, default=5, help="replies printed")
    parser.add_argument("--results", default=None, help="append the figures here instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    scores = score(args.run, args.n, args.max_new_tokens, args.show)
    saved = run_config(args.run)
    figures = {"run": os.path.basename(os.path.normpath(args.run)), "checkpoint": scores.pop("checkpoint"),
               **{key: saved[key] for key in ("optimizer", "lr", "max_steps")}, **scores}
    rate, scored = scores["names_the_word"], scores["questions"]
    print(f"{round(rate * scored)} of {scored} replies name the word asked about ({rate:.0%})")
    report("sft_replies", figures, args.results)
    return figures


if __name__ == "__main__":
    main()
