"""How much memory a training step takes, and the largest micro-batch that fits a device.

Frozen decisions:
- The step is train.py's own (rodin.train.loop.train_step with the run's optimizer, memory savers and
  bf16 autocast) run twice on fake tensors (FakeTensorMode: shapes, no data, no FLOPs), so the
  second step has the optimizer's state; torch's MemTracker adds up live storages, rounded to
  the CUDA allocator's 512 bytes, by kind. A CPU build of torch cannot fake CUDA tensors, so the
  fake tensors sit on the CPU with CPU autocast: the same casts, the same saved tensors.
- It counts tensors, not the allocator: fragmentation, the CUDA context and cuBLAS workspaces come
  on top, hence a margin (--memory_margin) when fitting a micro-batch, and on CUDA one real
  step of the chosen size before the run starts. Under FSDP2 weights, gradients and optimizer
  state are divided by the world size; activations and temporaries are whole on each rank.
- --micro_batch_size=auto keeps the global batch (--global_batch sequences) and so the data
  order: only the split into micro-batch x accumulation x ranks changes from card to card.
"""

import dataclasses
import math
import warnings

import torch

from rodin.train.device import memory_gib

GIB = 2**30
KINDS = {"Parameter": "params", "Gradient": "grads", "Optstate": "optimizer", "Activation": "activations", "Temp": "temporaries"}


def estimate(cfg):
    """GiB by kind at the peak of two training steps of cfg on one device, and the peak itself."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from rodin.model import LLaMA
    from rodin.train import activation_checkpoint, lora
    from rodin.train.device import autocast
    from rodin.train.loop import train_step
    from rodin.train.loss import make_loss_fn
    from rodin.train.optim import optimizer_for

    device = torch.device("cpu")
    # the peak of 2 accumulated micro-batches is that of any more: the gradients are whole from the second
    cfg = dataclasses.replace(cfg, grad_accum_steps=min(cfg.grad_accum_steps, 2))
    with FakeTensorMode():
        model = LLaMA(cfg.model)
        if cfg.lora_rank:  # as distributed.build_model on CUDA: the frozen base in bf16
            lora.apply(model, cfg.lora_rank, cfg.lora_alpha, lora.parse_targets(cfg.lora_targets), cfg.seed, torch.bfloat16,
                       embeddings=cfg.lora_train_embeddings)
        activation_checkpoint.apply(model, cfg.activation_checkpointing)
        optimizer = optimizer_for(model, cfg, fused=True)
        # ids are never read by a fake embedding: zeros are as good as a batch
        tokens = torch.zeros((cfg.micro_batch_size, cfg.seq_len), dtype=torch.long)
        amp = autocast(device, "bf16", cache=cfg.activation_checkpointing == "none")  # as train.py on a GPU
        tracker = MemTracker()
        tracker.track_external(model)
        for p in model.parameters():
            if not p.requires_grad:  # a LoRA base: torch 2.13's MemTracker would hook it for gradients and raise
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())

        def next_batch():
            tracker.reset_mod_stats()  # per-module figures are one forward's; the overall peak stays
            return tokens, tokens

        with tracker, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Expected a tensor")  # MemTracker meets checkpoint's None outputs
            for _ in range(2):
                train_step(model, optimizer, next_batch, cfg.grad_accum_steps, cfg.grad_clip, device, amp,
                           make_loss_fn(cfg.loss_chunk))
        snapshot = tracker.get_tracker_snapshot("peak")[device]
    figures = {name: snapshot.get(kind, 0) / GIB for kind, name in KINDS.items()}
    figures["peak"] = snapshot["Total"] / GIB
    return figures


class _NoHook:
    """Stands for the gradient hooks MemTracker installs on a parameter, for one that gets no gradient."""

    def remove(self):
        pass


def per_device_gib(figures, world_size):
    """One GPU's share under FSDP2: sharded weights, gradients and optimizer state, whole activations
    (the one or two blocks FSDP gathers at a time come on top)."""
    if world_size == 1:
        return figures["peak"]
    states = figures["params"] + figures["grads"] + figures["optimizer"]
    return states / world_size + figures["activations"] + figures["temporaries"]


def micro_batch_choices(cfg, world_size):
    """Micro-batch sizes that make the global batch (and every ramp-up stage) in whole
    accumulation steps on world_size ranks, largest first."""
    whole = math.gcd(cfg.global_batch, cfg.rampup_start, cfg.rampup_increment) if cfg.rampup_start else cfg.global_batch
    if whole % world_size:
        return []
    per_rank = whole // world_size
    if cfg.optimizer_in_backward:  # no accumulation: a step is one micro-batch on each rank
        return [per_rank]
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def with_micro_batch(cfg, micro_batch, world_size):
    return dataclasses.replace(cfg, micro_batch_size=micro_batch,
                               grad_accum_steps=cfg.global_batch // (micro_batch * world_size))


def fit_micro_batch(cfg, world_size, budget_gib, estimate_fn=estimate):
    """(largest micro-batch whose estimated step fits budget_gib on each rank, its GiB, the GiB of
    the next size up or None). Memory grows about linearly with the micro-batch, so two estimates
    place the answer and a few more confirm it: the largest that fits, the next one up does not."""
    choices = micro_batch_choices(cfg, world_size)
    cost = {}

    def gib(m):
        if m not in cost:
            cost[m] = per_device_gib(estimate_fn(with_micro_batch(cfg, m, world_size)), world_size)
        return cost[m]

    smallest = choices[-1]
    if gib(smallest) > budget_gib:
        raise ValueError(f"--micro_batch_size=auto: even a micro-batch of {smallest} needs {gib(smallest):.1f} GiB, more than "
                         f"the {budget_gib:.1f} GiB available; save memory with --activation_checkpointing=full, "
                         f"--optimizer_in_backward=true (one process) or more GPUs")
    i = len(choices) - 1
    if len(choices) > 1:
        second = choices[-2]
        slope = (gib(second) - gib(smallest)) / (second - smallest)
        guess = [m for m in choices if gib(smallest) + slope * (m - smallest) <= budget_gib]
        i = choices.index(guess[0]) if guess else i
    while gib(choices[i]) > budget_gib:  # the line overshot: smaller ones until one fits
        i += 1
    while i > 0 and gib(choices[i - 1]) <= budget_gib:  # the line undershot: larger ones while they fit
        i -= 1
    return choices[i], gib(choices[i]), (gib(choices[i - 1]) if i > 0 else None)


def resolve_batch(cfg, world_size, device, estimate_fn=estimate):
    """cfg with micro_batch_size and grad_accum_steps set from --global_batch (and, for
    --micro_batch_size=auto, the memory of the device), and a line saying what was chosen and why
    (None when nothing was derived). Bad combinations raise ValueError naming the option."""
    if not cfg.global_batch:
        if not cfg.micro_batch_size:
            raise ValueError("--micro_batch_size=auto needs the global batch: add --global_batch=SEQUENCES")
        return cfg, None
    if not cfg.micro_batch_size:
        if not micro_batch_choices(cfg, world_size):
            raise ValueError(f"--global_batch={cfg.global_batch}{ramp_note(cfg)} cannot be split over {world_size} processes "
                             f"in whole micro-batches; choose a multiple of {world_size}")
        capacity = cfg.memory_gib or memory_gib(device)
        budget = capacity * (1 - cfg.memory_margin)
        micro, need, bigger = fit_micro_batch(cfg, world_size, budget, estimate_fn)
        chosen = with_micro_batch(cfg, micro, world_size)
        why = (f"micro-batch {micro} x {chosen.grad_accum_steps} accumulation x {world_size} process(es) = global batch "
               f"{cfg.global_batch}: estimated {need:.2f} GiB a device, within {budget:.2f} GiB ({capacity:.2f} GiB "
               f"{'(--memory_gib)' if cfg.memory_gib else device.type} less a {cfg.memory_margin:.0%} margin)"
               + (f"; the next size up would need {bigger:.2f} GiB" if bigger is not None else ""))
        return chosen, why
    per_step = cfg.micro_batch_size * world_size
    if cfg.optimizer_in_backward and cfg.global_batch != per_step:
        raise ValueError(f"--global_batch={cfg.global_batch}: with --optimizer_in_backward a step is one micro-batch on each "
                         f"process (no accumulation), so --global_batch must be {per_step}")
    if cfg.global_batch % per_step:
        raise ValueError(f"--global_batch={cfg.global_batch} is not a whole number of micro-batches of "
                         f"{cfg.micro_batch_size} on {world_size} process(es); use --micro_batch_size=auto, or one that divides "
                         f"{cfg.global_batch // world_size if cfg.global_batch % world_size == 0 else cfg.global_batch}")
    chosen = with_micro_batch(cfg, cfg.micro_batch_size, world_size)
    return chosen, f"micro-batch {cfg.micro_batch_size} x {chosen.grad_accum_steps} accumulation x {world_size} process(es) = global batch {cfg.global_batch}"


def ramp_note(cfg):
    return f" (with ramp-up from {cfg.rampup_start} by {cfg.rampup_increment})" if cfg.rampup_start else ""


def trial_step(cfg, device):
    """One training step of cfg on a throwaway model with a batch of zeros (eager: compiling it
    would cost what the run compiles anyway, and eager holds at least as much)."""
    from rodin.train import distributed
    from rodin.train.device import autocast
    from rodin.train.loop import train_step
    from rodin.train.loss import make_loss_fn
    from rodin.train.optim import optimizer_for

    cfg = dataclasses.replace(cfg, compile="off")
    model = distributed.build_model(cfg, device, init_weights=False)
    optimizer = optimizer_for(model, cfg)
    tokens = torch.zeros((cfg.micro_batch_size, cfg.seq_len), dtype=torch.long, device=device)
    amp = autocast(device, cfg.dtype, cache=cfg.activation_checkpointing == "none")
    train_step(model, optimizer, lambda: (tokens, tokens), min(cfg.grad_accum_steps, 2), cfg.grad_clip, device, amp,
               make_loss_fn(cfg.loss_chunk))


def confirm_on_cuda(cfg, world_size, device, step=trial_step):
    """The micro-batch chosen from the estimate, checked on one CUDA process by a real step
    (step(cfg, device)): a smaller one is taken while it runs out of memory. Returns cfg, changed
    if needed, and a note or None. Under torchrun the estimate and its margin decide alone: a
    rank that ran out of memory mid-step would leave the others waiting in a collective."""
    if device.type != "cuda" or world_size > 1:
        return cfg, None
    for micro in [m for m in micro_batch_choices(cfg, world_size) if m <= cfg.micro_batch_size]:
        try:
            step(with_micro_batch(cfg, micro, world_size), device)
        except torch.cuda.OutOfMemoryError:
            continue
        finally:
            torch.cuda.empty_cache()
        note = None if micro == cfg.micro_batch_size else f"a real step ran out of memory at {cfg.micro_batch_size}: micro-batch {micro}"
        return with_micro_batch(cfg, micro, world_size), note
    raise ValueError("--micro_batch_size=auto: a real step runs out of memory even with a micro-batch of 1; "
                     "save memory with --activation_checkpointing=full or --optimizer_in_backward=true")


def choose_batch(cfg, world_size, device):
    """The run's micro-batch and accumulation (resolve_batch, then for --micro_batch_size=auto on
    one CUDA process the real step): (cfg, what to print, or None)."""
    auto = cfg.global_batch and not cfg.micro_batch_size
    cfg, why = resolve_batch(cfg, world_size, device)
    if auto:
        cfg, note = confirm_on_cuda(cfg, world_size, device)
        why = f"{why}; {note}" if note else why
    return cfg, why


def accumulation_of_eval_batches(cfg):
    """Micro-batches in one of the held-out set's --eval_batches: with --global_batch an evaluation
    batch is a global batch, so the held-out set is the same whatever micro-batch fits the card
    (without it, a batch of micro_batch_size x processes, as ever)."""
    return cfg.grad_accum_steps if cfg.global_batch else 1
