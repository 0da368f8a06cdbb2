"""Linear layers (and an embedding) that keep GGUF's quantized bytes and compute on them.

A GGUF Q8_0 / Q4_0 / Q4_1 / TQ2_0 matrix (or one quantized at load into any packed format,
metroline.quant.formats) is read as raw rows and repacked once into the kernels' layout
(metroline.kernels): a decode step then reads ~2-8.5 bits per weight instead of fp32's 32. `swap_in_packed_layers` is the transform: given which checkpoint matrices are
stored in which format, it replaces the model's nn.Linear layers (fused ones included: q/k/v,
gate/up) by PackedLinear before the weights are loaded, so the fp32 copy is never made.
This module knows nothing of the model's classes: fused layers are recognised by their
`shard_offsets` (output-row ranges per checkpoint matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import metroline.kernels as kernels

_qmatmul_op = torch.ops.metroline.qmatmul.default if kernels.available() else None
_embed_rows_op = kernels.embed_rows_op()

# Formats the packed kernels compute on (GGUF type numbers, metroline's own from 100 on).
PACKABLE = {int(f): f for f in kernels.Fmt}
# Formats an embedding table can be looked up from (embed_rows reads GGUF's 32-blocks).
EMBEDDABLE = {int(f): f for f in (kernels.Q8_0, kernels.Q4_0, kernels.Q4_1)}


@dataclass
class RawWeight:
    """One checkpoint matrix as stored: GGUF rows (uint8 [N, row_bytes]) of format `fmt`."""

    data: torch.Tensor
    fmt: int
    shape: tuple[int, int]  # (N out, K in)


class PackedLinear(nn.Module):
    """y = x @ W.T (+ b) with W packed; W may be several checkpoint matrices stacked along
    the output dimension (`shard_offsets`, as the model's fused layers have)."""

    def __init__(self, in_features: int, out_features: int, fmt: int, bias: bool = False,
                 shard_offsets: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt = int(fmt)
        self.shard_offsets = dict(shard_offsets or {})
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._pending: dict[str | None, torch.Tensor] = {}

    @property
    def num_bytes(self) -> int:
        return self.packed.numel()

    def expected_names(self, prefix: str) -> set[str]:
        names = ({f"{prefix}.weight:{s}" for s in self.shard_offsets} if self.shard_offsets
                 else {f"{prefix}.weight"})
        if self.bias is not None:
            names |= ({f"{prefix}.bias:{s}" for s in self.shard_offsets} if self.shard_offsets
                      else {f"{prefix}.bias"})
        return names

    def load_raw(self, shard: str | None, raw: RawWeight) -> None:
        """Take one checkpoint matrix's rows; once all shards are in, repack them together."""
        if raw.fmt != self.fmt:
            raise ValueError(f"{shard or 'weight'}: stored as type {raw.fmt}, layer expects {self.fmt}")
        n = self.shard_offsets[shard][1] if shard is not None else self.out_features
        if raw.shape != (n, self.in_features):
            raise ValueError(f"{shard or 'weight'}: expected {(n, self.in_features)}, got {raw.shape}")
        self._pending[shard] = raw.data
        order = sorted(self.shard_offsets, key=lambda s: self.shard_offsets[s][0]) or [None]
        if all(s in self._pending for s in order):
            rows = torch.cat([self._pending[s] for s in order]) if len(order) > 1 else self._pending[None]
            self.packed = kernels.repack(rows.contiguous(), self.fmt).to(self.packed.device)
            self._pending.clear()

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        """A fused layer's bias shard (fp32), as MergedLinear.load_shard."""
        assert param_name == "bias" and self.bias is not None
        off, size = self.shard_offsets[shard]
        with torch.no_grad():
            self.bias[off:off + size].copy_(tensor)

    def dequantized(self) -> torch.Tensor:
        return kernels.dequant(self.packed, self.fmt, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _qmatmul_op is not None and x.dtype is torch.float32 and x.dim() == 2 and x.is_cpu:
            # The decode hot path: straight to the op (kernels.qmatmul's checks cost ~4 us a call).
            y = _qmatmul_op(x, self.packed, self.fmt, self.out_features, self.in_features,
                            kernels.current_isa())
        else:
            y = kernels.qmatmul(x, self.packed, self.fmt, self.out_features, self.in_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={kernels.Fmt(self.fmt).name}, bias={self.bias is not None}")


class PackedEmbedding(nn.Module):
    """Embedding lookup from Q8_0 / Q4_0 / Q4_1 rows kept as stored: only the looked-up rows
    are dequantized (a step reads a few rows, not the table)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt = num_embeddings, embedding_dim, int(fmt)
        self.register_buffer("raw", torch.empty(0, dtype=torch.uint8), persistent=False)

    def load_raw(self, shard, raw: RawWeight) -> None:
        if raw.shape != (self.num_embeddings, self.embedding_dim) or raw.fmt != self.fmt:
            raise ValueError(f"embedding: expected {(self.num_embeddings, self.embedding_dim)} "
                             f"type {self.fmt}, got {raw.shape} type {raw.fmt}")
        self.raw = raw.data.contiguous().to(self.raw.device)

    def expected_names(self, prefix: str) -> set[str]:
        return {f"{prefix}.weight"}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if _embed_rows_op is not None and self.raw.is_cpu and flat.dtype is torch.int64:
            out = _embed_rows_op(self.raw, flat, self.fmt)  # one C++ call, not ~8 torch ops
        else:
            out = dequantize_rows(self.raw.index_select(0, flat), self.fmt, self.embedding_dim)
        return out.reshape(*ids.shape, -1)


def dequantize_rows(rows: torch.Tensor, fmt: int, K: int) -> torch.Tensor:
    """GGUF rows (uint8 [T, row_bytes]) -> fp32 [T, K]."""
    fmt = kernels.Fmt(fmt)
    T, nb = rows.shape[0], K // kernels.BLOCK
    blocks = rows.view(T, nb, -1)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [T, nb, 1]
    if fmt == kernels.Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(T, K)
    off = 4 if fmt == kernels.Q4_1 else 2
    qs = blocks[..., off:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()  # weight j low nibble, j+16 high
    if fmt == kernels.Q4_1:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        return (d * q + m).reshape(T, K)
    return (d * (q - 8)).reshape(T, K)


def place_packed_weights(model: nn.Module, allocate) -> int:
    """Move every CPU PackedLinear's bytes into one buffer from `allocate(nbytes)` (e.g.
    platform.huge_page_buffer), in module order, which is the order a forward streams them;
    each layer keeps a 64-byte-aligned view. Returns the bytes placed."""
    layers = [m for m in model.modules()
              if isinstance(m, PackedLinear) and m.packed.is_cpu and m.packed.numel() > 0]
    sizes = [(m.packed.numel() + 63) // 64 * 64 for m in layers]
    if not layers:
        return 0
    arena = allocate(sum(sizes))
    off = 0
    for m, size in zip(layers, sizes):
        n = m.packed.numel()
        view = arena[off:off + n]
        view.copy_(m.packed)
        m.packed = view
        off += size
    return off


def swap_in_packed_layers(model: nn.Module, stored: dict[str, int], tied_embedding: str | None = None,
                          tied_output: str | None = None) -> list[str]:
    """Replace every nn.Linear (and nn.Embedding) whose checkpoint matrices are all stored in
    one packable format by its packed twin; call before the weights are loaded.

    `stored` maps a module's weight name (for fused layers: "<module>.weight:<shard>") to its
    GGUF type. With `tied_embedding`, the output layer `tied_output` is computed packed from
    the embedding's bytes. Returns the names of the swapped modules."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            shards = getattr(mod, "shard_offsets", None)
            keys = ([f"{name}.weight:{s}" for s in shards] if shards else [f"{name}.weight"])
            if name == tied_output and tied_embedding is not None:
                keys = [f"{tied_embedding}.weight"]
            types = {stored.get(k) for k in keys}
            if len(types) != 1 or next(iter(types)) not in PACKABLE:
                continue
            if name == tied_output and tied_embedding is not None and next(iter(types)) not in EMBEDDABLE:
                continue  # the table itself stays dense: its bytes cannot serve the head
            new = PackedLinear(mod.in_features, mod.out_features, next(iter(types)),
                               bias=mod.bias is not None, shard_offsets=shards)
        elif isinstance(mod, nn.Embedding):
            fmt = stored.get(f"{name}.weight")
            if fmt not in EMBEDDABLE:
                continue
            new = PackedEmbedding(mod.num_embeddings, mod.embedding_dim, fmt)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
    return swapped
