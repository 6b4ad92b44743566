"""The optimizers (AdamW, or Muon on the blocks' matrices with AdamW on the rest), the
learning-rate schedules and the batch-size ramp-up.

Weight decay applies to matrices only: decaying norm gains (and, by the GPT-2 habit, nothing
else that is 1-D) pulls them toward zero for no benefit. With --optimizer=muon the attention and
FFN matrices of the blocks go to Muon (rodin/train/muon.py), embeddings, an untied output and gains stay
with AdamW, and one lr drives both (Moonlight's RMS-matching rule). Schedules and ramp-up are pure
functions of the step, so a resumed run needs nothing but the step to be on the same curve. AdamW
is fused on CUDA. InBackward steps each parameter inside backward so no full set of gradients
ever exists; its state_dict is that of the grouped optimizers, so checkpoints do not care which ran.
"""

import math

import torch

from rodin.train.muon import LR_RULE, VARIANTS, Muon

OPTIMIZERS = ("adamw", "muon")


def is_muon_matrix(name, p):
    """The matrices Muon orthogonalises: the 2-D weights of the blocks (attention and FFN)."""
    return name.startswith("layers.") and p.dim() == 2


def param_groups(model, weight_decay, muon_weight_decay=None, embedding_lr_scale=1.0, output_lr_scale=1.0,
                 lora_b_lr_scale=1.0):
    """AdamW's groups (decayed matrices, undecayed gains), then with muon_weight_decay set, a
    Muon group of the blocks' matrices, tagged {"optimizer": "muon"}. With an lr scale other than 1,
    each of AdamW's matrices is a group of its own with its "lr_scale" (the parameters' order is
    the same: checkpoints and publish.parameter_names number them alike). lora_b_lr_scale: the B
    matrices of LoRA's adapters (LoRA+, Hayou et al. 2024)."""
    use_muon = muon_weight_decay is not None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a tied matrix once
    to_muon = [p for n, p in named if use_muon and is_muon_matrix(n, p)]
    rest = [(n, p) for n, p in named if not (use_muon and is_muon_matrix(n, p))]
    matrices = [(n, p) for n, p in rest if p.dim() >= 2]
    scales = {"tok_embeddings.weight": embedding_lr_scale, "output.weight": output_lr_scale}

    def lr_scale(name):
        return lora_b_lr_scale if name.endswith(".lora.b") else scales.get(name, 1.0)

    if any(lr_scale(n) != 1.0 for n, _ in matrices):
        groups = [{"params": [p], "weight_decay": weight_decay, "lr_scale": lr_scale(n)} for n, p in matrices]
    else:
        groups = [{"params": [p for _, p in matrices], "weight_decay": weight_decay}]
    groups.append({"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0})
    if to_muon:
        groups.append({"params": to_muon, "weight_decay": muon_weight_decay, "optimizer": "muon"})
    return groups

def make_optimizer(model, lr, weight_decay, betas, fused=None, in_backward=False, muon=None, lr_scales=(1.0, 1.0, 1.0)):
    """AdamW over every parameter, or with muon={"momentum", "nesterov", "ns_steps", "weight_decay"}
    Muon over the blocks' matrices and AdamW over the rest. in_backward: each parameter stepped
    by its own optimizer as soon as its gradient is complete (InBackward). lr_scales: the token
    embeddings', an untied output's and LoRA's B matrices' lr, in multiples of lr (param_groups)."""
    groups = param_groups(model, weight_decay, muon["weight_decay"] if muon else None, *lr_scales)
    if fused is None:
        fused = all(p.is_cuda for group in groups for p in group["params"])
    adamw = dict(lr=lr, betas=betas, fused=fused or None)
    muon_kwargs = muon and dict(lr=lr, momentum=muon["momentum"], nesterov=muon["nesterov"], ns_steps=muon["ns_steps"],
                                adjust_lr_fn=LR_RULE, **{k: muon[k] for k in VARIANTS if k in muon})

    def build(group_list):
        if group_list and group_list[0].get("optimizer") == "muon":
            return Muon(group_list, **muon_kwargs)
        return torch.optim.AdamW(group_list, **adamw)

    if in_backward:
        return InBackward(groups, build)
    adamw_groups = [g for g in groups if g.get("optimizer") != "muon"]
    muon_groups = [g for g in groups if g.get("optimizer") == "muon"]
    if not muon_groups:
        return build(adamw_groups)
    return Optimizers([build(adamw_groups), build(muon_groups)])


def optimizer_for(model, cfg, fused=None):
    """The optimizer of a run config (TrainConfig): cfg.optimizer with its settings."""
    muon = None
    if cfg.optimizer == "muon":
        muon = {"momentum": cfg.muon_momentum, "nesterov": cfg.muon_nesterov, "ns_steps": cfg.muon_ns_steps,
                "weight_decay": cfg.muon_weight_decay, "orthogonalise": cfg.muon_orthogonalise,
                "normuon": cfg.muon_normuon, "cautious_weight_decay": cfg.muon_cautious_weight_decay}
    return make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=fused,
                          in_backward=cfg.optimizer_in_backward, muon=muon,
                          lr_scales=(cfg.embedding_lr_scale, cfg.output_lr_scale, cfg.lora_b_lr_scale))


def parts(optimizer):
    """The torch optimizers inside (what torch.distributed.checkpoint takes)."""
    return optimizer.parts if isinstance(optimizer, Optimizers) else [optimizer]


class Optimizers:
    """Several torch optimizers stepped as one: AdamW over some groups, Muon over others. Their
    param_groups and state_dict are those of one torch optimizer over all the groups in order,
    parameters numbered across them, so set_lr, checkpoints and clipping see one optimizer."""

    def __init__(self, optimizers):
        self.parts = list(optimizers)

    @property
    def param_groups(self):
        return [g for opt in self.parts for g in opt.param_groups]

    def step(self):
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state, groups, offset = {}, [], 0
        for opt in self.parts:
            saved = opt.state_dict()
            state.update({index + offset: s for index, s in saved["state"].items()})
            groups += [dict(g, params=[index + offset for index in g["params"]]) for g in saved["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the saved optimizer has {len(state_dict['param_groups'])} parameter groups, "
                             f"this one {len(self.param_groups)}")
        offset, first = 0, 0
        for opt in self.parts:
            n_groups, n_params = len(opt.param_groups), sum(len(g["params"]) for g in opt.param_groups)
            saved = state_dict["param_groups"][first : first + n_groups]
            opt.load_state_dict({
                "state": {i - offset: s for i, s in state_dict["state"].items() if offset <= i < offset + n_params},
                "param_groups": [dict(g, params=[i - offset for i in g["params"]]) for g in saved]})
            offset, first = offset + n_params, first + n_groups


class InBackward:
    """One optimizer per parameter (AdamW, or Muon for a Muon group's matrices), stepped by a
    post-accumulate-grad hook the moment that parameter's gradient is complete, which is then
    freed. Gradients cannot be accumulated over micro-batches nor clipped by their global norm
    (config.py refuses both). step() and zero_grad() are no-ops, so the training loop is the same
    as with the grouped optimizers, and state_dict is theirs: checkpoints do not care which ran."""

    def __init__(self, groups, build):
        self.groups = groups
        self.optimizers = {}
        for group in groups:
            for p in group["params"]:
                self.optimizers[p] = build([dict(group, params=[p])])
                p.register_post_accumulate_grad_hook(self._step)

    def _step(self, p):
        self.optimizers[p].step()
        p.grad = None

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass

    @property
    def param_groups(self):
        return [opt.param_groups[0] for opt in self.optimizers.values()]

    def state_dict(self):
        """The state_dict of the grouped optimizers over the same groups: params numbered in group order."""
        state, groups, index = {}, [], 0
        for group in self.groups:
            ids = []
            for p in group["params"]:
                per_param = self.optimizers[p].state_dict()
                if per_param["state"]:
                    state[index] = per_param["state"][0]
                ids.append(index)
                index += 1
            saved = self.optimizers[group["params"][0]].state_dict()["param_groups"][0] if group["params"] else {}
            groups.append(dict(saved, params=ids))
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        if len(state_dict["param_groups"]) != len(self.groups):
            raise ValueError(f"the saved optimizer has {len(state_dict['param_groups'])} parameter groups, "
                             f"this one {len(self.groups)}")
        for group, saved in zip(self.groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], saved["params"]):
                per_param = {0: state_dict["state"][index]} if index in state_dict["state"] else {}
                self.optimizers[p].load_state_dict({"state": per_param, "param_groups": [dict(saved, params=[0])]})


def lr_at(step, lr, min_lr, warmup_steps, max_steps, schedule="cosine", decay_steps=0):
    """Linear warmup from lr/warmup to lr, then down to min_lr at max_steps:
    cosine; wsd (stable at lr, then linear over the last decay_steps); linear; constant (stays at lr)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if step >= max_steps:
        return min_lr
    if schedule == "wsd":
        decay_start = max_steps - decay_steps
        return lr if step < decay_start else lr + (min_lr - lr) * (step - decay_start) / decay_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def batch_size_at(step, full, start=0, increment=0, rampup_steps=0):
    """Global batch (sequences) at a step: Megatron's/Lucie's ramp-up from start by increment in
    equal stages over rampup_steps, then full. start=0: full from the first step."""
    if not start or step >= rampup_steps:
        return full
    n_increments = (full - start) // increment
    return min(full, start + increment * (step * n_increments // rampup_steps))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def momentum_at(step, momentum, start, warmup_steps):
    """Muon's momentum at a step: linear from start to momentum over warmup_steps, then momentum."""
    if step >= warmup_steps:
        return momentum
    return start + (momentum - start) * step / warmup_steps


def set_momentum(optimizer, momentum):
    for group in optimizer.param_groups:
        if group.get("optimizer") == "muon":
            group["momentum"] = momentum
