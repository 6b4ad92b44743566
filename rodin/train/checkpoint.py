"""Checkpoints of a run: runs/<name>/checkpoints/step-NNNNNNN/, written so that a crash at any
instant leaves the previous checkpoint intact and the new one either whole or ignorable.

A checkpoint is written into step-N.tmp/, every file fsynced, then MANIFEST.json (file sizes)
written last, then the directory renamed to step-N/. On start the newest directory with a
manifest whose sizes match is loaded; a partial or corrupt one is skipped with a warning.
Tensors go to safetensors (no pickle); the rest (step, data cursor, config) to JSON.
Under torchrun (world size > 1, FSDP2) the tensors go to torch.distributed.checkpoint instead:
every rank writes its shards and its RNG state into the same step-N.tmp/, rank 0 writes the
manifest last and renames, so the directory contract (and `latest`) is the same for both formats.
Either format loads into a model sharded or not: DCP reshards, and a safetensors file is read by
rank 0 alone and broadcast into the shards.
Nodes with their own disks (torchrun --nnodes, a run directory each) each write the shards of
their ranks into their own step-N/ (the first rank of each such node commits it, its manifest
marked "whole": false): no disk holds the whole checkpoint, the mirror does (rodin/spot/mirror.py),
and `latest` only takes a whole one. Nodes that share the run directory write one, as one node.
Saves are synchronous: RODIN-1B's weights and moments are ~15 GB, seconds to write every few
hundred steps, and a save that is finished is the one a SIGTERM can rely on.
A disk that fills during a save loses only that save: its step-N.tmp/ is removed, the checkpoints
the save would have pruned after it are pruned before it, and it is tried once more; if the disk
is still full the run stops with one line (the newest complete checkpoint is untouched).
"""

import contextlib
import errno
import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rodin.data.tokenizer import checkpoint_tokenizer
from rodin.io import atomic_write_text, fsync_dir, fsync_file, sha256
from rodin.model import LLaMA, ModelConfig
from rodin.train import hf_llama, lora
from rodin.train.optim import parts

MANIFEST = "MANIFEST.json"


def checkpoint_root(run_dir):
    return os.path.join(run_dir, "checkpoints")


def model_tensors(model):
    """The model's state dict, a tied output matrix stored once (safetensors refuses shared storage);
    under LoRA the adapters alone: the frozen base is referenced by the checkpoint's meta "origin"."""
    state = trained_part(model, model.state_dict())
    if getattr(model.cfg, "tie_embeddings", False):
        state.pop("output.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def has_adapters(model):
    return any(lora.is_adapter(name) for name, _ in model.named_parameters())


def trained_part(model, state):
    """What a checkpoint keeps of a state dict: all of it, or under LoRA what trains (the adapters,
    and the embedding matrices with --lora_train_embeddings)."""
    if not has_adapters(model):
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained or lora.is_adapter(k)}


def expected_missing(model, tensors):
    """Under LoRA a load fills one part: the base (its adapters come fresh) or the adapters (the base
    loaded apart). Names of the other part are not missing."""
    if not has_adapters(model):
        return lambda name: False
    adapters_only = any(lora.is_adapter(k) for k in tensors)
    return lambda name: lora.is_adapter(name) != adapters_only


def load_model_tensors(model, tensors, source):
    if getattr(model.cfg, "tie_embeddings", False) and "tok_embeddings.weight" in tensors:
        tensors = dict(tensors, **{"output.weight": tensors["tok_embeddings.weight"]})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    other_part = expected_missing(model, tensors)
    missing = [k for k in missing if not other_part(k)]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def optimizer_tensors(optimizer):
    """Flatten torch.optim state to {'state.<param index>.<name>': tensor} plus JSON-able groups."""
    state = optimizer.state_dict()
    tensors = {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"state.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def load_optimizer_tensors(optimizer, tensors, param_groups):
    state = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def rng_tensors():
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors


def restore_rng(tensors):
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def is_sharded_run():
    return dist.is_initialized() and dist.get_world_size() > 1


def is_dcp(path):
    return os.path.exists(os.path.join(path, ".metadata"))


class DiskFull(Exception):
    """A save that ran out of disk space; its partial directory is already removed."""


def is_disk_full(error):
    """An OSError of a full disk (or quota), or DCP's CheckpointException of one on any rank."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    failures = getattr(error, "failures", None) or {}  # {rank: (exception, traceback)}
    return any(is_disk_full(exception) for exception, _ in failures.values())


def save(run_dir, step, model, optimizer, meta, keep, keep_every=0):
    """Write checkpoint `step` atomically, then prune to the newest `keep` and the milestones
    (steps that are multiples of keep_every > 0). meta: JSON-able dict.
    Under torchrun every rank must call it (the sharded state is written collectively).
    A full disk: prune first and try once more, else ValueError (one line)."""
    write = save_sharded if is_sharded_run() else save_single
    try:
        return write(run_dir, step, model, optimizer, meta, keep, keep_every)
    except DiskFull:
        freed = make_room(run_dir, keep, keep_every)
        if freed:
            warnings.warn(f"{checkpoint_root(run_dir)}: disk full writing step {step}; removed "
                          f"{', '.join(freed)} (due for pruning after this save) and trying again")
            try:
                return write(run_dir, step, model, optimizer, meta, keep, keep_every)
            except DiskFull:
                pass
    newest = latest(run_dir)
    raise ValueError(f"{checkpoint_root(run_dir)}: disk full, checkpoint step {step} not written (its partial files removed; "
                     f"the newest complete one, {newest and os.path.basename(newest)}, is intact); free space there or "
                     "lower --keep_checkpoints/--keep_every, then relaunch the same command to resume") from None


def make_room(run_dir, keep, keep_every):
    """Delete the checkpoints a save would prune after it (never the newest complete one, nor a
    milestone); their names (rank 0's, on every rank)."""
    freed = []
    if not is_sharded_run() or dist.get_rank() in directory_owners(run_dir):  # each disk its own
        for path in prunable(complete_checkpoints(run_dir, parts=True), keep - 1, keep_every):
            shutil.rmtree(path, ignore_errors=True)
            freed.append(os.path.basename(path))
    if dist.is_initialized():
        box = [freed]
        dist.broadcast_object_list(box, src=0)
        freed = box[0]
    return freed


def save_single(run_dir, step, model, optimizer, meta, keep, keep_every=0):
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_if_disk_full(tmp):
        os.makedirs(tmp)
        opt_tensors, param_groups = optimizer_tensors(optimizer)
        save_file(model_tensors(model), os.path.join(tmp, "model.safetensors"))
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        save_file(rng_tensors(), os.path.join(tmp, "rng.safetensors"))
        copy_record(run_dir, tmp)
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(dict(meta, step=step, optimizer_param_groups=param_groups), f, indent=2)
    commit(run_dir, tmp, final, step, keep, keep_every)
    return final


@contextlib.contextmanager
def removed_if_disk_full(tmp, remove=True):
    """Writes into a checkpoint's tmp directory: a full disk removes it (remove) and raises DiskFull.
    Sharded saves pass remove=False: other ranks may still be writing into a shared directory, which
    its owners remove once every rank has agreed (a rank removing it alone failed rank 0's next write)."""
    import torch.distributed.checkpoint as dcp

    try:
        yield
    except (OSError, dcp.CheckpointException) as e:  # DCP raises one rank's OSError on every rank, wrapped
        if not is_disk_full(e):
            raise
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFull(tmp) from None


RECORD = ("metrics.jsonl", "samples.md", "loss.png")  # the run's record, copied into each checkpoint as record-NAME


def copy_record(run_dir, tmp):
    """The run's record into a checkpoint being written: it travels with the checkpoint (to the
    mirror), so a fresh machine restores the curve, not only the weights."""
    for name in RECORD:
        if os.path.exists(os.path.join(run_dir, name)):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(tmp, "record-" + name))


def restore_record(path, run_dir):
    """A checkpoint's copy of the record back into a run directory that has none (a fresh machine)."""
    if os.path.exists(os.path.join(run_dir, RECORD[0])):
        return
    for name in RECORD:
        if os.path.exists(os.path.join(path, "record-" + name)):
            shutil.copyfile(os.path.join(path, "record-" + name), os.path.join(run_dir, name))


def commit(run_dir, tmp, final, step, keep, keep_every=0, world=1):
    """Every file fsynced, the manifest (file sizes; whether it holds every rank's files) last,
    then the rename: before it the checkpoint does not exist. A full disk removes tmp and raises
    DiskFull."""
    with removed_if_disk_full(tmp):
        files = sorted(os.listdir(tmp))
        for name in files:
            fsync_file(os.path.join(tmp, name))
        sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in files}
        whole = "trainer.json" in files and (world == 1 or all(f"rng-rank{r}.safetensors" in files for r in range(world)))
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps({"step": step, "whole": whole, "files": sizes}, indent=2))
    if os.path.exists(final):
        shutil.rmtree(final)  # re-saving a step after a restart
    os.replace(tmp, final)
    fsync_dir(checkpoint_root(run_dir))
    for old in prunable(complete_checkpoints(run_dir, parts=True), keep, keep_every):
        shutil.rmtree(old, ignore_errors=True)


def step_of(path):
    """The step of a checkpoint from its directory name, step-NNNNNNN."""
    return int(os.path.basename(os.path.normpath(path))[len("step-"):])


def prunable(paths, keep, keep_every=0):
    """Of checkpoints oldest first (paths or names), those to delete: all but the newest `keep`,
    except the milestones, whose step is a multiple of keep_every (> 0), kept for later evaluation."""
    return [p for p in paths[:-keep] if not (keep_every and step_of(p) % keep_every == 0)]


def save_sharded(run_dir, step, model, optimizer, meta, keep, keep_every=0):
    """DCP: each rank writes its own shards; rank 0 writes trainer.json, the manifest, and renames."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    final = os.path.join(checkpoint_root(run_dir), f"step-{step:07d}")
    tmp = final + ".tmp"
    owners = directory_owners(run_dir)
    if rank in owners:  # each disk's owner clears its own stale tmp before any rank writes into it
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if rank in owners:
        os.makedirs(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, parts(optimizer))
    model_state = trained_part(model, model_state)
    full = False
    try:
        with removed_if_disk_full(tmp, remove=False):
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
            save_file(rng_tensors(), os.path.join(tmp, f"rng-rank{rank}.safetensors"))
            if rank == 0:
                copy_record(run_dir, tmp)
                with open(os.path.join(tmp, "trainer.json"), "w") as f:
                    json.dump(dict(meta, step=step, world_size=dist.get_world_size(), format="dcp", owners=owners), f, indent=2)
    except DiskFull:
        full = True
    if agree_any(full):  # every rank's files are on disk, or every rank gives up this save
        if rank in owners:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFull(tmp)
    try:
        if rank in owners:
            commit(run_dir, tmp, final, step, keep, keep_every, world=dist.get_world_size())
    except DiskFull:
        full = True
    if agree_any(full):
        raise DiskFull(tmp)
    return final


_owners = {}


def directory_owners(run_dir):
    """The ranks that commit a checkpoint directory: rank 0, and the first rank of each node whose
    disk does not hold rank 0's run directory (nodes with local disks). Collective on first call:
    rank 0 writes a probe file into the run directory and each node looks for it."""
    if not is_sharded_run():
        return [0]
    key = (os.path.abspath(run_dir), dist.get_world_size(), id(dist.group.WORLD))
    if key not in _owners:
        box = [os.urandom(8).hex()]
        dist.broadcast_object_list(box, src=0)
        probe = os.path.join(run_dir, f".probe-{box[0]}")
        if dist.get_rank() == 0:
            os.makedirs(run_dir, exist_ok=True)
            atomic_write_text(probe, "rank 0's run directory\n")
        dist.barrier()
        local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, local_first and not os.path.exists(probe))
        dist.barrier()
        if dist.get_rank() == 0:
            os.unlink(probe)
        _owners[key] = [0] + [r for r, own in enumerate(flags) if own and r != 0]
    return _owners[key]


def agree_any(flag):
    """Whether any rank raised the flag (also a barrier)."""
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def verify(path):
    """None if the checkpoint at path is complete, else the reason it is not."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        return "no manifest (interrupted while writing)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, size in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file) or os.path.getsize(file) != size:
            return f"{name} is missing or has the wrong size"
    return None


def is_whole(path):
    """Whether a complete checkpoint holds every rank's files (not only one node's part of them)."""
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f).get("whole", True)


def complete_checkpoints(run_dir, parts=False):
    """Paths of complete checkpoints, oldest first; parts: also a node's part of one (for pruning)."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and not n.endswith(".tmp"))
    paths = [os.path.join(root, n) for n in names if verify(os.path.join(root, n)) is None]
    return paths if parts else [p for p in paths if is_whole(p)]


def newest_before(run_dir, step):
    """The newest whole checkpoint of the run directory before `step` (rank 0's disk decides, for
    every rank), or None: the guard's rollback target."""
    before = [p for p in complete_checkpoints(run_dir) if step_of(p) < step]
    box = [before[-1] if before else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def latest(run_dir):
    """The newest complete checkpoint, warning about newer ones that are partial or corrupt."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    for name in sorted(os.listdir(root), reverse=True):
        path = os.path.join(root, name)
        if not name.startswith("step-"):
            continue
        problem = "interrupted while writing" if name.endswith(".tmp") else verify(path)
        if problem is None and is_whole(path):
            return path
        if problem is not None:  # a node's part of a checkpoint is expected, not worth a warning
            warnings.warn(f"{path}: skipping checkpoint: {problem}")
    return None


def resolve(path):
    """A run directory -> its newest complete checkpoint; a checkpoint directory -> itself, if complete."""
    path = str(path)
    if os.path.exists(os.path.join(path, "trainer.json")) or os.path.basename(os.path.normpath(path)).startswith("step-"):
        problem = verify(path)
        if problem:
            raise ValueError(f"{path}: not a complete checkpoint ({problem}); give its run directory to take the newest complete one")
        return path
    found = latest(path)
    if found is None:
        raise ValueError(f"{path}: no complete checkpoint in {checkpoint_root(path)}; give a run directory or a step-N directory (train it first: make pretrain)")
    return found


def check_world_size(path, meta, global_batch, new_run):
    """Whether the checkpoint at path can continue its run on this world size: None if written by
    as many processes, a note if it is resharded (DCP reshards; a single-process checkpoint is
    read by rank 0 and broadcast into the shards), else ValueError. The data cursor is global, so
    the run continues on the same data only if the global batch is the same. new_run: the options
    that start a new run from the checkpoint instead, for the message."""
    saved_world = meta.get("world_size", 1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved_world == world:
        return None
    saved = meta["config"]
    saved_batch = meta.get("global_batch", saved["micro_batch_size"] * saved["grad_accum_steps"] * saved_world)
    if saved_batch % world:
        fits = [n for n in range(1, saved_batch + 1) if saved_batch % n == 0]
        raise ValueError(f"{path}: its global batch of {saved_batch} sequences cannot be split over {world} processes; "
                         f"resume on a number of processes that divides it ({', '.join(map(str, fits[:8]))}, ...), "
                         f"or start a new run from it with {new_run}")
    if global_batch != saved_batch:
        raise ValueError(f"{path}: written by {saved_world} process(es) with a global batch of {saved_batch} sequences; "
                         f"to resume on {world}, keep it: --micro_batch_size x --grad_accum_steps = {saved_batch // world} "
                         f"(or start a new run from it with {new_run})")
    return f"resharded from {saved_world} to {world} process(es)"


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def optimizer_name(meta):
    """The optimizer a checkpoint's state belongs to (checkpoints before Muon: AdamW's)."""
    return meta["config"].get("optimizer", "adamw")


def check_optimizer(path, meta, optimizer, fix):
    """Refuse an optimizer state of another optimizer than this run's: fix says what to do instead."""
    saved = optimizer_name(meta)
    if saved != optimizer:
        raise ValueError(f"{path}: holds {saved}'s optimizer state, this run uses --optimizer={optimizer}; {fix}")


def read_meta(path):
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


def is_sft(meta):
    """Whether a checkpoint is a chat fine-tune: sft.py records the checkpoint it started from."""
    return "init_from" in meta


def load(path, model, optimizer=None, restore_rng_state=True, keep_hyperparams=False):
    """Load weights (and optimizer, RNG) from a checkpoint directory; returns its meta dict.
    Either format loads into a model sharded or not (DCP reshards). keep_hyperparams: load the
    optimizer's moments but keep its current lr/betas/weight decay (a new phase of training)."""
    meta = read_meta(path)
    hyperparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else None
    if is_dcp(path):
        load_dcp(path, model, optimizer)
    else:
        if is_sharded_run():
            # rank 0 alone reads the weights (onto the CPU) and broadcasts them into every rank's shards
            tensors = load_file(os.path.join(path, "model.safetensors")) if dist.get_rank() == 0 else {}
            load_full_into_sharded(model, tensors, path)
        else:
            load_model_tensors(model, load_file(os.path.join(path, "model.safetensors"), device=str(model.output.weight.device)), path)
        if optimizer is not None:
            file = os.path.join(path, "optimizer.safetensors")
            try:
                if is_sharded_run():
                    # rank 0 reads the whole state and broadcasts it into every rank's shards, as the weights
                    tensors = load_file(file) if dist.get_rank() == 0 else {}
                    load_full_optimizer_into_sharded(model, optimizer, tensors, meta["optimizer_param_groups"])
                else:
                    device = str(next(iter(model.parameters())).device)
                    load_optimizer_tensors(optimizer, load_file(file, device=device), meta["optimizer_param_groups"])
            except (ValueError, KeyError, IndexError, RuntimeError) as e:
                raise ValueError(f"{file}: not a state of this run's optimizer ({first_line(e)}); "
                                 "start from its weights alone with --init_optimizer=false") from None
    if optimizer is not None and keep_hyperparams:
        for group, saved in zip(optimizer.param_groups, hyperparams):
            group.update(saved)
    if restore_rng_state:
        rank = dist.get_rank() if dist.is_initialized() else 0
        name = f"rng-rank{rank}.safetensors" if is_dcp(path) else "rng.safetensors"
        if os.path.exists(os.path.join(path, name)):  # absent for new ranks when resharding to more processes
            restore_rng(load_file(os.path.join(path, name)))
    return meta


def resume(path, meta, model, optimizer, data):
    """Continue a run from its checkpoint: weights, optimizer and RNG states, and the data cursor
    (data.load_state_dict). Returns (step, tokens_seen)."""
    load(path, model, optimizer)
    data.load_state_dict(meta["data"])
    return meta["step"], meta["tokens_seen"]


def load_model(path, device="cpu"):
    """(model in eval mode, meta, checkpoint path) of a run directory's newest complete checkpoint
    or of one checkpoint directory, for inference and export: its weights must read and be finite.
    A LoRA checkpoint's adapters are loaded over their base and merged into plain weights."""
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    model = LLaMA(ModelConfig(**meta["config"]["model"])).to(device)
    if meta.get("lora"):
        settings = meta["lora"]
        lora.apply(model, settings["rank"], settings["alpha"], lora.parse_targets(settings["targets"]), seed=0,
                   rows=settings.get("rows", ()), embeddings=settings.get("embeddings", False))
        load_base(meta["origin"], model, ckpt)
    try:
        load(ckpt, model, restore_rng_state=False)
    except Exception as e:  # safetensors raises its own error type on a damaged file
        raise ValueError(f"{ckpt}/model.safetensors: unreadable weights ({first_line(e)}); use an older checkpoint") from None
    if meta.get("lora"):
        lora.merge(model)
    for name, p in model.named_parameters():
        if not torch.isfinite(p.detach()).all():
            raise ValueError(f"{ckpt}/model.safetensors: {name} holds NaN or infinite values; use an older checkpoint")
    return model.eval(), meta, ckpt


def load_hf_weights(path, model, new_ids=()):
    """An HF Llama directory's weights into a model, sharded (FSDP2: rank 0 reads and broadcasts)
    or not; cast to the model's dtypes, shapes as config.json says, but for the embedding rows of
    tokens added to its tokenizer (new_ids: hf_llama.with_new_rows)."""
    def tensors():
        return hf_llama.with_new_rows(hf_llama.rodin_tensors(path, model.cfg), new_ids, model.cfg.vocab_size)

    if is_sharded_run():
        load_full_into_sharded(model, tensors() if dist.get_rank() == 0 else {}, path)
    else:
        load_model_tensors(model, tensors(), path)


def base_origin(spec, ckpt):
    """The origin of a rodin checkpoint used as a LoRA base: its path and its weights' sha256."""
    if is_dcp(ckpt):
        raise ValueError(f"--init_from={spec}: a LoRA base is read from one file; export a torchrun checkpoint to "
                         "Hugging Face first (export.py --format=hf) and start from that directory")
    return {"init_from": spec, "checkpoint": os.path.abspath(ckpt),
            "files": {"model.safetensors": sha256(os.path.join(ckpt, "model.safetensors"))}}


def load_base(origin, model, ckpt):
    """The frozen base under a LoRA run's adapters, from where its origin says (a rodin checkpoint or
    an HF directory, fetched again from the Hub if gone), refused if any of its files changed."""
    if origin.get("checkpoint"):
        path = origin["checkpoint"]
    elif os.path.isdir(origin["path"]) or "repo" not in origin:
        path = origin["path"]
    else:
        path = hf_llama.fetch(f"{hf_llama.HUB_PREFIX}{origin['repo']}@{origin['revision']}")
    for name, digest in origin["files"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file) or sha256(file) != digest:
            raise ValueError(f"{file}: not the base the adapters of {ckpt} were trained on (sha256 {digest[:12]}…); "
                             "put that file back, or train new adapters in another --name")
    if origin.get("checkpoint"):
        load(path, model, restore_rng_state=False)
    else:
        load_hf_weights(path, model, origin.get("added_rows", ()))


def load_run(path, tokenizer_path=None):
    """(model, tokenizer, meta, checkpoint path) of a run directory's newest complete checkpoint, or
    of a checkpoint directory: load_model, and the tokenizer it was trained with (the run's copy
    first, see rodin.data.tokenizer.checkpoint_tokenizer), which must fit the model's vocabulary."""
    model, meta, ckpt = load_model(path)
    tokenizer = checkpoint_tokenizer(ckpt, meta, tokenizer_path)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces do not fit the model's vocab_size={model.cfg.vocab_size}")
    return model, tokenizer, meta, ckpt


def load_dcp(path, model, optimizer=None):
    no_dist = not dist.is_initialized()  # one process reading a sharded checkpoint: DCP reshards
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # that is the intent
        _load_dcp(path, model, optimizer, no_dist)


def _load_dcp(path, model, optimizer, no_dist):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    options = StateDictOptions(strict=not has_adapters(model))  # under LoRA the adapters alone
    if optimizer is None:
        model_state = trained_part(model, get_model_state_dict(model))
        dcp.load({"model": model_state}, checkpoint_id=path, no_dist=no_dist)
        set_model_state_dict(model, model_state, options=options)
    else:
        model_state, optim_state = get_state_dict(model, parts(optimizer))
        model_state = trained_part(model, model_state)
        try:
            dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=path, no_dist=no_dist)
        except Exception as e:  # DCP wraps a missing key in its own CheckpointException
            raise ValueError(f"{path}: its optimizer state does not fit this run's optimizer ({first_line(e)}); "
                             "start from its weights alone with --init_optimizer=false") from None
        set_state_dict(model, parts(optimizer), model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def load_full_optimizer_into_sharded(model, optimizer, tensors, param_groups):
    """A single-process optimizer state (optimizer_tensors' flat form) into an optimizer over a
    model sharded with FSDP2: rank 0 passes the tensors, the other ranks {}. Parameters are
    numbered in the same group order on both sides, so index i is the i-th parameter of
    optimizer.param_groups, whose name (FQN) torch.distributed.checkpoint keys the state by."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = {}
    if dist.get_rank() == 0:
        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(order[int(index)], {})[name] = value
        if len(param_groups) != len(optimizer.param_groups):
            raise ValueError(f"{len(param_groups)} parameter groups saved, this optimizer has {len(optimizer.param_groups)}")
        full = {"state": state, "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in param_groups]}
    set_optimizer_state_dict(model, parts(optimizer), full,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_full_into_sharded(model, tensors, source):
    """Whole (unsharded) weights into a model sharded with FSDP2: rank 0 passes them, on any device,
    the other ranks pass {}. Each tensor is broadcast in turn and every rank keeps its shard of it,
    so no other rank ever holds more than one whole tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if getattr(model.cfg, "tie_embeddings", False) and "tok_embeddings.weight" in tensors:
        tensors = dict(tensors, **{"output.weight": tensors["tok_embeddings.weight"]})
    try:
        # under LoRA each load fills one part, base or adapters (expected_missing)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not has_adapters(model))
        set_model_state_dict(model, tensors, options=options)
    except RuntimeError as e:
        raise ValueError(f"{source}: weights do not fit the model config ({e})") from None
