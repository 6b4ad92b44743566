"""Muon (rodin/train/muon.py, rodin/train/optim.py): torch.optim.Muon's steps on the blocks' matrices and
AdamW's on the rest; the same steps inside backward, and on matrices sharded by FSDP2 over two
ranks, where each rank orthogonalises only its share of the matrices."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rodin.config import MODELS, parse_args
from rodin.model import LLaMA
from rodin.train import checkpoint
from rodin.train.optim import InBackward, Optimizers, make_optimizer, optimizer_for

MUON = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "weight_decay": 0.1}
BLOCK_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def tiny_model(tied=True):
    torch.manual_seed(0)
    return LLaMA(MODELS["test"].__class__(**{**MODELS["test"].__dict__, "tie_embeddings": tied}))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 512, (4, 16), generator=g), torch.randint(0, 512, (4, 16), generator=g)) for _ in range(n)]


def by_hand(model, lr):
    """What a user of torch.optim would write: Muon on the blocks' matrices, AdamW on the rest."""
    named = list(model.named_parameters())
    matrices = [p for n, p in named if n.startswith("layers.") and p.dim() == 2]
    rest = [p for n, p in named if not (n.startswith("layers.") and p.dim() == 2)]
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    return muon, adamw


def test_polar_express_orthogonalises_more_tightly_than_newton_schulz_in_as_many_steps():
    from torch.optim._muon import _zeropower_via_newtonschulz

    from rodin.train.muon import polar_express

    torch.manual_seed(0)
    for shape in ((64, 256), (256, 64)):
        g = torch.randn(shape)
        ours = torch.linalg.svdvals(polar_express(g).float())
        torchs = torch.linalg.svdvals(_zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float())
        assert 0.8 < ours.min() and ours.max() < 1.2  # every singular value near 1
        assert torchs.min() < 0.7  # torch's quintic leaves the small ones lower (by design, see its docstring)


def test_normuon_gives_every_row_the_same_rms_and_keeps_the_update_norm():
    from rodin.train.muon import normuon

    torch.manual_seed(0)
    update = torch.randn(32, 8) * torch.linspace(0.1, 3, 32)[:, None]  # rows of very different scale
    second_moment = torch.zeros(32, 1)
    out = normuon(update, second_moment)
    rms = out.square().mean(dim=1).sqrt()
    assert torch.allclose(rms, rms.mean().expand(32), rtol=1e-4)
    assert out.norm() == pytest.approx(update.norm().item(), rel=1e-5)
    assert torch.allclose(second_moment, 0.05 * update.square().mean(dim=1, keepdim=True))  # a running mean, beta2 0.95
    wide_state = torch.zeros(1, 32)
    assert normuon(update.T.contiguous(), wide_state).shape == (8, 32)  # a wide matrix: one value per column


def test_cautious_weight_decay_spares_the_weights_that_the_update_pushes_away_from_zero():
    from rodin.train.muon import Muon

    def stepped(cautious):
        p = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
        optimizer = Muon([p], lr=0.1, weight_decay=0.5, momentum=0.0, nesterov=False, adjust_lr_fn="match_rms_adamw",
                         cautious_weight_decay=cautious)
        p.grad = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # the update lowers every weight
        optimizer.step()
        return p.detach()

    plain, cautious = stepped(False), stepped(True)
    # where the weight is positive the update (same sign as the gradient) pulls it down as decay does:
    # both decay; where it is negative the update pushes it further from zero: only plain decays
    assert torch.equal(cautious[:, 0], plain[:, 0])
    assert (cautious[:, 1] < plain[:, 1]).all()  # more negative: no decay toward zero


@pytest.mark.parametrize("tied", [True, False])
def test_muon_steps_the_block_matrices_as_torch_muon_and_the_rest_as_adamw(tied):
    ours, theirs = tiny_model(tied), tiny_model(tied)
    optimizer = make_optimizer(ours, 1e-2, 0.1, (0.9, 0.95), muon=MUON)
    muon, adamw = by_hand(theirs, 1e-2)
    for inputs, targets in batches(3):
        ours(inputs, targets)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
        theirs(inputs, targets)[1].backward()
        muon.step(), adamw.step()
        muon.zero_grad(), adamw.zero_grad()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    muon_params = {id(p) for g in optimizer.param_groups if g.get("optimizer") == "muon" for p in g["params"]}
    for name, p in ours.named_parameters():
        assert (id(p) in muon_params) == (name.split(".")[-2] in BLOCK_MATRICES), name
    assert not tied or {len(g["params"]) for g in optimizer.param_groups[:2]} == {1, 5}  # embedding; 5 gains


def test_muon_lr_follows_the_schedule_and_carries_over_from_adamw_by_rms_matching():
    model = tiny_model()
    optimizer = make_optimizer(model, 3e-3, 0.1, (0.9, 0.95), muon=MUON)
    assert {g["lr"] for g in optimizer.param_groups} == {3e-3}
    assert {g["adjust_lr_fn"] for g in optimizer.param_groups if g.get("optimizer") == "muon"} == {"match_rms_adamw"}
    # Moonlight's rule: an orthogonal update of RMS 1/sqrt(max(A, B)) scaled to RMS 0.2 x lr, as AdamW's
    inputs, targets = batches(1)[0]
    before = model.layers[0].feed_forward.w1.weight.detach().clone()
    model(inputs, targets)[1].backward()
    optimizer.step()
    change = model.layers[0].feed_forward.w1.weight.detach() - before * (1 - 3e-3 * 0.1)
    rms = change.pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.2 * 3e-3, rel=0.35)  # Newton–Schulz's singular values sit in ~(0.7, 1.2)


def test_muon_in_backward_takes_the_steps_of_muon_and_its_checkpoint_is_the_grouped_ones(tmp_path):
    plain, hooked = tiny_model(), tiny_model()
    grouped = make_optimizer(plain, 1e-2, 0.1, (0.9, 0.95), muon=MUON)
    in_backward = make_optimizer(hooked, 1e-2, 0.1, (0.9, 0.95), muon=MUON, in_backward=True)
    assert isinstance(grouped, Optimizers) and isinstance(in_backward, InBackward)
    for inputs, targets in batches(3):
        plain(inputs, targets)[1].backward()
        grouped.step()
        grouped.zero_grad()
        hooked(inputs, targets)[1].backward()  # each matrix steps here, as its gradient completes
        assert all(p.grad is None for p in hooked.parameters())
    for (name, a), b in zip(plain.state_dict().items(), hooked.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # a checkpoint of either loads into the other
    path = checkpoint.save(tmp_path, 3, hooked, in_backward, {"config": {}}, keep=2)
    fresh = tiny_model()
    fresh_grouped = make_optimizer(fresh, 1e-2, 0.1, (0.9, 0.95), muon=MUON)
    checkpoint.load(path, fresh, fresh_grouped)
    saved, loaded = in_backward.state_dict(), fresh_grouped.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for index, state in saved["state"].items():
        assert state.keys() == loaded["state"][index].keys()
        assert all(torch.equal(state[k], loaded["state"][index][k]) for k in state)
    assert any("momentum_buffer" in s for s in loaded["state"].values())


def test_an_adamw_state_is_refused_by_a_muon_run_in_one_line(tmp_path):
    model = tiny_model()
    adamw = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    model(*batches(1)[0])[1].backward()
    adamw.step()
    path = checkpoint.save(tmp_path, 1, model, adamw, {"config": {}}, keep=2)
    muon = make_optimizer(tiny_model(), 1e-2, 0.1, (0.9, 0.95), muon=MUON)
    with pytest.raises(ValueError, match=r"optimizer.safetensors: not a state of this run's optimizer .*--init_optimizer=false"):
        checkpoint.load(path, tiny_model(), muon)


@pytest.mark.parametrize("argv,message", [
    (["--optimizer=sgd"], "--optimizer=sgd: choose adamw or muon"),
    (["--muon_momentum=1.5"], r"--muon_momentum=1.5: must be in \[0, 1\)"),
    (["--muon_ns_steps=0"], "--muon_ns_steps=0: must be between 1 and 99"),
    (["--muon_weight_decay=-1"], "--muon_weight_decay=-1.0: must be >= 0"),
])
def test_bad_optimizer_options_are_refused_naming_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(["--preset=test", *argv])


# ---- FSDP2 over two gloo ranks -------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_steps(rank, port, out_dir, n_steps, variant):
    """One rank: whole matrices orthogonalised (and NorMuon-normalised) from their shards; then the
    test model sharded by rodin.train.distributed and trained with Muon on this rank's half of each batch."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import rodin.train.muon
    from rodin.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    orthogonalised = []
    newton_schulz = rodin.train.muon._zeropower_via_newtonschulz

    def counting(update, *args):
        orthogonalised.append(tuple(update.shape))
        return newton_schulz(update, *args)

    rodin.train.muon._zeropower_via_newtonschulz = counting
    cfg = parse_args(["--preset=test", "--optimizer=muon", "--model.ffn_dim=150", *variant])  # 150 rows: uneven shards
    device = distributed.setup("cpu")
    model = distributed.build_model(cfg, device)
    mesh = model.tok_embeddings.weight.device_mesh
    torch.manual_seed(0)
    whole = [torch.randn(rows, 24) for rows in (7, 24, 50)]  # 7 rows over 2 ranks: 4 and 3
    sharded = [distribute_tensor(m, mesh, [Shard(0)]) for m in whole]
    plain = {"orthogonalise": "newton_schulz", "ns_coefficients": (3.4445, -4.7750, 2.0315), "ns_steps": 5, "eps": 1e-7}
    mine = rodin.train.muon.orthogonalise_sharded([m.to_local() for m in sharded], sharded, plain)
    normalised = []
    for _ in range(2):  # twice: the second step reads the second moment the first one wrote
        muon = rodin.train.muon.Muon([torch.nn.Parameter(m) for m in sharded], lr=0.1, normuon=True)
        normalised = [muon._normuon_sharded(p, m.to_local()) for p, m in zip(muon.param_groups[0]["params"], sharded)]
    orthogonalised.clear()
    optimizer = optimizer_for(model, cfg)
    losses = []
    for inputs, targets in batches(n_steps):
        half = slice(rank * 2, rank * 2 + 2)
        loss = model(inputs[half], targets[half])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(distributed.mean_over_ranks(loss.item(), device))
    momenta = {n: optimizer.parts[1].state[p]["momentum_buffer"].to_local()
               for n, p in model.named_parameters() if p in optimizer.parts[1].state}
    torch.save({"whole": whole, "mine": mine, "normalised": normalised, "losses": losses, "momenta": momenta, "orthogonalised": orthogonalised},
               os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.teardown()


@pytest.mark.parametrize("variant", [[], ["--muon_normuon=true"]], ids=["muon", "normuon"])
def test_muon_on_two_fsdp_ranks_steps_as_one_process_and_splits_the_newton_schulz_work(tmp_path, variant):
    from torch.optim._muon import _zeropower_via_newtonschulz

    from rodin.train.muon import normuon

    n_steps = 4
    mp.spawn(sharded_steps, args=(free_port(), str(tmp_path), n_steps, variant), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # a matrix's shards orthogonalised together are exactly the whole matrix orthogonalised
    for i, whole in enumerate(ranks[0]["whole"]):
        expected = _zeropower_via_newtonschulz(whole, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
        assert torch.equal(torch.cat([ranks[0]["mine"][i], ranks[1]["mine"][i]]), expected)
        # NorMuon on the shards, a row's RMS on its rank and a wide matrix's columns summed over the
        # ranks, is NorMuon on the whole matrix (float tolerance: the sums are taken in two halves)
        second_moment = torch.zeros((len(whole), 1) if len(whole) >= whole.size(1) else (1, whole.size(1)))
        expected = [normuon(whole, second_moment) for _ in range(2)][-1]
        torch.testing.assert_close(torch.cat([ranks[0]["normalised"][i], ranks[1]["normalised"][i]]), expected)

    cfg = parse_args(["--preset=test", "--optimizer=muon", "--model.ffn_dim=150", *variant])
    torch.manual_seed(cfg.seed)
    model = LLaMA(cfg.model)
    optimizer = optimizer_for(model, cfg)
    losses = []
    for inputs, targets in batches(n_steps):
        loss = model(inputs, targets)[1]  # the mean over 4 rows: the mean of the two ranks' means
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # float tolerance, a little wider than AdamW's 1e-5: Newton–Schulz runs in bf16, where the last
    # bits by which the sharded gradient reduction differs can flip a rounding
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-4)
    # the momentum stays sharded: each rank holds its rows of every matrix's buffer
    for name, p in model.named_parameters():
        if name.split(".")[-2] in BLOCK_MATRICES:
            whole = optimizer.parts[1].state[p]["momentum_buffer"]
            shards = [r["momenta"][name] for r in ranks]
            assert [len(m) for m in shards] == [len(c) for c in whole.chunk(2)], name
            assert (torch.cat(shards) - whole).norm() < 0.02 * whole.norm(), name
    # each matrix orthogonalised whole, once a step, on one rank: half of them on each
    n_matrices = cfg.model.n_layers * len(BLOCK_MATRICES)
    whole_shapes = sorted(tuple(p.shape) for n, p in model.named_parameters() if n.split(".")[-2] in BLOCK_MATRICES)
    assert sorted(ranks[0]["orthogonalised"] + ranks[1]["orthogonalised"]) == sorted(whole_shapes * n_steps)
    assert len(ranks[0]["orthogonalised"]) == len(ranks[1]["orthogonalised"]) == n_steps * n_matrices // 2
