"""The one place that resolves every "auto" choice, once, at start-up: device, dtype, attention
backend, the host KV tier, threads. Everything downstream receives concrete values.
"""

from __future__ import annotations

import os
import warnings

import torch

from metroline.config import WEIGHT_CHOICES


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # On CPUs without AMX bf16 matmuls run slower than fp32 (measured); GPUs use bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_attention_backend(name: str, device: torch.device, kv_cache_dtype: torch.dtype | None = None) -> str:
    """'auto': on a CPU with metroline's C++ kernels built, "cpu" (fused RoPE + K/V write, paged
    attention straight from the blocks) unless the KV cache format asked for is one those
    kernels do not read (bf16, fp8); else "torch", which runs anywhere (a CUDA backend
    registers in attention/ when present)."""
    if name != "auto":
        return name
    if device.type == "cpu":
        from metroline.kernels import fused
        from metroline.kernels.kv_cache import CPU_KERNEL_KV_DTYPES

        if (fused.available("paged_attention_decode") and fused.available("rope_kv_write")
                and (kv_cache_dtype is None or kv_cache_dtype in CPU_KERNEL_KV_DTYPES)):
            return "cpu"
    return "torch"


def resolve_kv_cache_dtype(name: str) -> torch.dtype | None:
    """--kv-cache-dtype: None for 'auto' (the attention backend's default), else the torch dtype
    the cache is kept in (kernels/kv_cache.py; the backend refuses a format it cannot read)."""
    from metroline.kernels.kv_cache import KV_CACHE_DTYPES

    return None if name == "auto" else KV_CACHE_DTYPES[name]


def resolve_kv_cache_memory_fraction(fraction: float | None, device: torch.device) -> float:
    """Share of free memory the KV pool may take. The CPU's memory is shared with everything
    else on the machine (and a small model needs little), a GPU's is the engine's own."""
    if fraction is not None:
        return fraction
    return 0.9 if device.type == "cuda" else 0.05


def resolve_host_kv_cache_memory(value: int | None, device: torch.device, enable_prefix_caching: bool,
                                 available_host_bytes: int) -> int:
    """Bytes for the host KV tier. None (auto): 10% of free host memory behind an accelerator,
    off on the CPU device (its blocks already live in host memory); 0: off."""
    if not enable_prefix_caching:
        return 0
    if value is None:
        return int(available_host_bytes * 0.1) if device.type == "cuda" else 0
    return value


def physical_cores() -> int:
    """Physical cores this process may use (SMT siblings counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
                pkg = f.read().strip()
            cores.add((pkg, core))
        except OSError:
            cores.add(("", str(cpu)))
    return max(1, len(cores))


def resolve_threads(threads: int | None) -> int:
    """Intra-op threads for the kernels: the physical cores by default."""
    return threads if threads else physical_cores()


# The packed formats a model can be quantized into at load (--weights q8_0 | q4_0 | q4_1 | int8
# | int4-g{32,64,128}[-asym] | ternary; int4-g32 and int4-g32-asym are GGUF's q4_0 and q4_1).
PACKED_TARGETS = ("q8_0", "q4_0", "q4_1", "int8", "int4-g32", "int4-g32-asym", "int4-g64", "int4-g64-asym",
                  "int4-g128", "int4-g128-asym", "ternary")


def resolve_weights(weights: str, device: torch.device, source_kind: str,
                    kernels_available: bool) -> str:
    """How weights are held: 'packed' (GGUF Q8_0/Q4_0/Q4_1 kept as stored and computed on by
    the C++ kernels), 'q8_0' / 'q4_0' / 'q4_1' / 'int8' / 'int4-g*' / 'ternary' (every matrix
    quantized into that packed format at load, whatever the file stores), or dequantized to 'fp32' / 'bf16' / 'fp16'. auto:
    packed for a GGUF on the CPU when the kernels are built; bf16 on CUDA until a GPU kernel
    exists; else fp32."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"unknown weight format {weights!r} (choose from {', '.join(WEIGHT_CHOICES)})")
    if weights != "auto":
        return weights
    if device.type == "cuda":
        return "bf16"
    if source_kind == "gguf" and device.type == "cpu" and kernels_available:
        return "packed"
    return "fp32"


# On the op-by-op path a step of fewer tokens than this runs its kernels on one thread: at
# batch 1-3 the matmuls are bandwidth-bound and one core streams nearly all of it, while a
# second OpenMP thread stalls at every op's barrier (~300 a step) as soon as anything else
# (the HTTP loop streaming the tokens) takes its core. Measured with `metroline serve` on 2
# cores: one stream 87 tok/s on 1 thread against 54 on 2; 16 streams 268 against 298.
# decode_layers (the whole step in one C++ call, chunks handed out dynamically, so a thread
# that lost its core delays nobody for long) uses every thread at any batch: one stream in
# `metroline serve`, 3 alternating rounds, 2 threads 131 / 145 / 143 tok/s against 1 thread
# 130 / 131 / 114; in-process 174 against 137.
SMALL_STEP_TOKENS = 4


def threads_for_step(num_tokens: int, max_threads: int, whole_step_kernel: bool = False) -> int:
    if whole_step_kernel:
        return max_threads
    return 1 if num_tokens < SMALL_STEP_TOKENS else max_threads


HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 CPU buffer of `nbytes`, 2 MiB-aligned and backed by transparent huge
    pages where the OS offers them (Linux, THP "always" or "madvise"); else plain memory.

    For weights a decode step streams: with 4 KiB pages every 4 KiB of a 100 MB stream is a TLB
    miss and a page walk; with 2 MiB pages, 50 of them. Measured on the default model's 30
    layers (2 cores, 12 alternating rounds): 3.39 -> 3.07 ms a step at 2 threads, 3.85 ->
    3.17 ms at 1."""
    import mmap

    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8)
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is None or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advise)
    except OSError:  # THP off ("never"), or a kernel without it: plain pages still work
        pass
    with warnings.catch_warnings():  # "non-writable buffer" does not apply: the map is writable
        warnings.simplefilter("ignore")
        whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    start = (-whole.data_ptr()) % HUGE_PAGE
    return whole[start:start + nbytes]


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Loading frees ~100 MB of temporaries (GGUF rows before repacking, the packed bytes before
    they move to the huge-page buffer) that glibc keeps in its heap, so the server's resident
    memory would count them: measured 532 -> 457 MB for the default model."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)
