"""Three grammar-constrained-decoding libraries side by side on this CPU, for the default
model's tokenizer (SmolLM2, byte-level BPE, 49152 tokens): llguidance (what metroline uses),
xgrammar and outlines-core.

A one-off comparison, outside the project's dependencies: run it with a separate venv, not
the project's, e.g.

    python3 -m venv /tmp/glvenv
    /tmp/glvenv/bin/pip install llguidance xgrammar outlines-core numpy tokenizers matplotlib jsonschema
    .venv/bin/python -c "from metroline.model.default import default_model_path; \
        from metroline.model.loader import load_tokenizer_from_gguf; \
        t = load_tokenizer_from_gguf(default_model_path()); \
        open('/tmp/smollm2_tokenizer.json', 'w').write(t.backend.to_str())"
    /tmp/glvenv/bin/python benchmarks/grammar_libraries.py [--tokenizer /tmp/smollm2_tokenizer.json]

(xgrammar pulls in torch; the masks go into a torch view of the same numpy buffer.)

For each library: (1) the tokenizer/vocabulary set-up, once; for each JSON schema: (2) the
grammar compile, cold (first time for that schema in this process): llguidance's
grammar_from_json_schema + LLMatcher (whose lexer is then built lazily, during the masks),
xgrammar's compile_json_schema (which precomputes its token-mask cache), outlines-core's
build_regex_from_schema + Index (the whole token automaton); (3) the per-token mask time (p50,
p99) along --samples walks per schema: mask into a 32-bit-per-word bitmask, pick the argmax of
seeded random logits among the allowed tokens, feed it back, until the stop token (only the
mask call is timed; a fresh matcher per walk, its creation timed apart), at most 300 tokens;
(4) whether the walk's text (the tokens' bytes) parses and validates with jsonschema.

Settings meant to make the three comparable: one thread everywhere (RAYON_NUM_THREADS=1,
xgrammar max_threads=1, torch 1 thread; CPU time is recorded beside wall time to show it);
compact JSON (llguidance with the options metroline uses, xgrammar any_whitespace=False,
outlines-core its default whitespace pattern `[ ]?`, the only one it has); special tokens other
than the stop token never allowed (llguidance reads them from tokenizer.json, xgrammar gets them
as empty strings, which it treats as special, outlines-core leaves them out of its vocabulary).
Every schema has additionalProperties false and bounded strings, so random walks end.

Writes benchmarks/results/grammar_libraries.{json,png}. One process, about 15 s of CPU (2-core VM).
"""

from __future__ import annotations

import os

for _var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_TOKENS = 300
STOP_IDS = [2]  # <|im_end|>, the default model's stop token
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")
LLG_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _obj(props: dict, required: list | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS = {
    "flat": _obj({"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                  "city": {"type": "string", "maxLength": 24}}),
    "nested_arrays": _obj({
        "user": _obj({"id": {"type": "integer"},
                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                               "minItems": 1, "maxItems": 4}}),
        "points": {"type": "array", "minItems": 2, "maxItems": 5,
                   "items": _obj({"x": {"type": "integer"}, "y": {"type": "integer"}})},
    }),
    "enums": _obj({"color": {"enum": ["red", "green", "blue", "cyan", "magenta", "yellow"]},
                   "size": {"enum": ["S", "M", "L", "XL", "XXL"]},
                   "status": {"type": "string", "enum": ["active", "inactive", "pending_review"]},
                   "kind": {"const": "shirt"}}),
    "number_bounds": _obj({"temperature": {"type": "number", "minimum": -50, "maximum": 50},
                           "percent": {"type": "integer", "minimum": 0, "maximum": 100},
                           "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                           "year": {"type": "integer", "minimum": 1900, "maximum": 2099}}),
    "string_patterns": _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                             "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                             "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,12}$"}}),
    "optional_nullable": _obj({"id": {"type": "integer"},
                               "nickname": {"type": ["string", "null"], "maxLength": 16},
                               "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                               "note": {"type": "string", "maxLength": 20},
                               "active": {"type": "boolean"}}, required=["id"]),
}

# Seen on the first runs (xgrammar 0.2.9, outlines-core 0.2.14), kept with the results.
NOTES = [
    "xgrammar: a string with maxLength compiles to characters [^\"\\\\\\r\\n]{0,N} (no escapes, control "
    "characters allowed) where its unbounded string rule excludes \\0-\\x1f, so a walk can emit a raw control "
    "byte inside a string: invalid JSON (json.loads rejects it).",
    "outlines-core: build_regex_from_schema ignores minimum/maximum of numbers and integers, so number_bounds "
    "walks go out of range (the regex is plain -?(0|[1-9][0-9]*)...).",
    "llguidance builds its lexer lazily, so its compile is small and its first masks (p99) carry the cost; "
    "outlines-core builds the whole token automaton up front, so its compile is the largest and masks are "
    "lookups; xgrammar is in between (precomputed adaptive token-mask cache).",
]

# --- tokenizer.json -> token strings and bytes ------------------------------------------

def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet: unicode char -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Vocab:
    def __init__(self, path: str):
        with open(path) as f:
            self.json_str = f.read()
        d = json.loads(self.json_str)
        assert d["model"]["type"] == "BPE" and d["pre_tokenizer"]["type"] == "ByteLevel", "byte-level BPE expected"
        vocab = d["model"]["vocab"]
        self.size = max(vocab.values()) + 1
        self.strings = [""] * self.size
        for s, i in vocab.items():
            self.strings[i] = s
        self.special = {a["id"] for a in d["added_tokens"] if a["special"]}
        dec = _byte_decoder()
        self.bytes = [s.encode() if i in self.special else bytes(dec[c] for c in s) for i, s in enumerate(self.strings)]


# --- the three libraries, behind one small interface ------------------------------------

class LLGuidance:
    name = "llguidance"

    def __init__(self, vocab: Vocab):
        import llguidance
        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(vocab.json_str, n_vocab=vocab.size, eos_token=STOP_IDS)

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, overrides=LLG_JSON_OPTIONS)
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return grammar, m  # the first walk uses the matcher built here

    def matcher(self, compiled, first: bool):
        grammar, m = compiled
        return m if first else self.ll.LLMatcher(self.tok, grammar, log_level=0)

    def fill(self, m, mask: np.ndarray, _view) -> None:
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t)

    def finish(self, m, stop: int) -> bool:
        return m.is_accepting() and m.consume_token(stop) and not m.is_error()


class XGrammar:
    name = "xgrammar"

    def __init__(self, vocab: Vocab):
        import torch
        import xgrammar
        torch.set_num_threads(1)
        self.torch, self.xgr = torch, xgrammar
        # Special tokens (other than the stop token) as empty strings: xgrammar then lists them in
        # special_token_ids and never allows them (from_huggingface does not, for this tokenizer).
        encoded = ["" if (i in vocab.special and i not in STOP_IDS) else s for i, s in enumerate(vocab.strings)]
        self.info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab.size,
                                           stop_token_ids=STOP_IDS, add_prefix_space=False)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled, first: bool):
        return self.xgr.GrammarMatcher(compiled)

    def view(self, mask: np.ndarray):
        return self.torch.from_numpy(mask.reshape(1, -1))  # shares mask's memory

    def fill(self, m, mask: np.ndarray, view) -> None:
        m.fill_next_token_bitmask(view)

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def finish(self, m, stop: int) -> bool:
        return m.accept_token(stop) and m.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab: Vocab):
        import outlines_core
        self.oc = outlines_core
        tokens: dict = {}
        for i, b in enumerate(vocab.bytes):
            if i not in vocab.special:
                tokens.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(STOP_IDS[0], tokens)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled, first: bool):
        return self.oc.Guide(compiled)

    def fill(self, m, mask: np.ndarray, _view) -> None:
        m.write_mask_into(mask.ctypes.data, mask.size, 4)

    def accept(self, m, t: int) -> bool:
        try:
            m.advance(t, return_tokens=False)
            return True
        except Exception:  # noqa: BLE001 - outlines-core raises ValueError on a disallowed token
            return False

    def finish(self, m, stop: int) -> bool:
        return m.is_finished()


BACKENDS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


# --- measuring --------------------------------------------------------------------------

def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3


def walk(backend, compiled, vocab: Vocab, rng: np.random.Generator, first: bool) -> dict:
    mask = np.zeros((vocab.size + 31) // 32, dtype=np.int32)
    view = backend.view(mask) if hasattr(backend, "view") else None
    m, init_ms, _ = _timed(lambda: backend.matcher(compiled, first))
    tokens: list[int] = []
    mask_ns: list[int] = []
    status, accepted = "max_tokens", False
    for _ in range(MAX_TOKENS + 1):
        mask.fill(0)
        t0 = time.perf_counter_ns()
        backend.fill(m, mask, view)
        mask_ns.append(time.perf_counter_ns() - t0)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab.size].astype(bool)
        if not allowed.any():
            status = "dead_end"
            break
        logits = rng.standard_normal(vocab.size, dtype=np.float32)
        logits[~allowed] = -np.inf
        t = int(np.argmax(logits))
        if t in STOP_IDS:
            status, accepted = "stop_token", bool(backend.finish(m, t))
            break
        if len(tokens) == MAX_TOKENS:
            break
        if not backend.accept(m, t):
            status = "token_rejected"
            break
        tokens.append(t)
    text = b"".join(vocab.bytes[t] for t in tokens).decode("utf-8", errors="replace")
    return {"tokens": len(tokens), "status": status, "grammar_accepted": accepted, "text": text,
            "matcher_init_ms": init_ms, "mask_ns": mask_ns,
            "special_tokens_emitted": sum(t in vocab.special for t in tokens)}


def validate(text: str, schema: dict) -> str | None:
    """None when valid, else why not."""
    import jsonschema
    try:
        obj = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
    return None if not errors else f"schema: {errors[0].message}"


def pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else float("nan")


def run_library(name: str, vocab: Vocab, samples: int, seed: int) -> dict:
    out: dict = {"library": name}
    module = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}[name]
    try:  # the import apart from the set-up (xgrammar's brings in torch)
        _, out["import_ms"], _ = _timed(lambda: importlib.import_module(module))
        backend, out["setup_ms"], out["setup_cpu_ms"] = _timed(lambda: BACKENDS[name](vocab))
    except Exception as e:  # noqa: BLE001 - record why and go on with the others
        out["error"] = f"setup failed: {type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc(limit=3)
        return out
    out["schemas"] = {}
    all_mask_ns: list[int] = []
    n_valid = n_total = 0
    for si, (sname, schema) in enumerate(SCHEMAS.items()):
        r: dict = {}
        out["schemas"][sname] = r
        try:
            compiled, r["compile_ms"], r["compile_cpu_ms"] = _timed(lambda: backend.compile(schema))
        except Exception as e:  # noqa: BLE001
            r["error"] = f"compile failed: {type(e).__name__}: {e}"
            n_total += samples
            continue
        walks = []
        for k in range(samples):
            rng = np.random.default_rng(seed * 1000 + si * 100 + k)
            try:
                w = walk(backend, compiled, vocab, rng, first=(k == 0))
            except Exception as e:  # noqa: BLE001
                w = {"status": f"error: {type(e).__name__}: {e}", "mask_ns": [], "tokens": 0, "text": "",
                     "grammar_accepted": False, "matcher_init_ms": float("nan"), "special_tokens_emitted": 0}
            w["invalid_reason"] = validate(w["text"], schema)
            walks.append(w)
        mask_ns = [x for w in walks for x in w["mask_ns"]]
        all_mask_ns += mask_ns
        valid = sum(w["invalid_reason"] is None for w in walks)
        n_valid += valid
        n_total += len(walks)
        r.update({
            "mask_p50_ms": pct(mask_ns, 50) / 1e6, "mask_p99_ms": pct(mask_ns, 99) / 1e6,
            "mask_max_ms": max(mask_ns) / 1e6 if mask_ns else float("nan"),
            "first_mask_ms_mean": float(np.mean([w["mask_ns"][0] for w in walks if w["mask_ns"]])) / 1e6,
            "masks": len(mask_ns),
            "matcher_init_ms_p50": pct([w["matcher_init_ms"] for w in walks], 50),
            "tokens_mean": float(np.mean([w["tokens"] for w in walks])),
            "valid": valid, "total": len(walks),
            "statuses": {s: sum(w["status"] == s for w in walks) for s in sorted({w["status"] for w in walks})},
            "grammar_accepted": sum(w["grammar_accepted"] for w in walks),
            "special_tokens_emitted": sum(w["special_tokens_emitted"] for w in walks),
            "invalid_reasons": sorted({w["invalid_reason"] for w in walks if w["invalid_reason"]})[:3],
            "example": walks[0]["text"],
        })
        print(f"  {name:13s} {sname:18s} compile {r['compile_ms']:9.2f} ms  mask p50 {r['mask_p50_ms']:.4f} "
              f"p99 {r['mask_p99_ms']:.4f} ms  valid {valid}/{len(walks)}  e.g. {walks[0]['text'][:70]!r}",
              flush=True)
    out["mask_p50_ms"] = pct(all_mask_ns, 50) / 1e6
    out["mask_p99_ms"] = pct(all_mask_ns, 99) / 1e6
    out["masks"] = len(all_mask_ns)
    out["valid"], out["total"] = n_valid, n_total
    return out


def cpu_model() -> str:
    """/proc/cpuinfo's model name, with family/model/stepping (a VM may say only "AMD EPYC")."""
    info: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or "unknown"
    name = info.get("model name", "unknown")
    return f"{name} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}, " \
           f"stepping {info.get('stepping', '?')})"


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    libs = [r for r in results["libraries"] if "schemas" in r]
    names = list(SCHEMAS)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 3, 3]})
    colors = {"llguidance": "tab:blue", "xgrammar": "tab:orange", "outlines-core": "tab:green"}
    ax = axes[0]
    ax.bar([r["library"] for r in libs], [r["setup_ms"] for r in libs], color=[colors[r["library"]] for r in libs])
    ax.set_yscale("log")
    ax.set_ylim(bottom=1)
    ax.set_ylabel("ms (log)")
    ax.set_title("tokenizer set-up\n(imports apart)")
    ax.tick_params(axis="x", rotation=20)
    width = 0.8 / max(len(libs), 1)
    x = np.arange(len(names))
    for j, r in enumerate(libs):
        s = r["schemas"]
        comp = [s[n].get("compile_ms", np.nan) for n in names]
        p50 = [s[n].get("mask_p50_ms", np.nan) for n in names]
        p99 = [s[n].get("mask_p99_ms", np.nan) for n in names]
        axes[1].bar(x + j * width, comp, width, label=r["library"], color=colors[r["library"]])
        axes[2].bar(x + j * width, p50, width, label=f"{r['library']} p50", color=colors[r["library"]])
        axes[2].scatter(x + j * width, p99, marker="_", s=200, color="black",
                        label="p99" if j == 0 else None, zorder=3)
    for ax, title in ((axes[1], "grammar compile, cold"), (axes[2], "mask per token: p50 bars, p99 ticks")):
        ax.set_xticks(x + width * (len(libs) - 1) / 2)
        ax.set_xticklabels(names, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"JSON-schema grammars, SmolLM2 tokenizer ({results['vocab_size']} tokens), 1 thread, "
                 f"{results['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="/tmp/smollm2_tokenizer.json")
    ap.add_argument("--samples", type=int, default=20, help="walks per schema and library")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--output", default=os.path.join(HERE, "results", "grammar_libraries.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    t_start, c_start = time.perf_counter(), time.process_time()
    vocab = Vocab(args.tokenizer)
    print(f"vocab {vocab.size}, special {sorted(vocab.special)}, stop {STOP_IDS}", flush=True)
    libs = []
    for name in args.libraries.split(","):
        r = run_library(name, vocab, args.samples, args.seed)
        if "error" in r:
            print(f"  {name}: {r['error']}", flush=True)
        else:
            print(f"  {name}: setup {r['setup_ms']:.1f} ms, mask p50 {r['mask_p50_ms']:.4f} ms p99 "
                  f"{r['mask_p99_ms']:.4f} ms, valid {r['valid']}/{r['total']}", flush=True)
        libs.append(r)
    results = {
        "what": "grammar-constrained decoding libraries on the default model's tokenizer, CPU, 1 thread; "
                "masks timed along seeded random-logit walks (argmax among allowed tokens), at most "
                f"{MAX_TOKENS} tokens, {args.samples} walks per schema",
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "versions": {d: version(d) for d in ("llguidance", "xgrammar", "outlines_core", "torch", "numpy",
                                             "tokenizers", "jsonschema")},
        "tokenizer": os.path.basename(args.tokenizer), "vocab_size": vocab.size, "stop_token_ids": STOP_IDS,
        "max_tokens": MAX_TOKENS, "samples_per_schema": args.samples, "seed": args.seed,
        "threads": {"RAYON_NUM_THREADS": 1, "xgrammar.max_threads": 1, "torch": 1,
                    "outlines-core": "not configurable (RAYON_NUM_THREADS=1 set)"},
        "whitespace": {"llguidance": LLG_JSON_OPTIONS, "xgrammar": "any_whitespace=False",
                       "outlines-core": "default whitespace_pattern [ ]?"},
        "compile_means": {"llguidance": "grammar_from_json_schema + LLMatcher (lexer built lazily, during masks)",
                          "xgrammar": "GrammarCompiler.compile_json_schema (token-mask cache precomputed)",
                          "outlines-core": "build_regex_from_schema + Index (full token automaton)"},
        "notes": NOTES,
        "schemas": SCHEMAS,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - c_start,
        "libraries": libs,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.splitext(args.output)[0] + ".png")
    print(f"wrote {args.output} (wall {results['wall_s']:.1f} s, cpu {results['cpu_s']:.1f} s, "
          f"load {load_before[0]:.2f} -> {results['loadavg_after'][0]:.2f})")


if __name__ == "__main__":
    main()
