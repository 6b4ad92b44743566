"""Muon for matrices that FSDP2 shards: what torch.optim.Muon lacks, and nothing else.

Frozen decisions:
- On one process the step is torch.optim.Muon's own. rodin/train/optim.py gives Muon the blocks'
  matrices and AdamW the rest, and sets Moonlight's RMS-matching LR rule ("match_rms_adamw":
  lr x 0.2 x sqrt(max(rows, cols))), so one lr and one schedule drive both.
- Under FSDP2 a matrix is a DTensor whose rows are split over the ranks. Momentum is
  element-wise, so it stays on the shards (a DTensor, which DCP checkpoints like AdamW's moments).
  Newton–Schulz needs the whole matrix: matrix i is gathered on rank i % world, orthogonalised
  there by torch's own iteration, and each rank gets its rows back. Every rank does 1/world of
  the Newton–Schulz work, and each update is exactly what one process would compute from the
  same momentum. NorMuon's second moment is sharded as the matrix's rows (a wide matrix's, one
  value per column, is whole on every rank); what it sums across rows is all-reduced.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz  # torch's Muon, shared with its step

# Moonlight ("Muon is Scalable for LLM Training"): an update RMS of 0.2, AdamW's typical one, so
# AdamW's learning rate and weight decay carry over
LR_RULE = "match_rms_adamw"


# Polar Express (Amsel et al. 2025, arXiv:2505.16932): a quintic per iteration, each chosen for the
# spectrum the previous one leaves, as modded-nanogpt and nanochat use; the input is scaled by its
# Frobenius norm with a 2 % safety margin
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
VARIANTS = {"orthogonalise": "newton_schulz", "normuon": False, "cautious_weight_decay": False}


def polar_express(update, eps=1e-7):
    """update orthogonalised by Polar Express's five quintics, in bf16 as torch's Newton–Schulz."""
    x = update.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() * 1.02 + eps)
    for a, b, c in POLAR_EXPRESS:
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def orthogonalise(update, group):
    if group["orthogonalise"] == "polar_express":
        return polar_express(update, group["eps"])
    return _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])


def normuon(update, second_moment, shape=None, all_sum=None, beta2=0.95, eps=1e-10):
    """NorMuon (arXiv:2510.05491): each row (each column of a wide matrix) of the orthogonalised
    update divided by the running RMS of its entries, then the whole rescaled to its former norm,
    so the learning rate rule still holds. second_moment: one value per row (column), updated.
    Under FSDP2, update is this rank's rows of a matrix of `shape` and all_sum sums a tensor over
    the ranks in place: a row's RMS is on its rank, a column's and the norms are summed."""
    rows, cols = shape or update.shape
    u = update.float()
    square = u.square()
    if rows >= cols:
        mean_square = square.mean(dim=-1, keepdim=True)
    else:
        mean_square = square.sum(dim=-2, keepdim=True)
        mean_square = (all_sum(mean_square) if all_sum else mean_square) / rows
    second_moment.lerp_(mean_square, 1 - beta2)
    scaled = u * second_moment.clamp_min(eps).rsqrt()
    norms = torch.stack([square.sum(), scaled.square().sum()])
    norms = (all_sum(norms) if all_sum else norms).sqrt()
    return (scaled * (norms[0] / norms[1].clamp_min(eps))).to(update.dtype)


def second_moment_for(p):
    """NorMuon's state for matrix p: one value per row, or per column of a wide matrix. Under FSDP2 a
    DTensor, so that checkpoints reshard it: the rows sharded as p's, the columns on every rank."""
    rows, cols = p.shape
    shape = (rows, 1) if rows >= cols else (1, cols)
    if not isinstance(p, DTensor):
        return torch.zeros(shape, device=p.device)
    placement = Shard(0) if rows >= cols else Replicate()
    return distribute_tensor(torch.zeros(shape, device=p.to_local().device), p.device_mesh, [placement])


class Muon(torch.optim.Muon):
    """torch.optim.Muon that also steps matrices sharded by FSDP2 (see the module docstring), and
    the variants of VARIANTS (each off by default, kept by measurement: rodin/config.py)."""

    def __init__(self, params, orthogonalise="newton_schulz", normuon=False, cautious_weight_decay=False, **kwargs):
        super().__init__(params, **kwargs)
        variants = {"orthogonalise": orthogonalise, "normuon": normuon, "cautious_weight_decay": cautious_weight_decay}
        self.defaults.update(variants)
        for group in self.param_groups:
            for key, value in variants.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        plain = all(all(group.get(k, v) == v for k, v in VARIANTS.items()) for group in self.param_groups)
        if plain and not any(isinstance(p, DTensor) for p in params):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if any(isinstance(p, DTensor) for p in with_grad):
                self._step_sharded(group, with_grad)
            else:
                for p in with_grad:
                    self._step_one(group, p)
        return loss

    def _step_one(self, group, p):
        """One matrix on one process: torch's step, with the variants the group asks for."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, grad = state["momentum_buffer"], p.grad
        buf.lerp_(grad, 1 - group["momentum"])
        update = orthogonalise(grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf, group)
        if group["normuon"]:
            if "second_moment" not in state:
                state["second_moment"] = second_moment_for(p)
            update = normuon(update, state["second_moment"])
        decay = group["lr"] * group["weight_decay"]
        if group["cautious_weight_decay"]:  # decay only where the update pulls the weight toward zero too
            p.sub_(p * (update * p > 0) * decay)
        else:
            p.mul_(1 - decay)
        p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))

    def _step_sharded(self, group, params):
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)  # a DTensor, sharded as p
            buf, grad = state["momentum_buffer"].to_local(), p.grad.to_local()
            buf.lerp_(grad, 1 - group["momentum"])
            updates.append(grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        orthogonal = orthogonalise_sharded(updates, params, group)
        if group.get("normuon"):
            orthogonal = [self._normuon_sharded(p, update) for p, update in zip(params, orthogonal)]
        for p, update in zip(params, orthogonal):
            local = p.to_local()
            decay = group["lr"] * group["weight_decay"]
            if group.get("cautious_weight_decay"):  # element-wise: the same on a shard as on the whole
                local.sub_(local * (update * local > 0) * decay)
            else:
                local.mul_(1 - decay)
            local.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))

    def _normuon_sharded(self, p, update):
        """NorMuon on this rank's rows: two small all-reduces a matrix (its columns' sums of squares
        where it is wide, and its norms), a few scalars beside the gathers of Newton–Schulz."""
        state = self.state[p]
        if "second_moment" not in state:
            state["second_moment"] = second_moment_for(p)
        group = p.device_mesh.get_group()

        def all_sum(t):
            dist.all_reduce(t, group=group)
            return t

        return normuon(update, state["second_moment"].to_local(), p.shape, all_sum)


def orthogonalise_sharded(updates, params, settings):
    """The rows of this rank of each whole matrix orthogonalised: updates[i] is this rank's rows
    of a matrix sharded as params[i] (a DTensor sharded by rows over a 1-D mesh); settings: the
    Muon param group (its orthogonaliser, steps, eps)."""
    if not params:
        return []
    mesh = params[0].device_mesh
    if mesh.ndim != 1 or any(p.placements != (Shard(0),) for p in params):
        raise ValueError("Muon under FSDP2 expects each matrix sharded by rows over one mesh dimension "
                         "(rodin.train.distributed.shard); use --optimizer=adamw with another layout")
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    owner_of = [i % world for i in range(len(params))]
    # every shard padded to ceil(rows / world) rows: torch.chunk's split, which FSDP2 uses
    padded = [_pad_rows(u, math.ceil(p.shape[0] / world)) for u, p in zip(updates, params)]
    gathered, gathers = {}, []
    for i, shard in enumerate(padded):
        owner = owner_of[i]
        pieces = [torch.empty_like(shard) for _ in range(world)] if owner == rank else None
        gathers.append(dist.gather(shard, pieces, dst=dist.get_global_rank(group, owner), group=group, async_op=True))
        gathered[i] = pieces
    results, scatters = [], []
    for i, (update, p) in enumerate(zip(updates, params)):
        owner = owner_of[i]
        out = torch.empty_like(padded[i])
        pieces = None
        if owner == rank:
            gathers[i].wait()
            whole = torch.cat(gathered[i])[: p.shape[0]]
            orthogonal = orthogonalise(whole, settings).to(update.dtype)
            pieces = list(_pad_rows(orthogonal, len(padded[i]) * world).chunk(world))
        scatters.append(dist.scatter(out, pieces, src=dist.get_global_rank(group, owner), group=group, async_op=True))
        results.append(out[: len(update)])
    for work in gathers + scatters:
        work.wait()
    return results


def _pad_rows(x, rows):
    if len(x) == rows:
        return x.contiguous()
    padded = x.new_zeros((rows, *x.shape[1:]))
    padded[: len(x)] = x
    return padded
