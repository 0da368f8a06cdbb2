"""Calibration for importance-weighted quantization (`--quant-method imatrix`), in the spirit
of llama.cpp's importance matrix and AWQ's activation awareness: how much each input channel
of each matrix matters is measured on real text, and the quantizers (metroline.quant.
quantizers) then minimise sum_k importance_k * (w_k - deq_k)^2 per block instead of the
plain error.

The importance of a matrix's input channel k is the mean of x_k^2 over the calibration
tokens, x the input of its layer, measured on the full-precision model (the file's weights
dequantized to fp32, `--weights fp32`) through the engine's own forward. Every linear layer
of the decoder layers gets one; the shards of a fused layer (q/k/v in qkv_proj, gate/up in
gate_up_proj) share their layer's input, so they share its vector. The embedding and the
output projection have none (they are quantized to nearest, as before).

The calibration sample (SAMPLE): ShareGPT records 0..999, each conversation in the model's
chat template, the first 256 tokens of the first 16 conversations at least that long (4096
tokens). It is disjoint from the evaluation slice (records 2000..2199, metroline.quant.
evaluate). Results are cached on disk, keyed by the model's files (path, size, mtime) and
the sample, in $METROLINE_CACHE_DIR/importance (default ~/.cache/metroline/importance), so a
second load does not run the model again; `save_importance` / `load_importance` (and
`--imatrix FILE`) keep them where one chooses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

from metroline.errors import MetrolineError

EVAL_RECORDS = (2000, 2200)  # metroline.quant.evaluate's held-out slice
QUANT_METHODS = ("rtn", "imatrix")
_VERSION = 1  # bump when what is measured changes: older cache files are then not read


class CalibrationError(MetrolineError):
    """Calibration cannot be done as asked, or an importance file does not fit (one line)."""


@dataclass(frozen=True)
class CalibrationSample:
    """ShareGPT records first..first+count-1, chat template, the first `tokens` tokens of the
    first `num_seqs` conversations at least that long."""

    first: int = 0
    count: int = 1000
    num_seqs: int = 16
    tokens: int = 256

    def __post_init__(self):
        if self.first < 0 or self.count < 1 or self.num_seqs < 1 or self.tokens < 2:
            raise CalibrationError("calibration sample: first >= 0, count >= 1, num_seqs >= 1, tokens >= 2")
        if self.first < EVAL_RECORDS[1] and self.first + self.count > EVAL_RECORDS[0]:
            raise CalibrationError(f"calibration records {self.first}..{self.first + self.count - 1} overlap "
                                   f"the evaluation slice (records {EVAL_RECORDS[0]}..{EVAL_RECORDS[1] - 1})")

    def describe(self) -> str:
        return (f"ShareGPT records {self.first}..{self.first + self.count - 1}, chat template, first "
                f"{self.tokens} tokens of the first {self.num_seqs} long enough")


SAMPLE = CalibrationSample()


def calibration_ids(tokenizer, sample: CalibrationSample | None = None) -> list[list[int]]:
    from metroline.quant.evaluate import held_out

    sample = sample or SAMPLE

    return held_out(tokenizer, sample.num_seqs, sample.tokens, sample.first, sample.count)


def _linear_inputs(model) -> dict[str, list[str]]:
    """Each linear layer of the decoder layers -> the checkpoint-side names of its matrices
    (the loader's `_fused_name`: "<module>.weight", fused layers "<module>.weight:<shard>")."""
    out = {}
    for name, mod in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(mod, torch.nn.Linear):
            shards = getattr(mod, "shard_offsets", None)
            out[name] = [f"{name}.weight:{s}" for s in shards] if shards else [f"{name}.weight"]
    return out


@torch.inference_mode()
def collect_importance(loaded, sample: CalibrationSample | None = None, *,
                       progress: bool = True) -> dict[str, np.ndarray]:
    """Mean x_k^2 per input channel k of every decoder-layer matrix (name as the loader
    names it -> float32 [K]), over `sample` run through `loaded`, the full-precision model
    (--weights fp32; sample None: SAMPLE)."""
    from metroline.progress import progress as progress_bar
    from metroline.quant.evaluate import hidden_states
    from metroline.quant.packed import PackedLinear

    sample = sample or SAMPLE
    layers = _linear_inputs(loaded.model)
    mods = dict(loaded.model.named_modules())
    if not layers or any(isinstance(m, PackedLinear) for m in loaded.model.model.layers.modules()):
        raise CalibrationError("calibration needs the model's linear layers in full precision (--weights fp32)")
    seqs = calibration_ids(loaded.tokenizer, sample)
    if not seqs:
        raise CalibrationError(f"no calibration sequence of {sample.tokens} tokens in {sample.describe()}")
    sums = {n: torch.zeros(mods[n].in_features, dtype=torch.float64) for n in layers}
    counts = dict.fromkeys(layers, 0)

    def recording(name, forward):
        def wrapped(x):
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            sums[name] += (flat * flat).sum(0).cpu()
            counts[name] += flat.shape[0]
            return forward(x)
        return wrapped

    # The model calls its layers' .forward directly (no hooks run), so the recording wrapper
    # shadows each layer's forward for the duration.
    for n in layers:
        mods[n].forward = recording(n, mods[n].forward)
    try:
        with progress_bar(len(seqs), "calibrating (importance)", progress, unit="seq") as bar:
            for ids in seqs:
                hidden_states(loaded, ids)
                bar.update(1)
    finally:
        for n in layers:
            del mods[n].forward
    out = {}
    for n, names in layers.items():
        mean = (sums[n] / max(1, counts[n])).float().numpy()
        out.update({key: mean for key in names})
    return out


# ----------------------------------------------------------------------- files and cache

def save_importance(importance: dict[str, np.ndarray], path: str, meta: dict | None = None) -> None:
    """Write `importance` (name -> float32 [K]) as a .npz file (written whole, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {f"w{i}": np.asarray(v, dtype=np.float32) for i, v in enumerate(importance.values())}
    header = json.dumps({"version": _VERSION, "names": list(importance), **(meta or {})})
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.array(header), **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; a saved file is like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_importance(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            header = json.loads(str(z["__meta__"]))
            if header.get("version") != _VERSION:
                raise CalibrationError(f"{path}: importance file of version {header.get('version')}, "
                                       f"this metroline reads {_VERSION}")
            return {name: z[f"w{i}"] for i, name in enumerate(header["names"])}
    except CalibrationError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise CalibrationError(f"cannot read importance file {path}: {' '.join(str(e).split())}") from None


def cache_dir() -> str:
    base = os.environ.get("METROLINE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "metroline")
    return os.path.join(base, "importance")


def _model_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    return [path]


def cache_path(source, sample: CalibrationSample | None = None) -> str:
    """Where the importance of `source` (loader.ModelSource) over `sample` is cached."""
    sample = sample or SAMPLE
    ident = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in _model_files(source.path)]
    key = hashlib.sha256(json.dumps({"v": _VERSION, "files": ident, "sample": asdict(sample)}).encode())
    stem = re.sub(r"[^\w.-]+", "_", source.name)[:60]
    return os.path.join(cache_dir(), f"{stem}-{key.hexdigest()[:16]}.npz")


def importance_for(source, load_reference, *, path: str | None = None, sample: CalibrationSample | None = None,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """The importance of the model at `source` (loader.ModelSource) over `sample`: read from
    `path` when that file exists, else from the cache, else collected on `load_reference()`
    (the model in full precision; only called then) and cached, and written to `path` when
    given. model.loader.importance_of is the door with a model name."""
    sample = sample or SAMPLE
    if path is not None and os.path.exists(path):
        return load_importance(path)
    cached = cache_path(source, sample)
    importance = None
    if os.path.exists(cached):
        try:
            importance = load_importance(cached)
        except CalibrationError:
            importance = None  # a damaged cache entry is measured again
    if importance is None:
        importance = collect_importance(load_reference(), sample, progress=progress)
        meta = {"model": source.name, "sample": sample.describe()}
        try:
            save_importance(importance, cached, meta)
        except OSError:
            pass  # no writable cache: measured again next time
    if path is not None:
        save_importance(importance, path, {"model": source.name, "sample": sample.describe()})
    return importance


def check_importance(importance: dict[str, np.ndarray], names) -> None:
    """Every decoder-layer matrix in `names` has an entry (the file was made for this model)."""
    missing = [n for n in names if n.startswith("model.layers.") and n not in importance]
    if missing:
        raise CalibrationError(f"the importance has no entry for {missing[0]} ({len(missing)} matrices "
                               "missing): was it collected on another model?")
