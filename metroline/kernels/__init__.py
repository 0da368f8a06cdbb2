"""Packed quantized-weight matmuls: metroline's C++ kernels (csrc/) and their pure-torch twins.

The only module that imports the compiled extension (`metroline._C`). Weights in GGUF's
Q8_0 / Q4_0 / Q4_1 blocks are converted once, at load, into the kernels' own layout
(`repack`); `qmatmul(x, packed, fmt, N, K)` then computes `x @ W.T` straight from it,
quantizing x to int8 per 32-block (llama.cpp's Q8 style) and using integer dot products.

Packed layout (csrc/qmm.h has the byte diagram): output rows in groups of 16; per group
and 32-block one record `d[16] fp16 | m[16] fp16 (Q4_1) | quants`, the quants arranged
4 k-values of 16 rows at a time. The last group is zero-padded.

When the extension is missing (build failed, non-x86 compiler trouble ...), every function
here still works on the same packed bytes through pure torch, logging one warning:
`qmatmul` then dequantizes to fp32 and calls F.linear on each call, so it is much slower.
"""

from __future__ import annotations

import contextlib
import importlib
import enum
import logging
import warnings
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Fmt", "Q4_0", "Q4_1", "Q8_0", "GROUP", "BLOCK",
    "available", "unavailable_reason", "cpu_isa", "cpu_features", "force_isa",
    "packed_nbytes", "repack", "unpack", "dequant", "qmatmul", "quantize_q8", "embed_rows_op",
    "repack_torch", "unpack_torch", "dequant_torch", "qmatmul_torch", "quantize_q8_torch",
]

logger = logging.getLogger(__name__)


class Fmt(enum.IntEnum):
    """Weight formats, numbered as gguf.GGMLQuantizationType."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8


Q4_0, Q4_1, Q8_0 = Fmt.Q4_0, Fmt.Q4_1, Fmt.Q8_0
GROUP = 16  # output rows per packed group
BLOCK = 32  # weights per block along K
_RAW_BLOCK_BYTES = {Fmt.Q4_0: 18, Fmt.Q4_1: 20, Fmt.Q8_0: 34}
_ISAS = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2}

try:
    # The compiled extension, optional; importing it registers torch.ops.metroline.*.
    importlib.import_module("metroline._C")

    _ops = torch.ops.metroline
    _reason: str | None = None
except Exception as e:  # ImportError, or an ABI mismatch with this torch
    _ops = None
    _reason = (
        f"metroline._C could not be imported ({type(e).__name__}: {e}); the C++ build failed or was "
        "skipped at install. To fix: `pip install --no-build-isolation -e .` with a C++ compiler"
    )

_isa = -1  # what force_isa selected; -1 = the best this CPU runs
_warned = False

if _ops is not None:
    @torch.library.register_fake("metroline::qmatmul")
    def _qmatmul_fake(x, packed, fmt, N, K, isa=-1):
        return x.new_empty((*x.shape[:-1], N))

    @torch.library.register_fake("metroline::embed_rows")
    def _embed_rows_fake(raw, ids, fmt):
        row_bytes = raw.shape[1]
        return raw.new_empty((ids.shape[0], row_bytes // _RAW_BLOCK_BYTES[Fmt(fmt)] * BLOCK), dtype=torch.float32)

    @torch.library.register_fake("metroline::dequant")
    def _dequant_fake(packed, fmt, N, K):
        return packed.new_empty((N, K), dtype=torch.float32)


def available() -> bool:
    """Whether the compiled kernels are loaded."""
    return _ops is not None


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not loaded (None when they are)."""
    return _reason


def cpu_isa() -> str:
    """The best kernel path on this CPU: "avx512" (with VNNI), "avx2", "scalar", or "torch"
    when the extension is missing. Read from the CPU at run time."""
    return _ops.cpu_isa() if _ops is not None else "torch"


def cpu_features() -> str:
    """Comma-separated SIMD features the kernels care about (CPU and OS both support them)."""
    return _ops.cpu_features() if _ops is not None else ""


@contextlib.contextmanager
def force_isa(name: str) -> Iterator[None]:
    """Run qmatmul/quantize_q8 on one path ("scalar", "avx2", "avx512", "auto") inside the
    block; for tests and benchmarks. Process-wide, not thread-safe."""
    global _isa
    if name not in _ISAS:
        raise ValueError(f"unknown isa {name!r}; expected one of {sorted(_ISAS)}")
    if _ops is None and name != "auto":
        raise RuntimeError(f"cannot force isa {name!r}: {_reason}")
    if name in ("avx2", "avx512") and name not in supported_isas():
        raise RuntimeError(f"this CPU (or build) cannot run the {name} kernels ({cpu_features() or 'no SIMD'})")
    old, _isa = _isa, _ISAS[name]
    try:
        yield
    finally:
        _isa = old


def current_isa() -> int:
    """The path force_isa selected, as the ops' `isa` argument (-1: the best this CPU runs)."""
    return _isa


def supported_isas() -> list[str]:
    """Kernel paths this CPU and build can run, slowest first."""
    if _ops is None:
        return []
    order = ["scalar", "avx2", "avx512"]
    return order[: order.index(_ops.cpu_isa()) + 1]


def _fallback(what: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("metroline: C++ kernels unavailable, %s runs on the torch path (slower): %s", what, _reason)


def _fmt(fmt) -> Fmt:
    try:
        return Fmt(int(fmt))
    except ValueError:
        raise ValueError(f"unsupported weight format {fmt!r}; expected one of {[f.name for f in Fmt]}") from None


def _record_layout(fmt: Fmt) -> tuple[int, int, int]:
    """(quant offset, record bytes, 4-byte chunks per row) of one packed (group, block) record."""
    qoff = 64 if fmt == Fmt.Q4_1 else 32
    nc = 8 if fmt == Fmt.Q8_0 else 4
    return qoff, qoff + GROUP * nc * 4, nc


def packed_nbytes(fmt, N: int, K: int) -> int:
    """Bytes of the packed form of an [N, K] weight."""
    fmt = _fmt(fmt)
    return -(-N // GROUP) * (K // BLOCK) * _record_layout(fmt)[1]


def _as_raw(raw) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # GGUFReader's memmaps are read-only; repack only reads
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"raw GGUF rows must be a uint8 [N, row_bytes] array, got {raw.dtype} {tuple(raw.shape)}")
    return raw


# ----------------------------------------------------------------------------- public ops


def repack(raw, fmt) -> torch.Tensor:
    """GGUF rows (uint8 [N, row_bytes], numpy or torch) -> packed uint8 [packed_nbytes]."""
    fmt, raw = _fmt(fmt), _as_raw(raw)
    if _ops is None:
        _fallback("repack")
        return repack_torch(raw, fmt)
    return _ops.repack(raw, int(fmt))


def unpack(packed: torch.Tensor, fmt, N: int, K: int) -> torch.Tensor:
    """Packed weights -> the exact GGUF rows, uint8 [N, K/32 * block_bytes] (for export)."""
    fmt = _fmt(fmt)
    if _ops is None:
        _fallback("unpack")
        return unpack_torch(packed, fmt, N, K)
    return _ops.unpack(packed, int(fmt), N, K)


def dequant(packed: torch.Tensor, fmt, N: int, K: int) -> torch.Tensor:
    """Packed weights -> fp32 [N, K], bit-identical to gguf.quants.dequantize."""
    fmt = _fmt(fmt)
    if _ops is None:
        _fallback("dequant")
        return dequant_torch(packed, fmt, N, K)
    return _ops.dequant(packed, int(fmt), N, K)


def embed_rows_op():
    """The compiled embed_rows(raw, ids, fmt) op (GGUF rows -> fp32, bit-identical to
    gguf.quants.dequantize), or None without it (quant.packed then dequantizes with torch ops)."""
    if _ops is None:
        return None
    try:
        return _ops.embed_rows.default
    except (AttributeError, RuntimeError):
        return None


def qmatmul(x: torch.Tensor, packed: torch.Tensor, fmt, N: int, K: int) -> torch.Tensor:
    """y = x @ W.T for x [..., K] (any float dtype) and packed W [N, K]; y [..., N] in x's dtype.

    x is quantized to int8 per 32-block (relative error of y ~0.5%, see tests/unit/test_kernels.py).
    Every weight byte is read once per call whatever the number of rows of x, so batching rows
    into one call is nearly free until the kernel becomes compute-bound (M ~ 4-8).
    """
    if _ops is not None:  # the decode hot path: ~3 us of overhead (fmt and shapes checked in C++)
        if x.dtype is torch.float32:
            return _ops.qmatmul(x, packed, fmt, N, K, _isa)
        return _ops.qmatmul(x.float(), packed, fmt, N, K, _isa).to(x.dtype)
    fmt = _fmt(fmt)
    _fallback("qmatmul")
    y = qmatmul_torch(x.reshape(-1, x.shape[-1]), packed, fmt, N, K)
    return y.view(*x.shape[:-1], N).to(x.dtype)


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization of x fp32 [M, K]: (q int8 [M, K], d fp32 [M, K/32])."""
    if _ops is None:
        _fallback("quantize_q8")
        return quantize_q8_torch(x)
    return _ops.quantize_q8(x.float(), _isa)


# --------------------------------------------------------------------- pure-torch twins


def repack_torch(raw: torch.Tensor, fmt) -> torch.Tensor:
    """Pure-torch repack: the same bytes as the C++ one."""
    fmt, raw = _fmt(fmt), _as_raw(raw)
    rb = _RAW_BLOCK_BYTES[fmt]
    N, row_bytes = raw.shape
    if row_bytes % rb:
        raise ValueError(f"row_bytes {row_bytes} is not a multiple of {fmt.name}'s block size {rb}")
    nb, ng = row_bytes // rb, -(-N // GROUP)
    qoff, rec, nc = _record_layout(fmt)
    blocks = torch.zeros(ng * GROUP, nb, rb, dtype=torch.uint8)
    blocks[:N] = raw.reshape(N, nb, rb)
    blocks = blocks.view(ng, GROUP, nb, rb).transpose(1, 2)  # [ng, nb, 16, rb]
    nscale = 4 if fmt == Fmt.Q4_1 else 2
    parts = [blocks[..., 0:2].reshape(ng, nb, 32)]
    if fmt == Fmt.Q4_1:
        parts.append(blocks[..., 2:4].reshape(ng, nb, 32))
    q = blocks[..., nscale:].reshape(ng, nb, GROUP, nc, 4).transpose(2, 3)  # [ng, nb, nc, 16, 4]
    parts.append(q.reshape(ng, nb, rec - qoff))
    return torch.cat(parts, dim=-1).reshape(-1).contiguous()


def _records(packed: torch.Tensor, fmt: Fmt, N: int, K: int) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(fmt, N, K) or K % BLOCK:
        raise ValueError(
            f"packed weights hold {packed.numel()} {packed.dtype} values, expected "
            f"{packed_nbytes(fmt, N, K)} uint8 for {fmt.name} N={N} K={K}"
        )
    return packed.reshape(-1, K // BLOCK, _record_layout(fmt)[1])  # [ng, nb, rec]


def unpack_torch(packed: torch.Tensor, fmt, N: int, K: int) -> torch.Tensor:
    """Pure-torch unpack: packed -> GGUF rows uint8 [N, row_bytes]."""
    fmt = _fmt(fmt)
    r = _records(packed, fmt, N, K)
    ng, nb, _ = r.shape
    qoff, _, nc = _record_layout(fmt)
    parts = [r[..., 0:32].reshape(ng, nb, GROUP, 2)]
    if fmt == Fmt.Q4_1:
        parts.append(r[..., 32:64].reshape(ng, nb, GROUP, 2))
    q = r[..., qoff:].reshape(ng, nb, nc, GROUP, 4).transpose(2, 3).reshape(ng, nb, GROUP, nc * 4)
    parts.append(q)
    blocks = torch.cat(parts, dim=-1).transpose(1, 2)  # [ng, 16, nb, rb]
    return blocks.reshape(ng * GROUP, -1)[:N].contiguous()


def dequant_torch(packed: torch.Tensor, fmt, N: int, K: int) -> torch.Tensor:
    """Pure-torch dequant: fp32 [N, K], the same values as gguf.quants.dequantize."""
    fmt = _fmt(fmt)
    r = _records(packed, fmt, N, K)
    ng, nb, _ = r.shape
    qoff, _, nc = _record_layout(fmt)
    d = r[..., 0:32].contiguous().view(torch.float16).float().transpose(1, 2).unsqueeze(-1)  # [ng,16,nb,1]
    q = r[..., qoff:].reshape(ng, nb, nc, GROUP, 4).permute(0, 3, 1, 2, 4).reshape(ng, GROUP, nb, nc * 4)
    if fmt == Fmt.Q8_0:
        w = q.view(torch.int8).float() * d
    else:
        nib = torch.cat([q & 15, q >> 4], dim=-1)  # byte j: k = j (low), k = 16 + j (high)
        if fmt == Fmt.Q4_0:
            w = d * (nib.to(torch.int8) - 8).float()
        else:
            m = r[..., 32:64].contiguous().view(torch.float16).float().transpose(1, 2).unsqueeze(-1)
            w = d * nib.float() + m
    return w.reshape(ng * GROUP, K)[:N].contiguous()


def qmatmul_torch(x: torch.Tensor, packed: torch.Tensor, fmt, N: int, K: int) -> torch.Tensor:
    """Pure-torch qmatmul: dequantize to fp32, then F.linear (x is not quantized here)."""
    return F.linear(x.float(), dequant_torch(packed, fmt, N, K))


def quantize_q8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of the kernels' activation quantization (bit-identical)."""
    M, K = x.shape
    xb = x.float().reshape(M, K // BLOCK, BLOCK)
    d = xb.abs().amax(dim=-1) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(xb * inv.unsqueeze(-1)).to(torch.int8)  # ties to even, as the kernels
    return q.reshape(M, K), d
