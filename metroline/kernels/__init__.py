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
    "Fmt", "Q4_0", "Q4_1", "Q8_0", "TQ2_0", "I8_ROW", "I4_G64", "I4_G64_ASYM", "I4_G128", "I4_G128_ASYM",
    "GROUP", "BLOCK", "SPEC", "k_multiple", "raw_row_bytes", "bits_per_weight",
    "available", "unavailable_reason", "cpu_isa", "cpu_features", "force_isa",
    "packed_nbytes", "repack", "unpack", "dequant", "qmatmul", "quantize_q8", "embed_rows_op",
    "repack_torch", "unpack_torch", "dequant_torch", "qmatmul_torch", "quantize_q8_torch",
]

logger = logging.getLogger(__name__)


class Fmt(enum.IntEnum):
    """Weight formats: GGUF's numbered as gguf.GGMLQuantizationType, metroline's own (no GGUF
    type holds them) from 100 on. csrc/qmm.h has the table of layouts."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    TQ2_0 = 35  # ternary, GGUF's 2-bit TQ2_0 blocks of 256
    I8_ROW = 100  # int8, one fp32 scale per output row
    I4_G64 = 101  # int4 d*(q-8), fp16 d per 64 weights
    I4_G64_ASYM = 102  # int4 d*q + m per 64
    I4_G128 = 103
    I4_G128_ASYM = 104


Q4_0, Q4_1, Q8_0, TQ2_0 = Fmt.Q4_0, Fmt.Q4_1, Fmt.Q8_0, Fmt.TQ2_0
I8_ROW, I4_G64, I4_G64_ASYM, I4_G128, I4_G128_ASYM = (
    Fmt.I8_ROW, Fmt.I4_G64, Fmt.I4_G64_ASYM, Fmt.I4_G128, Fmt.I4_G128_ASYM)
GROUP = 16  # output rows per packed group
BLOCK = 32  # weights per block along K
_RAW_BLOCK_BYTES = {Fmt.Q4_0: 18, Fmt.Q4_1: 20, Fmt.Q8_0: 34}  # the GGUF formats embed_rows reads
_GGUF_BYTES = (Fmt.Q4_0, Fmt.Q4_1, Fmt.Q8_0)  # formats whose packed quants are GGUF's bytes
# fmt -> (bits per quant, weights per scale along K (0: the whole row), asymmetric, zero point)
SPEC = {
    Fmt.Q4_0: (4, 32, False, 8), Fmt.Q4_1: (4, 32, True, 0), Fmt.Q8_0: (8, 32, False, 0),
    Fmt.TQ2_0: (2, 256, False, 1), Fmt.I8_ROW: (8, 0, False, 0),
    Fmt.I4_G64: (4, 64, False, 8), Fmt.I4_G64_ASYM: (4, 64, True, 0),
    Fmt.I4_G128: (4, 128, False, 8), Fmt.I4_G128_ASYM: (4, 128, True, 0),
}


def k_multiple(fmt) -> int:
    """K must be a multiple of this for `fmt` (its scale group; 32 for I8_ROW)."""
    return SPEC[Fmt(int(fmt))][1] or BLOCK


def raw_row_bytes(fmt, K: int) -> int:
    """Bytes of one raw (unpacked) row of K weights: GGUF's blocks, or metroline's own rows
    (I4_*: d fp16 | (m fp16) | K/2 bytes per group; I8_ROW: d fp32 | K int8)."""
    fmt = Fmt(int(fmt))
    bits, gs, asym, _ = SPEC[fmt]
    if fmt == Fmt.I8_ROW:
        return 4 + K
    return K // gs * ((4 if asym else 2) + gs * bits // 8)


def bits_per_weight(fmt, K: int = 4096) -> float:
    """Stored bits per weight, scales included (I8_ROW's depend on the row length K)."""
    return 8 * raw_row_bytes(fmt, K) / K
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
    """(quant offset, record bytes, 4-byte chunks per row) of one packed (group, block) record
    of a GGUF-bytes format (Q8_0 / Q4_0 / Q4_1)."""
    qoff = 64 if fmt == Fmt.Q4_1 else 32
    nc = 8 if fmt == Fmt.Q8_0 else 4
    return qoff, qoff + GROUP * nc * 4, nc


def _check_k(fmt: Fmt, K: int) -> None:
    mult = k_multiple(fmt)
    if K <= 0 or K % mult:
        raise ValueError(f"{fmt.name} needs K a positive multiple of {mult}, got K={K}")


def _layout(fmt: Fmt, K: int) -> tuple[int, int, int, int]:
    """(32-blocks per record, quant offset, record bytes, records per row of 16 rows)."""
    bits, gs, asym, _ = SPEC[fmt]
    bpr = (gs or K) // BLOCK
    qoff = 64 if asym or fmt == Fmt.I8_ROW else 32
    return bpr, qoff, qoff + bpr * GROUP * BLOCK * bits // 8, K // BLOCK // bpr


def packed_nbytes(fmt, N: int, K: int) -> int:
    """Bytes of the packed form of an [N, K] weight."""
    fmt = _fmt(fmt)
    _check_k(fmt, K)
    _, _, rec, nrec = _layout(fmt, K)
    return -(-N // GROUP) * nrec * rec


def _as_raw(raw) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # GGUFReader's memmaps are read-only; repack only reads
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"raw GGUF rows must be a uint8 [N, row_bytes] array, got {raw.dtype} {tuple(raw.shape)}")
    return raw


def _raw_k(fmt: Fmt, row_bytes: int) -> int:
    """K of raw rows of `row_bytes` bytes (one-line error when no K fits)."""
    bits, gs, asym, _ = SPEC[fmt]
    if fmt == Fmt.I8_ROW:
        if row_bytes <= 4 or (row_bytes - 4) % BLOCK:
            raise ValueError(f"row_bytes {row_bytes} is not 4 + a multiple of 32 (I8_ROW rows: fp32 d | K int8)")
        return row_bytes - 4
    rb = raw_row_bytes(fmt, gs)
    if row_bytes <= 0 or row_bytes % rb:
        raise ValueError(f"row_bytes {row_bytes} is not a multiple of {fmt.name}'s block size {rb}")
    return row_bytes // rb * gs


# ----------------------------------------------------------------------------- public ops


def repack(raw, fmt) -> torch.Tensor:
    """Raw rows (uint8 [N, row_bytes], numpy or torch: GGUF's blocks, or metroline's own rows
    for I8_ROW / I4_*, see raw_row_bytes) -> packed uint8 [packed_nbytes]."""
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
    if fmt not in _GGUF_BYTES:
        return _repack_generic(raw, fmt)
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


def _raw_parts(raw: torch.Tensor, fmt: Fmt):
    """Raw rows -> (codes uint8 [N, K], d bytes [N, nrec, sd], m bytes [N, nrec, 2] or None)."""
    bits, gs, asym, _ = SPEC[fmt]
    N, row_bytes = raw.shape
    K = _raw_k(fmt, row_bytes)
    nrec, rb = K // (gs or K), row_bytes // (K // (gs or K))
    blocks = raw.reshape(N, nrec, rb)
    if fmt == Fmt.I8_ROW:
        return blocks[..., 4:].reshape(N, K), blocks[..., :4], None
    if fmt == Fmt.TQ2_0:  # qs[64] | d: byte 32*j + i holds k = 128*j + 32*l + i at bits 2l
        qs = blocks[..., :64].reshape(N, nrec, 2, 1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)
        return ((qs >> shifts) & 3).reshape(N, K), blocks[..., 64:66], None
    qo = 4 if asym else 2
    qs = blocks[..., qo:].reshape(N, nrec, gs // BLOCK, 16)
    codes = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(N, K)
    return codes, blocks[..., 0:2], (blocks[..., 2:4] if asym else None)


def _repack_generic(raw: torch.Tensor, fmt: Fmt) -> torch.Tensor:
    """Any format from its codes: records d[16] | m[16] | per 32-block the quants of 16 rows."""
    bits, gs, asym, _ = SPEC[fmt]
    codes, d, m = _raw_parts(raw, fmt)
    N, K = codes.shape
    ng, nb = -(-N // GROUP), K // BLOCK
    bpr, qoff, rec, nrec = _layout(fmt, K)

    def rows(t):  # [N, ...] -> [ng, 16, ...], zero rows padding the last group
        out = torch.zeros((ng * GROUP, *t.shape[1:]), dtype=torch.uint8)
        out[:N] = t
        return out.view(ng, GROUP, *t.shape[1:])

    c = rows(codes).view(ng, GROUP, nb, BLOCK)
    if bits == 8:  # byte c*64 + r*4 + j: k = 4c + j
        q = c.view(ng, GROUP, nb, 8, 4)
    elif bits == 4:  # low nibble k = 4c + j, high k = 16 + 4c + j
        q = (c[..., :16] | (c[..., 16:] << 4)).view(ng, GROUP, nb, 4, 4)
    else:  # bits 2l of byte c*64 + r*4 + j: k = 16c + 4l + j
        c2 = c.view(ng, GROUP, nb, 2, 4, 4)
        q = c2[..., 0, :] | (c2[..., 1, :] << 2) | (c2[..., 2, :] << 4) | (c2[..., 3, :] << 6)
    q = q.permute(0, 2, 3, 1, 4).reshape(ng, nrec, -1)  # [ng, nb, chunks, 16, 4]
    parts = [rows(d).permute(0, 2, 1, 3).reshape(ng, nrec, -1)]
    if asym:
        parts.append(rows(m).permute(0, 2, 1, 3).reshape(ng, nrec, -1))
    parts.append(q)
    out = torch.cat(parts, dim=-1)
    assert out.shape[-1] == rec, (out.shape, rec)
    return out.reshape(-1).contiguous()


def _packed_parts(packed: torch.Tensor, fmt: Fmt, N: int, K: int):
    """Packed -> (codes uint8 [ng*16, K], d bytes [ng*16, nrec, sd], m bytes or None)."""
    bits, gs, asym, _ = SPEC[fmt]
    _check_k(fmt, K)
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(fmt, N, K):
        raise ValueError(
            f"packed weights hold {packed.numel()} {packed.dtype} values, expected "
            f"{packed_nbytes(fmt, N, K)} uint8 for {fmt.name} N={N} K={K}")
    bpr, qoff, rec, nrec = _layout(fmt, K)
    ng, nb, sd = -(-N // GROUP), K // BLOCK, 4 if fmt == Fmt.I8_ROW else 2
    r = packed.reshape(ng, nrec, rec)
    d = r[..., : GROUP * sd].reshape(ng, nrec, GROUP, sd).permute(0, 2, 1, 3).reshape(ng * GROUP, nrec, sd)
    m = (r[..., 32:64].reshape(ng, nrec, GROUP, 2).permute(0, 2, 1, 3).reshape(ng * GROUP, nrec, 2)
         if asym else None)
    nc = {8: 8, 4: 4, 2: 2}[bits]
    q = r[..., qoff:].reshape(ng, nb, nc, GROUP, 4).permute(0, 3, 1, 2, 4)  # [ng, 16, nb, nc, 4]
    if bits == 8:
        c = q.reshape(ng, GROUP, nb, BLOCK)
    elif bits == 4:
        q = q.reshape(ng, GROUP, nb, 16)
        c = torch.cat([q & 15, q >> 4], dim=-1)
    else:
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
        c = (q.unsqueeze(-2) >> shifts) & 3  # [ng, 16, nb, 2, 4(l), 4(j)]
    return c.reshape(ng * GROUP, K), d, m


def _unpack_generic(packed: torch.Tensor, fmt: Fmt, N: int, K: int) -> torch.Tensor:
    bits, gs, asym, _ = SPEC[fmt]
    codes, d, m = _packed_parts(packed, fmt, N, K)
    codes, d = codes[:N], d[:N]
    if fmt == Fmt.I8_ROW:
        return torch.cat([d.reshape(N, 4), codes], dim=1).contiguous()
    nrec = K // gs
    if fmt == Fmt.TQ2_0:
        c = codes.reshape(N, nrec, 2, 4, 32)
        qs = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
        return torch.cat([qs.reshape(N, nrec, 64), d], dim=-1).reshape(N, -1).contiguous()
    c = codes.reshape(N, nrec, gs // BLOCK, BLOCK)
    qs = (c[..., :16] | (c[..., 16:] << 4)).reshape(N, nrec, -1)
    parts = [d] + ([m[:N]] if asym else []) + [qs]
    return torch.cat(parts, dim=-1).reshape(N, -1).contiguous()


def _dequant_generic(packed: torch.Tensor, fmt: Fmt, N: int, K: int) -> torch.Tensor:
    bits, gs, asym, zero = SPEC[fmt]
    codes, d, m = _packed_parts(packed, fmt, N, K)
    codes, rw = codes[:N], gs or K
    if fmt == Fmt.I8_ROW:
        df = d[:N].contiguous().view(torch.float32).reshape(N, 1)
        return (codes.view(torch.int8).float() * df).contiguous()
    df = d[:N].contiguous().view(torch.float16).float().reshape(N, -1).repeat_interleave(rw, dim=1)
    if bits == 8:
        return codes.view(torch.int8).float() * df
    if asym:
        mf = m[:N].contiguous().view(torch.float16).float().reshape(N, -1).repeat_interleave(rw, dim=1)
        return df * codes.float() + mf
    return df * (codes.to(torch.int16) - zero).float()


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
    if fmt not in _GGUF_BYTES:
        return _unpack_generic(packed, fmt, N, K)
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
    if fmt not in _GGUF_BYTES:
        return _dequant_generic(packed, fmt, N, K)
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
