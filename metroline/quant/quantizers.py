"""Quantizers from fp32 matrices to a stored format, optionally weighted by the importance of
each input channel (metroline.quant.calibrate), through one entry point: `quantize_weighted`.

Every format's quantizer takes `(w [N, K] float32, importance [K] or None)` and returns the
stored rows (uint8 [N, row_bytes]); `register_quantizer` adds one for a new type. With no
importance, the GGUF types round to nearest exactly as `gguf.quants.quantize` (llama.cpp's
reference quantizer) does. With importance a_k, GGUF Q8_0 / Q4_0 / Q4_1 choose, per 32-weight
block, the scale (Q4_1: scale and minimum) that minimises sum_k a_k (w_k - deq_k)^2 over a set
of candidates, in the spirit of llama.cpp's imatrix quantizers (make_qx_quants /
make_qkx2_quants): the round-to-nearest scale times factors around 1 (Q8_0 127/(127 + i/2),
i in -8..8; Q4_0 8/(8 + i/10), i in -9..9; Q4_1 15/(15 + i/10), i in -10..10); for each, the
weights are rounded on that grid, the scale (and minimum) refitted by weighted least squares
for those integers, rounded to fp16 as stored, and the integers rounded again on the stored
grid. A block keeps its round-to-nearest bytes unless the best candidate's weighted error,
computed on the values the file decodes to, is strictly lower: the weighted error never
exceeds round-to-nearest's, and the bytes are GGUF's block layout (llama.cpp loads them).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

BLOCK = 32
Quantizer = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
QUANTIZERS: dict[int, Quantizer] = {}


def register_quantizer(qtype: int, fn: Quantizer) -> None:
    """`fn(w [N, K] float32, importance [K] | None) -> uint8 [N, row_bytes]` quantizes to `qtype`."""
    QUANTIZERS[int(qtype)] = fn


def quantize_weighted(w: np.ndarray, qtype: int, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows of `w` ([N, K] float32) in format `qtype` (a GGML type number, or a type a
    registered quantizer handles), minimising the importance-weighted squared error per
    block when `importance` ([K], >= 0: mean x_k^2 of the layer's input) is given; without it
    round to nearest (for GGUF types, gguf.quants.quantize bit for bit)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not w.flags.writeable:  # e.g. a memory-mapped file's tensor: torch wants writable arrays
        w = w.copy()
    if w.ndim != 2:
        raise ValueError(f"expected a matrix [N, K], got shape {w.shape}")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32)
        if importance.shape != (w.shape[1],):
            raise ValueError(f"importance has shape {importance.shape}, the matrix {w.shape[1]} input channels")
        if not np.all(np.isfinite(importance)) or np.any(importance < 0):
            raise ValueError("importance must be finite and >= 0")
    fn = QUANTIZERS.get(int(qtype))
    if fn is not None:
        return fn(w, importance)
    if importance is not None:
        raise ValueError(f"no importance-weighted quantizer for type {_type_name(qtype)}")
    return _rtn(w, qtype)


def _type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return str(qtype)


def _rtn(w: np.ndarray, qtype: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(w, GGMLQuantizationType(int(qtype)))


# ------------------------------------------------------------------ GGUF Q8_0 / Q4_0 / Q4_1

# name -> (grid min, grid max, affine (scale and minimum), RTN grid steps N, candidate step, i up to):
# candidate scale = RTN scale * N / (N + step * i).
_GRIDS = {"Q8_0": (-127, 127, False, 127.0, 0.5, 8), "Q4_0": (-8, 7, False, 8.0, 0.1, 9),
          "Q4_1": (0, 15, True, 15.0, 0.1, 10)}


def _weighted_gguf(name: str) -> Quantizer:
    def quantize(w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        rtn = _rtn(w, _gguf_type(name))
        if importance is None:
            return rtn
        return _search(w, importance, rtn, name)
    quantize.__name__ = f"quantize_{name.lower()}"
    return quantize


def _gguf_type(name: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[name])


def decode_blocks(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """GGUF blocks (uint8 [..., block_bytes]) -> fp32 [..., 32], as gguf's dequantize does."""
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    if name == "Q8_0":
        return d * blocks[..., 2:].contiguous().view(torch.int8).float()
    off = 4 if name == "Q4_1" else 2
    qs = blocks[..., off:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()
    if name == "Q4_1":
        return d * q + blocks[..., 2:4].contiguous().view(torch.float16).float()
    return d * (q - 8)


def _encode_blocks(d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor, name: str) -> torch.Tensor:
    """fp16-exact scales d (and minima m) [..., 1] and integers q [..., 32] on the grid as
    GGUF block bytes."""
    parts = [d.half().view(torch.uint8)]
    if m is not None:
        parts.append(m.half().view(torch.uint8))
    if name == "Q8_0":
        parts.append(q.to(torch.int8).view(torch.uint8))
    else:
        u = (q if name == "Q4_1" else q + 8).to(torch.uint8)
        parts.append(u[..., :16] | (u[..., 16:] << 4))
    return torch.cat(parts, dim=-1)


def _search(w: np.ndarray, importance: np.ndarray, rtn: np.ndarray, name: str) -> np.ndarray:
    # One intra-op thread: the tensors are a few MB, and torch's threads cost more than they
    # give (a 576 x 1536 matrix: 0.13 s on one thread; 3-5 s on two, with other processes on
    # the 2 cores making the OpenMP workers wait for each other at every op).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _search_blocks(w, importance, rtn, name)
    finally:
        torch.set_num_threads(threads)


def _search_blocks(w: np.ndarray, importance: np.ndarray, rtn: np.ndarray, name: str) -> np.ndarray:
    qmin, qmax, affine, steps, step, n = _GRIDS[name]
    N, K = w.shape
    if K % BLOCK:
        raise ValueError(f"{name} needs rows of a multiple of {BLOCK} weights, got {K}")
    x = torch.from_numpy(w).view(N, K // BLOCK, BLOCK)
    a = torch.from_numpy(importance).view(1, K // BLOCK, BLOCK).expand_as(x)
    rtn_t = torch.from_numpy(rtn).view(N, K // BLOCK, -1)
    if affine:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        base, origin = (hi - lo) / steps, lo
    else:
        if name == "Q8_0":
            base = x.abs().amax(-1, keepdim=True) / steps
        else:  # Q4_0: the signed extreme maps to -8
            base = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True)) / -steps
        origin = torch.zeros_like(base)
    f64 = torch.float64
    ax = a * x
    sa, saw, saxx = _sum(a), _sum(ax), _sum(ax * x)
    origin64 = origin.double()
    best_err = torch.full(base.shape, float("inf"), dtype=f64)
    best_d, best_m = base.clone(), origin.clone()
    q, t = torch.empty_like(x), torch.empty_like(x)
    for i in range(-n, n + 1):
        d = base * (steps / (steps + step * i))
        safe = torch.where(d == 0, torch.ones_like(d), d)
        if affine:
            torch.sub(x, origin, out=q).div_(safe)
        else:
            torch.div(x, safe, out=q)
        q.round_().clamp_(qmin, qmax)
        # Weighted least squares for these integers: the scale (and the minimum).
        torch.mul(a, q, out=t)
        saq, saqq = _sum(t), _sum(t.mul_(q))
        sawq = _sum(torch.mul(ax, q, out=t))
        if affine:
            det = saqq * sa - saq * saq
            ok = det > 1e-12 * saqq * sa
            det = torch.where(ok, det, torch.ones_like(det))
            d_fit = torch.where(ok, (sawq * sa - saq * saw) / det, d.double())
            m_fit = torch.where(ok, (saqq * saw - saq * sawq) / det, origin64)
        else:
            ok = saqq > 0
            d_fit = torch.where(ok, sawq / torch.where(ok, saqq, torch.ones_like(saqq)), d.double())
            m_fit = origin64
        d16, m16 = d_fit.half().double(), m_fit.half().double()
        # sum a (d q + m - x)^2 for these integers on the stored (fp16) scale and minimum.
        err = (saxx - 2 * d16 * sawq - 2 * m16 * saw + d16 * d16 * saqq + 2 * d16 * m16 * saq
               + m16 * m16 * sa)
        err = torch.where(torch.isfinite(err) & (d16 != 0), err, torch.full_like(err, float("inf")))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d, best_m = torch.where(better, d16.float(), best_d), torch.where(better, m16.float(), best_m)
    # Re-round on the chosen grid, encode, and keep RTN's bytes unless strictly better on
    # the decoded values (errors in float64).
    safe = torch.where(best_d == 0, torch.ones_like(best_d), best_d)
    q = torch.clamp(torch.round((x - best_m) / safe), qmin, qmax)
    ours = _encode_blocks(best_d, best_m if affine else None, q, name)
    a64, x64 = a.double(), x.double()
    e_ours = (a64 * (x64 - decode_blocks(ours, name).double()) ** 2).sum(-1)
    e_rtn = (a64 * (x64 - decode_blocks(rtn_t, name).double()) ** 2).sum(-1)
    out = torch.where((e_ours < e_rtn).unsqueeze(-1), ours, rtn_t)
    return out.reshape(N, -1).numpy()


def _sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over a block, in float32 (fast; float64 sums of float32 cost ~3x), as float64."""
    return t.sum(-1, keepdim=True).double()


def weighted_error(w: np.ndarray, rows: np.ndarray, qtype: int, importance: np.ndarray) -> np.ndarray:
    """sum_k a_k (w_k - deq_k)^2 per 32-block ([N, K // 32], float64) of stored `rows`,
    decoded by gguf's own dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    deq = dequantize(rows, GGMLQuantizationType(int(qtype))).astype(np.float64)
    diff = (w.astype(np.float64) - deq) ** 2 * importance.astype(np.float64)
    return diff.reshape(w.shape[0], -1, BLOCK).sum(-1)


for _name in _GRIDS:
    register_quantizer(_gguf_type(_name), _weighted_gguf(_name))


# ------------------------------------------------------------------ metroline's packed formats

def _register_packed_formats() -> None:
    """int8 per row, int4 with groups of 64 / 128 and ternary (TQ2_0, absmean scales):
    metroline.quant.formats, whose quantizers take the same optional importance (a weighted
    search over a few candidate scales, RTN's included)."""
    from metroline.kernels import Fmt
    from metroline.quant import formats

    for fmt in (Fmt.I8_ROW, Fmt.I4_G64, Fmt.I4_G64_ASYM, Fmt.I4_G128, Fmt.I4_G128_ASYM, Fmt.TQ2_0):
        register_quantizer(int(fmt), lambda w, importance, f=fmt: formats.quantize(w, f, importance))


_register_packed_formats()
