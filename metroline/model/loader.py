"""Model loading: a GGUF file or a Hugging Face style folder -> LlamaForCausalLM + Tokenizer.

GGUF tensors are dequantized to the model dtype with the `gguf` package; Llama-architecture
GGUFs store q/k rows permuted for llama.cpp's interleaved RoPE, which is undone here so the
weights match the HF (rotate-half) layout.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from metroline.errors import ModelLoadError
from metroline.model.default import DEFAULT_MODEL_NAME, default_model_path
from metroline.model.gguf_meta import open_gguf, read_gguf_metadata
from metroline.model.llama import _FUSED, LlamaConfig, LlamaForCausalLM
from metroline.platform import (PACKED_TARGETS, huge_page_buffer, release_free_memory, resolve_device, resolve_dtype,
                                resolve_weights)
from metroline.progress import progress
from metroline.quant.packed import (EMBEDDABLE, PACKABLE, PackedLinear, RawWeight, place_packed_weights,
                                    swap_in_packed_layers)

SUPPORTED_GGUF_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                      "Qwen2ForCausalLM": "qwen2"}


@dataclass
class ModelSource:
    kind: str  # "gguf" | "hf"
    path: str
    name: str  # served model name


def resolve_model_source(model: str | None) -> ModelSource:
    """None -> the default model; a .gguf file; a HF folder; else a hub id (needs a hub)."""
    if model is None:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_NAME)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", os.path.join(path, ggufs[0]), _stem(ggufs[0]))
            raise ModelLoadError(f"{path} is not a model folder (no config.json or single .gguf)")
        return ModelSource("hf", path, os.path.basename(os.path.normpath(path)))
    if os.path.isfile(path):
        return ModelSource("gguf", path, _stem(os.path.basename(path)))
    if path.endswith(".gguf") or path.startswith((".", "/", "~")):
        raise ModelLoadError(f"model file not found: {model}")
    if re.fullmatch(r"[\w-]+/[\w.-]+", model):
        return ModelSource("hf", _download_from_hub(model), model)
    raise ModelLoadError(f"model not found: {model} (no such file or folder, and not a hub id)")


def _stem(name: str) -> str:
    return name[:-5] if name.endswith(".gguf") else name


def _download_from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed") from None
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"])
    except Exception as e:
        raise ModelLoadError(f"cannot fetch {repo_id!r} from the hub: {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: object) -> str:
    """An exception's message on one line (ModelLoadError messages are printed as one line)."""
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------------- GGUF

def gguf_to_config(meta: dict) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ModelLoadError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_GGUF_ARCHS)})")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_embd = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_head)
    # key_length when the converter wrote it, else the rotary dimension (full rotary in these archs).
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or n_embd // n_head)
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    rope_scaling = None
    kind = get("rope.scaling.type")
    if kind and kind != "none":
        rope_scaling = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length"):
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=n_embd, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=n_head,
        num_key_value_heads=int(n_kv), head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=False,  # decided from the tensors present, see load_gguf
        qkv_bias=arch == "qwen2", architecture=arch,
    )


_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_name_to_hf(name: str) -> str:
    if name == "rope_freqs.weight":
        return "rope_freqs"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    base, _, kind = name.rpartition(".")
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.{kind}"
    raise ModelLoadError(f"unexpected tensor {name!r} in GGUF file")


def _reverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two rotary halves of every head's rows.
    # Row r = h*dim + 2*i + j holds what HF keeps at h*dim + j*dim/2 + i.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_gguf_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy, shape (rows, cols) in PyTorch order."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if qtype == Q.F32:
        return tensor.data.view(np.float32).reshape(shape)
    if qtype == Q.F16:
        return tensor.data.view(np.float16).astype(np.float32).reshape(shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = int(tensor.shape[0]) // block * type_size
    try:
        out = dequantize(tensor.data.reshape(-1, row_bytes), qtype)
    except NotImplementedError:
        raise ModelLoadError(f"unsupported quantization type {qtype.name} (tensor {tensor.name})") from None
    return out.reshape(shape).astype(np.float32, copy=False)


def iter_gguf_weights(reader, config: LlamaConfig, progress=None,
                      raw_names: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) per GGUF tensor; tensors named in `raw_names` (by their layer's
    name, see _fused_name) come as RawWeight, their stored rows, for packed layers."""
    for t in reader.tensors:
        name = gguf_name_to_hf(t.name)
        if _fused_name(name) in raw_names:
            rows = int(t.shape[1])
            data = _unpermute(name, np.asarray(t.data).view(np.uint8).reshape(rows, -1), config)
            w = RawWeight(torch.from_numpy(np.array(data, copy=True)), int(t.tensor_type),
                          (rows, int(t.shape[0])))
        else:
            w = torch.from_numpy(np.require(_unpermute(name, dequantize_gguf_tensor(t), config),
                                            np.float32, ["C", "W"]))
        if progress is not None:
            progress.update(1)
        yield name, w


def _unpermute(name: str, rows: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """Undo the converter's q/k row interleave (weights and biases alike; rows are independent,
    so stored quantized rows are reordered just as fp32 ones)."""
    if config.architecture in ("llama", "mistral"):
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return _reverse_llama_permute(rows, config.num_attention_heads)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return _reverse_llama_permute(rows, config.num_key_value_heads)
    return rows


# ------------------------------------------------------------------------------ HF folder

def hf_to_config(cfg: dict) -> LlamaConfig:
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_HF_ARCHS[a] for a in archs if a in SUPPORTED_HF_ARCHS), None)
    if arch is None:
        mt = cfg.get("model_type")
        arch = mt if mt in SUPPORTED_GGUF_ARCHS else None
    if arch is None:
        raise ModelLoadError(f"unsupported architecture {archs or cfg.get('model_type')!r} "
                             f"(supported: {', '.join(SUPPORTED_HF_ARCHS)})")

    def need(key: str):
        value = cfg.get(key)
        if value is None:
            raise ModelLoadError(f"config.json has no {key!r} (architecture {arch})")
        return value

    n_head = need("num_attention_heads")
    attention_bias = bool(cfg.get("attention_bias", False))
    rope_params = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling") or None
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    max_pos = cfg.get("max_position_embeddings") or 2048
    extra = {}
    window = _sliding_window(cfg, arch)
    if window is not None and window < max_pos:
        # Attention here has no sliding window, so past it our logits would differ from the
        # model's: the context stops at the window instead.
        extra["sliding_window"] = window
        max_pos = window
    return LlamaConfig(
        vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"), num_hidden_layers=need("num_hidden_layers"),
        num_attention_heads=n_head, num_key_value_heads=cfg.get("num_key_value_heads") or n_head,
        head_dim=cfg.get("head_dim") or need("hidden_size") // n_head,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else attention_bias,
        o_bias=attention_bias and arch != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)), architecture=arch, extra=extra,
    )


def _sliding_window(cfg: dict, arch: str) -> int | None:
    """The attention window of a config whose layers (any of them) use one, as transformers reads it."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    layer_types = cfg.get("layer_types")
    if layer_types:
        return int(window) if "sliding_attention" in layer_types else None
    if arch == "qwen2":  # sliding only when enabled, and only from layer max_window_layers on
        n_layers = cfg.get("num_hidden_layers") or 0
        uses = cfg.get("use_sliding_window") and cfg.get("max_window_layers", n_layers) < n_layers
        return int(window) if uses else None
    return int(window)


def iter_safetensors_weights(path: str, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors files in {path}")
    for f in files:
        try:
            with safe_open(os.path.join(path, f), framework="pt") as st:
                for key in st.keys():
                    if progress is not None:
                        progress.update(1)
                    yield key, st.get_tensor(key)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot read {f}: {e}") from None


def _count_safetensors(path: str) -> int:
    from safetensors import safe_open

    n = 0
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as st:
                n += len(list(st.keys()))
    return n


# ------------------------------------------------------------------------------- loading

@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: "object"
    config: LlamaConfig
    source: ModelSource
    weight_format: str  # what the file stores, e.g. "Q4_1", "bf16"
    file_bytes: int
    weights: str = "fp32"  # how they are held: "packed (...)", "fp32", "bf16"
    weight_bytes: int = 0  # bytes of weights a decode step reads (all but the embedding)
    chosen_by: str = ""  # why --weights auto held them so, when a measurement decided


def load_tokenizer_from_gguf(path: str | os.PathLike):
    """The tokenizer of a GGUF file alone (its metadata; no tensor is read)."""
    from metroline.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(open_gguf(path)))


def load_model(model: str | None = None, dtype: str = "auto", device: str = "auto",
               max_model_len: int | None = None, show_progress: bool = True,
               weights: str = "auto", quant_method: str = "rtn", imatrix: str | None = None) -> LoadedModel:
    """quant_method: how weights quantized at load are rounded: "rtn" (to nearest, as
    llama.cpp's reference quantizer) or "imatrix" (importance-weighted, metroline.quant.
    calibrate; the importance read from `imatrix` when that file exists, else the cache,
    else measured on the fp32 model and cached, and written to `imatrix` when given)."""
    from metroline.tokenizer import Tokenizer

    import metroline.kernels as kernels

    source = resolve_model_source(model)
    dev = resolve_device(device)
    chosen_by = ""
    try:
        held = resolve_weights(weights, dev, source.kind, kernels.available())
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if weights == "auto" and dev.type == "cpu" and kernels.available():
        from metroline.quant.choose import recorded_choice

        measured = recorded_choice(source.path)  # `metroline eval formats` ran on this file here
        if measured is not None:
            held = measured.choice
            chosen_by = (f"auto: {held}, the fastest within +{measured.bound:.0%} perplexity "
                         f"(measured {measured.measured_at})")
    _check_quant_method(quant_method, imatrix, held, source.kind)
    if held in ("bf16", "fp16") and dtype == "auto":
        dtype = {"bf16": "bfloat16", "fp16": "float16"}[held]
    torch_dtype = resolve_dtype(dtype, dev)
    stored: dict[str, int] = {}  # weight name (fused: "<module>.weight:<shard>") -> GGUF type
    kept: set[str] = set()  # matrices already in the format they are quantized to at load
    importance = None  # per matrix, under --quant-method imatrix (quant.calibrate)
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        meta = read_gguf_metadata(reader)
        config = gguf_to_config(meta)
        names = {t.name for t in reader.tensors}
        if "output.weight" not in names:
            config = _replace(config, tie_word_embeddings=True)
        # Llama-architecture GGUFs of checkpoints with attention biases carry them as tensors.
        if "blk.0.attn_q.bias" in names and not config.qkv_bias:
            config = _replace(config, qkv_bias=True)
        if "blk.0.attn_output.bias" in names:
            config = _replace(config, o_bias=True)
        tokenizer = Tokenizer.from_gguf_metadata(meta)
        ftypes = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
        weight_format = "+".join(sorted(ftypes))
        total = len(reader.tensors)
        if held == "packed":
            stored = {_fused_name(gguf_name_to_hf(t.name)): int(t.tensor_type)
                      for t in reader.tensors if t.name.endswith(".weight") and len(t.shape) == 2}
        raw_names = {n for n, ty in stored.items()
                     if ty in (EMBEDDABLE if n == "model.embed_tokens.weight" else PACKABLE)}
        weights = lambda bar: iter_gguf_weights(reader, config, bar, raw_names)  # noqa: E731
        file_types = {_fused_name(gguf_name_to_hf(t.name)): int(t.tensor_type)
                      for t in reader.tensors if t.name.endswith(".weight") and len(t.shape) == 2}
        file_bytes = os.path.getsize(source.path)
    else:
        cfg_path = os.path.join(source.path, "config.json")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {cfg_path}: {e}") from None
        config = hf_to_config(cfg)
        tokenizer = Tokenizer.from_hf_dir(source.path)
        weight_format = str(cfg.get("torch_dtype") or cfg.get("dtype") or "unknown")
        total = _count_safetensors(source.path)
        weights = lambda bar: iter_safetensors_weights(source.path, bar)  # noqa: E731
        file_bytes = sum(os.path.getsize(os.path.join(source.path, f))
                         for f in os.listdir(source.path) if f.endswith(".safetensors"))
    _check_rope(config)
    max_len = max_model_len or config.max_position_embeddings
    if "sliding_window" in config.extra:
        max_len = min(max_len, config.extra["sliding_window"])
    with torch.device("meta"):
        net = LlamaForCausalLM(config, max_positions=max_len)
    if held in PACKED_TARGETS or (held == "packed" and source.kind != "gguf"):
        # Quantized at load: each matrix to the target format (packed: Q8_0 for a safetensors
        # checkpoint, int8 with one fp16 scale per 32 weights of a row), then computed on by
        # the same packed kernels. Matrices already in the format pass as stored.
        # Under a lower-bit target the embedding and the output projection stay in Q8_0, as
        # llama.cpp's own quantizer keeps them (the tensors a 4-bit error hurts most); a matrix
        # whose K is not a multiple of the target's group takes its fallback (quant.formats).
        stored = _targets(net, config, held if held in PACKED_TARGETS else "q8_0")
        raw_names = set(stored)
        src_weights = weights
        if source.kind == "gguf":  # matrices already in their target kept as stored, others quantized
            kept = {n for n, ty in file_types.items() if stored.get(n) == ty}
            src_weights = lambda bar: iter_gguf_weights(reader, config, bar, kept)  # noqa: E731
        if quant_method == "imatrix" and any(n.startswith("model.layers.") and n not in kept for n in stored):
            # (not when every decoder matrix is kept as stored: nothing would use it)
            from metroline.quant.calibrate import check_importance

            importance = importance_of(model, imatrix, device=device, progress=show_progress)
            check_importance(importance, stored)
        weights = lambda bar: _quantized(src_weights(bar), stored, importance)  # noqa: E731
        held = "packed"
    if stored:  # the transform: packed layers in place of nn.Linear, before any fp32 copy exists
        swapped = swap_in_packed_layers(
            net, stored, "model.embed_tokens" if config.tie_word_embeddings else None, "lm_head")
        if not swapped:
            held = "fp32"
    net = net.to_empty(device=dev).to(torch_dtype)
    net.tie_weights()
    # Buffers computed at construction (rotary tables) were lost to the meta device.
    net.model.rotary_emb.inv_freq = _fresh_inv_freq(config, dev)
    net.model.rotary_emb._build(max_len)
    with progress(total, f"loading {source.name}", show_progress, unit="tensor", transient=True) as bar:
        # rope_freqs (scaled RoPE factors) stay fp32: they divide the fp32 inverse frequencies.
        tensors = ((n, t if isinstance(t, RawWeight) else
                    t.to(dev, torch.float32 if n == "rope_freqs" else torch_dtype))
                   for n, t in weights(bar))
        try:
            loaded = net.load_weights(tensors)
        except (KeyError, ValueError) as e:  # unexpected name or wrong shape
            raise ModelLoadError(f"bad checkpoint {source.path}: {_one_line(e.args[0] if e.args else e)}") from None
    missing = net.expected_weights() - loaded
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    if dev.type == "cpu":  # one huge-page stream instead of 4 KiB pages scattered over the heap
        place_packed_weights(net, huge_page_buffer)
        release_free_memory()
    net.eval().requires_grad_(False)
    described = _describe_weights(net, held) + (", imatrix-calibrated" if importance is not None else "")
    return LoadedModel(net, tokenizer, config, source, weight_format, file_bytes, described,
                       _decode_weight_bytes(net), chosen_by)


def importance_of(model: str | None, imatrix: str | None = None, *, device: str = "auto",
                  progress: bool = True) -> dict[str, np.ndarray]:
    """--quant-method imatrix's importance for `model` (metroline.quant.calibrate.importance_for:
    the file `imatrix`, the cache, or measured on the model loaded in fp32)."""
    from metroline.quant.calibrate import importance_for

    return importance_for(resolve_model_source(model),
                          lambda: load_model(model, weights="fp32", dtype="float32", device=device,
                                             show_progress=progress),
                          path=imatrix, progress=progress)


def _check_quant_method(method: str, imatrix: str | None, held: str, source_kind: str) -> None:
    """Calibration applies to weights quantized at load (one line when asked for others)."""
    from metroline.quant.calibrate import QUANT_METHODS

    if method not in QUANT_METHODS:
        raise ModelLoadError(f"unknown quantization method {method!r} (choose from {', '.join(QUANT_METHODS)})")
    if imatrix is not None and method != "imatrix":
        raise ModelLoadError("--imatrix FILE goes with --quant-method imatrix")
    if method == "imatrix" and not (held in PACKED_TARGETS or (held == "packed" and source_kind != "gguf")):
        raise ModelLoadError(f"--quant-method imatrix calibrates weights quantized at load (--weights "
                             f"{', '.join(PACKED_TARGETS)}), not {held} weights"
                             + (" (a GGUF's own packed weights are kept as stored)" if held == "packed" else ""))


def _matrix_names(net, config) -> dict[str, int]:
    """The checkpoint-side names (fused layers by shard) of every matrix a packed layer can
    hold (K a multiple of 32), with their K."""
    names = {}
    for name, mod in net.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features % 32 == 0:
            shards = getattr(mod, "shard_offsets", None)
            for n in ([f"{name}.weight:{s}" for s in shards] if shards else [f"{name}.weight"]):
                names[n] = mod.in_features
        elif isinstance(mod, torch.nn.Embedding) and mod.embedding_dim % 32 == 0:
            names[f"{name}.weight"] = mod.embedding_dim
    return names


def _ggml_type(fmt: str):
    """The packed format (kernels.Fmt: a GGML type number, or metroline's own from 100 on) a
    --weights target stands for."""
    from metroline.quant.formats import target_format

    return target_format(fmt)


_KEEP_HIGH = ("model.embed_tokens.weight", "lm_head.weight")


def _targets(net, config, held: str) -> dict[str, int]:
    """Per matrix the format it is quantized into under the target `held`."""
    from metroline.quant.formats import format_for

    target, high = _ggml_type(held), _ggml_type("q8_0")
    out = {}
    for n, k in _matrix_names(net, config).items():
        fmt = high if n in _KEEP_HIGH else format_for(target, k)
        if fmt is not None:
            out[n] = int(fmt)
    return out


def _quantized(weights, targets: dict[str, int], importance: dict[str, np.ndarray] | None = None):
    """fp32 matrices named in `targets` quantized to their type (round to nearest per
    32-weight block, as llama.cpp does, or weighted by `importance` where it has the
    matrix's name: metroline.quant.quantizers); RawWeights already stored pass as they are."""
    from metroline.quant.quantizers import quantize_weighted

    for name, t in weights:
        key = _fused_name(name)
        qtype = targets.get(key)
        if isinstance(t, RawWeight) or qtype is None or t.dim() != 2:
            yield name, t
        else:
            try:
                rows = quantize_weighted(t.float().numpy(), qtype, (importance or {}).get(key))
            except ValueError as e:
                raise ModelLoadError(f"cannot quantize {name}: {e}") from None
            yield name, RawWeight(torch.from_numpy(rows), qtype, tuple(t.shape))


def _fused_name(hf_name: str) -> str:
    """A checkpoint weight's name as the model's layer sees it: fused layers by shard."""
    for frag, (fused, shard) in _FUSED.items():
        if frag in hf_name:
            return f"{hf_name.replace(frag, fused)}:{shard}"
    return hf_name


def _describe_weights(net, held: str) -> str:
    packed = [m for m in net.modules() if isinstance(m, PackedLinear)]
    if held != "packed" or not packed:
        return held if held != "packed" else "fp32"
    import metroline.kernels as kernels

    fmts = sorted({kernels.Fmt(m.fmt).name for m in packed})
    others = sum(1 for m in net.modules() if isinstance(m, torch.nn.Linear))
    path = kernels.cpu_isa() if kernels.available() else "torch fallback"
    return (f"packed {'+'.join(fmts)} ({len(packed)} layers on {path} kernels"
            + (f", {others} dequantized" if others else "") + ")")


def _decode_weight_bytes(net) -> int:
    """Bytes of weights read per decode step: every matmul's (embedding lookups read a row)."""
    total = 0
    for m in net.modules():
        if isinstance(m, PackedLinear):
            total += m.num_bytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def _check_rope(config: LlamaConfig) -> None:
    from metroline.model.llama import rope_inv_freq

    try:
        rope_inv_freq(config)
    except ValueError as e:
        raise ModelLoadError(f"{e} (supported: default, linear, llama3)") from None


def _fresh_inv_freq(config: LlamaConfig, dev: torch.device) -> torch.Tensor:
    from metroline.model.llama import rope_inv_freq

    return rope_inv_freq(config).to(dev)


def _replace(config: LlamaConfig, **kw) -> LlamaConfig:
    from dataclasses import replace

    return replace(config, **kw)
