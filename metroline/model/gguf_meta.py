"""Reading GGUF metadata into plain Python values."""

from __future__ import annotations

import os
from typing import Any

from metroline.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | os.PathLike):
    """Open a GGUF file with the `gguf` package; a clear ModelLoadError for anything else."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"not a GGUF file (bad magic): {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on corrupt files
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from None


def read_gguf_metadata(reader) -> dict[str, Any]:
    """All key/value fields of an open GGUFReader as Python values (arrays become lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise ModelLoadError(f"cannot decode GGUF metadata field {key!r}: {e}") from None
    return meta
