"""Fine-tune a pretrained checkpoint into a chat model (full fine-tune or LoRA, ChatML).

    python sft.py --preset=cpu-demo --init_from=runs/demo --data=data/littre-sft.jsonl.gz [--key=value ...]
    torchrun --nproc_per_node=8 sft.py --preset=gpu-demo --init_from=runs/lucie-7b --data=... [--key=value ...]

Frozen decisions:
- The model shape and tokenizer are the init_from checkpoint's, or those of a Hugging Face Llama
  (a directory or hf:ORG/NAME[@revision], rodin.train.init_from); only its weights are taken (a
  fresh optimizer). An HF model's tokenizer without <|im_start|>/<|im_end|> gets both, its
  embedding (and untied output) rows grown and set to the mean of the others; a rodin run's is refused.
- The loss covers assistant tokens only, their <|im_end|> included; conversations are packed
  with document masking (--pack=false: one per row, padded) and never split across rows.
- The run directory is a pretraining run's (config.json, metrics.jsonl, loss.png, samples.md,
  checkpoints/); relaunching resumes from its own newest checkpoint, bit-identically on CPU,
  and SIGTERM/SIGINT/SIGUSR1 checkpoint and exit 0. The step-0 val_loss is the "before".
- --lora_rank=R trains low-rank adapters over the frozen base instead (rodin.train.lora), and the
  embedding (untied: and output) rows of <|im_start|> and <|im_end|> (--lora_chat_rows): checkpoints
  hold the adapters and those rows' deltas and name their base; export merges them.
- Under torchrun it is train.py's FSDP2: every rank reads and packs the same rows and takes its
  slice of each global batch; the model is built sharded and init_from is loaded into the shards.
"""

import dataclasses
import os
import sys

import torch

from rodin.config import SFT_PRESETS, config_to_dict, parse_args, save_config
from rodin.data.batches import TrainBatches, eval_batches
from rodin.data.sft_rows import Rows, is_trainable, make_examples, read_conversations, shuffled, split_conversations
from rodin.data.tokenizer import copy_into_run
from rodin.eval.chat import chat_reply, open_chat_tokenizer
from rodin.model import ModelConfig
from rodin.spot.lifeline import Lifeline
from rodin.train import checkpoint, distributed, fp8, init_from, lora, preflight
from rodin.train.budget import Budget
from rodin.train.device import autocast, peak_flops
from rodin.train.guard import DIVERGED, guard_for
from rodin.train.loop import evaluate, run_steps
from rodin.train.loss import make_loss_fn
from rodin.train.memory import accumulation_of_eval_batches, choose_batch
from rodin.train.optim import optimizer_for
from rodin.train.runlog import RunLog

N_SAMPLES = 3  # held-out questions answered in samples.md at the end


def refuse_pretraining_only_options(cfg):
    """Options of TrainConfig that sft.py does not implement yet: refused, never silently ignored."""
    unsupported = {"rampup_start": 0}
    set_ = [f"--{k}" for k, default in unsupported.items() if getattr(cfg, k) != default]
    if cfg.init_optimizer not in ("auto", "false"):  # a fine-tune takes the weights alone
        set_.append(f"--init_optimizer={cfg.init_optimizer}")
    if set_:
        raise ValueError(f"sft.py does not support {', '.join(set_)} yet (train.py does); drop them")


def main(argv):
    if any(a.startswith("--model") for a in argv):
        raise ValueError("sft.py takes the model shape from --init_from; --model options do not apply")
    cfg = parse_args(argv, presets=SFT_PRESETS)
    refuse_pretraining_only_options(cfg)
    with (distributed.process_group(cfg.device) as device,
          Lifeline(cfg, os.path.join(cfg.out_dir, cfg.name)) as lifeline):
        return finetune(cfg, device, lifeline)


def finetune(cfg, device, lifeline):
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    rank, world = distributed.rank(), distributed.world_size()
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    budget = Budget(cfg.price_per_hour, cfg.max_cost, world)  # this launch's meter starts now
    restored = lifeline.restore()
    if restored:
        say(restored)
    diverged = lifeline.diverged_before(config_to_dict(cfg))  # the same options would diverge again
    if diverged:
        say(diverged)
        return DIVERGED
    # a run that has a checkpoint resumes from it and no longer needs init_from
    ckpt = checkpoint.latest(run_dir)
    from_hf = ckpt is None and init_from.is_hf(cfg.init_from)
    new_ids = ()  # ids of tokens added to an HF model's tokenizer
    if from_hf:
        # the run's config.json then names the model and tokenizer it holds, as a pretraining run's does
        source, init_ckpt = cfg.init_from, cfg.init_from
        cfg, tokenizer = init_from.run_config(cfg)
        if not tokenizer.has_chat_tokens:  # ChatML's two tokens added, their rows the mean of the others
            cfg, tokenizer, new_ids = init_from.add_chat_tokens(cfg, tokenizer, run_dir)
            say(f"{tokenizer.path}: <|im_start|> <|im_end|> added as ids {new_ids[0]} and {new_ids[1]}, "
                "their embedding rows the mean of the others")
    else:
        if ckpt is None:
            init_ckpt = checkpoint.resolve(cfg.init_from)
            if os.path.abspath(init_ckpt).startswith(os.path.abspath(run_dir) + os.sep):
                raise ValueError(f"--init_from={cfg.init_from} is this run's own directory; fine-tune into another --name")
        source = ckpt or init_ckpt
        source_meta = checkpoint.read_meta(source)
        init_ckpt = source_meta["init_from"] if ckpt else init_ckpt
        tokenizer = open_chat_tokenizer(source, source_meta, cfg.tokenizer or None)
        cfg = dataclasses.replace(cfg, model=ModelConfig(**source_meta["config"]["model"]), tokenizer=tokenizer.path)
    if cfg.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"--seq_len={cfg.seq_len} exceeds the max_seq_len={cfg.model.max_seq_len} of {source}")
    cfg, batch_choice = choose_batch(cfg, world, device)  # --global_batch, --micro_batch_size=auto
    if batch_choice:
        say(f"batch: {batch_choice}")
    # what the device cannot run stops here, before anything costs time or is written
    preflight.check(cfg, device, world, distributed.compiles(cfg, device))
    amp = autocast(device, cfg.dtype, cache=cfg.activation_checkpointing == "none")

    # every rank reads and packs the same rows (the same data, tokenizer and seed), then takes its slice
    conversations = shuffled(list(read_conversations(cfg.data, cfg.data_split)), cfg.seed)
    train_convs, val_convs = split_conversations(conversations, cfg.val_fraction)
    if not val_convs:
        raise ValueError(f"{cfg.data}: no held-out conversation with val_fraction={cfg.val_fraction}; raise it")
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id  # fills rows; never a target
    train_rows = Rows(make_examples(tokenizer, train_convs, cfg.seq_len + 1, cfg.truncate, progress=cfg.tqdm and is_main,
                                    warn_skipped=is_main), cfg.seq_len, pad_id, cfg.pack)
    val_rows = Rows(make_examples(tokenizer, val_convs, cfg.seq_len + 1, cfg.truncate, warn_skipped=is_main),
                    cfg.seq_len, pad_id, cfg.pack)
    if not len(train_rows) or not len(val_rows):
        raise ValueError(f"{cfg.data}: no trainable conversation left in the {'train' if not len(train_rows) else 'val'} split")
    if len(val_rows) < world:
        raise ValueError(f"{cfg.data}: {len(val_rows)} held-out rows for {world} processes; raise --val_fraction")
    batches = TrainBatches(train_rows, cfg.micro_batch_size, cfg.seed, rank, world)
    global_batch = cfg.micro_batch_size * cfg.grad_accum_steps * world
    say(f"data: {train_rows.n_examples:,} train / {val_rows.n_examples:,} held-out conversations in "
        f"{len(train_rows):,} rows of {cfg.seq_len} ({train_rows.fill():.0%} filled, {'packed' if cfg.pack else 'padded'})")

    row_ids = lora_rows(cfg, tokenizer)  # embedding rows trained with the adapters
    note = None
    if ckpt is not None:
        meta = checkpoint.read_meta(ckpt)
        note = check_resumable(ckpt, meta, cfg, tokenizer, train_rows, global_batch, row_ids)
        budget.load_state_dict(meta.get("budget", {}))
        if budget.spent_before_launch():  # relaunched at the cap it stopped at
            lifeline.stopped("budget", meta["step"], cfg.max_steps - meta["step"], budget, outcome="no step trained")
            return 0
    # no initial weights to draw: init_from or the run's own checkpoint is loaded into the model
    # rows are cut after the longest row of each batch: their length varies (compiled as dynamic)
    model = distributed.build_model(cfg, device, init_weights=False, varying_length=True, lora_rows=row_ids)
    optimizer = optimizer_for(model, cfg)
    loss_fn = make_loss_fn(cfg.loss_chunk, lora.output_rows(model))
    step, tokens_seen, origin = 0, 0, None
    if ckpt is not None:
        origin = meta.get("origin")
        if cfg.lora_rank:  # the checkpoint holds the adapters; their base comes from where it began
            checkpoint.load_base(origin, model, ckpt)
        step, tokens_seen = checkpoint.resume(ckpt, meta, model, optimizer, batches)
        say(f"resuming from {ckpt} (step {step}, {tokens_seen:,} tokens{', ' + note if note else ''})")
    elif from_hf:
        origin = init_from.start(cfg.init_from, model, is_main, new_ids)
        say(f"fine-tuning {cfg.init_from} (a Hugging Face Llama)")
    else:
        checkpoint.load(init_ckpt, model, restore_rng_state=False)
        if cfg.lora_rank and is_main:
            origin = checkpoint.base_origin(cfg.init_from, init_ckpt)
        say(f"fine-tuning {init_ckpt}")
    os.makedirs(run_dir, exist_ok=True)
    log = None
    if rank in lifeline.owners:  # every node's disk: rodin supervise reads max_steps there
        save_config(cfg, os.path.join(run_dir, "config.json"))
    if is_main:
        copy_into_run(tokenizer, run_dir)  # the run works without data/ (chat, export, eval, --init_from)
        if origin:
            init_from.write_origin(run_dir, origin)
        log = RunLog(run_dir, dict(config_to_dict(cfg), world_size=world), cfg.wandb, resume_step=step)
    say(f"model: {model.num_params():,} parameters | {world} x {device.type}{' (FSDP2)' if world > 1 else ''} | "
        f"{fp8.precision(cfg, device)} | {cfg.optimizer}")
    if cfg.lora_rank:
        say(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {lora.trainable_params(model):,} trainable parameters, the base frozen"
            f"{' but for the embeddings' if cfg.lora_train_embeddings else ''}")

    state = {"step": step, "tokens_seen": tokens_seen, "guard": guard_for(cfg, meta if ckpt is not None else None)}

    def save_checkpoint():
        meta = {"tokens_seen": state["tokens_seen"], "data": batches.state_dict(), "data_fingerprint": train_rows.fingerprint(),
                "config": config_to_dict(cfg), "tokenizer": tokenizer.fingerprint, "init_from": init_ckpt, "origin": origin, "lora": lora.settings(cfg, row_ids), "world_size": world,
                "global_batch": global_batch, "budget": budget.state_dict(),
                "guard": state["guard"] and state["guard"].state_dict()}
        path = checkpoint.save(run_dir, state["step"], model, optimizer, meta, cfg.keep_checkpoints, cfg.keep_every)
        lifeline.checkpointed(path, state["step"], **budget.figures(cfg.max_steps - state["step"]))
        return path

    def run_eval():
        # each rank its share of the same held-out rows; evaluate weighs every rank's tokens
        mine = eval_batches(val_rows, cfg.micro_batch_size, cfg.eval_batches * accumulation_of_eval_batches(cfg), rank, world)
        return {"val_loss": evaluate(model, mine, device, amp, loss_fn)}

    lifeline.send("start", step=step, max_steps=cfg.max_steps, world_size=world, **budget.figures(cfg.max_steps - step))
    loss, stopped = run_steps(
        cfg, state, model=model, optimizer=optimizer, next_batch=batches.next, device=device, amp=amp, loss_fn=loss_fn,
        run_eval=run_eval, save_checkpoint=save_checkpoint, log=log, notify=lifeline.send, status=lifeline.mirror_status, checkpoint_before=lifeline.checkpoint_before,
        sequences_at=lambda step: global_batch,
        tokens_in=lambda batch: int((batch[0] != pad_id).sum()),  # padding is not data
        budget=budget, flops_per_token=model.flops_per_token(cfg.seq_len), peak=peak_flops(device))
    step = state["step"]
    lifeline.wait_for_uploads()
    if stopped:
        lifeline.stopped(stopped, step, cfg.max_steps - step, budget, guard=state["guard"], config=config_to_dict(cfg))
        if is_main:
            log.finish()
        return DIVERGED if stopped == "diverged" else 0
    prompts = held_out_prompts(val_convs, N_SAMPLES)
    samples = held_out_replies(model, tokenizer, prompts, cfg.sample_tokens)  # all ranks: FSDP needs them in each forward
    lifeline.send("finish", step=step, loss=loss, **budget.figures(0))
    if not is_main:
        return 0
    log.write_samples(step, samples)
    log.finish()
    val = [r["val_loss"] for r in log.records if "val_loss" in r]
    print(f"done: step {step}, train loss {loss:.3f}, held-out loss {val[0]:.3f} before -> {val[-1]:.3f} after")
    print(f"chat with it: rodin chat {run_dir}")
    print("replies to held-out questions:")
    for text in samples:
        print(f"  {text}")
    return 0


def lora_rows(cfg, tokenizer):
    """The token ids whose embedding rows train with the adapters: ChatML's two (--lora_chat_rows)."""
    wanted = cfg.lora_rank and cfg.lora_chat_rows and not cfg.lora_train_embeddings  # whole rows train then
    return (tokenizer.im_start_id, tokenizer.im_end_id) if wanted else ()


def check_resumable(ckpt_path, meta, cfg, tokenizer, rows, global_batch, row_ids=()):
    """Refuse to resume what would not continue the same run; returns a note when resharding."""
    if meta["config"]["model"] != dataclasses.asdict(cfg.model):
        raise ValueError(f"{ckpt_path}: a fine-tune of another model shape ({meta['config']['model']}); "
                         "fine-tune into another --name")
    if meta["tokenizer"] != tokenizer.fingerprint:
        raise ValueError(f"{ckpt_path}: trained with tokenizer {meta['tokenizer']}, not {tokenizer.path} ({tokenizer.fingerprint})")
    checkpoint.check_optimizer(ckpt_path, meta, cfg.optimizer, f"resume with --optimizer={checkpoint.optimizer_name(meta)}, "
                               "or fine-tune into another --name")
    lora.check_same(ckpt_path, meta, cfg, row_ids)
    if meta.get("data_fingerprint") != rows.fingerprint():
        raise ValueError(f"{ckpt_path}: started on other SFT rows (data, seq_len, pack, truncate or seed differ); "
                         "resume with the same settings, or use another --name")
    return checkpoint.check_world_size(ckpt_path, meta, global_batch, new_run=f"--init_from={ckpt_path} and another --name")


def held_out_prompts(val_convs, n):
    """The first n held-out conversations that have a user turn, cut after the first one (any
    system turn kept): the questions the samples answer."""
    prompts = []
    for _, messages in val_convs:
        if is_trainable(messages) and any(m["role"] == "user" for m in messages):
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            prompts.append(messages[: first_user + 1])
    return prompts[:n]


@torch.compiler.set_stance("force_eager")  # sampling runs eager, as rodin.train.loop.sample_texts
def held_out_replies(model, tokenizer, prompts, max_new_tokens):
    """Greedy replies to held-out prompts, as 'question -> reply'."""
    was_training = model.training
    model.eval()
    out = []
    for messages in prompts:
        text, stopped = chat_reply(model, tokenizer, messages, max_new_tokens, temperature=0)
        out.append(f"{messages[-1]['content']} -> {text}" + ("" if stopped else " [no <|im_end|>]"))
    model.train(was_training)
    return out


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
