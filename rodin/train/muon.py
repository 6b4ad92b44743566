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
  same momentum.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz  # torch's Muon, shared with its step

# Moonlight ("Muon is Scalable for LLM Training"): an update RMS of 0.2, AdamW's typical one, so
# AdamW's learning rate and weight decay carry over
LR_RULE = "match_rms_adamw"


class Muon(torch.optim.Muon):
    """torch.optim.Muon that also steps matrices sharded by FSDP2 (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        if not any(isinstance(p, DTensor) for p in params):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_sharded(group, [p for p in group["params"] if p.grad is not None])
        return loss

    def _step_sharded(self, group, params):
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)  # a DTensor, sharded as p
            buf, grad = state["momentum_buffer"].to_local(), p.grad.to_local()
            buf.lerp_(grad, 1 - group["momentum"])
            updates.append(grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        orthogonal = orthogonalise_sharded(updates, params, group["ns_coefficients"], group["ns_steps"], group["eps"])
        for p, update in zip(params, orthogonal):
            local = p.to_local()
            local.mul_(1 - group["lr"] * group["weight_decay"])
            local.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))


def orthogonalise_sharded(updates, params, ns_coefficients, ns_steps, eps):
    """The rows of this rank of each whole matrix orthogonalised: updates[i] is this rank's rows
    of a matrix sharded as params[i] (a DTensor sharded by rows over a 1-D mesh)."""
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
            orthogonal = _zeropower_via_newtonschulz(whole, ns_coefficients, ns_steps, eps).to(update.dtype)
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
