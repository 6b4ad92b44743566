"""Memory savers change memory, not results: chunked cross-entropy, activation checkpointing and
AdamW in backward give the losses of the plain path."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import train
from rodin.train.loss import chunked_cross_entropy


def test_chunked_cross_entropy_equals_cross_entropy_of_full_logits_in_value_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 10))
    targets[0, :4] = -100
    full = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    full.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = chunked_cross_entropy(hidden, weight, targets, chunk=7)  # 30 positions: 7+7+7+7+2
    chunked.backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(hidden.grad, expected[0])
    torch.testing.assert_close(weight.grad, expected[1])


def losses(demo_data, out_dir, *args):
    argv = ["--preset=test", f"--data_dir={demo_data['dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={out_dir}", "--name=run", "--max_steps=6", "--eval_every=3", "--grad_clip=0", *args]
    assert train.main(argv) == 0
    with open(os.path.join(out_dir, "run", "metrics.jsonl")) as f:
        return [r[k] for r in map(json.loads, f) for k in ("loss", "val_loss") if k in r]


@pytest.fixture(scope="module")
def plain_losses(demo_data, tmp_path_factory):
    return losses(demo_data, tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("saver", [
    ["--activation_checkpointing=full"],
    ["--activation_checkpointing=half"],
    ["--activation_checkpointing=ops"],
    ["--optimizer_in_backward=true"],
    ["--loss_chunk=48"],
    ["--activation_checkpointing=full", "--optimizer_in_backward=true", "--loss_chunk=48"],  # the 3090 preset's set
], ids=lambda s: "+".join(a.split("=")[0][2:] for a in s))
def test_memory_saver_gives_the_losses_of_the_plain_path(demo_data, tmp_path, plain_losses, saver):
    assert losses(demo_data, tmp_path, *saver) == pytest.approx(plain_losses, rel=1e-5)


def test_optimizer_in_backward_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="grad_accum_steps=1"):
        train.parse_args(["--preset=test", "--optimizer_in_backward=true", "--grad_accum_steps=2"])
    with pytest.raises(ValueError, match="grad_clip=0"):
        train.parse_args(["--preset=test", "--optimizer_in_backward=true"])


def test_under_bf16_autocast_recomputed_blocks_without_the_weight_cast_cache_give_the_plain_losses(demo_data, tmp_path):
    # as on a GPU: bf16 autocast, where recomputation also turns off autocast's cache of bf16 weights
    plain = losses(demo_data, tmp_path / "plain", "--dtype=bf16")
    recomputed = losses(demo_data, tmp_path / "recomputed", "--dtype=bf16", "--activation_checkpointing=full")
    assert recomputed == pytest.approx(plain, rel=1e-5)
