"""Whether a run can run on the device it found, checked before the first step and before anything
is written: a run that cannot stops in one line naming the option that fixes it, instead of
failing minutes (or hours, and euros) later.

Frozen decisions:
- Only what the device decides is checked here; config.py checks the options among themselves,
  and rodin.train.distributed.setup checks NCCL where it makes the process group.
- Memory is a closed-form estimate of one GPU's peak (fp32 weights and optimizer state, gradients
  when accumulated, the activations each recomputation mode keeps, the loss's logits), within 5 %
  of bench/memory_estimate.py's fake-tensor figures for the 3090, b200, rodin-1b and lucie-7b
  presets, in microseconds instead of 20-80 s. A run is refused only when the estimate exceeds the
  card's whole memory (the allocator decides the borderline); --check_memory=false skips it.
- bf16 means a card that computes it natively (compute capability 8.0: A100, RTX 30xx and later);
  --dtype=auto picks fp32 on older cards (rodin.train.device.resolve_dtype).
- torch.compile needs its compiler: Triton on CUDA, a C++ compiler on the CPU.
- torch itself (2.9 or later) is checked when rodin is first imported (rodin/__init__.py): the
  optimizers import torch.optim.Muon before any check here could run.
"""

import dataclasses
import math

import torch

from rodin.train.device import compiler_missing, cuda_has_native_bf16, describe, memory_gib, resolve_dtype

GIB = 2**30


def check(cfg, device, world=1, compiled=False):
    """Raise ValueError, in one line, if the run of cfg cannot work on device (this rank's, of
    `world` ranks); compiled: whether its blocks will be compiled."""
    check_bf16(cfg, device)
    if compiled:
        check_compiler(device)
    if cfg.check_memory and device.type == "cuda" and cfg.micro_batch_size:  # auto fits itself (rodin/train/memory.py)
        check_memory(cfg, device, world)


def check_bf16(cfg, device):
    if cfg.dtype == "bf16" and device.type == "cuda" and not cuda_has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--dtype=bf16: {describe(device)} does not compute bf16 natively (compute capability "
                         f"{major}.{minor}, bf16 needs 8.0); use --dtype=fp32 (--dtype=auto picks it)")


def check_compiler(device):
    missing = compiler_missing(device)
    if missing:
        raise ValueError(f"{missing}: install it, or --compile=off")


def check_memory(cfg, device, world):
    total = memory_gib(device)
    need = estimate_peak_gib(cfg, world, resolve_dtype(device, cfg.dtype))
    if need <= total:
        return
    what = f"micro-batches of {cfg.micro_batch_size} x {cfg.seq_len} tokens"
    raise ValueError(f"{what} need ~{need:.1f} GiB on each GPU (estimated), {describe(device)} has {total:.1f} GiB: "
                     f"{memory_fix(cfg, world, resolve_dtype(device, cfg.dtype), total)}; "
                     "or --check_memory=false to try anyway")


def memory_fix(cfg, world, dtype, total):
    """The options that bring the estimate within `total` GiB, in the order tried: smaller
    micro-batches (more of them: the same batch), then recomputing every block as well, else what
    the weights and optimizer state alone need."""
    modes = [cfg.activation_checkpointing] + (["full"] if cfg.activation_checkpointing != "full" else [])
    for mode in modes:
        micro_batch = cfg.micro_batch_size
        while micro_batch >= 1:
            fixed = dataclasses.replace(cfg, activation_checkpointing=mode, micro_batch_size=micro_batch)
            if estimate_peak_gib(fixed, world, dtype) <= total:
                options = [f"--activation_checkpointing={mode}"] if mode != cfg.activation_checkpointing else []
                sequences = cfg.grad_accum_steps * cfg.micro_batch_size
                if micro_batch != cfg.micro_batch_size:
                    options.append(f"--micro_batch_size={micro_batch}")
                    # the same batch, unless the optimizer steps in backward (it cannot accumulate)
                    if not cfg.optimizer_in_backward and sequences % micro_batch == 0:
                        options.append(f"--grad_accum_steps={sequences // micro_batch}")
                return " ".join(options) + f" fits (~{estimate_peak_gib(fixed, world, dtype):.1f} GiB)"
            micro_batch //= 2
    state = state_bytes(cfg, world) / GIB
    stepped_in_backward = dataclasses.replace(cfg, optimizer_in_backward=True, grad_accum_steps=1, grad_clip=0.0,
                                              rampup_start=0, micro_batch_size=1, activation_checkpointing="full")
    if world == 1 and not cfg.optimizer_in_backward and estimate_peak_gib(stepped_in_backward, 1, dtype) <= total:
        return (f"weights, gradients and optimizer state alone need ~{state:.1f} GiB: --optimizer_in_backward=true "
                "--grad_accum_steps=1 --grad_clip=0 with smaller micro-batches, or several GPUs under torchrun")
    return f"weights and optimizer state alone need ~{state:.1f} GiB: more GPUs under torchrun (FSDP2 shards them)"


def parameter_counts(model):
    """(all parameters, those of one block, those of the blocks' matrices), a tied matrix once."""
    head_dim = model.dim // model.n_heads
    attention = model.dim * head_dim * (2 * model.n_heads + 2 * model.n_kv_heads)
    block = attention + 3 * model.dim * model.ffn_dim + 2 * model.dim
    embeddings = model.vocab_size * model.dim * (1 if model.tie_embeddings else 2)
    return embeddings + model.n_layers * block + model.dim, block, model.n_layers * (block - 2 * model.dim)


def state_bytes(cfg, world=1):
    """Weights, gradients (whole while micro-batches accumulate) and optimizer state, fp32, this GPU's share."""
    total, block, matrices = parameter_counts(cfg.model)
    optimizer = 8 * total if cfg.optimizer == "adamw" else 4 * matrices + 8 * (total - matrices)  # Muon: one moment
    accumulating = cfg.grad_accum_steps > 1 or cfg.rampup_start > 0
    gradients = 4 * total if accumulating and not cfg.optimizer_in_backward else 0
    state = (4 * total + gradients + optimizer) / world
    if world > 1:  # FSDP2 gathers a block and the next (prefetched), and the root, in bf16
        state += 2 * (2 * block + total - cfg.model.n_layers * block)
    return state


def activation_bytes_per_token(model, mode, dtype):
    """Bytes kept for backward per token of a micro-batch, over all blocks: what autograd saves in
    one block under bf16 autocast (fp32 residual stream and norms, bf16 matmul inputs and outputs),
    or in fp32, with the block's input alone for a recomputed block."""
    d, f = model.dim, model.ffn_dim
    kv = model.n_kv_heads * (model.dim // model.n_heads)
    if dtype == "bf16":
        whole, matmuls = 32 * d + 4 * kv + 8 * f, 12 * d + 4 * kv + 4 * f
    else:
        whole, matmuls = 28 * d + 8 * kv + 16 * f, 16 * d + 8 * kv + 8 * f
    recomputed = 4 * d  # the block's input
    layers = model.n_layers
    per_layer = {"none": whole * layers, "full": recomputed * layers, "ops": matmuls * layers,
                 "half": recomputed * math.ceil(layers / 2) + whole * (layers // 2)}
    return per_layer[mode], whole


def estimate_peak_gib(cfg, world=1, dtype="bf16"):
    """One GPU's peak memory for a training step of cfg (see the module docstring), in GiB."""
    tokens = cfg.micro_batch_size * cfg.seq_len
    kept, one_block = activation_bytes_per_token(cfg.model, cfg.activation_checkpointing, dtype)
    # without chunks the logits stay for backward (8 bytes each) and their gradient comes on top
    # (8 more); a chunk's logits, softmax and gradient live only while the chunk is computed (12)
    if cfg.loss_chunk:
        logits, in_loss = 0, 12 * cfg.model.vocab_size * min(cfg.loss_chunk, tokens)
    else:
        logits, in_loss = 8 * cfg.model.vocab_size * tokens, 8 * cfg.model.vocab_size * tokens
    # then a recomputed block is rebuilt whole, one at a time
    transient = max(in_loss, one_block * tokens if cfg.activation_checkpointing != "none" else 0)
    # without recomputation autocast keeps a bf16 copy of every weight through the forward (FSDP2
    # gathers them in bf16 instead: nothing to cast)
    cast_weights = 2 * parameter_counts(cfg.model)[0] if (
        dtype == "bf16" and cfg.activation_checkpointing == "none" and world == 1) else 0
    return (state_bytes(cfg, world) + kept * tokens + logits + transient + cast_weights) / GIB
