"""Low-rank adapters (LoRA, Hu et al. 2021): the base weights frozen, each target matrix W of the
blocks used as W + (alpha / r) B A, with A (r x in) and B (out x r) the only weights trained.

Frozen decisions:
- An adapter sits on its nn.Linear (a `lora` submodule and a forward hook adding its output),
  so rodin/model.py is untouched and the base keeps its names: checkpoints, FSDP2 and export see
  layers.N.attention.wq.weight as ever, and the adapter as layers.N.attention.wq.lora.{a,b}.
- B starts at zero (the first step is the base model's), A as nn.Linear's default init, drawn
  from the run's seed. No dropout: it would break exact resume.
- The base is frozen, in bf16 on CUDA (it is never updated, so an fp32 master copy buys nothing);
  adapters stay fp32 and are trained by AdamW (optim.is_muon_matrix leaves them out of Muon).
- A checkpoint holds the adapters only (checkpoint.model_tensors saves what is trained), with a
  reference to the base (meta "origin", its file hashes); merge() folds them into plain weights.
- A few whole embedding rows train too (RowDeltas: ChatML's two tokens in sft.py, as peft's
  trainable_token_indices): a base may never have seen those tokens (or get them added), and
  adapters on the blocks cannot learn frozen rows. Each row is base + a delta starting at zero; with tied embeddings the
  output row is the same row, untied it has a delta of its own. The loss adds the output deltas'
  logits to the frozen projection's (rodin.train.loss), so no vocabulary-sized matrix is copied.
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = {"attn": ("attention.wq", "attention.wk", "attention.wv", "attention.wo"),
           "ffn": ("feed_forward.w1", "feed_forward.w3", "feed_forward.w2")}


class Adapter(nn.Module):
    def __init__(self, in_features, out_features, rank, alpha, device=None):
        super().__init__()
        self.scale = alpha / rank
        self.a = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.b = nn.Parameter(torch.zeros(out_features, rank, device=device))

    def forward(self, x):
        return F.linear(F.linear(x, self.a), self.b) * self.scale

    def delta(self):
        return (self.b.float() @ self.a.float()) * self.scale


class RowDeltas(nn.Module):
    """Trained deltas (fp32, zero at the start) of the rows `ids` of a frozen (vocab, dim) matrix."""

    def __init__(self, ids, dim, device=None):
        super().__init__()
        self.row_ids = tuple(ids)  # not a buffer: FSDP2 builds on the meta device, and to_empty() would not refill it
        self.delta = nn.Parameter(torch.zeros(len(ids), dim, device=device))

    def ids(self, device):
        return torch.tensor(self.row_ids, dtype=torch.long, device=device)

    def embed(self, tokens, embedded):
        """The frozen embedding's output with each of our tokens' delta added."""
        hits = (tokens.unsqueeze(-1) == self.ids(tokens.device)).to(embedded.dtype)  # (..., rows): one-hot of our ids
        return embedded + hits @ self.delta.to(embedded.dtype)

    def logits(self, hidden, logits):
        """The frozen projection's logits with the deltas' share added to our ids' columns."""
        return add_row_logits(hidden, logits, self.ids(logits.device), self.delta)


def add_row_logits(hidden, logits, ids, delta):
    """logits with the share of trained rows `delta` (k, dim) added to the columns `ids` (k,): a function
    of its tensors alone, so that the chunked loss can pass the delta through torch.utils.checkpoint."""
    return logits.index_add(-1, ids, F.linear(hidden, delta.to(hidden.dtype)).to(logits.dtype))


def _add_row_deltas(module, args, output):
    return module.lora_rows.embed(args[0], output)


def _add_logit_deltas(model, module, args, output):
    return output_rows(model).logits(args[0], output)


def output_rows(model):
    """The RowDeltas of the output projection (the embedding's when tied), or None."""
    if not hasattr(model.tok_embeddings, "lora_rows"):
        return None
    return model.tok_embeddings.lora_rows if model.cfg.tie_embeddings else model.output.lora_rows


def _add_adapter(module, args, output):
    return output + module.lora(args[0])


def _require_grad(module, args, output):
    return output.requires_grad_()


def parse_targets(text):
    """--lora_targets=attn,ffn -> the suffixes of the matrices that get adapters."""
    names = [t for t in text.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora_targets={text}: choose among {', '.join(TARGETS)} (comma-separated)")
    return tuple(suffix for t in names for suffix in TARGETS[t])


def targets(model, suffixes):
    """(name, nn.Linear) of the blocks' matrices that get adapters."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(suffixes)
            and name.startswith("layers.")]


def check_rank(model, rank, suffixes):
    for name, linear in targets(model, suffixes):
        if rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"--lora_rank={rank} is larger than {name} ({linear.out_features} x {linear.in_features}): "
                             f"a rank above {min(linear.in_features, linear.out_features)} adds nothing; lower --lora_rank")


def is_adapter(name):
    return ".lora." in name or ".lora_rows." in name


def apply(model, rank, alpha, suffixes, seed, base_dtype=None, rows=(), embeddings=False):
    """Freeze the model and add adapters to the target matrices (fp32, on their device; A drawn
    from `seed`, see initial_adapters), and deltas to the embedding (and untied output) rows of the
    token ids `rows`. base_dtype: the frozen weights cast to it (bf16 on CUDA). embeddings: the
    embedding (and untied output) matrices train whole instead, in fp32 (peft's modules_to_save).
    On the meta device (FSDP2 builds there) the adapters are allocated and drawn after sharding."""
    check_rank(model, rank, suffixes)
    whole = {id(model.tok_embeddings.weight), id(model.output.weight)} if embeddings else set()
    for p in model.parameters():
        p.requires_grad_(id(p) in whole)
        if base_dtype is not None and id(p) not in whole:
            p.data = p.data.to(base_dtype)
    for _, linear in targets(model, suffixes):
        linear.lora = Adapter(linear.in_features, linear.out_features, rank, alpha, linear.weight.device)
        linear.lora_hook = linear.register_forward_hook(_add_adapter)
    if rows:
        device = model.tok_embeddings.weight.device
        model.tok_embeddings.lora_rows = RowDeltas(rows, model.cfg.dim, device)
        model.tok_embeddings.lora_hook = model.tok_embeddings.register_forward_hook(_add_row_deltas)
        if not model.cfg.tie_embeddings:
            model.output.lora_rows = RowDeltas(rows, model.cfg.dim, device)
        # the plain logits path; the chunked loss adds them itself (rodin.train.loss, output_rows)
        model.output.lora_rows_hook = model.output.register_forward_hook(functools.partial(_add_logit_deltas, model))
    # the frozen embedding's output marked as needing gradients, as without LoRA: every block then
    # sees the same kind of input, and its compiled graph serves them all (else block 0 gets its own)
    model.lora_hook = model.tok_embeddings.register_forward_hook(_require_grad)
    if next(model.parameters()).device.type != "meta":
        model.load_state_dict(initial_adapters(model, seed), strict=False)
    return model


def initial_adapters(model, seed):
    """{name: tensor} of fresh adapters on the CPU, the same for one process or many: A uniform in
    +-1/sqrt(in) (nn.Linear's default), B zero, drawn in module order from `seed`; row deltas zero."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, RowDeltas):
            tensors[f"{name}.delta"] = torch.zeros(module.delta.shape)
        if isinstance(module, Adapter):
            rank, fan_in = module.a.shape
            bound = 1 / math.sqrt(fan_in)
            tensors[f"{name}.a"] = torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)
            tensors[f"{name}.b"] = torch.zeros(module.b.shape)
    return tensors


def settings(cfg, rows=()):
    """What a checkpoint records of a run's adapters and trained rows or matrices (None without LoRA)."""
    if not cfg.lora_rank:
        return None
    return {"rank": cfg.lora_rank, "alpha": float(cfg.lora_alpha), "targets": cfg.lora_targets,
            **({"rows": list(rows)} if rows else {}), **({"embeddings": True} if cfg.lora_train_embeddings else {})}


def check_same(path, meta, cfg, rows=()):
    """A run resumes with the adapters it was trained with, or not at all."""
    if meta.get("lora") != settings(cfg, rows):
        raise ValueError(f"{path}: trained with LoRA {meta.get('lora')}, this run asks for {settings(cfg, rows)}; resume with "
                         "the same --lora_rank, --lora_alpha, --lora_targets, --lora_train_embeddings (and sft.py's --lora_chat_rows), "
                         "or use another --name")


def trainable_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge(model):
    """Fold every adapter into its matrix (W + (alpha/r) B A, in W's dtype) and remove it: a plain
    LLaMA whose every weight trains again."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora"):
            module.weight.copy_((module.weight.float() + module.lora.delta()).to(module.weight.dtype))
            del module.lora
            module.lora_hook.remove()
    for module in (model.tok_embeddings, model.output):  # tied: the output's row is the embedding's
        if hasattr(module, "lora_rows"):
            rows = module.lora_rows
            ids = rows.ids(module.weight.device)
            module.weight[ids] = (module.weight[ids].float() + rows.delta).to(module.weight.dtype)
            del module.lora_rows
    if hasattr(model.output, "lora_rows_hook"):
        model.tok_embeddings.lora_hook.remove()
        model.output.lora_rows_hook.remove()
    model.lora_hook.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
