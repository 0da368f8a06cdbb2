"""`--weights auto` by measurement: the fastest weight format whose perplexity stays within a
stated bound of the full-precision model's, measured once per model file and CPU.

`metroline eval formats` (cli.cmd_eval_formats) measures each candidate format on this machine
(perplexity on the held-out ShareGPT slice, decode tok/s of the model's own forward at batch 1)
and records the result here; a later `--weights auto` on the same file and CPU reads that record
(`recorded_choice`) instead of the static rule (packed as stored). The record is a small JSON
file under $METROLINE_CACHE_DIR/formats (default ~/.cache/metroline/formats), keyed by the model file's
path, size and modification time, the CPU's SIMD path and the thread count, so a changed file or
another machine is measured afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

DEFAULT_BOUND = 0.02  # perplexity at most 2% above the fp32 reference's
# Speeds within this share of the fastest count as a tie (the noise of a shared machine), and a
# tie goes to the lower perplexity.
SPEED_TIE = 0.05


@dataclass
class FormatMeasure:
    weights: str  # the --weights value
    perplexity: float
    decode_tok_s: float  # batch 1, the model's forward + lm_head per token
    weight_bytes: int  # bytes a decode step reads


@dataclass
class FormatChoice:
    choice: str
    bound: float
    reference_perplexity: float
    measures: list[FormatMeasure] = field(default_factory=list)
    measured_at: str = ""

    def within(self) -> list[FormatMeasure]:
        limit = self.reference_perplexity * (1 + self.bound)
        return [m for m in self.measures if m.perplexity <= limit]


def pick(measures: list[FormatMeasure], reference_perplexity: float, bound: float) -> str:
    """The fastest format whose perplexity is within `bound` (relative) of the reference's (of
    those within SPEED_TIE of the fastest, the lowest perplexity); ValueError when none is (the
    reference itself always qualifies when measured)."""
    if bound < 0:
        raise ValueError(f"the perplexity bound must be >= 0, got {bound}")
    ok = [m for m in measures if m.perplexity <= reference_perplexity * (1 + bound)]
    if not ok:
        raise ValueError(f"no measured format is within {bound:.1%} of the reference perplexity "
                         f"{reference_perplexity:.3f}")
    fastest = max(m.decode_tok_s for m in ok)
    return min((m for m in ok if m.decode_tok_s >= fastest * (1 - SPEED_TIE)), key=lambda m: m.perplexity).weights


def _cache_dir() -> str:
    base = os.environ.get("METROLINE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "metroline")
    return os.path.join(base, "formats")


def record_key(model_path: str) -> str:
    import torch

    from metroline.kernels import fused

    st = os.stat(model_path)
    parts = [os.path.abspath(model_path), str(st.st_size), str(st.st_mtime_ns), fused.simd_isa(),
             str(torch.get_num_threads())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def record_path(model_path: str) -> str:
    return os.path.join(_cache_dir(), record_key(model_path) + ".json")


def save_choice(model_path: str, choice: FormatChoice) -> str:
    path = record_path(model_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    choice.measured_at = choice.measured_at or time.strftime("%Y-%m-%d %H:%M:%S")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"model": os.path.abspath(model_path), **asdict(choice)}, f, indent=1)
    os.replace(tmp, path)
    return path


def recorded_choice(model_path: str) -> FormatChoice | None:
    """The choice recorded for this file on this CPU, or None (never measured, or unreadable)."""
    try:
        with open(record_path(model_path)) as f:
            d = json.load(f)
        return FormatChoice(d["choice"], d["bound"], d["reference_perplexity"],
                            [FormatMeasure(**m) for m in d["measures"]], d.get("measured_at", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None
