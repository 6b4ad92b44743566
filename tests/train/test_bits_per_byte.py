"""rodin/train/bits_per_byte.py: bits per byte, computed by hand and from a real tokenizer."""

import math

import pytest
import torch
import torch.nn.functional as F

from rodin.data.tokenizer import JsonTokenizer, Tokenizer
from rodin.train.bits_per_byte import bits_per_byte, bytes_per_token, loss_to_bpb, target_bytes, token_byte_lengths


def test_bits_per_byte_by_hand():
    # two tokens predicted with p = 1/2 and p = 1/4: 1 + 2 = 3 bits, spelling 6 bytes -> 0.5 bit/byte
    nats = -math.log(0.5) - math.log(0.25)
    assert bits_per_byte(nats, 6) == pytest.approx(0.5)
    # the same through a mean loss per token and the mean bytes per token (3)
    assert loss_to_bpb(nats / 2, 3.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no bytes"):
        bits_per_byte(1.0, 0)


def test_piece_bytes_add_up_to_the_utf8_bytes_of_the_text(demo_data):
    tok = Tokenizer(demo_data["tokenizer"])
    lengths = token_byte_lengths(tok)
    # accents (2 bytes each), doubled spaces ('▁'), and a character only byte fallback can spell
    text = "À l'été,  « ça » coûte 12 € — 鳥"
    ids = tok.encode(text)
    assert any(tok.sp.is_byte(i) for i in ids), "the test needs a byte-fallback piece"
    assert target_bytes(torch.tensor(ids), lengths) == len(text.encode("utf-8"))
    # <s> and </s> spell no text; -100 targets are ignored
    assert lengths[tok.bos_id] == 0 and lengths[tok.eos_id] == 0
    targets = torch.tensor([[tok.bos_id, *ids, tok.eos_id, -100, -100]])
    assert target_bytes(targets, lengths) == len(text.encode("utf-8"))


def test_piece_bytes_of_a_tokenizer_json_add_up_too(lucie_like_tokenizer):
    tok = JsonTokenizer(lucie_like_tokenizer)  # a "▁" before the text, byte pieces outside the special tokens
    text = "À l'été,  « ça » coûte 12 € — 鳥"
    ids = tok.encode(text)
    assert any(tok.is_byte(i) for i in ids) and tok.piece(ids[0]).startswith("\u2581")
    assert target_bytes(torch.tensor(ids), token_byte_lengths(tok)) == len((" " + text).encode("utf-8"))


def test_uniform_model_scores_log2_vocab_bits_per_token(demo_data):
    tok = Tokenizer(demo_data["tokenizer"])
    lengths = token_byte_lengths(tok)
    text = "Les hommes sont comme les plantes, qui ne croissent jamais heureusement si elles ne sont bien cultivées"
    targets = torch.tensor([tok.encode(text)])
    logits = torch.zeros(1, targets.size(1), tok.vocab_size)  # every id equally likely
    loss = float(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    bpb = loss_to_bpb(loss, bytes_per_token([(None, targets)], lengths))
    by_hand = targets.numel() * math.log2(tok.vocab_size) / len(text.encode("utf-8"))
    assert bpb == pytest.approx(by_hand, rel=1e-6)
