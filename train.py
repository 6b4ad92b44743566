"""Pretrain a LLaMA on token shards, on one device or sharded over many.

    python train.py --preset=cpu-demo [--key=value ...] [--model.key=value ...]
    torchrun --nproc_per_node=8 train.py --preset=b200 --grad_accum_steps=2

Frozen decisions:
- bf16 autocast on GPU with fp32 master weights and no GradScaler (bf16 has fp32's range).
- Everything a run is lives in runs/<name>/: config.json, metrics.jsonl, loss.png, samples.md,
  checkpoints/. Relaunching the same command resumes from the newest complete checkpoint.
- The data cursor is two integers (epoch, index); LR and batch size are functions of the step:
  a resumed run is bit-identical to an uninterrupted one on CPU.
- SIGTERM/SIGINT/SIGUSR1 finish the current step, write a checkpoint and exit 0; under torchrun
  the ranks all-reduce the flag so they stop at the same step. World size > 1 means FSDP2 and
  torch.distributed.checkpoint; world size 1 means a plain module and safetensors.
- Under torchrun the model is built on the meta device and sharded before any rank allocates it;
  a new run's weights are those one process would draw, broadcast from rank 0 (rodin.train.distributed).
- The money a run spends is counted from each launch's start and carried in its checkpoints
  (rodin.train.budget); at --max_cost it checkpoints and exits 0, and a relaunch at that cap trains nothing.
"""

import dataclasses
import os
import sys

from rodin.config import config_to_dict, parse_args, save_config
from rodin.data.batches import TrainBatches, Windows, eval_batches, find_shards, held_out_sets
from rodin.data.tokenizer import copy_into_run, open_tokenizer
from rodin.spot.lifeline import Lifeline
from rodin.train import checkpoint, distributed, fp8, init_from, lora, preflight
from rodin.train.bits_per_byte import bytes_per_token, loss_to_bpb, token_byte_lengths
from rodin.train.budget import Budget
from rodin.train.device import autocast, peak_flops
from rodin.train.guard import DIVERGED, guard_for
from rodin.train.loop import evaluate, run_steps, sample_texts
from rodin.train.loss import make_loss_fn
from rodin.train.memory import accumulation_of_eval_batches, choose_batch
from rodin.train.optim import batch_size_at, optimizer_for
from rodin.train.runlog import RunLog

# what a new phase (--init_from) may change in the model: the context it is trained for
PHASE_MAY_CHANGE = ("max_seq_len", "rope_theta")


def check_resumable(ckpt_path, meta, cfg, tokenizer, global_batch):
    """Refuse to resume what would not continue the same run; returns a note when resharding."""
    if meta["config"]["model"] != dataclasses.asdict(cfg.model):
        raise ValueError(f"{ckpt_path}: trained with model {meta['config']['model']}, this run asks for "
                         f"{dataclasses.asdict(cfg.model)}; use another --name, or the same model settings")
    if meta["tokenizer"] != tokenizer.fingerprint:
        raise ValueError(f"{ckpt_path}: trained with tokenizer {meta['tokenizer']}, not {cfg.tokenizer} ({tokenizer.fingerprint})")
    checkpoint.check_optimizer(ckpt_path, meta, cfg.optimizer, f"resume with --optimizer={checkpoint.optimizer_name(meta)}, "
                               f"or start a new run from its weights: --init_from={ckpt_path} --init_optimizer=false")
    lora.check_same(ckpt_path, meta, cfg)
    return checkpoint.check_world_size(ckpt_path, meta, global_batch,
                                       new_run=f"--init_from={ckpt_path} --init_optimizer=false")


def check_phase_source(path, meta, cfg, tokenizer):
    saved = {k: v for k, v in meta["config"]["model"].items() if k not in PHASE_MAY_CHANGE}
    wanted = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in PHASE_MAY_CHANGE}
    if saved != wanted:
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise ValueError(f"{path}: a new phase may change only {', '.join(PHASE_MAY_CHANGE)} of the model, "
                         f"this run also changes {', '.join(changed)}")
    if meta["tokenizer"] != tokenizer.fingerprint:
        raise ValueError(f"{path}: trained with tokenizer {meta['tokenizer']}, not {cfg.tokenizer} ({tokenizer.fingerprint})")
    if cfg.init_optimizer == "true":
        checkpoint.check_optimizer(path, meta, cfg.optimizer, "take its weights alone with --init_optimizer=false, "
                                   f"or its optimizer state with --optimizer={checkpoint.optimizer_name(meta)}")


def takes_optimizer_state(cfg, from_hf):
    """--init_optimizer resolved to true or false: auto takes init_from's optimizer state where it
    has one (a rodin checkpoint trained fully); an HF model and new LoRA adapters have none."""
    fresh = from_hf or cfg.lora_rank
    if cfg.init_from and cfg.init_optimizer == "true" and fresh:
        source = f"{cfg.init_from} is a Hugging Face model and holds" if from_hf else "new LoRA adapters have"
        raise ValueError(f"--init_optimizer=true: {source} no optimizer state; drop it, or say --init_optimizer=false")
    wanted = cfg.init_optimizer == "true" or (cfg.init_optimizer == "auto" and not fresh)
    return "true" if cfg.init_from and wanted else "false"


def main(argv):
    cfg = parse_args(argv)
    with (distributed.process_group(cfg.device) as device,
          Lifeline(cfg, os.path.join(cfg.out_dir, cfg.name)) as lifeline):
        return train(cfg, device, lifeline)


def train(cfg, device, lifeline):
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    rank, world = distributed.rank(), distributed.world_size()
    budget = Budget(cfg.price_per_hour, cfg.max_cost, world)  # this launch's meter starts now
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    from_hf = init_from.is_hf(cfg.init_from)
    cfg = dataclasses.replace(cfg, init_optimizer=takes_optimizer_state(cfg, from_hf))
    if from_hf:  # the model shape and tokenizer are the HF model's
        cfg, _ = init_from.run_config(cfg)
    cfg, batch_choice = choose_batch(cfg, world, device)  # --global_batch, --micro_batch_size=auto
    if batch_choice:
        say(f"batch: {batch_choice}")
    # what the device cannot run stops here, before anything costs time or is written
    preflight.check(cfg, device, world, distributed.compiles(cfg, device))
    amp = autocast(device, cfg.dtype, cache=cfg.activation_checkpointing == "none")

    tokenizer = open_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"{cfg.tokenizer}: {tokenizer.vocab_size} pieces do not fit the model's vocab_size={cfg.model.vocab_size}")
    train_windows = Windows(find_shards(cfg.data_dir, "train"), cfg.seq_len, tokenizer.fingerprint)
    val_windows = Windows(find_shards(cfg.data_dir, "val"), cfg.seq_len, tokenizer.fingerprint)
    batches = TrainBatches(train_windows, cfg.micro_batch_size, cfg.seed, rank, world)
    per_micro_step = cfg.micro_batch_size * world  # sequences in one micro-step over all ranks
    full_batch = per_micro_step * cfg.grad_accum_steps
    if cfg.rampup_start and (cfg.rampup_start % per_micro_step or cfg.rampup_increment % per_micro_step
                             or not cfg.rampup_start < full_batch):
        raise ValueError(f"batch ramp-up: rampup_start={cfg.rampup_start} and rampup_increment={cfg.rampup_increment} must be "
                         f"multiples of micro_batch_size x world size = {per_micro_step}, and rampup_start below the "
                         f"global batch {full_batch}")

    restored = lifeline.restore()
    if restored:
        say(restored)
    diverged = lifeline.diverged_before(config_to_dict(cfg))  # the same options would diverge again
    if diverged:
        say(diverged)
        return DIVERGED
    ckpt = checkpoint.latest(run_dir)
    if ckpt is not None:
        meta = checkpoint.read_meta(ckpt)
        note = check_resumable(ckpt, meta, cfg, tokenizer, full_batch)
        budget.load_state_dict(meta.get("budget", {}))
        if budget.spent_before_launch():  # relaunched at the cap it stopped at
            lifeline.stopped("budget", meta["step"], cfg.max_steps - meta["step"], budget, outcome="no step trained")
            return 0
    # the initial weights are drawn only if no checkpoint overwrites them
    model = distributed.build_model(cfg, device, init_weights=ckpt is None and not cfg.init_from)
    optimizer = optimizer_for(model, cfg)
    loss_fn = make_loss_fn(cfg.loss_chunk)
    step, tokens_seen, origin = 0, 0, None
    if ckpt is not None:
        origin = meta.get("origin")
        if cfg.lora_rank:  # the checkpoint holds the adapters; their base comes from where it began
            checkpoint.load_base(origin, model, ckpt)
        step, tokens_seen = checkpoint.resume(ckpt, meta, model, optimizer, batches)
        say(f"resuming from {ckpt} (step {step}, {tokens_seen:,} tokens{', ' + note if note else ''})")
    elif from_hf:
        origin = init_from.start(cfg.init_from, model, is_main)
        say(f"continuing {cfg.init_from} (a Hugging Face Llama) with a fresh optimizer")
    elif cfg.init_from:
        source = checkpoint.resolve(cfg.init_from)
        meta = checkpoint.read_meta(source)
        check_phase_source(source, meta, cfg, tokenizer)
        checkpoint.load(source, model, optimizer if cfg.init_optimizer == "true" else None, restore_rng_state=False,
                        keep_hyperparams=True)
        if cfg.lora_rank and is_main:
            origin = checkpoint.base_origin(cfg.init_from, source)
        say(f"new phase from {source} (its step {meta['step']}, {meta['tokens_seen']:,} tokens), "
            f"{'with' if cfg.init_optimizer == 'true' else 'without'} its optimizer state")
    os.makedirs(run_dir, exist_ok=True)
    log = None
    if rank in lifeline.owners:  # every node's disk: rodin supervise reads max_steps there
        save_config(cfg, os.path.join(run_dir, "config.json"))
    if is_main:
        copy_into_run(tokenizer, run_dir)  # the run works without data/ (chat, export, eval, --init_from)
        if origin:
            init_from.write_origin(run_dir, origin)
        log = RunLog(run_dir, dict(config_to_dict(cfg), world_size=world), cfg.wandb, resume_step=step)

    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(device)
    say(f"model: {model.num_params():,} parameters | {full_batch * cfg.seq_len:,} tokens/step | "
        f"{world} x {device.type}{' (FSDP2)' if world > 1 else ''} | "
        f"{fp8.precision(cfg, device)} | {cfg.optimizer}")
    if cfg.lora_rank:
        say(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {lora.trainable_params(model):,} trainable parameters, the base frozen"
            f"{' but for the embeddings' if cfg.lora_train_embeddings else ''}")

    state = {"step": step, "tokens_seen": tokens_seen, "guard": guard_for(cfg, meta if ckpt is not None else None)}

    def save_checkpoint():
        meta = {"tokens_seen": state["tokens_seen"], "data": batches.state_dict(), "config": config_to_dict(cfg),
                "tokenizer": tokenizer.fingerprint, "world_size": world, "global_batch": full_batch,
                "budget": budget.state_dict(), "origin": origin, "lora": lora.settings(cfg),
                "guard": state["guard"] and state["guard"].state_dict()}
        path = checkpoint.save(run_dir, state["step"], model, optimizer, meta, cfg.keep_checkpoints, cfg.keep_every)
        lifeline.checkpointed(path, state["step"], **budget.figures(cfg.max_steps - state["step"]))
        return path

    # held-out windows of each source; they are fixed, so are their bytes per token: bpb = loss / (ln 2 * it)
    held_out = held_out_sets(val_windows, cfg.eval_batches * accumulation_of_eval_batches(cfg))
    byte_lengths = token_byte_lengths(tokenizer)
    tokens_and_bytes = {}
    for name, (windows, n_batches) in held_out.items():
        batches_ = list(eval_batches(windows, cfg.micro_batch_size * world, n_batches))  # what all ranks evaluate
        n_tokens = sum(targets.numel() for _, targets in batches_)
        tokens_and_bytes[name] = (n_tokens, n_tokens * bytes_per_token(batches_, byte_lengths))

    def run_eval():
        record, nats, n_bytes = {}, 0.0, 0.0
        for name, (windows, n_batches) in held_out.items():
            # each rank its share of the same held-out windows; evaluate weighs every rank's tokens
            mine = eval_batches(windows, cfg.micro_batch_size, n_batches, rank, world)
            val_loss = evaluate(model, mine, device, amp, loss_fn)
            n_tokens, bytes_ = tokens_and_bytes[name]
            nats, n_bytes = nats + val_loss * n_tokens, n_bytes + bytes_
            if name:
                record[f"val_loss/{name}"], record[f"val_bpb/{name}"] = val_loss, loss_to_bpb(val_loss, bytes_ / n_tokens)
        total_tokens = sum(n for n, _ in tokens_and_bytes.values())
        # over all sources: the mean loss per held-out token, and bits per held-out byte
        return {"val_loss": nats / total_tokens, "val_bpb": loss_to_bpb(nats / total_tokens, n_bytes / total_tokens), **record}

    def sample(step):
        samples = sample_texts(model, tokenizer, cfg.sample_tokens)  # all ranks: FSDP needs them in each forward
        if is_main:
            log.write_samples(step, samples)

    lifeline.send("start", step=step, max_steps=cfg.max_steps, world_size=world, **budget.figures(cfg.max_steps - step))
    loss, stopped = run_steps(
        cfg, state, model=model, optimizer=optimizer, next_batch=batches.next, device=device, amp=amp,
        loss_fn=loss_fn, run_eval=run_eval, save_checkpoint=save_checkpoint, log=log, notify=lifeline.send,
        sequences_at=lambda step: batch_size_at(step, full_batch, cfg.rampup_start, cfg.rampup_increment, cfg.rampup_steps),
        tokens_in=lambda batch: batch[0].numel(), budget=budget, flops_per_token=flops_per_token, peak=peak,
        sample=sample, status=lifeline.mirror_status, checkpoint_before=lifeline.checkpoint_before)
    step = state["step"]
    lifeline.wait_for_uploads()
    if stopped:
        lifeline.stopped(stopped, step, cfg.max_steps - step, budget, guard=state["guard"], config=config_to_dict(cfg))
        if is_main:
            log.finish()
        return DIVERGED if stopped == "diverged" else 0
    samples = sample_texts(model, tokenizer, cfg.sample_tokens)
    lifeline.send("finish", step=step, loss=loss, **budget.figures(0))
    if is_main:
        log.write_samples(step, samples)
        log.finish()
        val_loss = next((r["val_loss"] for r in reversed(log.records) if "val_loss" in r), float("nan"))
        print(f"done: step {step}, train loss {loss:.3f}, val loss {val_loss:.3f}")
        print("samples:")
        for text in samples:
            print(f"  {text}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
