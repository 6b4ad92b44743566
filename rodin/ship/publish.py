"""Publish a run as a release on the Hugging Face Hub, as RODIN-1B and Lucie-7B were: the
transformers model, GGUF f16/q8_0/q4_k_m and an Ollama Modelfile, a bilingual model card, and
with --revisions the milestone checkpoints as revisions (with --with_optimizer, their optimizer state).

    rodin publish runs/NAME --repo=ORG/NAME [--revisions] [--with_optimizer] [--private]
    rodin publish runs/NAME --repo=./hub/NAME    # a local folder: NAME/main/, NAME/step0005000/, ...

Frozen decisions:
- The release is built in runs/NAME/release/ (main/, revisions/stepNNNNNNN/). Model files are
  rebuilt only when their checkpoint changed (.source.json); every export is verified against
  transformers or llama.cpp (rodin.ship.verify) before anything is uploaded; the card is rewritten each time.
- A revision is named as Lucie's (step0005000) and holds the checkpoint in transformers form in
  float32, its weights bit for bit, plus with --with_optimizer optimizer.safetensors (a
  torch.distributed.checkpoint converted) and trainer_state.json (param groups, parameter names).
  Milestones: the complete checkpoints whose step is a multiple of the run's keep_every, else all.
- Only what changed is uploaded: each file's sha256 against the repo's (the Hub's LFS sha256 or
  git blob id), one commit per revision; nothing is deleted from the repo.
- On the Hub a revision is a branch made from the repository's first commit: it holds its files only.
  A local --repo is the same layout on disk, one folder per revision (how the tests publish).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import shutil

from safetensors.torch import load_file, save_file

from rodin.config import config_from_dict
from rodin.io import atomic_write_text, fsync_file, sha256
from rodin.ship import modelcard, verify
from rodin.ship.gguf_export import K_QUANTS, ffn_warning, modelfile, pad_ffn, write_gguf_file
from rodin.ship.hf import hf_name, write_hf
from rodin.train import checkpoint
from rodin.train.hf_llama import load_hf_model
from rodin.train.optim import optimizer_for, param_groups

QUANTS = ("f16", "q8_0", "q4_k_m")  # the GGUF set RODIN-1B shipped
STAMP = ".source.json"


# ---- what to publish ------------------------------------------------------------------------------

def revision_name(step):
    return f"step{step:07d}"


def milestones(run_dir):
    """The complete checkpoints published as revisions: those whose step is a multiple of the run's
    keep_every (config.json) when it is set, else every one kept."""
    keep_every = (modelcard.read_json(os.path.join(run_dir, "config.json"), {}) or {}).get("keep_every", 0)
    ckpts = checkpoint.complete_checkpoints(run_dir)
    if keep_every and keep_every > 0:
        return [c for c in ckpts if checkpoint.read_meta(c)["step"] % keep_every == 0]
    return ckpts


def source_stamp(ckpt, **options):
    """What a built folder was made from: the checkpoint's manifest (step, file sizes) and the options."""
    return {"manifest": modelcard.read_json(os.path.join(ckpt, checkpoint.MANIFEST)),
            "tokens_seen": checkpoint.read_meta(ckpt).get("tokens_seen"), **options}


def build_once(folder, stamp, build):
    """build(tmp) into folder, unless folder was already built from stamp; a rebuild goes into
    folder.tmp and replaces folder when complete. Returns whether it built."""
    if modelcard.read_json(os.path.join(folder, STAMP)) == stamp:
        return False
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    atomic_write_text(os.path.join(tmp, STAMP), json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return True


def require(checker, dtype, report):
    """A verification report, or ValueError when the export falls outside rodin.ship.verify's thresholds."""
    print(verify.summary(checker, dtype, report))
    problems = verify.failures(report, checker, dtype)
    if problems:
        raise ValueError(f"{checker} ({dtype}) disagrees with the checkpoint: {'; '.join(problems)}; nothing was uploaded")
    return {k: report[k] for k in ("max_logit_diff", "argmax_agreement", "greedy_same", "greedy_total")}


def build_main(folder, ckpt, model, tokenizer, meta, name, dtype, quants, license, pad, threads, check):
    """The release's model files: HF directory at the root, GGUFs, Modelfile; returns the verification
    figures (kept in folder/.verification.json, so that a release that is not rebuilt still has them)."""
    figures = {}

    def build(out):
        info = {"license": license, "steps": meta["step"], "tokens seen": f"{meta.get('tokens_seen', 0):,}"}
        write_hf(out, model, tokenizer, dtype, name, info)
        if check:
            figures["hf"] = require("transformers", dtype, verify.check_transformers(out, model, tokenizer, dtype))
        gguf_model = pad_ffn(model) if pad else model
        if not pad and (warning := ffn_warning(model.cfg)) and any(q in K_QUANTS for q in quants):
            print(f"warning: {warning}")
        for quant in quants:
            path = write_gguf_file(out, gguf_model, tokenizer, quant, name, license, threads)
            if check:
                figures[quant] = require("llama.cpp", quant, verify.check_llama_cpp(path, gguf_model, tokenizer, quant, threads))
        default = os.path.join(out, f"{name}-{quants[-1]}.gguf")
        atomic_write_text(os.path.join(out, "Modelfile"), modelfile(default, tokenizer, model.cfg.max_seq_len))
        atomic_write_text(os.path.join(out, ".verification.json"), json.dumps(figures, indent=1) + "\n")

    stamp = source_stamp(ckpt, name=name, dtype=dtype, quants=list(quants), license=license, pad_ffn=pad, verified=check)
    build_once(folder, stamp, build)
    return modelcard.read_json(os.path.join(folder, ".verification.json"), {})


# ---- revisions and their optimizer state --------------------------------------------------------------

def training_optimizer(model, config):
    """The optimizer train.py builds for a run's config (grouped, as checkpoints number it),
    so that its saved state loads into it."""
    cfg = dataclasses.replace(config_from_dict(config), optimizer_in_backward=False)
    return optimizer_for(model, cfg)


def parameter_names(model, config):
    """HF names of the parameters in the optimizer's numbering (rodin.train.optim.param_groups' order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    muon_weight_decay = config.get("muon_weight_decay") if config.get("optimizer") == "muon" else None
    return [hf_name(names[id(p)]) for group in param_groups(model, 0.0, muon_weight_decay) for p in group["params"]]


OPTIMIZER_STATE = {
    "adamw": ("AdamW (torch.optim)", "exp_avg, exp_avg_sq, step"),
    "muon": ("Muon on the blocks' matrices (torch.optim.Muon), AdamW on the rest",
             "momentum_buffer for Muon's matrices; exp_avg, exp_avg_sq, step for AdamW's"),
}


def write_optimizer_state(ckpt, meta, model, out):
    """out/optimizer.safetensors and out/trainer_state.json. A single-process checkpoint's file is
    copied as it is; a torch.distributed.checkpoint is loaded into one process and written whole."""
    if checkpoint.is_dcp(ckpt):
        optimizer = training_optimizer(model, meta["config"])
        checkpoint.load(ckpt, model, optimizer, restore_rng_state=False)
        tensors, groups = checkpoint.optimizer_tensors(optimizer)
        save_file(tensors, os.path.join(out, "optimizer.safetensors"))
    else:
        shutil.copyfile(os.path.join(ckpt, "optimizer.safetensors"), os.path.join(out, "optimizer.safetensors"))
        groups = meta["optimizer_param_groups"]
    label, keys = OPTIMIZER_STATE[checkpoint.optimizer_name(meta)]
    state = {"step": meta["step"], "tokens_seen": meta.get("tokens_seen"), "optimizer": label,
             "optimizer_param_groups": groups, "param_names": parameter_names(model, meta["config"]),
             "format": f"optimizer.safetensors holds state.<i>.<name> ({keys}) of parameter i of "
                       "param_names; rodin.ship.publish.load_revision loads it back",
             "config": meta["config"], "data": meta.get("data"), "tokenizer": meta.get("tokenizer")}
    atomic_write_text(os.path.join(out, "trainer_state.json"), json.dumps(state, indent=1) + "\n")


def build_revision(folder, ckpt, name, license, with_optimizer, tokenizer_path, check):
    """One milestone checkpoint as a revision folder (float32 HF model, and its optimizer state)."""
    def build(out):
        model, tokenizer, meta, _ = checkpoint.load_run(ckpt, tokenizer_path)
        info = {"license": license, "steps": meta["step"], "tokens seen": f"{meta.get('tokens_seen', 0):,}"}
        write_hf(out, model, tokenizer, "f32", name, dict(info, revision=revision_name(meta["step"])))
        if check:
            require("transformers", "f32", verify.check_transformers(out, model, tokenizer, "f32"))
        if with_optimizer:
            write_optimizer_state(ckpt, meta, model, out)

    return build_once(folder, source_stamp(ckpt, name=name, license=license, with_optimizer=with_optimizer), build)


def load_revision(folder):
    """(model, optimizer, trainer state) of a revision published with its optimizer state: the
    model in float32 from its HF files, the optimizer as train.py builds it, with the saved state."""
    model = load_hf_model(folder)
    state = modelcard.read_json(os.path.join(folder, "trainer_state.json"))
    optimizer = training_optimizer(model, state["config"])
    checkpoint.load_optimizer_tensors(optimizer, load_file(os.path.join(folder, "optimizer.safetensors")),
                                      state["optimizer_param_groups"])
    return model, optimizer, state


# ---- the card and what it shows ------------------------------------------------------------------

def write_card(folder, run_dir, ckpt, meta, model, **card):
    """README.md and the images it shows (loss.png, eval/) into the release folder."""
    facts = modelcard.gather(run_dir, ckpt, meta, model, **card)
    if facts["loss_png"]:
        copy_file(os.path.join(run_dir, "loss.png"), os.path.join(folder, "loss.png"))
    evals = facts["evals"]
    for png in evals["curves"] + ([evals["needle_png"]] if evals["needle"] else []):
        copy_file(png, os.path.join(folder, "eval", os.path.basename(png)))
    if evals["newest"]:
        run = {"name": card["name"], "evals": [evals["newest"]]}
        cells, labels = modelcard.eval_scores([run])
        modelcard.plot_evals(cells, list(labels), os.path.join(folder, "eval", "scores.png"))
    atomic_write_text(os.path.join(folder, "README.md"), modelcard.render(facts))


def copy_file(src, dst):
    """Copy under a temporary name, fsync, rename: a reader never sees half a file."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    fsync_file(tmp)
    os.replace(tmp, dst)


# ---- repositories ------------------------------------------------------------------------------------

def git_blob_sha1(path):
    """The git object id of a file (what the Hub reports for files not stored with LFS)."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def release_files(folder):
    """{path in the repo: local path} of a built folder, its bookkeeping (dot files) left out."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if not n.startswith(".") and not n.endswith(".tmp"):
                path = os.path.join(root, n)
                files[os.path.relpath(path, folder).replace(os.sep, "/")] = path
    return files


class LocalRepo:
    """A folder laid out as the Hub repository: one sub-folder per revision (main/, step0005000/, ...)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)

    def __str__(self):
        return self.path

    def prepare(self, private=False):
        os.makedirs(os.path.join(self.path, "main"), exist_ok=True)

    def remote_files(self, revision):
        """{path: ("sha256", hex)} of a revision, or None when it does not exist yet."""
        folder = os.path.join(self.path, revision)
        if not os.path.isdir(folder):
            return None
        return {rel: ("sha256", sha256(path)) for rel, path in release_files(folder).items()}

    def create_revision(self, revision):
        os.makedirs(os.path.join(self.path, revision), exist_ok=True)

    def upload(self, revision, files, message):
        for rel, local in files.items():
            copy_file(local, os.path.join(self.path, revision, rel))


class HubRepo:
    """A model repository on the Hugging Face Hub (huggingface_hub's HfApi; token from `hf auth login` or HF_TOKEN)."""

    def __init__(self, repo_id, api=None):
        from huggingface_hub import HfApi

        self.repo_id, self.api = repo_id, api or HfApi()

    def __str__(self):
        return f"https://huggingface.co/{self.repo_id}"

    def prepare(self, private=False):
        self.api.create_repo(self.repo_id, private=private, exist_ok=True)

    def remote_files(self, revision):
        from huggingface_hub.errors import RevisionNotFoundError
        from huggingface_hub.hf_api import RepoFile

        try:
            entries = list(self.api.list_repo_tree(self.repo_id, recursive=True, revision=revision))
        except RevisionNotFoundError:
            return None
        return {e.path: ("sha256", e.lfs.sha256) if e.lfs else ("git", e.blob_id) for e in entries if isinstance(e, RepoFile)}

    def create_revision(self, revision):
        first = self.api.list_repo_commits(self.repo_id)[-1].commit_id  # newest first: the last is the initial commit
        self.api.create_branch(self.repo_id, branch=revision, revision=first, exist_ok=True)

    def upload(self, revision, files, message):
        from huggingface_hub import CommitOperationAdd

        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=local) for rel, local in files.items()]
        self.api.create_commit(self.repo_id, operations, commit_message=message, revision=revision)


class HashCache:
    """sha256 of local files, remembered by (size, mtime) in release/.hashes.json: a re-run does not
    read gigabytes again to find that nothing changed."""

    def __init__(self, path):
        self.path, self.entries = path, modelcard.read_json(path, {}) or {}

    def sha256(self, path):
        stat = os.stat(path)
        key, seen = os.path.abspath(path), [stat.st_size, stat.st_mtime_ns]
        if self.entries.get(key, [None])[:2] != seen:
            self.entries[key] = seen + [sha256(path)]
        return self.entries[key][2]

    def save(self):
        atomic_write_text(self.path, json.dumps(self.entries, indent=0, sort_keys=True) + "\n")


def changed_files(folder, remote, hashes):
    """{path in the repo: local path} of the files of folder that the remote revision lacks or holds otherwise."""
    changed = {}
    for rel, local in release_files(folder).items():
        kind, digest = remote.get(rel, (None, None))
        mine = hashes.sha256(local) if kind in ("sha256", None) else git_blob_sha1(local)
        if mine != digest:
            changed[rel] = local
    return changed


def publish_folder(repo, revision, folder, message, hashes):
    """Upload what changed in folder to a revision (made if new); returns the paths uploaded."""
    remote = repo.remote_files(revision)
    if remote is None:
        repo.create_revision(revision)
        remote = {}
    changed = changed_files(folder, remote, hashes)
    if changed:
        repo.upload(revision, changed, message)
    return sorted(changed)


def is_local(repo):
    """A Hub id is ORG/NAME; anything else (absolute, ./relative, an existing folder) is a local folder."""
    return os.path.isabs(repo) or repo.startswith((".", "~")) or os.path.isdir(repo) or repo.count("/") != 1


# ---- the command ---------------------------------------------------------------------------------

def publish(run_dir, repo, *, name=None, repo_id=None, revisions=False, with_optimizer=False, dtype="bf16",
            quants=QUANTS, license="apache-2.0", base_model=None, private=False, pad=False, tokenizer=None,
            threads=None, check=True, out=None, api=None):
    """Build the release of run_dir and upload what changed to repo; returns {revision: paths uploaded}."""
    if with_optimizer and not revisions:
        raise ValueError("--with_optimizer publishes the optimizer state of the revisions; add --revisions")
    if not os.path.isdir(checkpoint.checkpoint_root(run_dir)):
        raise ValueError(f"{run_dir}: not a run directory (no checkpoints/); publish runs/NAME, made by train.py or sft.py")
    local = is_local(repo)
    name = name or os.path.basename(os.path.normpath(repo if local else repo.split("/")[1]))
    repo_id = repo_id or (f"ORG/{name}" if local else repo)
    release = out or os.path.join(run_dir, "release")
    ckpt = checkpoint.resolve(run_dir)
    model, tok, meta, _ = checkpoint.load_run(ckpt, tokenizer)
    print(f"{ckpt}: step {meta['step']}, {model.num_params():,} parameters -> {repo}")
    main_dir = os.path.join(release, "main")
    verification = build_main(main_dir, ckpt, model, tok, meta, name, dtype, list(quants), license, pad, threads, check)
    kept = milestones(run_dir) if revisions else []
    names = [revision_name(checkpoint.read_meta(c)["step"]) for c in kept]
    for ckpt_path, revision in zip(kept, names):
        build_revision(os.path.join(release, "revisions", revision), ckpt_path, name, license, with_optimizer, tokenizer, check)
    write_card(main_dir, run_dir, ckpt, meta, model, name=name, repo_id=repo_id, dtype=dtype, quants=list(quants),
               license=license, verification=verification, revisions=names, with_optimizer=with_optimizer,
               base_model=base_model)

    target = LocalRepo(repo) if local else HubRepo(repo, api)
    target.prepare(private)
    hashes = HashCache(os.path.join(release, ".hashes.json"))
    uploaded = {}
    try:
        for revision in names:
            uploaded[revision] = publish_folder(target, revision, os.path.join(release, "revisions", revision),
                                                f"{name}: checkpoint {revision}", hashes)
        uploaded["main"] = publish_folder(target, "main", main_dir, f"{name}: release of step {meta['step']}", hashes)
    finally:
        hashes.save()
    for revision, paths in uploaded.items():
        print(f"{target} @ {revision}: " + (f"uploaded {', '.join(paths)}" if paths else "up to date"))
    return uploaded


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory (runs/NAME): its newest complete checkpoint is released")
    parser.add_argument("--repo", required=True, help="Hub repository ORG/NAME, or a local folder (absolute or ./path)")
    parser.add_argument("--name", help="model name in file names and the card (default: the repository's name)")
    parser.add_argument("--repo_id", help="the Hub id the card's snippets use (default: --repo; ORG/<name> for a folder)")
    parser.add_argument("--revisions", action="store_true", help="publish the milestone checkpoints as revisions step0005000, ...")
    parser.add_argument("--with_optimizer", action="store_true", help="each revision with its optimizer state")
    parser.add_argument("--dtype", default="bf16", choices=["f32", "f16", "bf16"], help="weights of the transformers model")
    parser.add_argument("--quants", default=",".join(QUANTS), help="GGUF types (the last is the Modelfile's)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--base_model", help="the Hub id of the base model, for an instruct model's card")
    parser.add_argument("--private", action="store_true", help="create the Hub repository private")
    parser.add_argument("--pad_ffn", action="store_true", help="zero-pad the FFN to a multiple of 256 so K-quants apply")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the run directory's copy)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (verification, K-quants)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check every export against transformers / llama.cpp before uploading")
    parser.add_argument("--out", help="where the release is built (default: <run>/release)")
    args = parser.parse_args(argv)
    publish(args.run.rstrip("/"), args.repo, name=args.name, repo_id=args.repo_id, revisions=args.revisions,
            with_optimizer=args.with_optimizer, dtype=args.dtype, quants=args.quants.split(","), license=args.license,
            base_model=args.base_model, private=args.private, pad=args.pad_ffn, tokenizer=args.tokenizer,
            threads=args.threads, check=args.verify, out=args.out)
    return 0
