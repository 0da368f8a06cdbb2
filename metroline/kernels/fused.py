"""Fused decoder-layer ops on metroline's C++ kernels (csrc/fused*.cpp), and their pure-torch twins.

One call each, ~3 us of dispatch, instead of the several torch ops they replace:

* `rms_norm(x, weight, eps)`: RMSNorm in fp32, as F.rms_norm / HF's composite.
* `add_rms_norm(x, residual, weight, eps)`: in place, `residual += x` then
  `x = rms_norm(residual)` (vLLM's fused_add_rms_norm contract).
* `silu_mul(x)`: `silu(x[..., :I]) * x[..., I:]` for x = gate_up_proj's output (gate first).
* `rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, positions=None)`:
  rotate-half RoPE on q and k in place (bit-identical to llama.py's apply_rotary), then k and v
  into the paged caches (fp32 or fp16, converted round-to-nearest-even) at slot_mapping; slot -1
  is skipped.

Activations are fp32 (other dtypes, and a build without the kernels, run the torch twins).
Each op takes `isa`: None follows metroline.kernels.force_isa, or "scalar" / "avx2" /
"avx512" / "auto" (for tests and benchmarks). The kernel path is picked from the CPU at run
time, never assumed; `supported_isas()` says which this CPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metroline.kernels as _k
from metroline.kernels.kv_cache import write_rows

__all__ = [
    "available", "simd_isa", "supported_isas",
    "rms_norm", "add_rms_norm", "silu_mul", "rope_kv_write",
    "rms_norm_torch", "add_rms_norm_torch", "silu_mul_torch", "rope_kv_write_torch",
]

_ORDER = ["scalar", "avx2", "avx512"]


def _op(name: str):
    """The compiled op's default overload, or None (extension missing, or built before this op)."""
    if _k._ops is None:
        return None
    try:
        return getattr(getattr(_k._ops, name), "default")
    except (AttributeError, RuntimeError):
        return None


_simd_isa = _op("simd_isa")


_LOADED: dict[str, bool] = {}


def available(name: str = "rms_norm") -> bool:
    """Whether the compiled op `name` is loaded (cached: cheap enough for a forward pass)."""
    try:
        return _LOADED[name]
    except KeyError:
        return _LOADED.setdefault(name, _op(name) is not None)


def simd_isa() -> str:
    """The best path of the attention and fused kernels on this CPU ("avx512", "avx2",
    "scalar"), or "torch" without them. Read from the CPU at run time."""
    return _simd_isa() if _simd_isa is not None else "torch"


def supported_isas() -> list[str]:
    """Paths of the attention and fused kernels this CPU and build run, slowest first."""
    best = simd_isa()
    return _ORDER[: _ORDER.index(best) + 1] if best in _ORDER else []


def _isa(isa: str | None) -> int:
    if isa is None:
        return _k._isa
    if isa not in _k._ISAS:
        raise ValueError(f"unknown isa {isa!r}; expected one of {sorted(_k._ISAS)}")
    return _k._ISAS[isa]


def _fallback(what: str) -> None:
    _k._fallback(what if _k._ops is None else f"{what} (metroline._C predates it: rebuild)")


_rms_norm = _op("rms_norm")
_add_rms_norm = _op("add_rms_norm")
_silu_mul = _op("silu_mul")
_rope_kv_write = _op("rope_kv_write")

if _rms_norm is not None:
    @torch.library.register_fake("metroline::rms_norm")
    def _rms_norm_fake(x, weight, eps, isa=-1):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("metroline::add_rms_norm")
    def _add_rms_norm_fake(x, residual, weight, eps, isa=-1):
        return None

    @torch.library.register_fake("metroline::silu_mul")
    def _silu_mul_fake(x, isa=-1):
        return x.new_empty((x.shape[0], x.shape[1] // 2))

    @torch.library.register_fake("metroline::rope_kv_write")
    def _rope_kv_write_fake(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, isa=-1):
        return None


# ----------------------------------------------------------------------------- public ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, isa: str | None = None) -> torch.Tensor:
    """RMSNorm of x [..., H] over its last dim, normalised in fp32: a new tensor of x's shape."""
    if _rms_norm is not None and x.dtype is torch.float32 and weight.dtype is torch.float32:
        if x.dim() == 2 and x.stride(1) == 1:
            return _rms_norm(x, weight, eps, _isa(isa))  # the decode hot path
        return _rms_norm(x.reshape(-1, x.shape[-1]), weight, eps, _isa(isa)).view(x.shape)
    if _rms_norm is None:
        _fallback("rms_norm")
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 isa: str | None = None) -> None:
    """In place: residual += x, then x = rms_norm(residual, weight, eps). x and residual are
    [T, H] (rows contiguous) of one shape."""
    if (_add_rms_norm is not None and x.dtype is torch.float32 and residual.dtype is torch.float32
            and weight.dtype is torch.float32 and x.dim() == 2):
        _add_rms_norm(x, residual, weight, eps, _isa(isa))
        return
    if _add_rms_norm is None:
        _fallback("add_rms_norm")
    add_rms_norm_torch(x, residual, weight, eps)


def silu_mul(x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """silu(gate) * up for x = [..., 2I] holding gate then up: a new [..., I] tensor."""
    if _silu_mul is not None and x.dtype is torch.float32:
        if x.dim() == 2 and x.stride(1) == 1:
            return _silu_mul(x, _isa(isa))
        return _silu_mul(x.reshape(-1, x.shape[-1]), _isa(isa)).view(*x.shape[:-1], x.shape[-1] // 2)
    if _silu_mul is None:
        _fallback("silu_mul")
    return silu_mul_torch(x)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  positions: torch.Tensor | None = None, isa: str | None = None) -> None:
    """RoPE on q [T, Hq, D] and k [T, Hkv, D] in place, then k and v [T, Hkv, D] into k_cache /
    v_cache [S, Hkv, R] at slot_mapping [T] int64 (-1: not written), in the cache's format
    (kernels/kv_cache.py: fp32 / fp16, or int8 rows with their scale, R = D + 2).

    cos/sin: [T, D] (or llama.py's [T, 1, D]) rows per token, or with `positions` [T] int64 the
    whole [max_positions, D] tables (no per-step gather). q, k, v may be strided views (of the
    qkv projection's output) as long as their last dim is contiguous."""
    if (_rope_kv_write is not None and q.dtype is torch.float32
            and k_cache.dtype in (torch.float32, torch.float16, torch.int8)):
        if cos.dim() == 3:
            cos, sin = cos.reshape(cos.shape[0], cos.shape[-1]), sin.reshape(sin.shape[0], sin.shape[-1])
        _rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, _isa(isa))
        return
    if _rope_kv_write is None:
        _fallback("rope_kv_write")
    rope_kv_write_torch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, positions)


# --------------------------------------------------------------------- pure-torch twins


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm composite: normalise in fp32, then weight * x in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    residual.add_(x)
    x.copy_(rms_norm_torch(residual, weight, eps))


def silu_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_kv_write_torch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, positions=None) -> None:
    """llama.py's apply_rotary (x * cos + rotate_half(x) * sin) on q and k, then the rows
    written in the cache's format (kv_cache.write_rows)."""
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    cos = cos.reshape(q.shape[0], 1, q.shape[-1]).to(q.dtype)
    sin = sin.reshape(q.shape[0], 1, q.shape[-1]).to(q.dtype)
    half = q.shape[-1] // 2
    for x in (q, k):
        x.copy_(x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    write_rows(k_cache, slot_mapping, k)
    write_rows(v_cache, slot_mapping, v)
