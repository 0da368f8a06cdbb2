"""Frozen configuration dataclasses, validated once in __post_init__. CLI flags map 1:1 to fields."""

from __future__ import annotations

from dataclasses import dataclass

from metroline.errors import InvalidRequestError


# How weights may be held (platform.resolve_weights): packed as stored, quantized at load into
# a packed format, or dequantized.
# The packed targets (platform.PACKED_TARGETS; metroline.quant.formats.TARGETS maps them to formats).
WEIGHT_CHOICES = ("auto", "packed", "q8_0", "q4_0", "q4_1", "int8", "int4-g32", "int4-g32-asym", "int4-g64",
                  "int4-g64-asym", "int4-g128", "int4-g128-asym", "ternary", "fp32", "bf16", "fp16")
# KV cache formats (kernels/kv_cache.py); auto: the attention backend's default (fp16 on the
# CPU kernels, the model's dtype on the torch backend).
KV_CACHE_DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16", "fp8", "int8")
# How weights quantized at load are rounded: to nearest, or importance-weighted
# (metroline.quant.calibrate; must match calibrate.QUANT_METHODS).
QUANT_METHOD_CHOICES = ("rtn", "imatrix")


def _require(cond: bool, msg: str, param: str) -> None:
    if not cond:
        raise InvalidRequestError(msg, param=param)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Bytes for the KV pool. None: what the model can use (max_num_seqs sequences of the
    # context length), capped by a share of the memory free at start-up.
    kv_cache_memory: int | None = None
    # That share; None: 5% of host memory on the CPU device, 90% of free device memory on GPUs.
    kv_cache_memory_fraction: float | None = None
    # Overrides the size computed from memory (tests use tiny pools).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # Session pins (kv_retention_s) never hold more than this share of the pool.
    max_pinned_fraction: float = 0.25
    # Bytes of host memory for KV blocks evicted from an accelerator. None: automatic (on a
    # GPU, 10% of free host memory; off on the CPU device, where it would gain nothing); 0: off.
    host_kv_cache_memory: int | None = None
    # One of KV_CACHE_DTYPE_CHOICES: int8 holds ~2x the tokens of fp16 in the same memory.
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        _require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                 "block_size must be a positive power of two", "block_size")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0,
                 "kv_cache_memory must be positive", "kv_cache_memory")
        _require(self.kv_cache_memory_fraction is None or 0 < self.kv_cache_memory_fraction <= 0.95,
                 "kv_cache_memory_fraction must be in (0, 0.95]", "kv_cache_memory_fraction")
        _require(0.0 <= self.max_pinned_fraction <= 0.9, "max_pinned_fraction must be in [0, 0.9]",
                 "max_pinned_fraction")
        _require(self.host_kv_cache_memory is None or self.host_kv_cache_memory >= 0,
                 "host_kv_cache_memory must be >= 0", "host_kv_cache_memory")
        _require(self.num_blocks is None or self.num_blocks >= 2,
                 "num_blocks must be at least 2", "num_blocks")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPE_CHOICES,
                 f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPE_CHOICES)}", "kv_cache_dtype")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's context length
    policy: str = "fcfs"  # "fcfs" or "priority"
    enable_chunked_prefill: bool = True
    # Requests allowed to wait; beyond it add_request says no (the server answers 429).
    max_queued_requests: int | None = None
    # Append the tokens a grammar forces (tool-call boilerplate) without a step per token.
    grammar_fast_forward: bool = True

    def __post_init__(self):
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens must be > 0",
                 "max_num_batched_tokens")
        _require(self.max_num_seqs > 0, "max_num_seqs must be > 0", "max_num_seqs")
        _require(self.policy in ("fcfs", "priority"), "policy must be 'fcfs' or 'priority'",
                 "policy")
        _require(self.max_queued_requests is None or self.max_queued_requests >= 0,
                 "max_queued_requests must be >= 0", "max_queued_requests")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: who drafts (`method`), how many tokens at most per step, and when
    it stops paying. method None: off; "ngram" (prompt lookup), "suffix" (suffix decoding over
    this request and recent outputs), "draft:MODEL" (a model sharing the vocabulary; MODEL a
    path, or "layers=N": the target's own first N layers)."""
    method: str | None = None
    num_speculative_tokens: int = 8  # at most; the policy picks fewer when acceptance is low
    # Above this many decoding requests nobody drafts (the step stops being bound by reading
    # the weights, so verifying drafts costs what they save; measured on 2 CPU cores,
    # benchmarks/speculative.py: 1.17x at 4, 1.02x at 8, 0.91x at 16); None: no limit.
    max_batch: int | None = 6
    adaptive: bool = True  # k per request from its recent acceptance

    def __post_init__(self):
        m = self.method
        _require(m is None or m in ("ngram", "suffix") or (m.startswith("draft:") and len(m) > 6),
                 f"unknown speculative method {m!r} (ngram, suffix or draft:MODEL)", "speculative")
        _require(1 <= self.num_speculative_tokens <= 15, "num_speculative_tokens must be in 1..15",
                 "num_speculative_tokens")
        _require(self.max_batch is None or self.max_batch >= 1, "max_batch must be >= 1", "max_batch")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # path to .gguf / HF folder / hub id; None: the default model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    weights: str = "auto"  # one of WEIGHT_CHOICES (resolved by platform.resolve_weights)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None
    seed: int = 0
    quant_method: str = "rtn"  # one of QUANT_METHOD_CHOICES
    imatrix: str | None = None  # importance file (read if present, else written); imatrix only

    def __post_init__(self):
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"unsupported dtype {self.dtype!r}", "dtype")
        _require(self.weights in WEIGHT_CHOICES,
                 f"unsupported weight format {self.weights!r}", "weights")
        _require(self.quant_method in QUANT_METHOD_CHOICES,
                 f"unknown quantization method {self.quant_method!r} (choose from "
                 f"{', '.join(QUANT_METHOD_CHOICES)})", "quant_method")
        _require(self.imatrix is None or self.quant_method == "imatrix",
                 "--imatrix FILE goes with --quant-method imatrix", "imatrix")
        _require(self.quant_method == "rtn" or self.weights not in ("fp32", "bf16", "fp16"),
                 f"--quant-method {self.quant_method} calibrates weights quantized at load "
                 f"(--weights q8_0, q4_0, q4_1), not {self.weights}", "quant_method")


@dataclass(frozen=True)
class ServerConfig:
    """Server-side settings; the engine's are CacheConfig / SchedulerConfig / ModelConfig."""

    served_model_names: tuple[str, ...] = ()  # empty: the model's own name
    api_key: str | None = None
    max_request_body_bytes: int = 8 * 2**20
    request_timeout: float | None = None  # seconds for a whole generation request
    shutdown_timeout: float = 30.0  # seconds in-flight work may take once draining began
    chat_template: str | None = None  # template source overriding the model's
    ready_timeout: float = 30.0  # seconds /ready's one-token generation may take
    retry_after: int = 1  # seconds, sent with 429
    ready_cache_s: float = 5.0  # seconds a successful /ready check is remembered
    # /metrics needs the API key unless it is public, or the scraper sends this bearer token.
    metrics_token: str | None = None
    public_metrics: bool = False
    store_path: str | None = None  # the Responses API's SQLite store; None: agents.store.default_store_path()

    def __post_init__(self):
        if self.max_request_body_bytes <= 0:
            raise ValueError("max_request_body_bytes must be > 0")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
