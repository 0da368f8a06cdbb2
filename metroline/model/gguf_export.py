"""GGUF export: a model file re-quantized into one of the formats the kernels run, written
with the `gguf` package so that llama.cpp-family runtimes load it. From a GGUF file
(export_gguf) or from a Hugging Face folder (export_hf_gguf: llama.cpp's tensor names, q/k row
order, hyperparameter keys and tokenizer metadata written from config.json and
tokenizer.json).

Everything but the tensors is carried over as it was (architecture and hyperparameters,
tokenizer, chat template), with general.file_type set to the new format. Matrices (2-D,
rows a multiple of 32) take the target format; a tensor already in it is copied byte for
byte, so exporting to the format a file already has gives the same file contents and the
same outputs. 1-D tensors (norms, biases) stay F32. For a 4-bit or ternary target the token
embedding and the output projection stay in Q8_0, as llama.cpp's own quantizer keeps them
above the rest (they are the tensors a 4-bit error hurts most).

`ternary` writes GGUF's TQ2_0 (metroline's absmean quantizer, metroline.quant.formats); a
matrix whose rows are not a multiple of 256 is written Q4_0, as llama.cpp's quantizer does.
int4-g32 / int4-g32-asym are Q4_0 / Q4_1; int8 (per-row scales) and int4 with groups of 64 or
128 have no GGUF type: asking for them is a one-line error.

With `importance` (metroline.quant.calibrate: per decoder-layer matrix, the mean x^2 of
each input channel), those matrices are quantized importance-weighted
(metroline.quant.quantizers.quantize_weighted) instead of to nearest; the bytes are the same
GGUF block formats. A tensor already in the target is still copied as stored.
"""

from __future__ import annotations

import os
import re

import numpy as np

from metroline.errors import MetrolineError
from metroline.progress import progress as progress_bar

FORMATS = ("q8_0", "q4_0", "q4_1", "ternary", "f16", "f32")
ALIASES = {"int4-g32": "q4_0", "int4-g32-asym": "q4_1"}
NO_GGUF_TYPE = ("int8", "int4-g64", "int4-g64-asym", "int4-g128", "int4-g128-asym")  # packed-only formats
_KEEP_HIGH = ("token_embd.weight", "output.weight")


class ExportError(MetrolineError):
    """The export cannot be done as asked (one line says why)."""


def _qtype(fmt: str):
    from gguf import GGMLQuantizationType as Q

    return {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "ternary": Q.TQ2_0, "f16": Q.F16, "f32": Q.F32}[fmt]


def _file_type(fmt: str):
    from gguf import LlamaFileType as F

    return {"q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "ternary": F.MOSTLY_TQ2_0,
            "f16": F.MOSTLY_F16, "f32": F.ALL_F32}[fmt]


def tensor_target(name: str, shape: tuple[int, ...], fmt: str):
    """The type a tensor is written in (shape in GGUF order: shape[0] the row length)."""
    from gguf import GGMLQuantizationType as Q

    target = _qtype(fmt)
    if len(shape) < 2 or (target not in (Q.F16, Q.F32) and shape[0] % 32):
        return Q.F32
    if fmt in ("q4_0", "q4_1", "ternary") and name in _KEEP_HIGH:
        return Q.Q8_0
    if target == Q.TQ2_0 and shape[0] % 256:
        return Q.Q4_0
    return target


def _convert(t, target, importance=None) -> np.ndarray:
    """Tensor `t` (GGUFTensor) as `target`: its stored bytes when it already is, else
    dequantized to fp32 and quantized (rows in GGUF order)."""
    from gguf import GGMLQuantizationType as Q

    from metroline.model.loader import dequantize_gguf_tensor, gguf_name_to_hf

    if t.tensor_type == target:  # the stored bytes, shaped as the writer reads them
        shape = tuple(int(d) for d in reversed(t.shape))
        if target in (Q.F32, Q.F16):
            return np.array(t.data, copy=True).view(np.float32 if target == Q.F32 else np.float16).reshape(shape)
        return np.array(t.data, copy=True).reshape(*shape[:-1], -1)
    # (rows, cols) fp32 -> target; q/k rows stay in the file's order (importance is per column).
    imp = _importance_of(importance, gguf_name_to_hf(t.name)) if target not in (Q.F32, Q.F16) else None
    return _encode(dequantize_gguf_tensor(t), target, imp)


def _importance_of(importance: dict | None, hf_name: str) -> np.ndarray | None:
    """The importance vector of a checkpoint matrix (None without calibration, or for a
    matrix outside the decoder layers); a decoder-layer matrix must have one."""
    if importance is None:
        return None
    from metroline.model.loader import _fused_name

    key = _fused_name(hf_name)
    if key not in importance and key.startswith("model.layers.") and ".weight" in key:
        raise ExportError(f"the importance has no entry for {key}: was it collected on another model?")
    return importance.get(key)


def _encode(x: np.ndarray, target, importance: np.ndarray | None = None) -> np.ndarray:
    """fp32 rows (PyTorch order) in `target`: as they are, fp16, or quantized per block
    (importance-weighted when `importance` is given)."""
    from gguf import GGMLQuantizationType as Q

    from metroline.quant.quantizers import quantize_weighted

    if target == Q.F32:
        return x
    if target == Q.F16:
        return x.astype(np.float16)
    return quantize_weighted(x, target, importance)


def _format(fmt: str) -> str:
    fmt = ALIASES.get(fmt.lower(), fmt.lower())
    if fmt in NO_GGUF_TYPE:
        raise ExportError(f"{fmt} has no GGUF type (it is a packed format for --weights only); GGUF export "
                          f"writes {', '.join(FORMATS)} (int4-g32 = q4_0, int4-g32-asym = q4_1)")
    if fmt not in FORMATS:
        raise ExportError(f"--to must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def _write(writer, out: str, fmt: str, tensors, total: int, progress: bool) -> dict:
    """Add (GGUF name, data, type) tensors, write the file, and say what was written."""
    counts: dict[str, int] = {}
    with progress_bar(total, f"quantizing to {fmt}", progress, unit="tensor") as bar:
        for name, data, target in tensors:
            writer.add_tensor(name, data, raw_dtype=target)
            counts[target.name] = counts.get(target.name, 0) + 1
            bar.update(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"output": out, "format": fmt, "tensors": counts, "bytes": os.path.getsize(out)}


def export_gguf(src: str, out: str, fmt: str, progress: bool = True, importance: dict | None = None) -> dict:
    """Write `src` (a GGUF file) re-quantized to `fmt` at `out`; returns what was written.
    `importance`: see the module's docstring."""
    from gguf import GGUFValueType, GGUFWriter

    from metroline.model.gguf_meta import open_gguf

    fmt = _format(fmt)
    if os.path.abspath(src) == os.path.abspath(out):
        raise ExportError("the output file must not be the input file")
    reader = open_gguf(src)
    arch = reader.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ExportError(f"{src}: no general.architecture in the GGUF metadata")
    writer = GGUFWriter(out, arch)
    for key, value in reader.metadata.items():
        if key in ("general.architecture", "general.alignment", "general.file_type"):
            continue
        vtype, etype = reader.metadata_types[key]
        writer.add_key_value(key, value, GGUFValueType(vtype), GGUFValueType(etype) if etype is not None else None)
    writer.add_file_type(int(_file_type(fmt)))
    tensors = ((t.name, _convert(t, target, importance), target)
               for t in reader.tensors for target in [tensor_target(t.name, t.shape, fmt)])
    return _write(writer, out, fmt, tensors, len(reader.tensors), progress)


# ------------------------------------------------------------------ from a Hugging Face folder

def _hf_to_gguf_name(name: str) -> str | None:
    from metroline.model.loader import _GGUF_LAYER, _GGUF_TOP

    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for g, h in _GGUF_LAYER.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
        return None
    base, _, kind = name.rpartition(".")
    for g, h in _GGUF_TOP.items():
        if h == base:
            return f"{g}.{kind}"
    return None


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter order of a q/k projection's rows (the loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer_name(tok_json: dict) -> str:
    """The tokenizer.ggml.pre that splits text as this tokenizer.json does."""
    from metroline.tokenizer import _PRE_SPLITS

    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("use_regex", True)):
            regex = (parts[0].get("pattern") or {}).get("Regex")
            for name, split in _PRE_SPLITS.items():
                if split == regex:
                    return name
    raise ExportError("this tokenizer.json splits text in a way GGUF has no name for (export supports "
                      "byte-level BPE with the GPT-2 split or a split metroline knows)")


def export_hf_gguf(src: str, out: str, fmt: str, progress: bool = True, importance: dict | None = None) -> dict:
    """Write a Hugging Face folder (config.json, *.safetensors, tokenizer.json) of a supported
    architecture as a GGUF in `fmt`: llama.cpp's tensor names and q/k row order, its
    hyperparameter keys, the byte-level BPE tokenizer (tokens, types, merges) and the chat
    template."""
    import json

    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter

    from metroline.model.loader import _count_safetensors, hf_to_config, iter_safetensors_weights
    from metroline.tokenizer import Tokenizer

    fmt = _format(fmt)
    with open(os.path.join(src, "config.json")) as f:
        cfg = hf_to_config(json.load(f))
    with open(os.path.join(src, "tokenizer.json")) as f:
        tok_json = json.load(f)
    if (tok_json.get("model") or {}).get("type") != "BPE":
        raise ExportError("export from a folder supports byte-level BPE tokenizers only")
    pre = _pre_tokenizer_name(tok_json)
    tok = Tokenizer.from_hf_dir(src)
    arch = cfg.architecture
    w = GGUFWriter(out, arch)
    w.add_name(os.path.basename(os.path.normpath(src)))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_file_type(int(_file_type(fmt)))
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    n = max(cfg.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok_json.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in tok_json.get("added_tokens", [])}
    known = set(vocab.values())
    # llama.cpp token types: 1 normal, 3 control (special), 4 user-defined (added), 5 unused.
    types = [3 if i in special else 4 if i in added else 1 if i in known else 5 for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(bool(tok.add_bos_token))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

    def tensors():
        for name, t in iter_safetensors_weights(src):
            g = _hf_to_gguf_name(name)
            if g is None:
                raise ExportError(f"{src}: tensor {name!r} has no GGUF name")
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            x = t.to(torch.float32).numpy()
            if arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "q_proj.bias")):
                x = _permute(x, cfg.num_attention_heads)
            elif arch in ("llama", "mistral") and name.endswith(("k_proj.weight", "k_proj.bias")):
                x = _permute(x, cfg.num_key_value_heads)
            target = tensor_target(g, tuple(reversed(x.shape)), fmt)
            quantized = target not in (Q.F32, Q.F16)
            yield g, _encode(x, target, _importance_of(importance, name) if quantized else None), target

    return _write(w, out, fmt, tensors(), _count_safetensors(src), progress)
