"""One process or many: the process group, building the model sharded (FSDP2), and agreement
between ranks.

Frozen decisions:
- `torchrun` sets WORLD_SIZE/RANK/LOCAL_RANK; without them there is no process group at all.
- FSDP2 (`fully_shard`) only when the world size is > 1: one unit per block, then the root (embedding,
  final norm, tied output). At world size 1 sharding only costs time.
- Under torchrun no rank builds the whole model on its device: it is built on the meta device,
  sharded, and each rank allocates only its shards. Rank 0 alone builds the initial weights, on the
  CPU with the run's seed, and broadcasts them tensor by tensor: a run starts from exactly the
  weights one process would have. A run that loads a checkpoint next skips that build.
- On CUDA the shards are all-gathered as bf16 and gradients reduced in fp32 (MixedPrecisionPolicy);
  on CPU (gloo, the tests) everything stays fp32 so one process and two agree to float tolerance.
- Every collective decision (stop now?) is an all-reduce: ranks never act on a local view alone.
"""

import contextlib
import datetime
import gc
import os

import torch
import torch.distributed as dist

from rodin.model import LLaMA
from rodin.train import activation_checkpoint, fp8, lora
from rodin.train.checkpoint import load_full_into_sharded
from rodin.train.device import has_cpp_compiler


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def setup(device_name="auto"):
    """Join the process group torchrun describes (if any) and return this rank's torch.device."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if n > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda and not dist.is_nccl_available():
            raise ValueError("torchrun on CUDA needs NCCL, which this torch build lacks (torch.distributed."
                             "is_nccl_available() is False): install a CUDA build of torch for Linux, or run one "
                             "process without torchrun")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # a generous timeout: rank 0 may be writing a multi-GB checkpoint while the others wait
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    if use_cuda and n > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: one GPU per process
    if use_cuda:
        return torch.device("cuda" if device_name == "auto" else device_name)
    return torch.device("cpu" if device_name == "auto" else device_name)


def teardown(finished=True):
    """Leave the process group. After a run every rank finished, the ranks first meet at a barrier,
    so none destroys its group while a peer still talks to it (once in CI a rank aborted at exit,
    "terminate called without an active exception", after its peer had left first); after an error
    none waits, the others may be gone. The model's DTensors hold the group: collected first."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device_name="auto"):
    """setup() on entry, teardown() on leaving: with the barrier when the body finished, without
    it when it raised (a rank that failed must not wait for peers that may be gone)."""
    device = setup(device_name)
    try:
        yield device
    except BaseException:
        teardown(finished=False)
        raise
    teardown()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def build_model(cfg, device, init_weights=True, varying_length=False, lora_rows=()):
    """This rank's model for a run config (TrainConfig): activation checkpointing and torch.compile
    applied and, under torchrun, sharded with FSDP2. init_weights=False: the caller loads a
    checkpoint into it next, so under torchrun its shards are left uninitialised. varying_length:
    batches differ in length (SFT rows), so compiled blocks take it as dynamic from the first one.
    lora_rows: under --lora_rank, the token ids whose embedding rows train too (rodin.train.lora)."""
    world = world_size()
    if cfg.optimizer_in_backward and world > 1:
        raise ValueError("optimizer_in_backward is for a single device; under torchrun FSDP already shards gradients "
                         "and optimizer state: drop --optimizer_in_backward=true")
    torch.manual_seed(cfg.seed)
    if world == 1:
        model = LLaMA(cfg.model).to(device)
    else:
        with torch.device("meta"):
            model = LLaMA(cfg.model)
    if cfg.lora_rank:  # the base frozen (bf16 on CUDA), adapters on the blocks' matrices
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha, lora.parse_targets(cfg.lora_targets), cfg.seed,
                   base_dtype=torch.bfloat16 if device.type == "cuda" else None, rows=lora_rows,
                   embeddings=cfg.lora_train_embeddings)
    recipe = fp8.resolve(cfg, device)
    if recipe != "off":
        fp8.convert(model, recipe)
    activation_checkpoint.apply(model, cfg.activation_checkpointing)
    if compiles(cfg, device):
        # a first static graph would be compiled again as dynamic at the second length: one graph, not two
        dynamic = True if varying_length else None
        if compile_scope(cfg, device, world) == "whole":
            model.compile(dynamic=dynamic)
        else:
            for block in model.layers:  # per block, as torchtitan: FSDP's hooks stay outside the graphs
                block.compile(dynamic=dynamic)
    if world == 1:
        return model
    shard(model, device)
    model.to_empty(device=device)  # this rank's shards only; the tied output stays tied
    model.init_rope()
    if cfg.lora_rank:
        load_full_into_sharded(model, lora.initial_adapters(model, cfg.seed) if is_main() else {}, "the initial adapters")
    if init_weights:
        full = {}
        if is_main():
            torch.manual_seed(cfg.seed)
            full = LLaMA(cfg.model).state_dict()  # on the CPU: the weights one process would draw
        load_full_into_sharded(model, full, "the initial weights of rank 0")
    return model


# On a CPU inductor's compile costs 10-30 s (2 cores, cold cache) and saves 12 % of the cpu-demo
# step in bf16 compiled block by block (9,482 against 8,420 tokens/s), ~40 % compiled whole (12,573
# against 8,758 on the demo model): make pretrain's 680 steps train in 272 s, 312 s by blocks (216 s
# since bf16 attention runs in fp32 on the CPU, rodin/model.py attend). It
# pays from a few hundred steps; shorter runs (tests, the SFT demo) stay eager.
CPU_COMPILE_MIN_STEPS = 500


def compile_scope(cfg, device, world):
    """blocks or whole (--compile_scope). auto: the whole model on one process, where the
    embedding, the final norm, the output projection and the loss then fuse with the blocks
    (bench/train_throughput.py, against per block): on the demo model in bf16, 2 threads of an
    Intel Xeon, 12,468 tokens/s against 9,864 (transformers compiled whole: 11,552); RODIN-1B at
    context 2048 on an H200, 60,777 against 58,513 (MFU 52.5 %, 50.5 %) and 47.3 GiB against 53.7.
    Per block under FSDP2, whose hooks stay outside the graphs."""
    if cfg.compile_scope != "auto":
        return cfg.compile_scope
    return "whole" if world == 1 else "blocks"


def compiles(cfg, device):
    """Whether a run's blocks are compiled: --compile=on; auto: on CUDA, and on a CPU for runs of
    CPU_COMPILE_MIN_STEPS steps or more when inductor has its C++ compiler."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cfg.max_steps >= CPU_COMPILE_MIN_STEPS and has_cpp_compiler()


def shard(model, device):
    """FSDP2: each block its own unit (gathered just before use, freed after), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.layers:
        for adapter in [m for m in block.modules() if isinstance(m, lora.Adapter)]:
            fully_shard(adapter, mp_policy=mp)  # fp32 and trained: a group apart from the frozen bf16 base
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def from_rank_0(value):
    """Rank 0's value of a small Python object, on every rank (the same decision everywhere)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value):
    """Every rank's value of a small Python object, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_same_config(config, local=()):
    """Refuse, on every rank and before anything is built, ranks launched with other options than
    rank 0's (a node given another --mirror, --lr, ...); `local`: options each node may set its own way."""
    configs = gather_objects({k: v for k, v in config.items() if k not in local})
    for r, other in enumerate(configs):
        differ = sorted(k for k in set(other) | set(configs[0]) if other.get(k) != configs[0].get(k))
        if differ:
            k = differ[0]
            raise ValueError(f"--{k}: rank {r} was launched with {other.get(k)!r}, rank 0 with {configs[0].get(k)!r}"
                             f"{f' (and {len(differ) - 1} more options)' if len(differ) > 1 else ''}; "
                             "give every node the same command")


def sum_over_ranks(values, device):
    """Element-wise sums over ranks of a list of Python numbers (float64: token counts stay exact)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def mean_over_ranks(value, device):
    """The mean of a Python float over ranks (each rank's loss is over its own slice of the batch)."""
    return sum_over_ranks([value], device)[0] / world_size()
