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
"""

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
    return ".lora." in name


def apply(model, rank, alpha, suffixes, seed, base_dtype=None):
    """Freeze the model and add adapters to the target matrices (fp32, on their device; A drawn
    from `seed`, see initial_adapters). base_dtype: the frozen weights cast to it (bf16 on CUDA).
    On the meta device (FSDP2 builds there) the adapters are allocated and drawn after sharding."""
    check_rank(model, rank, suffixes)
    for p in model.parameters():
        p.requires_grad_(False)
        if base_dtype is not None:
            p.data = p.data.to(base_dtype)
    for _, linear in targets(model, suffixes):
        linear.lora = Adapter(linear.in_features, linear.out_features, rank, alpha, linear.weight.device)
        linear.lora_hook = linear.register_forward_hook(_add_adapter)
    # the frozen embedding's output marked as needing gradients, as without LoRA: every block then
    # sees the same kind of input, and its compiled graph serves them all (else block 0 gets its own)
    model.lora_hook = model.tok_embeddings.register_forward_hook(_require_grad)
    if next(model.parameters()).device.type != "meta":
        model.load_state_dict(initial_adapters(model, seed), strict=False)
    return model


def initial_adapters(model, seed):
    """{name: tensor} of fresh adapters on the CPU, the same for one process or many: A uniform in
    +-1/sqrt(in) (nn.Linear's default), B zero, drawn in module order from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            rank, fan_in = module.a.shape
            bound = 1 / math.sqrt(fan_in)
            tensors[f"{name}.a"] = torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)
            tensors[f"{name}.b"] = torch.zeros(module.b.shape)
    return tensors


def settings(cfg):
    """What a checkpoint records of a run's adapters (None without LoRA)."""
    return {"rank": cfg.lora_rank, "alpha": float(cfg.lora_alpha), "targets": cfg.lora_targets} if cfg.lora_rank else None


def check_same(path, meta, cfg):
    """A run resumes with the adapters it was trained with, or not at all."""
    if meta.get("lora") != settings(cfg):
        raise ValueError(f"{path}: trained with LoRA {meta.get('lora')}, this run asks for {settings(cfg)}; "
                         "resume with the same --lora_rank, --lora_alpha and --lora_targets, or use another --name")


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
    model.lora_hook.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
