"""Chat data for SFT: conversations in the `messages` JSONL format, read, checked, tokenized with
the ChatML loss mask (rodin.data.chatml), split, and laid out in rows of seq_len (input, target) pairs.

Frozen decisions:
- Held-out conversations are chosen by a hash of their content (rodin.data.text.is_validation), not
  by position, so the split survives reordering and appending.
- A row holds whole conversations, never part of one: packed several to a row with doc_ids
  (attention and RoPE positions restart at each conversation: nothing leaks between them), or
  one per row, padded. A conversation longer than seq_len + 1 tokens is skipped, or cut (truncate).
- Rows are packed once, in an order seeded by the run's seed; epochs then shuffle whole rows with
  rodin.data.batches.TrainBatches, so the data cursor is two integers exactly as in pretraining.
"""

import hashlib
import json
import os
import sys
import unicodedata

import numpy as np
import torch
from tqdm import tqdm

from rodin.data import chatml
from rodin.data.text import is_validation, open_text

IGNORE = -100  # the target of a position that is not trained (F.cross_entropy's ignore_index)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def read_conversations(source, split="train"):
    """Yields (where, messages) for each record of a local .jsonl[.gz] file or of a Hub dataset read
    with `datasets` (source then names the dataset, split its split). `where` is "file:line" or
    "dataset[split] row N", for messages. Content is NFC-normalised as all text in rodin."""
    if os.path.isfile(source):
        yield from _read_jsonl(source)
        return
    if source.endswith((".jsonl", ".json", ".gz")):
        raise FileNotFoundError(f"{source}: no such file")
    import datasets

    rows = datasets.load_dataset(source, split=split)
    if "messages" not in rows.column_names:
        raise ValueError(f"{source}[{split}]: no 'messages' column (columns: {', '.join(rows.column_names)}); "
                         "SFT reads the common messages format")
    for n, row in enumerate(rows, 1):
        yield f"{source}[{split}] row {n}", _normalise(row["messages"])


def _read_jsonl(path):
    n = 0
    with open_text(path) as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not JSON Lines ({e}); SFT reads one JSON object a line") from None
                if not isinstance(record, dict) or "messages" not in record:
                    raise ValueError(f"{path}:{n}: not a JSON object with a 'messages' list; "
                                     'expected {"messages": [{"role": ..., "content": ...}, ...]}')
                yield f"{path}:{n}", _normalise(record["messages"])
        except (UnicodeDecodeError, EOFError, OSError) as e:
            raise ValueError(f"{path}:{n + 1}: not UTF-8 JSON Lines ({e})") from None


def _normalise(messages):
    if not isinstance(messages, list):
        return messages  # chatml.validate says why
    return [dict(m, content=unicodedata.normalize("NFC", m["content"]))
            if isinstance(m, dict) and isinstance(m.get("content"), str) else m for m in messages]


def split_conversations(conversations, val_fraction):
    """(train, val) lists of (where, messages), split by a hash of each conversation."""
    train, val = [], []
    for where, messages in conversations:
        key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        (val if is_validation(key, val_fraction) else train).append((where, messages))
    return train, val


def is_trainable(messages):
    try:
        chatml.validate(messages)
        return True
    except ValueError:
        return False


def make_example(tokenizer, messages, max_tokens=None, truncate=False):
    """(inputs, targets) int arrays of one conversation: inputs are its ids but the last, targets
    the next id where that id is trained (assistant content and its <|im_end|>), else IGNORE.
    Raises ValueError with the reason when the conversation cannot be trained on."""
    chatml.validate(messages)
    ids, trained = chatml.encode(tokenizer, messages)
    if max_tokens is not None and len(ids) > max_tokens:
        if not truncate:
            raise ValueError(f"{len(ids)} tokens, more than seq_len + 1 = {max_tokens}")
        ids, trained = ids[:max_tokens], trained[:max_tokens]
        if not any(trained[1:]):
            raise ValueError(f"no assistant token within the first {max_tokens} tokens")
    ids, trained = np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)
    return ids[:-1], np.where(trained[1:], ids[1:], IGNORE)


def make_examples(tokenizer, conversations, max_tokens, truncate=False, progress=False, warn_skipped=True):
    """Examples of the conversations that can be trained on; the others get a one-line warning
    (warn_skipped=False: none, for the ranks of a torchrun other than 0, which read the same data)."""
    examples = []
    for where, messages in tqdm(conversations, desc="tokenize", unit="conv", disable=not progress, mininterval=1):
        try:
            examples.append(make_example(tokenizer, messages, max_tokens, truncate))
        except ValueError as e:
            if warn_skipped:
                warn(f"{where}: skipped: {e}")
    skipped = len(conversations) - len(examples)
    if skipped and warn_skipped:
        warn(f"{skipped} of {len(conversations)} conversations skipped")
    return examples


class Rows:
    """Examples laid out in rows of seq_len positions: inputs (pad_id where empty), targets (IGNORE
    where empty or untrained) and doc_ids (the example's number within its row, -1 where empty).
    pack=False puts one example per row. Answers len() and get(indices) as rodin.data.batches.Windows does,
    so TrainBatches and eval_batches serve it unchanged."""

    def __init__(self, examples, seq_len, pad_id, pack=True):
        self.seq_len, self.pack = seq_len, pack
        rows = []  # each a list of examples
        for example in examples:
            assert len(example[0]) <= seq_len, "make_examples keeps conversations within seq_len + 1 tokens"
            if pack and rows and sum(len(e[0]) for e in rows[-1]) + len(example[0]) <= seq_len:
                rows[-1].append(example)  # next-fit: simple, and order-preserving
            else:
                rows.append([example])
        # int32 halves the memory of a large set; batches are int64, as torch's embedding wants
        self.inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
        self.targets = np.full((len(rows), seq_len), IGNORE, dtype=np.int32)
        self.doc_ids = np.full((len(rows), seq_len), -1, dtype=np.int32)
        self.lengths = np.zeros(len(rows), dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for d, (inputs, targets) in enumerate(row):
                self.inputs[r, at : at + len(inputs)] = inputs
                self.targets[r, at : at + len(inputs)] = targets
                self.doc_ids[r, at : at + len(inputs)] = d
                at += len(inputs)
            self.lengths[r] = at
        self.n_examples = len(examples)

    def __len__(self):
        return len(self.inputs)

    def get(self, indices):
        """(inputs, targets, doc_ids) tensors of the rows, cut after the longest row's last token
        (the cut columns are padding, which causal attention never lets a real token see).
        doc_ids is None with one conversation per row: the causal mask is then enough."""
        indices = np.asarray(list(indices), dtype=np.int64)
        width = int(self.lengths[indices].max())
        inputs = torch.from_numpy(self.inputs[indices, :width]).long()
        targets = torch.from_numpy(self.targets[indices, :width]).long()
        doc_ids = torch.from_numpy(self.doc_ids[indices, :width]).long() if self.pack else None
        return inputs, targets, doc_ids

    def fill(self):
        """Fraction of the row positions that hold tokens."""
        return float(self.lengths.sum()) / max(1, self.inputs.size)

    def fingerprint(self):
        """Identifies the rows, so that a run resumes only on the data it started with."""
        h = hashlib.sha256()
        for array in (self.inputs, self.targets, self.doc_ids):
            h.update(array.tobytes())
        return h.hexdigest()[:16]


def shuffled(items, seed):
    """items in an order drawn from seed (a fixed permutation, independent of torch's RNG)."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]
