"""--max-memory: choose the weight format and the KV pool so that both fit a budget.

The budget covers what the model itself holds: the weights as they will be held, plus the KV
cache pool (the Python runtime and torch are not counted; they are the same whatever the
model). Candidates are tried from the most faithful to the smallest: a GGUF's weights as
stored, then q8_0, q4_1, q4_0, int4-g64, int4-g128 (quantized at load; the embedding and head
stay in Q8_0 under 4 bits; a matrix whose rows the larger groups do not divide takes the
loader's fallback, metroline.quant.formats.format_for); a checkpoint in 16 or 32 bits starts at
q8_0. Ternary is never chosen: it only suits models trained for it (their TQ2_0 GGUF is
"as stored"). The first whose weights leave room for
at least one sequence of the context (or of `min_kv_tokens`) wins, and the rest of the budget
becomes the KV pool. When none fits, the error says what the smallest needs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from metroline.errors import MetrolineError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ORDER = ("q8_0", "q4_1", "q4_0", "int4-g64", "int4-g128")
_HIGH = ("token_embd.weight", "output.weight", "model.embed_tokens.weight", "lm_head.weight")


class MemoryBudgetError(MetrolineError):
    """The model cannot fit the --max-memory budget in any format (the message says what would)."""


def parse_size(text: str | int) -> int:
    """'300MB', '1.5GiB', '2e9', 400000000 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MetrolineError(f"cannot read {text!r} as a size (e.g. 300MB, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class MemoryPlan:
    weights: str  # the --weights value to load with
    weight_bytes: int
    kv_cache_memory: int
    kv_tokens: int

    def describe(self) -> str:
        return (f"--max-memory: weights {self.weights} ({self.weight_bytes / 1e6:.0f} MB), KV cache "
                f"{self.kv_cache_memory / 1e6:.0f} MB ({self.kv_tokens:,} tokens)")


def _matrices(path: str, kind: str) -> tuple[list[tuple[str, int, str, int]], dict]:
    """(name, elements, stored type, row length) of every tensor, and the model's shape."""
    if kind == "gguf":
        from metroline.model.gguf_meta import open_gguf, read_gguf_metadata
        from metroline.model.loader import gguf_to_config

        r = open_gguf(path)
        cfg = gguf_to_config(read_gguf_metadata(r))
        return [(t.name, t.n_elements, t.tensor_type.name, int(t.shape[0])) for t in r.tensors], _shape(cfg)
    from safetensors import safe_open

    from metroline.model.loader import hf_to_config

    with open(os.path.join(path, "config.json")) as f:
        cfg = hf_to_config(json.load(f))
    out = []
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), "pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    shape = sl.get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    out.append((name, n, "F16" if sl.get_dtype() in ("F16", "BF16") else "F32", int(shape[-1])))
    return out, _shape(cfg)


def _shape(cfg) -> dict:
    return {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "context": cfg.max_position_embeddings}


def weight_bytes(tensors, fmt: str | None) -> int:
    """Bytes of the weights held in `fmt` (None: as stored; else a --weights packed target).
    Vectors stay fp32."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from metroline.kernels import Fmt, raw_row_bytes
    from metroline.quant.formats import format_for, target_format

    total = 0.0
    for name, n, stored, row in tensors:
        if n == row or row % 32:  # a vector, or rows the packed formats cannot hold
            total += 4 * n
            continue
        if fmt is not None:
            f = Fmt.Q8_0 if name in _HIGH else format_for(target_format(fmt), row)
            total += raw_row_bytes(f, row) / row * n  # bytes per weight, scales included
            continue
        block, size = GGML_QUANT_SIZES.get(GGMLQuantizationType.__members__.get(stored), (1, 4))
        total += size / block * n
    return int(total)


def plan_memory(model: str | None, budget: int, max_model_len: int | None = None, block_size: int = 16,
                kv_cache_dtype: str = "auto", min_kv_tokens: int | None = None) -> MemoryPlan:
    """`kv_cache_dtype`: the --kv-cache-dtype the pool will hold (auto: fp16)."""
    from metroline.kernels.kv_cache import KV_CACHE_DTYPES, bytes_per_row
    from metroline.model.loader import resolve_model_source

    source = resolve_model_source(model)
    tensors, shape = _matrices(source.path, source.kind)
    row = bytes_per_row(KV_CACHE_DTYPES["fp16" if kv_cache_dtype == "auto" else kv_cache_dtype], shape["head_dim"])
    per_token = 2 * shape["layers"] * shape["kv_heads"] * row
    need_tokens = min_kv_tokens or min(max_model_len or shape["context"], shape["context"])
    need_kv = -(-need_tokens // block_size) * block_size * per_token
    stored_kinds = {t for _, n, t, row in tensors if n != row}
    candidates = ([("packed", None)]
                  if source.kind == "gguf" and stored_kinds <= {"Q8_0", "Q4_0", "Q4_1", "TQ2_0"} else [])
    candidates += [(f, f) for f in _ORDER]
    tried = []
    for weights, fmt in candidates:
        wb = weight_bytes(tensors, fmt)
        tried.append((weights, wb))
        if wb + need_kv <= budget:
            kv = budget - wb
            return MemoryPlan(weights, wb, kv, kv // per_token // block_size * block_size)
    weights, wb = min(tried, key=lambda x: x[1])
    raise MemoryBudgetError(
        f"--max-memory {budget / 1e6:.0f} MB is too small for {source.name}: the smallest format ({weights}) holds "
        f"{wb / 1e6:.0f} MB of weights and one sequence of {need_tokens:,} tokens needs {need_kv / 1e6:.0f} MB "
        f"of KV cache; give at least {(wb + need_kv) / 1e6:.0f} MB (or a smaller --max-model-len)")
