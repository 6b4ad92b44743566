"""FP8 matmuls for the blocks' linear layers (--fp8): torch._scaled_mm, forward and backward.

Frozen decisions:
- Our own ~100 lines on torch._scaled_mm rather than torchao's float8 training: the GPU machines
  rodin is measured on have torch but no torchao (and no network), _scaled_mm also runs on a CPU
  (so the tests run the real FP8 arithmetic, not a mock), and the layer is a class swap of
  nn.Linear: the parameters, their names, the checkpoints and the exports do not change.
- Dynamic scaling, as torchao's default: each matmul's operands are scaled by their own amax
  just before the cast (no history to checkpoint, so resume stays exact). Forward operands in
  e4m3 (precision), gradients in e5m2 (range) for tensorwise, e4m3 for rowwise (as torchao). `tensorwise`: one scale per tensor; `rowwise`: one
  per row of the left operand and per column of the right one, along the dimension each matmul
  sums over (torchao: +25 % and +10 % on 8 x H100 for Llama-3 8B; rowwise keeps more accuracy).
- The weights stay fp32 (the optimizer's master copy) and are cast on every use; under FSDP2 the
  all-gather is bf16 as without FP8 (no float8 all-gather: torchao's needs its own tensor subclass).
- Only the blocks' matrices (attention and FFN); the embedding and the output head stay bf16, as in
  torchtitan and nanochat. _scaled_mm needs sizes that are multiples of 16: a matrix that is not
  (RODIN-1B's FFN, 5,461 wide; Lucie-7B's 14,336 is) stays bf16, and so does a matmul over an SFT
  batch of odd length. Padding them (torchao's pad_inner_dim) is left for a card to measure.
"""

import torch
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")
BLOCK_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
FP8_CAPABILITY = (8, 9)  # RTX 4090, L40S, H100/H200, B200; an RTX 3090 (8.6) has no FP8


def to_fp8(t, dtype, dim=None):
    """(t cast to dtype after scaling by its amax, the inverse scale as fp32): one scale for the
    whole tensor (dim None) or one per slice along dim (kept as a size-1 dimension)."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = torch.finfo(dtype).max / amax.float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype), scale.reciprocal()


def scaled_mm(a, b, a_dtype, b_dtype, rowwise):
    """a @ b in FP8 with bf16 out: a (M, K) scaled per row, b (K, N) per column when rowwise."""
    a8, a_inv = to_fp8(a, a_dtype, -1 if rowwise else None)
    b8, b_inv = to_fp8(b, b_dtype, 0 if rowwise else None)
    # _scaled_mm takes its left operand row-major and its right one column-major
    return torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=a_inv, scale_b=b_inv,
                            out_dtype=torch.bfloat16)


class Float8Matmul(torch.autograd.Function):
    """y = x @ w.T with x (M, K), w (N, K); both gradients are FP8 matmuls too."""

    @staticmethod
    def forward(ctx, x, w, rowwise):
        ctx.save_for_backward(x, w)
        ctx.rowwise = rowwise
        return scaled_mm(x, w.t(), E4M3, E4M3, rowwise)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        grad_dtype = E4M3 if ctx.rowwise else E5M2  # CUDA's rowwise kernel takes e4m3 only (torchao's rowwise recipe too)
        grad_x = scaled_mm(grad_y, w, grad_dtype, E4M3, ctx.rowwise)
        grad_w = scaled_mm(grad_y.t(), x, grad_dtype, E4M3, ctx.rowwise)
        return grad_x, grad_w.to(w.dtype), None


class Float8Linear(torch.nn.Linear):
    """nn.Linear (no bias) whose matmul is FP8; set by convert(), same parameters and state dict."""

    fp8_recipe = "tensorwise"

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] % 16 or not torch.is_grad_enabled():  # odd sizes, evaluation and sampling: bf16
            return F.linear(x, self.weight)
        x_bf16 = flat if flat.dtype == torch.bfloat16 else flat.to(torch.bfloat16)
        w_bf16 = self.weight.to(torch.bfloat16)
        y = Float8Matmul.apply(x_bf16, w_bf16, self.fp8_recipe == "rowwise").reshape(*x.shape[:-1], -1)
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)  # as F.linear would return


def fp8_sized(module):
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert(model, recipe):
    """The blocks' linear layers of model made Float8Linear (in place), those whose sizes are
    multiples of 16 (_scaled_mm's rule): RODIN-1B's FFN (5,461 wide) stays bf16. Returns how many."""
    count = 0
    for block in model.layers:
        for name, module in block.named_modules():
            if name.rsplit(".", 1)[-1] in BLOCK_LINEARS and type(module) is torch.nn.Linear and fp8_sized(module):
                module.__class__ = Float8Linear
                module.fp8_recipe = recipe
                count += 1
    return count


def has_fp8(device):
    """Whether device runs FP8 matmuls: CUDA of compute capability 8.9+, or a CPU (torch's own kernel)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= FP8_CAPABILITY
    return device.type == "cpu"


def resolve(cfg, device):
    """--fp8 as it applies to this run: off, tensorwise or rowwise. auto: tensorwise on a CUDA card
    with FP8 when the model's matrices are large enough to pay for the casts (cfg.fp8_min_dim),
    off on a CPU (where FP8 is slower than bf16) and on older cards. Bad combinations: ValueError."""
    if cfg.fp8 == "off":
        return "off"
    if cfg.fp8 == "auto":
        big = cfg.model.dim >= cfg.fp8_min_dim
        return "tensorwise" if device.type == "cuda" and has_fp8(device) and big and fits_fp8(cfg.model) else "off"
    if not has_fp8(device):
        card = (f"{torch.cuda.get_device_name(device)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
                if device.type == "cuda" else device.type)
        raise ValueError(f"--fp8={cfg.fp8}: {card} has no FP8 matmuls (compute capability 8.9 or more: RTX 4090, L40S, "
                         f"H100, B200); use --fp8=off, or --fp8=auto to use them where they exist")
    if not fits_fp8(cfg.model):
        raise ValueError(f"--fp8={cfg.fp8}: FP8 matmuls need the model's dim and heads x head_dim divisible by 16 "
                         f"(dim={cfg.model.dim}, n_heads={cfg.model.n_heads}, n_kv_heads={cfg.model.n_kv_heads}, "
                         f"head_dim={cfg.model.head_dim}); use --fp8=off")
    return cfg.fp8


def fits_fp8(model_cfg):
    """Whether any of the blocks' matrices can be FP8: the attention's, sized by dim and the heads."""
    sizes = (model_cfg.dim, model_cfg.n_heads * model_cfg.head_dim, model_cfg.n_kv_heads * model_cfg.head_dim)
    return all(s % 16 == 0 for s in sizes)


def precision(cfg, device):
    """What a run computes in, for its first lines: 'bf16', or 'bf16 + fp8 tensorwise'."""
    from rodin.train.device import resolve_dtype

    recipe = resolve(cfg, device)
    if recipe == "off":
        return resolve_dtype(device, cfg.dtype)
    ffn = "" if cfg.model.ffn_dim % 16 == 0 else f" (attention only: ffn_dim {cfg.model.ffn_dim} is not a multiple of 16)"
    return f"{resolve_dtype(device, cfg.dtype)} + fp8 {recipe}{ffn}"
