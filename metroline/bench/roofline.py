"""`metroline bench roofline`: what this machine can do for a model, and how close a result is.

Decode streams every matmul weight once per step, whatever the batch, and each sequence's KV
cache; it computes 2 FLOPs per weight per token (plus attention over the context). So:

    step time(B) = max((W + B * C * kv) / bandwidth,  B * (F + A * C) / flops)
    tokens/s(B)  = B / step time(B)

with W the weight bytes per step, kv the KV bytes per token of context, C the context, F = 2 *
matmul weights, A = 4 * layers * q_size. Batch 1 is bandwidth-bound; compute takes over at
the batch where both terms meet.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

ALIASES = {"fp32": "F32", "float32": "F32", "f32": "F32", "bf16": "BF16", "bfloat16": "BF16",
           "fp16": "F16", "float16": "F16", "f16": "F16"}
# Formats that are not GGML types: bytes per weight, scales included.
EXTRA_FORMATS = {"int8": 1.0 + 4 / 1024,  # per-output-channel fp32 scale, rows of ~1k weights
                 "int4": 0.5 + 2 / 32,  # group-wise, 32 weights per fp16 scale
                 "ternary": 0.25}  # 2 bits per weight


def bytes_per_weight(fmt: str) -> float:
    """Bytes per weight of a format: fp32/bf16/fp16, int8, int4, ternary, or any GGML type
    name (q4_0, q4_1, q8_0, q4_k, ... with their block scales)."""
    key = fmt.lower()
    if key in EXTRA_FORMATS:
        return EXTRA_FORMATS[key]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = ALIASES.get(key, fmt.upper())
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    except KeyError:
        known = sorted({*ALIASES, *EXTRA_FORMATS, *(t.name.lower() for t in GGML_QUANT_SIZES)})
        raise ValueError(f"unknown weight format {fmt!r}; known: file, {', '.join(known)}") from None
    return size / block


@dataclass
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int
    kv_size: int
    vocab_size: int
    file_format: str = ""
    file_matmul_bytes: int | None = None  # bytes the file stores for the matmul weights (GGUF)

    @property
    def matmul_weights(self) -> int:
        """Weights every token multiplies: q/k/v/o, gate/up/down in each layer, and the output
        head (the input embedding is only gathered, one row per token)."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * (2 * self.q_size + 2 * self.kv_size) + 3 * h * i
        return self.num_layers * per_layer + self.vocab_size * h

    def kv_bytes_per_token(self, elem_bytes: float) -> float:
        return 2 * self.num_layers * self.kv_size * elem_bytes


def model_shape(model: str | None = None) -> ModelShape:
    """The shape of a model (a .gguf file, a Hugging Face folder, or None: the default)."""
    from metroline.model.loader import gguf_to_config, hf_to_config, resolve_model_source

    src = resolve_model_source(model)
    file_bytes = None
    if src.kind == "gguf":
        from metroline.model.gguf_meta import open_gguf, read_gguf_metadata

        reader = open_gguf(src.path)
        cfg = gguf_to_config(read_gguf_metadata(reader))
        mats = {t.name: t for t in reader.tensors if len(t.shape) == 2}
        head = mats.get("output.weight", mats.get("token_embd.weight"))
        file_bytes = sum(t.data.nbytes for n, t in mats.items() if n.startswith("blk."))
        file_bytes += head.data.nbytes if head is not None else 0
        fmt = "+".join(sorted({t.tensor_type.name for t in mats.values()}))
    else:
        import json

        with open(os.path.join(src.path, "config.json")) as f:
            raw = json.load(f)
        cfg = hf_to_config(raw)
        fmt = str(raw.get("torch_dtype") or raw.get("dtype") or "")
    return ModelShape(src.name, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                      cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
                      cfg.vocab_size, fmt, file_bytes)


def weight_bytes(shape: ModelShape, fmt: str) -> float:
    if fmt.lower() == "file":
        if shape.file_matmul_bytes is None:
            raise ValueError("weight format 'file' needs a GGUF model")
        return float(shape.file_matmul_bytes)
    return shape.matmul_weights * bytes_per_weight(fmt)


def throughput_at(batch: float, w_bytes: float, bandwidth: float, flops: float, flops_per_token: float,
                  kv_bytes_per_seq: float = 0.0) -> float:
    """Decode tokens/s (all sequences together) at a batch size, by the roofline above."""
    step = max((w_bytes + batch * kv_bytes_per_seq) / bandwidth, batch * flops_per_token / flops)
    return batch / step


def decode_ceilings(shape: ModelShape, fmt: str, bandwidth: float, flops: float,
                    context: int = 0, kv_elem_bytes: float = 4.0) -> dict:
    """Batch-1 ceiling, the batch where compute takes over, and the compute-bound ceiling."""
    w = weight_bytes(shape, fmt)
    kv = shape.kv_bytes_per_token(kv_elem_bytes) * context
    fpt = 2 * shape.matmul_weights + 4 * shape.num_layers * shape.q_size * context
    # (w + B kv) / bw = B fpt / flops  ->  B = (w / bw) / (fpt / flops - kv / bw)
    denom = fpt / flops - kv / bandwidth
    takeover = (w / bandwidth) / denom if denom > 0 else math.inf
    return {"weight_format": fmt, "weight_bytes_per_step": w,
            "bytes_per_weight": w / shape.matmul_weights, "context": context,
            "kv_bytes_per_sequence": kv, "flops_per_token": fpt,
            "decode_ceiling_batch1_tok_s": throughput_at(1, w, bandwidth, flops, fpt, kv),
            "compute_bound_batch": takeover,
            "compute_bound_tok_s": flops / fpt,
            "prefill_ceiling_tok_s": flops / (2 * shape.matmul_weights)}


def achieved(result: dict, shape: ModelShape, fmt: str, bandwidth: float, flops: float,
             context: int | None = None, kv_elem_bytes: float = 4.0) -> list[dict]:
    """Fractions of the roofline a result reached: a `bench serve` result (per run: output
    throughput against the aggregate ceiling at a batch of the run's concurrency, and the
    per-stream decode rate from median TPOT against the batch-1 ceiling), or
    benchmarks/offline_throughput.json (single-stream decode against batch 1)."""
    rows = []
    if "single_stream" in result:  # benchmarks/offline_throughput.py
        tok_s = result["single_stream"]["metroline_tok_s"]
        c = decode_ceilings(shape, fmt, bandwidth, flops, context or 0, kv_elem_bytes)
        rows.append({"what": "offline single-stream decode", "batch": 1, "tok_s": tok_s,
                     "ceiling_tok_s": c["decode_ceiling_batch1_tok_s"],
                     "fraction": tok_s / c["decode_ceiling_batch1_tok_s"]})
        return rows
    for run in result.get("runs", []):
        m = run["metrics"]
        if not m["completed"]:
            continue
        batch = run.get("max_concurrency") or m["completed"]
        ctx = context
        if ctx is None:  # the mean context a decode step attends to
            ctx = int(m["input_tokens"] / m["completed"] + m["output_tokens"] / m["completed"] / 2)
        c = decode_ceilings(shape, fmt, bandwidth, flops, ctx, kv_elem_bytes)
        agg = throughput_at(batch, c["weight_bytes_per_step"], bandwidth, flops,
                            c["flops_per_token"], c["kv_bytes_per_sequence"])
        tpot = m["tpot_ms"]["p50"]
        row = {"what": f"{result.get('label', '')} concurrency {batch}", "batch": batch, "context": ctx,
               "output_tok_s": m["output_throughput"], "ceiling_tok_s": agg,
               "fraction": m["output_throughput"] / agg}
        if tpot:  # how close one stream decodes to the best a lone stream could
            one = c["decode_ceiling_batch1_tok_s"]
            row.update(stream_tok_s=1000 / tpot, stream_ceiling_tok_s=one,
                       stream_fraction=(1000 / tpot) / one)
        rows.append(row)
    return rows


def measure(device: str = "cpu") -> tuple[float, float, dict]:
    """Bandwidth (B/s), fp32 matmul throughput (FLOP/s) and machine info, measured now."""
    from metroline.bench.hardware import machine_info, measure_bandwidth, measure_matmul_flops

    info = machine_info()
    return measure_bandwidth(device), measure_matmul_flops(device), info


def shape_json(shape: ModelShape) -> dict:
    return {**asdict(shape), "matmul_weights": shape.matmul_weights}
