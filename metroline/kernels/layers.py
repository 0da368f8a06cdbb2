"""Every decoder layer of a step in one C++ call (csrc/layers_ops.cpp): the CPU decode hot path.

`decode_layers(h, residual, stack, cos, sin, positions, slot_mapping, block_tables,
context_lens, query_start_loc, block_size, scale, eps)` runs all layers of a Llama-family
model whose linear layers are packed (Q8_0 / Q4_0 / Q4_1, no biases) over the paged KV cache:
qkv matmul, RoPE + K/V write, paged attention, o matmul, add + RMSNorm, gate/up matmul,
SiLU-and-mul, down matmul, add + the next layer's RMSNorm. `h` (the first layer's normalized
input) and `residual` (the residual stream) are [T, hidden] fp32, updated in place: on return
`h` holds the final norm's output. The kernels, splits and order of operations are those of
the op-by-op path (`qmatmul`, `fused.rope_kv_write`, `attention.paged_attention_decode`,
`fused.add_rms_norm`, `fused.silu_mul`), so the result is bit-identical to it.

What the op-by-op path pays and this one does not: ~10 Python calls and torch dispatches per
layer (300 a step for a 30-layer model, ~3-4 ms at batch 1) and a thread-pool wake-up per op;
here one OpenMP region covers the step and its threads take each op's chunks from an atomic
counter, a late thread leaving its share to the others.

`LayerStack` holds the per-layer argument lists (weights, formats, caches), built once.
Set METROLINE_DECODE_LAYERS=0 to run the op-by-op path instead (for A/B measurements).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from metroline.kernels.fused import _isa, _op

__all__ = ["available", "enabled", "LayerStack", "decode_layers"]

_decode_layers = _op("decode_layers")

if _decode_layers is not None:
    @torch.library.register_fake("metroline::decode_layers")
    def _decode_layers_fake(h, residual, weights, fmts, k_caches, v_caches, cos, sin, positions, slot_mapping,
                            block_tables, context_lens, query_start_loc, block_size, num_heads, num_kv_heads,
                            intermediate_size, scale, eps, isa=-1):
        return None


def available() -> bool:
    """Whether the compiled op is loaded."""
    return _decode_layers is not None


def enabled() -> bool:
    """available(), unless METROLINE_DECODE_LAYERS=0 asks for the op-by-op path."""
    return _decode_layers is not None and os.environ.get("METROLINE_DECODE_LAYERS", "1") != "0"


@dataclass
class LayerStack:
    """The per-layer arguments of decode_layers, in its order: per layer the packed qkv, o,
    gate_up, down bytes, the post-attention norm weight and the next norm's weight (the next
    layer's input norm, or the final norm); per layer the 4 weight formats; the caches."""

    weights: list[torch.Tensor]
    fmts: list[int]
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def decode_layers(h: torch.Tensor, residual: torch.Tensor, stack: LayerStack, cos: torch.Tensor,
                  sin: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                  block_size: int, scale: float, eps: float, isa: str | None = None) -> None:
    """Run every layer in place (see the module doc)."""
    if _decode_layers is None:
        raise RuntimeError("metroline._C has no decode_layers op (not built, or built before it): "
                           "use the op-by-op path")
    _decode_layers(h, residual, stack.weights, stack.fmts, stack.k_caches, stack.v_caches, cos, sin,
                   positions, slot_mapping, block_tables, context_lens, query_start_loc, block_size,
                   stack.num_heads, stack.num_kv_heads, stack.intermediate_size, scale, eps, _isa(isa))
