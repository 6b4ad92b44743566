"""The training loop that pretraining (train.py) and SFT (sft.py) share: run_steps (schedule,
step, log, evaluate, checkpoint, stop at the same step on every rank), one optimizer step over
micro-batches, held-out evaluation, and the stop flag set by the signals a spot machine sends.

Every decision that ends a step (a signal, a checkpoint that the clock makes due, the budget) is
agreed in the step's one all-reduce: a signal counts on any rank, the clock and the money on rank 0.
"""

import math
import os
import signal
import time

import torch
from tqdm import tqdm

from rodin.train import checkpoint, distributed
from rodin.train.device import peak_memory_gib
from rodin.train.guard import finite_weights
from rodin.train.optim import lr_at, momentum_at, set_lr, set_momentum

clock = time.monotonic  # when a checkpoint falls due by the clock (rank 0's); the tests replace it


def to_device(batch, device, loss_fn=None):
    """A batch is (inputs, targets), or (inputs, targets, doc_ids) for packed SFT rows (doc_ids may
    be None). Returns inputs, targets and the forward's keyword arguments, on device; loss_fn is
    passed to the model (rodin/train/loss.py's chunked cross-entropy)."""
    inputs, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    doc_ids = batch[2] if len(batch) > 2 else None
    kwargs = {} if doc_ids is None else {"doc_ids": doc_ids.to(device, non_blocking=True)}
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    return inputs, targets, kwargs


def forward_backward(model, next_batch, grad_accum_steps, grad_clip, device, autocast, loss_fn=None, norm=False):
    """Forward/backward grad_accum_steps micro-batches and clip. Returns (mean loss, gradient norm)
    as tensors on the device (reading one waits for the GPU); the norm is 0 without clipping unless
    `norm` asks for it (the guard does)."""
    total = torch.zeros((), device=device)
    for _ in range(grad_accum_steps):
        inputs, targets, kwargs = to_device(next_batch(), device, loss_fn)
        with autocast:
            _, loss = model(inputs, targets, **kwargs)
        (loss / grad_accum_steps).backward()
        total += loss.detach()
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    elif norm:
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # none when stepped in backward
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    else:
        grad_norm = torch.tensor(0.0)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()  # FSDP2: a DTensor of per-shard partial norms
    return total / grad_accum_steps, grad_norm


def train_step(model, optimizer, next_batch, grad_accum_steps, grad_clip, device, autocast, loss_fn=None):
    """forward_backward, then the optimizer's step: (mean loss, grad norm), tensors on the device."""
    loss, grad_norm = forward_backward(model, next_batch, grad_accum_steps, grad_clip, device, autocast, loss_fn)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


# Only training steps run through compiled blocks. Held-out evaluation (no grad) and sampling (KV
# cache, no autocast, start_pos and length changing every token) would each compile graphs of their
# own, 3 more a run, for a small share of its time: they run eager (tests/train/test_compile.py).
@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def evaluate(model, batches, device, autocast, loss_fn=None):
    """Mean loss over the given batches (see to_device) of every rank, weighted by target tokens:
    under torchrun each rank passes its own share of the held-out data."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        inputs, targets, kwargs = to_device(batch, device, loss_fn)
        with autocast:
            _, loss = model(inputs, targets, **kwargs)
        n = int((targets != -100).sum())
        loss_sum += float(loss) * n
        count += n
    model.train(was_training)
    loss_sum, count = distributed.sum_over_ranks([loss_sum, count], device)
    return loss_sum / count if count else math.nan


class StopFlag:
    """Set by SIGTERM/SIGINT/SIGUSR1 while the loop runs (a context manager): the loop finishes its
    step, checkpoints and exits 0. The previous handlers come back at the end: a process forked
    later (a multiprocessing pool) must still die on SIGTERM, or Pool.terminate waits forever."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __bool__(self):
        return self.signal is not None


SAMPLE_PROMPTS = ("Le", "La vie est", "Il faut", "Les hommes")


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # see evaluate
def sample_texts(model, tokenizer, max_new_tokens, prompts=SAMPLE_PROMPTS, seed=0, temperature=0.8, top_k=50):
    """Continuations of fixed French prompts, from a seeded generator (the training RNG is untouched)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = []
    for prompt in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k,
                             stop_tokens=(tokenizer.eos_id,), generator=generator)
        texts.append(tokenizer.decode([i for i in out[1:] if i != tokenizer.eos_id]))
    model.train(was_training)
    return texts


def run_steps(cfg, state, **parts):
    """The step loop (steps below) with SIGTERM/SIGINT/SIGUSR1 turned into a clean stop while it runs."""
    with StopFlag() as stop:
        return steps(cfg, state, stop, **parts)


def steps(cfg, state, stop, *, model, optimizer, next_batch, device, amp, loss_fn, run_eval, save_checkpoint, log,
          sequences_at, tokens_in, budget, flops_per_token=None, peak=None, sample=None, notify=None, status=None,
          checkpoint_before=None):
    """The step loop that pretraining and SFT share: schedule, step, log, evaluate, checkpoint (every
    cfg.ckpt_every steps, every cfg.ckpt_every_minutes, at milestones), and stop at the same step on
    every rank when a signal arrives or the budget (a rodin.train.budget.Budget) is spent.

    state: a dict with "step", "tokens_seen" and "guard" (a rodin.train.guard.Guard, or None),
    advanced in place (save_checkpoint reads it).
    sequences_at(step): sequences per step over all ranks (a batch ramp-up changes it).
    tokens_in(batch): the tokens this rank's micro-batch counts for (summed over ranks each step).
    run_eval(): {"val_loss": …, …}. log: a RunLog, or None on ranks other than 0.
    sample(step): called every cfg.sample_every steps. notify(event, **fields): the webhook.
    status(): more figures for each logged record (the mirror's: rodin.spot.lifeline.Lifeline.mirror_status).
    checkpoint_before(step): the guard's rollback target, the path of the newest whole checkpoint
    before step on this rank's disk, or None (rodin.spot.lifeline.Lifeline.checkpoint_before; without
    it, the run directory's: checkpoint.newest_before).
    Returns (last loss, stop reason or None); the reason "budget" when the cap stopped the run,
    "diverged" when the guard did."""
    world = distributed.world_size()
    per_micro_step = cfg.micro_batch_size * world
    guard = state.get("guard")

    step_tokens = [0]  # this rank's, in the current step

    def counted_batch():
        batch = next_batch()
        step_tokens[0] += tokens_in(batch)
        return batch

    def go_back(loss, trouble=None):
        """roll_back, told to the webhook; True when the run must stop as diverged."""
        nonlocal saved_step
        record = roll_back(cfg, state, model, optimizer, device, sequences_at, log, loss, trouble, checkpoint_before)
        if record is not None and notify is not None:
            notify("rollback", **record)
        if record is None or guard.diverged():
            return True
        saved_step = state["step"]  # the step of the checkpoint it went back to
        bar.n = state["step"]
        bar.refresh()
        return False

    stopping = signalled = over_budget = diverged = False
    decides = distributed.rank() == 0  # the clock and the money are rank 0's
    if state["step"] == 0:
        record = {"step": 0, **run_eval(), "tokens_seen": 0}
        if log is not None:
            log.log(record)
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=cfg.name, unit="step",
               disable=not (cfg.tqdm and log is not None), dynamic_ncols=True)
    model.train()
    loss = float("nan")  # a relaunch of a finished run trains no step
    last_time, last_step, last_tokens = time.time(), state["step"], state["tokens_seen"]
    last_checkpoint = clock()
    saved_step = state["step"] if state["step"] > 0 else None  # a resumed run's step has its checkpoint
    budget.measure(state["step"])
    end = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    while state["step"] < end and not stopping:
        step = state["step"]
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule, cfg.decay_steps)
        lr *= guard.lr_factor(step) if guard else 1.0
        set_lr(optimizer, lr)
        if cfg.muon_momentum_warmup_steps:
            set_momentum(optimizer, momentum_at(step, cfg.muon_momentum, cfg.muon_momentum_start, cfg.muon_momentum_warmup_steps))
        sequences = sequences_at(step)
        step_tokens[0] = 0
        step_loss, grad_norm = forward_backward(model, counted_batch, sequences // per_micro_step, cfg.grad_clip, device,
                                                amp, loss_fn, norm=guard is not None)
        bad, this_loss = 0.0, 0.0
        if guard is not None:  # reading them waits for the step: the guard's one cost
            bad = float(not bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm)))
            this_loss = 0.0 if bad else float(step_loss)
        # one all-reduce a step: every rank's tokens, whether any rank got a stop signal or a
        # non-finite step, the loss, and rank 0's verdicts: a checkpoint is due by the clock, the budget is spent
        due = decides and 0 < cfg.ckpt_every_minutes <= (clock() - last_checkpoint) / 60
        tokens, stop_votes, due_votes, budget_votes, bad_votes, loss_sum = distributed.sum_over_ranks(
            [step_tokens[0], float(bool(stop)), float(due), float(decides and budget.exhausted()), bad, this_loss], device)
        verdict = guard.judge(step + 1, loss_sum / world, bad_votes == 0) if guard else "ok"
        if verdict == "skip" and cfg.optimizer_in_backward:
            verdict = "rollback"  # its update was applied during backward: only a rollback undoes it
        if verdict == "ok":
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["tokens_seen"] += int(tokens)
        step = state["step"] = step + 1
        signalled, over_budget = stop_votes > 0, budget_votes > 0
        stopping = signalled or over_budget  # so every rank stops at the same step
        bar.update(1)
        if verdict == "rollback":
            if go_back(loss_sum / world if bad_votes == 0 else None):
                stopping = diverged = True
            continue
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # the guard has the mean over ranks already; without it, one more all-reduce at logged steps
            loss = loss_sum / world if guard is not None else distributed.mean_over_ranks(float(step_loss), device)
            elapsed = time.time() - last_time
            tokens_per_s = (state["tokens_seen"] - last_tokens) / elapsed
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "batch_size": sequences,
                      "tokens_per_s": tokens_per_s, "tokens_seen": state["tokens_seen"],
                      "eta_s": (cfg.max_steps - step) * elapsed / max(step - last_step, 1),
                      "peak_mem_gib": peak_memory_gib(device), "time": time.time(), "elapsed_s": budget.seconds()}
            if guard is not None:
                record["skipped_steps"] = guard.skipped
                if verdict == "skip":  # its loss was not finite: recorded as skipped, not as a number
                    record["skipped"] = True
                    del record["loss"]
            if peak and flops_per_token:
                record["mfu"] = tokens_per_s * flops_per_token / (peak * world)
            budget.measure(step)
            record.update(budget.figures(cfg.max_steps - step))
            if status is not None:
                record.update(status())
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                record.update(run_eval())
            if log is not None:
                log.log(record)
                eta_min = int(record["eta_s"] // 60)
                bar.set_postfix(loss=f"{record.get('loss', math.nan):.3f}", tok_s=f"{tokens_per_s:,.0f}", mem=f"{record['peak_mem_gib']:.1f}G",
                                **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
                                eta=f"{eta_min // 60}h{eta_min % 60:02d}",
                                **({"spent": f"{record['cost']:.2f}"} if "cost" in record else {}),
                                **({"to_finish": f"{record['cost_to_finish']:.2f}"} if "cost_to_finish" in record else {}),
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}),
                                **({"skipped": guard.skipped} if guard is not None and guard.skipped else {}),
                                **({"mirror": f"down, {record['mirror_backlog']} queued"} if record.get("mirror_down") else {}))
                if "val_loss" in record:
                    log.plot()
            last_time, last_step, last_tokens = time.time(), step, state["tokens_seen"]
        if sample is not None and cfg.sample_every and step % cfg.sample_every == 0:
            sample(step)
        milestone = cfg.keep_every and step % cfg.keep_every == 0
        if step % cfg.ckpt_every == 0 or milestone or due_votes > 0 or step == end or stopping:
            if guard is not None and not guard.may_checkpoint():
                continue  # during a spike: the checkpoint to roll back to must predate it
            if guard is not None and distributed.sum_over_ranks([float(not finite_weights(model))], device)[0] > 0:
                if go_back(None, trouble=step):  # weights gone non-finite: never written, rolled back
                    stopping = diverged = True
                continue
            if state["step"] != saved_step:
                save_checkpoint()
                saved_step = state["step"]
            last_checkpoint = clock()
    bar.close()
    if diverged:
        return loss, "diverged"
    if over_budget and state["step"] < cfg.max_steps:
        return loss, "budget"
    if signalled or state["step"] < cfg.max_steps:
        return loss, stop.signal or ("stop on another rank" if signalled else "stop_at_step")
    return loss, None


def roll_back(cfg, state, model, optimizer, device, sequences_at, log, loss, trouble=None, checkpoint_before=None):
    """Back to the newest checkpoint that predates the guard's trouble (rank 0 picks it): weights,
    optimizer state, RNG, step and tokens seen come back, the data cursor does not, so the batches
    trained on since then are skipped. loss: the spike's, None when the trouble was not finite.
    Returns the guard's record of it, or None when no checkpoint predates the trouble."""
    guard = state["guard"]
    trouble = trouble or guard.trouble_since or state["step"]
    guard.trouble_since = guard.trouble_since or trouble
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    path = (checkpoint_before or (lambda step: checkpoint.newest_before(run_dir, step)))(trouble)
    if path is None:
        return None
    target = checkpoint.step_of(path)
    meta = checkpoint.load(path, model, optimizer)  # the data cursor stays where it is
    skipped = sum(sequences_at(s) for s in range(target, state["step"]))
    record = guard.rolled_back(state["step"], target, meta.get("guard"), loss, skipped)
    state["step"], state["tokens_seen"] = target, meta["tokens_seen"]
    if log is not None:
        log.rewind(target)
        log.log({"step": target, "rollback": record, "time": time.time()})
        what = f"loss {loss:.3g}" if loss is not None else "steps that were not finite"
        print(f"guard: {what} at step {record['from_step']}: rolled back to step {target}, "
              f"{skipped} sequences skipped, lr x {cfg.rollback_lr_factor:g} until step {record['from_step']}")
    return record
