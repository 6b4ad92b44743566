"""Bits per byte: held-out loss in a unit that does not depend on the tokenizer.

Frozen decisions:
- bpb = total nats / (ln 2 * total UTF-8 bytes of the target text). A tokenizer with longer pieces
  has a higher loss per token but the same bpb for the same model quality, so runs with different
  vocabularies compare.
- Bytes are counted from the pieces: a byte-fallback piece <0xNN> is 1 byte, '▁' is 1 space byte,
  control pieces (<s>, </s>, chat tokens) and <unk> are 0 bytes. Their nats still count: ending a
  document is part of the text's information.
"""

import math

import torch


def bits_per_byte(total_nats, total_bytes):
    if total_bytes <= 0:
        raise ValueError("bits per byte of no bytes: the targets hold no text")
    return total_nats / (math.log(2) * total_bytes)


def token_byte_lengths(tokenizer):
    """A (vocab_size,) tensor: how many UTF-8 bytes of text each id stands for."""
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for i in range(tokenizer.vocab_size):
        if tokenizer.is_byte(i):  # before is_special: a tokenizer.json may list its bytes as special
            lengths[i] = 1
        elif not tokenizer.is_special(i) and tokenizer.piece(i) is not None:
            lengths[i] = len(tokenizer.piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def target_bytes(targets, byte_lengths):
    """UTF-8 bytes of the text that the (non -100) targets spell."""
    kept = targets[targets != -100]
    return int(byte_lengths[kept].sum())


def bytes_per_token(batches, byte_lengths):
    """Mean bytes per target token over (inputs, targets) batches: turns a mean loss over the same
    batches into bpb with loss_to_bpb."""
    n_bytes, n_tokens = 0, 0
    for _, targets in batches:
        n_bytes += target_bytes(targets, byte_lengths)
        n_tokens += int((targets != -100).sum())
    return n_bytes / n_tokens if n_tokens else math.nan


def loss_to_bpb(mean_loss, bytes_per_token):
    """bpb from a mean loss in nats per token and the bytes per token of the same targets."""
    return mean_loss / (math.log(2) * bytes_per_token)
