"""GGUF export: a model file re-quantized into one of the formats the kernels run, written
with the `gguf` package so that llama.cpp-family runtimes load it.

Everything but the tensors is carried over as it was (architecture and hyperparameters,
tokenizer, chat template), with general.file_type set to the new format. Matrices (2-D,
rows a multiple of 32) take the target format; a tensor already in it is copied byte for
byte, so exporting to the format a file already has gives the same file contents and the
same outputs. 1-D tensors (norms, biases) stay F32. For a 4-bit target the token embedding
and the output projection stay in Q8_0, as llama.cpp's own quantizer keeps them above the
rest (they are the tensors a 4-bit error hurts most).
"""

from __future__ import annotations

import os

import numpy as np

from metroline.errors import MetrolineError

FORMATS = ("q8_0", "q4_0", "q4_1", "f16", "f32")
_KEEP_HIGH = ("token_embd.weight", "output.weight")


class ExportError(MetrolineError):
    """The export cannot be done as asked (one line says why)."""


def _qtype(fmt: str):
    from gguf import GGMLQuantizationType as Q

    return {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "f16": Q.F16, "f32": Q.F32}[fmt]


def _file_type(fmt: str):
    from gguf import LlamaFileType as F

    return {"q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "f16": F.MOSTLY_F16,
            "f32": F.ALL_F32}[fmt]


def tensor_target(name: str, shape: tuple[int, ...], fmt: str):
    """The type a tensor is written in (shape in GGUF order: shape[0] the row length)."""
    from gguf import GGMLQuantizationType as Q

    target = _qtype(fmt)
    if len(shape) < 2 or (target not in (Q.F16, Q.F32) and shape[0] % 32):
        return Q.F32
    if fmt in ("q4_0", "q4_1") and name in _KEEP_HIGH:
        return Q.Q8_0
    return target


def _convert(t, target) -> np.ndarray:
    """Tensor `t` (GGUFTensor) as `target`: its stored bytes when it already is, else
    dequantized to fp32 and quantized (rows in GGUF order)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from metroline.model.loader import dequantize_gguf_tensor

    if t.tensor_type == target:  # the stored bytes, shaped as the writer reads them
        shape = tuple(int(d) for d in reversed(t.shape))
        if target in (Q.F32, Q.F16):
            return np.array(t.data, copy=True).view(np.float32 if target == Q.F32 else np.float16).reshape(shape)
        return np.array(t.data, copy=True).reshape(*shape[:-1], -1)
    x = dequantize_gguf_tensor(t)  # (rows, cols) fp32
    if target == Q.F32:
        return x
    if target == Q.F16:
        return x.astype(np.float16)
    return quantize(x, target)


def export_gguf(src: str, out: str, fmt: str, progress: bool = True) -> dict:
    """Write `src` (a GGUF file) re-quantized to `fmt` at `out`; returns what was written."""
    from gguf import GGUFValueType, GGUFWriter

    from metroline.model.gguf_meta import open_gguf

    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ExportError(f"--to must be one of {', '.join(FORMATS)}, not {fmt!r}")
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
    counts: dict[str, int] = {}
    bar = _bar(len(reader.tensors), f"quantizing to {fmt}", progress)
    for t in reader.tensors:
        target = tensor_target(t.name, t.shape, fmt)
        data = _convert(t, target)
        writer.add_tensor(t.name, data, raw_dtype=target)
        counts[target.name] = counts.get(target.name, 0) + 1
        bar.update(1)
    bar.close()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"output": out, "format": fmt, "tensors": counts, "bytes": os.path.getsize(out)}


def _bar(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="tensor")
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Null()
