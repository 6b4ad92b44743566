"""Activation checkpointing: keep a block's input, recompute its insides during backward.

Modes: `full` recomputes every block (activations: one (B, T, dim) tensor per block), `half`
every other block, `ops` every block but keeps the outputs of matmuls and attention and only
recomputes the cheap element-wise ops (norms, RoPE, SiLU) — torchtitan's selective policy.
Applied by wrapping each block's forward in place, so parameter names (and checkpoints) do not
change, before torch.compile and FSDP, which then see a checkpointed forward.
"""

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls)


def checkpoint_module(module, selective=False):
    inner = module.forward
    kwargs = {"context_fn": _selective_contexts} if selective else {}

    def forward(*args, **kw):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs, **kw)

    module.forward = forward


def apply(model, mode):
    """Wrap model.layers' forwards according to mode: none | full | half | ops."""
    if mode == "none":
        return model
    for i, block in enumerate(model.layers):
        if mode == "full" or mode == "ops" or (mode == "half" and i % 2 == 0):
            checkpoint_module(block, selective=mode == "ops")
    return model
