"""rodin/train/optim.py: schedules and batch ramp-up as functions of the step; AdamW stepped in backward."""

import dataclasses
import math

import pytest
import torch

from rodin.config import MODELS
from rodin.model import LLaMA
from rodin.train import checkpoint, lora
from rodin.train.optim import batch_size_at, lr_at, make_optimizer, momentum_at, set_lr, set_momentum


def curve(schedule, decay_steps=0):
    return [lr_at(s, 1.0, 0.1, 10, 100, schedule, decay_steps) for s in range(110)]


def test_every_schedule_warms_up_linearly_then_reaches_min_lr_at_max_steps():
    for schedule in ("cosine", "wsd", "linear"):
        lrs = curve(schedule, decay_steps=20)
        assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]), schedule
        assert lrs[10] == pytest.approx(1.0) and lrs[100] == lrs[109] == 0.1, schedule
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), f"{schedule} is not monotone after warmup"


def test_cosine_is_halfway_at_the_midpoint_and_linear_is_a_straight_line():
    assert curve("cosine")[55] == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert curve("linear")[55] == pytest.approx(1.0 - 0.9 * 45 / 90)


def test_warmup_stable_decay_is_flat_until_its_last_decay_steps():
    lrs = curve("wsd", decay_steps=20)
    assert set(lrs[10:80]) == {1.0}
    assert lrs[90] == pytest.approx(1.0 - 0.9 * 10 / 20)


def test_constant_stays_at_lr_after_warmup():
    assert set(curve("constant")[10:]) == {1.0}


def test_batch_ramp_up_follows_lucies_256_to_1024_by_64():
    sizes = [batch_size_at(s, 1024, 256, 64, 1200) for s in range(1300)]
    assert sizes[0] == 256 and sizes[1199] == 960 and sizes[1200:] == [1024] * 100
    assert sorted(set(sizes)) == list(range(256, 1025, 64))  # every stage, 100 steps each
    assert all(sizes.count(b) == 100 for b in range(256, 1024, 64))
    assert batch_size_at(0, 1024) == 1024


def tiny_model():
    torch.manual_seed(0)
    return LLaMA(MODELS["test"])


def test_adamw_in_backward_takes_the_steps_of_adamw():
    batch = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    plain, fused = tiny_model(), tiny_model()
    opt_plain = make_optimizer(plain, 1e-2, 0.1, (0.9, 0.95))
    make_optimizer(fused, 1e-2, 0.1, (0.9, 0.95), in_backward=True)  # its hooks hold it: it steps inside backward
    for _ in range(3):
        plain(*batch)[1].backward()
        opt_plain.step()
        opt_plain.zero_grad()
        fused(*batch)[1].backward()  # the step happens here
        assert all(p.grad is None for p in fused.parameters()), "gradients are freed as they are used"
    for (name, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_checkpoint_does_not_care_which_adamw_wrote_it(tmp_path):
    model = tiny_model()
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), in_backward=True)
    model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))[1].backward()
    path = checkpoint.save(tmp_path, 1, model, optimizer, {}, keep=2)
    fresh = tiny_model()
    grouped = make_optimizer(fresh, 1e-2, 0.1, (0.9, 0.95))
    checkpoint.load(path, fresh, grouped)
    for p, q in zip(model.parameters(), fresh.parameters()):
        a, b = optimizer.optimizers[p].state[p], grouped.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = make_optimizer(tiny_model(), 1e-2, 0.1, (0.9, 0.95), in_backward=True)
    again.load_state_dict(grouped.state_dict())
    assert again.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def muon_settings():
    return {"momentum": 0.9, "nesterov": True, "ns_steps": 5, "weight_decay": 0.1}


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_and_output_lr_scales_give_them_their_own_lr_in_the_same_parameter_order(tied):
    torch.manual_seed(0)
    model = LLaMA(dataclasses.replace(MODELS["test"], tie_embeddings=tied))
    plain = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), muon=muon_settings())
    scaled = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), muon=muon_settings(), lr_scales=(0.5, 1.0 if tied else 0.25))
    set_lr(scaled, 4e-3)
    lrs = {id(p): g["lr"] for g in scaled.param_groups for p in g["params"]}
    assert lrs[id(model.tok_embeddings.weight)] == pytest.approx(2e-3)
    assert lrs[id(model.output.weight)] == pytest.approx(2e-3 if tied else 1e-3)
    assert lrs[id(model.norm.weight)] == lrs[id(model.layers[0].attention.wq.weight)] == pytest.approx(4e-3)
    # checkpoints number the parameters across groups: the order must not depend on the scales
    order = [id(p) for g in plain.param_groups for p in g["params"]]
    assert order == [id(p) for g in scaled.param_groups for p in g["params"]]


def test_lora_plus_gives_the_adapters_b_matrices_their_own_lr():
    model = lora.apply(tiny_model(), rank=4, alpha=8, suffixes=lora.parse_targets("attn,ffn"), seed=0)
    optimizer = make_optimizer(model, 1e-2, 0.0, (0.9, 0.95), lr_scales=(1.0, 1.0, 16.0))
    set_lr(optimizer, 1e-3)
    lrs = {name: g["lr"] for name, p in model.named_parameters() for g in optimizer.param_groups
           if any(p is q for q in g["params"])}
    assert lrs and all(lr == pytest.approx(1.6e-2 if name.endswith(".lora.b") else 1e-3) for name, lr in lrs.items())


def test_muon_momentum_warms_up_linearly_then_stays_and_adamw_is_untouched():
    assert [momentum_at(s, 0.95, 0.85, 100) for s in (0, 50, 100, 500)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    optimizer = make_optimizer(tiny_model(), 1e-2, 0.1, (0.9, 0.95), muon=muon_settings())
    set_momentum(optimizer, 0.87)
    assert {g.get("momentum") for g in optimizer.param_groups} == {0.87, None}
    assert {g.get("betas") for g in optimizer.param_groups} == {(0.9, 0.95), None}
