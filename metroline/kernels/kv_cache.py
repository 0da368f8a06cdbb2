"""KV cache element formats, in pure torch (any device): how K/V rows are stored and read back.

A layer's cache is [slots, num_kv_heads, R]:

* float32 / float16 / bfloat16: R = head_dim, values converted round-to-nearest-even.
* float8_e4m3fn: R = head_dim, values clamped to +-448 and cast (no scale; storage only).
* int8: R = head_dim + 2 bytes. A head's row is head_dim int8 values q, then the row's scale d
  as fp16 (2 bytes, little-endian): x ~ d * q, with d = fp16(amax / 127) and
  q = clamp(round_half_even(x * (1 / d)), -127, 127) (q = 0 when d = 0), per token and kv head.
  csrc/kv_cache.h is the same format; the C++ writer (rope_kv_write) and these functions
  produce identical bytes, and the C++ attention reads the rows directly.

`write_rows` / `read_rows` are the only ways the torch paths touch a cache, so a backend never
needs to know which format it holds.
"""

from __future__ import annotations

import torch

__all__ = ["KV_CACHE_DTYPES", "CPU_KERNEL_KV_DTYPES", "row_width", "bytes_per_row", "quantize_int8_rows", "dequantize_int8_rows",
           "write_rows", "read_rows"]

KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                   "fp8": torch.float8_e4m3fn, "int8": torch.int8}
# What the C++ attention and rope_kv_write kernels read and write.
CPU_KERNEL_KV_DTYPES = (torch.float16, torch.float32, torch.int8)
_FP8_MAX = 448.0


def row_width(dtype: torch.dtype, head_dim: int) -> int:
    """Elements in one head's row of a cache of `dtype`."""
    return head_dim + 2 if dtype == torch.int8 else head_dim


def bytes_per_row(dtype: torch.dtype, head_dim: int) -> int:
    return row_width(dtype, head_dim) * torch.empty((), dtype=dtype).element_size()


def quantize_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (any float dtype) -> int8 rows [..., D + 2] (module doc)."""
    x = x.float()
    d16 = (x.abs().amax(dim=-1, keepdim=True) / 127.0).to(torch.float16)
    d = d16.float()
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x * inv).clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, d16.view(torch.int8)], dim=-1)


def dequantize_int8_rows(c: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 rows [..., D + 2] -> [..., D] in `dtype` (d * q, computed in fp32)."""
    d = c[..., -2:].contiguous().view(torch.float16).float()
    return (c[..., :-2].float() * d).to(dtype)


def write_rows(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache[slots] = x (x [n, Hkv, D], slots [n] int64), converted to the cache's format."""
    if cache.dtype == torch.int8:
        cache.index_copy_(0, slots, quantize_int8_rows(x))
    elif cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernels: copy the bytes
        rows = x.float().clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        cache.view(torch.uint8).index_copy_(0, slots, rows.view(torch.uint8))
    else:
        cache.index_copy_(0, slots, x.to(cache.dtype))


def read_rows(cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[index] as values in `dtype` (index: any int64 shape; result [*index.shape, Hkv, D])."""
    if cache.dtype == torch.int8:
        return dequantize_int8_rows(cache[index], dtype)
    if cache.dtype == torch.float8_e4m3fn:
        return cache.view(torch.uint8)[index].view(torch.float8_e4m3fn).to(dtype)
    return cache[index].to(dtype)
