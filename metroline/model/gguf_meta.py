"""A fast reader of GGUF files: metadata as Python values, tensors as memory-mapped bytes.

gguf.GGUFReader builds a numpy view per metadata element, which takes seconds for a 49k-token
vocabulary; this parser reads the header in one pass (string arrays in a Python loop, numeric
arrays with np.frombuffer) and maps tensor data lazily. Dequantization stays with the `gguf`
package (see loader.dequantize_gguf_tensor).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from metroline.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars) / numpy dtype (arrays)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
       6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (innermost) dimension
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # raw bytes (uint8) of the tensor, memory-mapped

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


class GGUFFile:
    def __init__(self, path: str):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._mm
        self._pos = 0
        if self._read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"not a GGUF file (bad magic): {path}")
        (version,) = self._unpack("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"unsupported GGUF version {version}: {path}")
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata: dict[str, Any] = {}
        # key -> (value type, element type of an array or None): what a writer needs to copy it
        self.metadata_types: dict[str, tuple[int, int | None]] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            etype = None
            if vtype == _ARRAY:
                (etype,) = struct.unpack_from("<I", self._mm, self._pos)
            self.metadata_types[key] = (vtype, etype)
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            qtype_id, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in dims), qtype_id, offset))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // align) * align
        raw = np.frombuffer(buf, dtype=np.uint8)
        self.tensors: list[GGUFTensor] = []
        for name, dims, qtype_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(qtype_id)
            except ValueError:
                raise ModelLoadError(f"unsupported quantization type id {qtype_id} (tensor {name})") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_el = int(np.prod(dims))
            nbytes = n_el // block * type_size
            start = data_start + offset
            if start + nbytes > len(buf):
                raise ModelLoadError(f"GGUF file is truncated (tensor {name}): {path}")
            self.tensors.append(GGUFTensor(name, dims, qtype, raw[start:start + nbytes]))

    def _read(self, n: int) -> bytes:
        b = self._mm[self._pos:self._pos + n]
        if len(b) != n:
            raise ModelLoadError(f"GGUF file is truncated: {self.path}")
        self._pos += n
        return b

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self._read(size))

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        return self._read(n).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, n = self._unpack("<IQ")
            if etype in _NP:
                dt = np.dtype(_NP[etype]).newbyteorder("<")
                arr = np.frombuffer(self._read(n * dt.itemsize), dtype=dt)
                return arr.tolist()
            return [self._value(etype) for _ in range(n)]
        raise ModelLoadError(f"bad GGUF metadata value type {vtype}: {self.path}")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file; a clear ModelLoadError for a missing, foreign or corrupt file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    with open(path, "rb") as f:  # before mmap, which fails on an empty file
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelLoadError(f"not a GGUF file (bad magic): {path}")
    try:
        return GGUFFile(path)
    except ModelLoadError:
        raise
    except Exception as e:
        detail = " ".join(str(e).split())  # one line, as every ModelLoadError
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(e).__name__}: {detail}") from None


def read_gguf_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value fields of an open GGUF file (arrays are lists)."""
    return {k: v for k, v in reader.metadata.items()}
