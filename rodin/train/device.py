"""What a device can do, decided here and asked by the rest: which device and precision a run uses,
its memory, whether torch.compile has its compiler there, and the peak FLOP/s that MFU is
measured against (the datasheet's, and a matmul measured on the card)."""

import contextlib
import importlib.util
import os
import platform
import time

import torch

# dense bf16 tensor-core peak (FLOP/s, fp32 accumulate) by a substring of the device name
PEAK_BF16_FLOPS = [
    ("B200", 2250e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("A6000", 155e12),
    ("L4", 121e12),
    ("A10", 125e12),
]


def describe(device):
    """'cuda:0 (NVIDIA H100 80GB HBM3)', or 'cpu': the device as an error message names it."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def memory_gib(device):
    """What one device has: a CUDA card's memory, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def has_cpp_compiler():
    """Whether inductor finds the C++ compiler it compiles CPU kernels with."""
    try:
        from torch._inductor import exc
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: let torch.compile say what it lacks
        return True
    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return False
    return True


def compiler_missing(device):
    """What torch.compile lacks on this device, in words, or None: Triton on CUDA, a C++ compiler
    on the CPU."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs Triton, which this torch install lacks (pip install triton)"
        return None
    if not has_cpp_compiler():
        return "torch.compile on the CPU needs a C++ compiler (g++, or the one named by $CXX) and none was found"
    return None


def hardware_name(device):
    """What a run computes on, for its record: the GPU's name, or the CPU's architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine() or 'unknown'})"


def pick_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 is the fast path:
    a 2048² matmul ran at 827 GFLOP/s in bf16 against 191 in fp32 on an AMD EPYC with AVX512-BF16.
    Elsewhere torch emulates bf16 and it is slower than fp32. Asks torch, else the CPU flags."""
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch.cpu's own probes
        probe = getattr(torch.cpu, check, None)
        if probe is not None:
            try:
                if probe():
                    return True
            except RuntimeError:
                pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cuda_has_native_bf16(device):
    """Whether a CUDA card computes bf16 natively (compute capability 8.0: A100, RTX 30xx and later).
    Older ones (V100, T4, RTX 20xx) emulate it, slower than fp32."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(device, dtype="auto"):
    """fp32 or bf16: auto is bf16 autocast where it is native (CUDA cards from compute capability
    8.0, CPUs with AVX512-BF16 or AMX), else fp32."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_native_bf16(device) else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype={dtype}: choose auto, fp32 or bf16")
    return dtype


def autocast(device, dtype="auto", cache=True):
    """bf16 autocast (bf16 needs no GradScaler: it has fp32's exponent range; weights, gradients
    and optimizer state stay fp32), or nothing for fp32; dtype as in resolve_dtype.
    cache=False: no bf16 copy of every weight kept until the forward ends. With recomputed blocks
    backward casts them again anyway, and rodin-1b's copies are 2.3 GiB (bench/memory_estimate.py)."""
    if resolve_dtype(device, dtype) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


def peak_flops(device):
    """Peak bf16 FLOP/s of a CUDA device, or None when unknown (then no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def measured_matmul_flops(device, n=8192, repeats=20):
    """FLOP/s of an n x n x n bf16 matmul on this device, timed after a warm-up: the peak a training
    step could reach here (H100s reach ~70-80 % of their datasheet's), so that an MFU against it
    and one against PEAK_BF16_FLOPS, side by side, say how far the step is from the card's best."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_memory_gib(device):
    """Peak memory of this process: CUDA tensors allocated on a GPU, resident set size on CPU."""
    if device.type != "cuda":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return torch.cuda.max_memory_allocated(device) / 2**30
