"""rodin/train/checkpoint.py: atomic checkpoints; a partial one is never loaded."""

import os

import pytest
import torch

from rodin.config import MODELS
from rodin.model import LLaMA
from rodin.train import checkpoint
from rodin.train.optim import make_optimizer


def trained_pair(tied=True):
    torch.manual_seed(0)
    model = LLaMA(MODELS["test"].__class__(**{**MODELS["test"].__dict__, "tie_embeddings": tied}))
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    _, loss = model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))
    loss.backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("tied", [True, False])
def test_model_optimizer_and_rng_come_back_exactly(tmp_path, tied):
    model, optimizer = trained_pair(tied)
    rng_before = torch.get_rng_state()
    path = checkpoint.save(tmp_path, 5, model, optimizer, {"tokens_seen": 10}, keep=2)
    expected_next_random = torch.rand(3)
    fresh = LLaMA(model.cfg)
    fresh_opt = make_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95))
    meta = checkpoint.load(path, fresh, fresh_opt)
    assert meta["step"] == 5 and meta["tokens_seen"] == 10
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert (fresh.output.weight.data_ptr() == fresh.tok_embeddings.weight.data_ptr()) == tied
    for p, q in zip(model.parameters(), fresh.parameters()):
        a, b = optimizer.state[p], fresh_opt.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.rand(3), expected_next_random)
    assert not torch.equal(rng_before, torch.get_rng_state())


def test_only_the_newest_k_checkpoints_are_kept(tmp_path):
    model, optimizer = trained_pair()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model, optimizer, {}, keep=2)
    assert [os.path.basename(p) for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]


def test_partial_and_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path):
    model, optimizer = trained_pair()
    good = checkpoint.save(tmp_path, 1, model, optimizer, {}, keep=3)
    corrupt = checkpoint.save(tmp_path, 2, model, optimizer, {}, keep=3)
    with open(os.path.join(corrupt, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    os.makedirs(os.path.join(checkpoint.checkpoint_root(tmp_path), "step-0000003.tmp"))
    with pytest.warns(UserWarning) as caught:
        assert checkpoint.latest(tmp_path) == good
    messages = " ".join(str(w.message) for w in caught)
    assert "step-0000003.tmp" in messages and "step-0000002" in messages and "wrong size" in messages
