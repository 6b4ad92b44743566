"""Cross-entropy over a large vocabulary without the full logits in memory.

At 8 x 2048 positions and 64,000 pieces, fp32 logits are 4 GiB (and their gradient as much again).
chunked_cross_entropy projects `chunk` positions at a time, sums their losses, and recomputes each
chunk's logits in backward (torch.utils.checkpoint), so at most one chunk of logits is alive. The
arithmetic is the model's own (bf16 matmul under autocast, then fp32 log-softmax): same loss.
"""

import functools

import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rodin.train.lora import add_row_logits


def _chunk_loss_sum(hidden, weight, targets, row_ids=None, row_delta=None):
    logits = F.linear(hidden, weight)
    if row_ids is not None:  # LoRA's trained rows (rodin.train.lora.RowDeltas): their logits' share
        logits = add_row_logits(hidden, logits, row_ids, row_delta)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(hidden, weight, targets, chunk=2048, rows=None):
    """Mean cross-entropy of (..., dim) hidden states projected by weight (vocab, dim) against
    targets (...), ignoring -100, computed `chunk` positions at a time. rows: a module whose `delta`
    (k, dim) is added to the rows `ids` of weight (LoRA's trained rows), read at each call (FSDP2
    swaps the tensors of a module's parameters), and whose gradient reaches it alone."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    extra = () if rows is None else (rows.ids(hidden.device), rows.delta)
    total = None
    # split (not slicing in a loop): one backward node concatenates the chunks' gradients once
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        part = checkpoint(_chunk_loss_sum, h, weight, t, *extra, use_reentrant=False)
        total = part if total is None else total + part
    return total / (targets != -100).sum().clamp(min=1)


def make_loss_fn(chunk, rows=None):
    """The loss_fn argument of LLaMA.forward for a config's loss_chunk (0: None, the plain loss).
    rows: the model's trained output rows (rodin.train.lora.output_rows), if any."""
    return functools.partial(chunked_cross_entropy, chunk=chunk, rows=rows) if chunk > 0 else None
