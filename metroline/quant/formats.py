"""Quantizers (numpy) for every packed weight format, and their exact numpy dequantizers.

`quantize(w, fmt, importance=None)` turns fp32 rows [N, K] into the format's raw rows (the
bytes `metroline.kernels.repack` takes: GGUF's blocks for Q8_0 / Q4_0 / Q4_1 / TQ2_0,
metroline's own rows for I8_ROW and I4_*; layouts in csrc/qmm.h):

* Q8_0 / I8_ROW: symmetric int8, d = amax/127 (per 32 weights / per output row, the latter
  kept in fp32).
* Q4_0 / I4_G64 / I4_G128: w = d*(q-8), q 0..15, d = (the value of largest |w|) / -8, as
  llama.cpp's Q4_0 (per 32 / 64 / 128 weights).
* Q4_1 / I4_G64_ASYM / I4_G128_ASYM: w = d*q + m, m = min, d = (max - min)/15.
* TQ2_0 (ternary, BitNet b1.58's absmean): per 256 weights d = mean(|w|),
  q = clamp(round(w/d), -1, 1), stored as GGUF's TQ2_0 (codes q+1).

Round to nearest with the scales rounded to their stored precision first (so max|w - deq| <=
|d|/2 within the representable range). With `importance` (per input channel weights [K] of
the squared error, e.g. mean x^2 of the activations), each block's scale (and min) is chosen
among a few candidates, the round-to-nearest one included, to minimize
sum_k importance_k * (w_k - deq_k)^2; without it, plain RTN (for the GGUF 32-blocks exactly
gguf.quants.quantize, whose bytes the loader always produced).
"""

from __future__ import annotations

import numpy as np

from metroline.kernels import SPEC, Fmt, k_multiple, raw_row_bytes

# --weights names of the packed targets -> format. int4-g32 / -asym are GGUF's Q4_0 / Q4_1.
TARGETS = {
    "q8_0": Fmt.Q8_0, "q4_0": Fmt.Q4_0, "q4_1": Fmt.Q4_1,
    "int8": Fmt.I8_ROW,
    "int4-g32": Fmt.Q4_0, "int4-g32-asym": Fmt.Q4_1,
    "int4-g64": Fmt.I4_G64, "int4-g64-asym": Fmt.I4_G64_ASYM,
    "int4-g128": Fmt.I4_G128, "int4-g128-asym": Fmt.I4_G128_ASYM,
    "ternary": Fmt.TQ2_0,
}
# A matrix whose K is not a multiple of its target's group takes the next format that fits
# (the larger groups fall back to the smaller ones; ternary to Q4_0, as llama.cpp's quantizer
# does for TQ2_0 rows that are not a multiple of 256).
FALLBACK = {
    Fmt.I4_G128: Fmt.I4_G64, Fmt.I4_G64: Fmt.Q4_0,
    Fmt.I4_G128_ASYM: Fmt.I4_G64_ASYM, Fmt.I4_G64_ASYM: Fmt.Q4_1,
    Fmt.TQ2_0: Fmt.Q4_0,
}


def target_format(name: str) -> Fmt:
    """The format a --weights target name stands for (one-line error for unknown names)."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown packed format {name!r} (choose from {', '.join(TARGETS)})") from None


def format_for(fmt, K: int) -> Fmt | None:
    """`fmt`, or its fallback when K is not a multiple of its group; None when K % 32 != 0."""
    fmt = Fmt(int(fmt))
    while K % k_multiple(fmt):
        if fmt not in FALLBACK:
            return None
        fmt = FALLBACK[fmt]
    return fmt


def _f16(x: np.ndarray) -> np.ndarray:
    """Rounded to fp16 and back (float64), as the stored scale will be."""
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def _check(w: np.ndarray, fmt: Fmt, importance) -> tuple[np.ndarray, np.ndarray | None]:
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] == 0:
        raise ValueError(f"quantize: weights must be a non-empty 2-D array [N, K], got shape {w.shape}")
    K = w.shape[1]
    mult = k_multiple(fmt)
    if K == 0 or K % mult:
        raise ValueError(f"quantize: {fmt.name} needs K a positive multiple of {mult}, got K={K}")
    if not np.isfinite(w).all():
        raise ValueError("quantize: weights hold inf or nan")
    if importance is not None:
        importance = np.asarray(importance, np.float64)
        if importance.shape != (K,) or not np.isfinite(importance).all() or (importance < 0).any():
            raise ValueError(f"quantize: importance must be {K} finite values >= 0 (one per input channel), "
                             f"got shape {importance.shape}")
    return w.astype(np.float64), importance


# ------------------------------------------------------------------------ scale search

def _sym(x: np.ndarray, imp: np.ndarray | None, d0: np.ndarray, qmin: int, qmax: int, factors,
         f32_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Blocks x [B, n] as d*q, q integer in [qmin, qmax]: (d [B] as stored, q [B, n]).

    d0 is the round-to-nearest scale; with importance, d0 * each factor, and for each the
    weighted least-squares refit of d to its q, are tried, and the best kept per block."""
    rnd = (lambda v: np.asarray(v, np.float64).astype(np.float32).astype(np.float64)) if f32_scale else _f16

    def fit(d):
        d = rnd(d)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d[:, None] != 0, np.clip(np.rint(x / d[:, None]), qmin, qmax), 0)
        return d, q

    d, q = fit(d0)
    if imp is None:
        return d, q
    best = ((x - d[:, None] * q) ** 2 * imp).sum(1)
    for f in factors:
        dc, qc = fit(d0 * f)
        num, den = (imp * x * qc).sum(1), (imp * qc * qc).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_ls = rnd(np.where(den > 0, num / den, 0.0))
        for dd in (dc, d_ls):
            err = ((x - dd[:, None] * qc) ** 2 * imp).sum(1)
            better = err < best
            best = np.where(better, err, best)
            d = np.where(better, dd, d)
            q = np.where(better[:, None], qc, q)
    return d, q


def _asym(x: np.ndarray, imp: np.ndarray | None, levels: int = 15):
    """Blocks x [B, n] as d*q + m, q in [0, levels]: (d [B], m [B], q [B, n]), d, m as fp16."""
    lo, hi = x.min(1), x.max(1)

    def fit(lo, hi):
        d, m = _f16((hi - lo) / levels), _f16(lo)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d[:, None] != 0, np.clip(np.rint((x - m[:, None]) / d[:, None]), 0, levels), 0)
        return d, m, q

    def err(d, m, q):
        return ((x - (d[:, None] * q + m[:, None])) ** 2 * imp).sum(1)

    d, m, q = fit(lo, hi)
    if imp is None:
        return d, m, q
    best = err(d, m, q)
    span = hi - lo
    for a in (0.0, 0.03, 0.06, 0.1):
        for b in (0.0, 0.03, 0.06, 0.1):
            if a == b == 0.0:
                continue
            dc, mc, qc = fit(lo + a * span, hi - b * span)
            # Weighted least squares of (d, m) for these q: the 2x2 normal equations.
            s1, sq, sqq = imp.sum(1), (imp * qc).sum(1), (imp * qc * qc).sum(1)
            sx, sqx = (imp * x).sum(1), (imp * qc * x).sum(1)
            det = s1 * sqq - sq * sq
            with np.errstate(divide="ignore", invalid="ignore"):
                d_ls = np.where(det > 0, (s1 * sqx - sq * sx) / det, dc)
                m_ls = np.where(det > 0, (sqq * sx - sq * sqx) / det, mc)
            for dd, mm in ((dc, mc), (_f16(d_ls), _f16(m_ls))):
                e = err(dd, mm, qc)
                better = e < best
                best = np.where(better, e, best)
                d, m = np.where(better, dd, d), np.where(better, mm, m)
                q = np.where(better[:, None], qc, q)
    return d, m, q


_SYM_FACTORS = np.linspace(0.75, 1.1, 15)  # int4: d0 = max/-8; shrinking clips the extreme
_I8_FACTORS = np.linspace(0.85, 1.0, 7)
_TERNARY_FACTORS = np.linspace(0.5, 2.0, 16)


def _blocks(w: np.ndarray, imp: np.ndarray | None, gs: int):
    N, K = w.shape
    x = w.reshape(-1, gs)
    ib = None if imp is None else np.broadcast_to(imp.reshape(1, K // gs, gs), (N, K // gs, gs)).reshape(-1, gs)
    return x, ib


def _signed_max(x: np.ndarray) -> np.ndarray:
    """Per block the value of largest magnitude, sign kept (llama.cpp's Q4_0 scale source)."""
    return np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]


# ----------------------------------------------------------------------------- public


def quantize(w: np.ndarray, fmt, importance: np.ndarray | None = None) -> np.ndarray:
    """fp32 weights [N, K] -> raw rows uint8 [N, raw_row_bytes(fmt, K)] of `fmt`.

    importance: optional [K] weights of each input channel's squared error; when given, the
    scales minimize the importance-weighted error over a few candidates (RTN's included, so
    the weighted error is never above RTN's)."""
    fmt = Fmt(int(fmt))
    w, imp = _check(w, fmt, importance)
    N, K = w.shape
    bits, gs, asym, zero = SPEC[fmt]
    if imp is None and fmt in (Fmt.Q8_0, Fmt.Q4_0, Fmt.Q4_1):
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize

        return gguf_quantize(np.ascontiguousarray(w, np.float32), GGMLQuantizationType(int(fmt)))
    if fmt == Fmt.I8_ROW:
        d, q = _sym(w, imp if imp is None else np.broadcast_to(imp, w.shape), np.abs(w).max(1) / 127,
                    -127, 127, _I8_FACTORS, f32_scale=True)
        return np.concatenate([d.astype(np.float32).reshape(N, 1).view(np.uint8),
                               q.astype(np.int8).view(np.uint8)], axis=1)
    x, ib = _blocks(w, imp, gs)
    nblk = x.shape[0] // N
    if fmt == Fmt.TQ2_0:
        d, q = _sym(x, ib, np.abs(x).mean(1), -1, 1, _TERNARY_FACTORS)
        c = (q + 1).astype(np.uint8).reshape(-1, 2, 4, 32)  # k = 128j + 32l + i -> byte 32j + i, bits 2l
        qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
        out = np.concatenate([qs.reshape(-1, 64), d.astype(np.float16).reshape(-1, 1).view(np.uint8)], axis=1)
        return out.reshape(N, nblk * 66)
    if bits == 8:  # Q8_0 with importance
        d, q = _sym(x, ib, np.abs(x).max(1) / 127, -127, 127, _I8_FACTORS)
        out = np.concatenate([d.astype(np.float16).reshape(-1, 1).view(np.uint8), q.astype(np.int8).view(np.uint8)],
                             axis=1)
        return out.reshape(N, -1)
    if asym:
        d, m, c = _asym(x, ib)
        head = [d.astype(np.float16).reshape(-1, 1).view(np.uint8), m.astype(np.float16).reshape(-1, 1).view(np.uint8)]
    else:
        d, q = _sym(x, ib, _signed_max(x) / -8, -8, 7, _SYM_FACTORS)
        c = q + 8
        head = [d.astype(np.float16).reshape(-1, 1).view(np.uint8)]
    c = c.astype(np.uint8).reshape(-1, gs // 32, 32)
    qs = (c[..., :16] | (c[..., 16:] << 4)).reshape(-1, gs // 2)  # per 32-block GGUF Q4 bytes
    out = np.concatenate(head + [qs], axis=1)
    assert out.shape[1] * nblk == raw_row_bytes(fmt, K)
    return out.reshape(N, -1)


def dequantize(rows: np.ndarray, fmt, K: int) -> np.ndarray:
    """Raw rows -> fp32 [N, K], the numpy reference of kernels.dequant (the same fp32
    operations: d*q, d*(q - z), d*q + m)."""
    fmt = Fmt(int(fmt))
    rows = np.ascontiguousarray(rows).view(np.uint8)
    N = rows.shape[0]
    bits, gs, asym, zero = SPEC[fmt]
    if rows.shape[1] != raw_row_bytes(fmt, K):
        raise ValueError(f"dequantize: {fmt.name} rows of K={K} hold {raw_row_bytes(fmt, K)} bytes, "
                         f"got {rows.shape[1]}")
    if fmt in (Fmt.Q8_0, Fmt.Q4_0, Fmt.Q4_1, Fmt.TQ2_0):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        return gguf_dequantize(rows, GGMLQuantizationType(int(fmt))).reshape(N, K).astype(np.float32)
    if fmt == Fmt.I8_ROW:
        d = rows[:, :4].copy().view(np.float32)
        return rows[:, 4:].view(np.int8).astype(np.float32) * d
    rb = raw_row_bytes(fmt, gs)
    b = rows.reshape(N, K // gs, rb)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    qs = b[..., 4 if asym else 2:].reshape(N, K // gs, gs // 32, 16)
    c = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(N, K // gs, gs)
    if asym:
        m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
        return (d * c.astype(np.float32) + m).reshape(N, K)
    return (d * (c.astype(np.int8) - np.int8(8)).astype(np.float32)).reshape(N, K)


def scales(rows: np.ndarray, fmt, K: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Per weight, the scale d (and min m for the asymmetric formats) its block stores,
    as fp32 [N, K] (for error bounds)."""
    fmt = Fmt(int(fmt))
    rows = np.ascontiguousarray(rows).view(np.uint8)
    N = rows.shape[0]
    bits, gs, asym, zero = SPEC[fmt]
    if fmt == Fmt.I8_ROW:
        return np.repeat(rows[:, :4].copy().view(np.float32), K, axis=1), None
    rb = raw_row_bytes(fmt, gs)
    b = rows.reshape(N, K // gs, rb)
    doff = 64 if fmt == Fmt.TQ2_0 else 0
    d = b[..., doff:doff + 2].copy().view(np.float16).astype(np.float32).reshape(N, -1)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32).reshape(N, -1) if asym else None
    rep = (lambda a: None if a is None else np.repeat(a, gs, axis=1))
    return rep(d), rep(m)
