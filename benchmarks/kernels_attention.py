"""metroline's attention and fused layer ops against the torch code they replace.

Per call, at the default model's shapes (hidden 576, 9 query / 3 kv heads of 64, MLP 1536,
block size 16), decode batches of B = 1 and 16 sequences (one query token each), contexts of
128, 1024 and 4096 tokens, 1 and 2 threads:

* attention: TorchAttentionBackend.forward (index_copy_ of the step's K/V, gather of K/V by
  slot, scaled_dot_product_attention; fp32 cache) vs paged_attention_decode on fp32 and fp16
  caches, on each SIMD path this CPU runs. The torch figure includes its K/V write (~5 us),
  which the kernels do in rope_kv_write.
* rope + KV write: llama.py's apply_rotary on q and k, then the backend's two index_copy_ vs
  rope_kv_write (fp32 and fp16 caches).
* rms_norm: F.rms_norm (RMSNorm.forward for fp32) vs rms_norm; residual add + norm:
  `x + h` then F.rms_norm vs add_rms_norm.
* silu_mul: split, F.silu(gate) * up vs silu_mul.

The KV cache is cold, as in decode, where a step's 30 layers of K/V stream past the caches:
each attention variant rotates over enough cache copies to exceed the L3 (32 MB here). The
machine is shared and noisy: variants are interleaved in a shuffled order in each round and
the median over rounds is reported (with the minimum, and at 1 thread the calling thread's CPU
time, which preemption by other processes does not inflate); the load average is recorded
before and after. The summary adds one layer's glue (2 norms, RoPE + KV write, attention, SiLU) x 30.

Writes benchmarks/results/kernels_attention.json and kernels_attention.png.
Usage: python benchmarks/kernels_attention.py [--rounds 7] [--threads 1,2] [--batches 1,16]
       [--contexts 128,1024,4096] [--max-load 1.0] [--max-wait 0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import metroline.kernels as K  # noqa: E402
from metroline.attention.backend import SeqInfo, TorchAttentionBackend  # noqa: E402
from metroline.kernels import fused  # noqa: E402
from metroline.kernels.attention import paged_attention_decode  # noqa: E402
from metroline.model.llama import apply_rotary  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HIDDEN, HQ, HKV, D, INTER, BLOCK, LAYERS, EPS = 576, 9, 3, 64, 1536, 16, 30, 1e-5
COLD_BYTES = 96 << 20  # > L3 (32 MB here) with margin
TARGET_S = 0.004  # time each measurement at least this long


class Variant:
    """One thing to time: fn(state) over rotating states (cache copies)."""

    def __init__(self, key: dict, fn, states: list):
        self.key, self.fn, self.states = key, fn, states
        self.i, self.samples, self.cpu, self.reps = 0, [], [], 1

    def call(self):
        self.i = (self.i + 1) % len(self.states)
        self.fn(self.states[self.i])

    def calibrate(self):
        self.call()
        t = time.perf_counter()
        self.call()
        dt = time.perf_counter() - t
        self.reps = max(1, min(2000, int(TARGET_S / max(dt, 1e-7))))

    def measure(self):
        c, t = time.thread_time(), time.perf_counter()
        for _ in range(self.reps):
            self.call()
        self.samples.append((time.perf_counter() - t) / self.reps)
        self.cpu.append((time.thread_time() - c) / self.reps)


def simd_isas() -> list[str]:
    return [i for i in fused.supported_isas() if i != "scalar"] or ["scalar"]


class Step:
    """One decode step's inputs for B sequences of `ctx` cached tokens (the new one included)."""

    def __init__(self, B: int, ctx: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.B, self.ctx = B, ctx
        nb = -(-ctx // BLOCK)
        self.num_blocks = B * nb
        perm = torch.randperm(self.num_blocks, generator=g)
        self.block_ids = [perm[b * nb:(b + 1) * nb].tolist() for b in range(B)]
        self.tables = torch.tensor(self.block_ids, dtype=torch.int32)
        self.context_lens = torch.full((B,), ctx, dtype=torch.int32)
        self.qsl = torch.arange(B + 1, dtype=torch.int32)
        self.qkv = torch.randn(B, (HQ + 2 * HKV) * D, generator=g)
        self.q = self.qkv[:, :HQ * D].view(B, HQ, D)
        self.k = self.qkv[:, HQ * D:(HQ + HKV) * D].view(B, HKV, D)
        self.v = self.qkv[:, (HQ + HKV) * D:].view(B, HKV, D)
        seqs = [SeqInfo(1, ctx - 1, ids) for ids in self.block_ids]
        self.backend = TorchAttentionBackend()
        self.meta = self.backend.build_metadata(seqs, BLOCK, torch.device("cpu"))
        self.slots = self.meta.slot_mapping
        pos = torch.full((B,), ctx - 1)
        inv_freq = 1.0 / (100000.0 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        emb = torch.cat([torch.outer(pos.float(), inv_freq)] * 2, dim=-1)
        self.cos, self.sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)  # llama.py's [T, 1, D]

    def caches(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (self.num_blocks * BLOCK, HKV, D)
        one = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        n = max(1, min(64, -(-COLD_BYTES // (2 * one[0].numel() * one[0].element_size()))))
        return [one] + [(one[0].clone(), one[1].clone()) for _ in range(n - 1)]


def attention_variants(B: int, ctx: int) -> list[Variant]:
    s = Step(B, ctx)
    out = []
    c32, c16 = s.caches(torch.float32), s.caches(torch.float16)
    common = {"op": "attention", "B": B, "ctx": ctx}
    out.append(Variant({**common, "impl": "torch", "cache": "fp32", "isa": "torch"},
                       lambda c: s.backend.forward(s.q, s.k, s.v, c, s.meta, D ** -0.5), c32))
    for isa in simd_isas():
        for name, caches in (("fp32", c32), ("fp16", c16)):
            out.append(Variant({**common, "impl": "metroline", "cache": name, "isa": isa},
                               lambda c, isa=isa: paged_attention_decode(s.q, c[0], c[1], s.tables, s.context_lens,
                                                                         s.qsl, D ** -0.5, BLOCK, isa=isa),
                               caches))
    return out


def small_variants(B: int) -> list[Variant]:
    """rope + KV write, the norms, silu_mul: their cost does not depend on the context."""
    s = Step(B, 128)
    g = torch.Generator().manual_seed(1)
    x, h = torch.randn(B, HIDDEN, generator=g), torch.randn(B, HIDDEN, generator=g)
    w = torch.randn(HIDDEN, generator=g)
    gu = torch.randn(B, 2 * INTER, generator=g)
    c32, c16 = s.caches(torch.float32)[:1], s.caches(torch.float16)[:1]
    qk = s.qkv[:, :(HQ + HKV) * D].view(B, HQ + HKV, D)

    def torch_rope(c):
        r = apply_rotary(qk, s.cos, s.sin)
        q, k = r.split([HQ, HKV], dim=1)
        c[0].index_copy_(0, s.slots, k)
        c[1].index_copy_(0, s.slots, s.v)
        return q

    def torch_add_norm(_):
        y = x + h
        return F.rms_norm(y, (HIDDEN,), w, EPS)

    def torch_silu(_):
        gate, up = gu.split(INTER, dim=-1)
        return F.silu(gate) * up

    xx, hh = x.clone(), h.clone()
    out = [
        Variant({"op": "rope_kv_write", "B": B, "impl": "torch", "cache": "fp32", "isa": "torch"}, torch_rope, c32),
        Variant({"op": "rms_norm", "B": B, "impl": "torch", "isa": "torch"},
                lambda _: F.rms_norm(x, (HIDDEN,), w, EPS), [None]),
        Variant({"op": "add_rms_norm", "B": B, "impl": "torch", "isa": "torch"}, torch_add_norm, [None]),
        Variant({"op": "silu_mul", "B": B, "impl": "torch", "isa": "torch"}, torch_silu, [None]),
    ]
    # The kernels' rope works in place: re-rotating the same buffer keeps the values bounded
    # (a rotation), so the timed loop needs no copy.
    for isa in ["scalar"] + simd_isas():
        for name, caches in (("fp32", c32), ("fp16", c16)):
            out.append(Variant({"op": "rope_kv_write", "B": B, "impl": "metroline", "cache": name, "isa": isa},
                               lambda c, isa=isa: fused.rope_kv_write(s.q, s.k, s.v, s.cos, s.sin, c[0], c[1],
                                                                      s.slots, isa=isa), caches))
        out += [
            Variant({"op": "rms_norm", "B": B, "impl": "metroline", "isa": isa},
                    lambda _, isa=isa: fused.rms_norm(x, w, EPS, isa=isa), [None]),
            # In place on (xx, hh): the residual grows by the normalised x each call, which
            # changes no timing (no denormals or infs within a run's calls at this size).
            Variant({"op": "add_rms_norm", "B": B, "impl": "metroline", "isa": isa},
                    lambda _, isa=isa: fused.add_rms_norm(xx, hh, w, EPS, isa=isa), [None]),
            Variant({"op": "silu_mul", "B": B, "impl": "metroline", "isa": isa},
                    lambda _, isa=isa: fused.silu_mul(gu, isa=isa), [None]),
        ]
    return out


def wait_for_quiet(max_load: float, max_wait: float, step: float = 20.0) -> list:
    samples = [os.getloadavg()]
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"load {os.getloadavg()[0]:.2f} > {max_load}: waiting {step:.0f} s", file=sys.stderr, flush=True)
        time.sleep(step)
        samples.append(os.getloadavg())
    return samples


def measure_all(vs: list[Variant], rounds: int) -> None:
    for v in vs:
        v.samples, v.cpu = [], []
        v.calibrate()
    order = list(vs)
    for _ in range(rounds):
        random.shuffle(order)
        for v in order:
            v.measure()


def summarize(rows: list[dict]) -> list[dict]:
    """Per (threads, B, ctx): one layer's glue outside the matmuls, torch vs metroline, x 30."""
    out = []

    def pick(t, B, op, impl, ctx=None, cache=None):
        sel = [r for r in rows if r["threads"] == t and r["B"] == B and r["op"] == op and r["impl"] == impl
               and (ctx is None or r.get("ctx") == ctx) and (cache is None or r.get("cache") == cache)]
        if impl == "metroline":
            best = fused.simd_isa()
            sel = [r for r in sel if r["isa"] == best] or sel
        return min((r["us"] for r in sel), default=None)

    for t in sorted({r["threads"] for r in rows}):
        for B in sorted({r["B"] for r in rows}):
            for ctx in sorted({r["ctx"] for r in rows if "ctx" in r}):
                row = {"threads": t, "B": B, "ctx": ctx}
                for impl, cache in (("torch", "fp32"), ("metroline", "fp32"), ("metroline", "fp16")):
                    parts = [pick(t, B, "attention", impl, ctx, cache), pick(t, B, "rope_kv_write", impl, None, cache),
                             pick(t, B, "rms_norm", impl), pick(t, B, "add_rms_norm", impl),
                             pick(t, B, "silu_mul", impl)]
                    key = f"{impl}_{cache}"
                    row[f"{key}_layer_us"] = round(sum(parts), 1) if None not in parts else None
                    row[f"{key}_step_ms"] = round(sum(parts) * LAYERS / 1000, 2) if None not in parts else None
                out.append(row)
    return out


def run(args) -> dict:
    if not fused.available("paged_attention_decode"):
        sys.exit(f"the C++ attention kernels are not built: {K.unavailable_reason() or 'rebuild metroline._C'}")
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    waited = wait_for_quiet(args.max_load, args.max_wait) if args.max_wait > 0 else []
    result = {
        "machine": {"cpu": _cpu_name(), "features": K.cpu_features(), "simd_isa": fused.simd_isa(),
                    "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "loadavg_before": os.getloadavg(),
        "loadavg_while_waiting": waited,
        "settings": {"rounds": args.rounds, "cold_bytes": COLD_BYTES, "threads": threads, "batches": batches,
                     "contexts": contexts, "model": {"hidden": HIDDEN, "hq": HQ, "hkv": HKV, "head_dim": D,
                                                     "intermediate": INTER, "block_size": BLOCK}},
        "results": [],
    }
    groups = [("small", B, None) for B in batches] + [("attention", B, c) for B in batches for c in contexts]
    for kind, B, ctx in groups:
        vs = small_variants(B) if kind == "small" else attention_variants(B, ctx)
        for t in threads:
            torch.set_num_threads(t)
            measure_all(vs, args.rounds)
            for v in vs:
                row = {**v.key, "threads": t, "us": round(statistics.median(v.samples) * 1e6, 2),
                       "us_min": round(min(v.samples) * 1e6, 2)}
                if t == 1:  # the calling thread's CPU time: what the call costs when preempted
                    row["cpu_us"] = round(statistics.median(v.cpu) * 1e6, 2)
                result["results"].append(row)
            _print_rows([r for r in result["results"] if r["threads"] == t and r["B"] == B
                         and r.get("ctx") == ctx and (kind == "small") == (r["op"] != "attention")])
        del vs
    result["loadavg_after"] = os.getloadavg()
    result["summary"] = summarize(result["results"])
    print("\nglue per layer outside the matmuls (us) and per 30-layer step (ms):")
    for r in result["summary"]:
        print(f"  threads={r['threads']} B={r['B']:<2d} ctx={r['ctx']:<5d} torch {r['torch_fp32_layer_us']} us "
              f"({r['torch_fp32_step_ms']} ms) | metroline fp32 {r['metroline_fp32_layer_us']} us "
              f"({r['metroline_fp32_step_ms']} ms) | fp16 {r['metroline_fp16_layer_us']} us "
              f"({r['metroline_fp16_step_ms']} ms)")
    return result


def _cpu_name() -> str:
    try:
        from metroline.bench.hardware import cpu_name

        return cpu_name()
    except Exception:
        return platform.processor()


def _print_rows(rows: list[dict]) -> None:
    if not rows:
        return
    r0 = rows[0]
    head = f"\nB={r0['B']}" + (f" ctx={r0['ctx']}" if "ctx" in r0 else "") + f", {r0['threads']} thread(s): us/call"
    print(head)
    for op in dict.fromkeys(r["op"] for r in rows):
        cells = [f"{r['impl'] if r['impl'] == 'torch' else r['isa']}"
                 + (f"/{r['cache']}" if "cache" in r else "") + f" {r['us']:.1f}" for r in rows if r["op"] == op]
        print(f"  {op:<14s} " + " | ".join(cells))
    sys.stdout.flush()


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    rows = result["results"]
    threads = sorted({r["threads"] for r in rows})
    batches = sorted({r["B"] for r in rows})
    best = result["machine"]["simd_isa"]
    fig, axes = plt.subplots(2, len(threads), figsize=(6.2 * len(threads), 8.2), squeeze=False)
    colors = {"torch": "black", "fp32": "tab:blue", "fp16": "tab:orange"}
    for j, t in enumerate(threads):
        ax = axes[0][j]
        for B, ls in zip(batches, ["-", "--", ":"]):
            sel = [r for r in rows if r["op"] == "attention" and r["threads"] == t and r["B"] == B]
            for impl, cache in (("torch", "fp32"), ("metroline", "fp32"), ("metroline", "fp16")):
                pts = sorted((r["ctx"], r["us"]) for r in sel if r["impl"] == impl and r["cache"] == cache
                             and (impl == "torch" or r["isa"] == best))
                label = f"B={B} " + ("torch (gather + SDPA, fp32)" if impl == "torch" else f"metroline {best} {cache}")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3,
                        color=colors["torch" if impl == "torch" else cache], label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["ctx"] for r in rows if "ctx" in r}))
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("us / call (one layer)")
        ax.set_title(f"decode attention, cold KV, {t} thread(s)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
        ax = axes[1][j]
        ops = ["rope_kv_write", "rms_norm", "add_rms_norm", "silu_mul"]
        width = 0.8 / (2 * len(batches))
        for bi, B in enumerate(batches):
            for ii, impl in enumerate(("torch", "metroline")):
                vals = []
                for op in ops:
                    sel = [r for r in rows if r["op"] == op and r["threads"] == t and r["B"] == B and r["impl"] == impl
                           and (impl == "torch" or r["isa"] == best) and r.get("cache", "fp32") == "fp32"]
                    vals.append(sel[0]["us"] if sel else 0)
                k = bi * 2 + ii
                ax.bar([x + (k - len(batches) + 0.5) * width for x in range(len(ops))], vals, width,
                       color="black" if impl == "torch" else "tab:blue", alpha=1.0 if bi == 0 else 0.5,
                       label=f"B={B} {'torch' if impl == 'torch' else 'metroline ' + best}")
        ax.set_xticks(range(len(ops)))
        ax.set_xticklabels(ops, fontsize=8)
        ax.set_yscale("log")
        ax.set_yticks([v for v in (1, 2, 5, 10, 20, 50, 100, 200, 500) if v <= 2 * max(ax.get_ylim())])
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("us / call")
        ax.set_title(f"fused ops (fp32 cache for rope), {t} thread(s)", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"metroline attention + fused ops vs torch ({result['machine']['cpu']}; load "
                 f"{result['loadavg_before'][0]:.1f} -> {result['loadavg_after'][0]:.1f})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="128,1024,4096")
    ap.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-min load average below this")
    ap.add_argument("--max-wait", type=float, default=0, help="seconds to wait for it (0: do not wait)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, one thread")
    ap.add_argument("--out", default=os.path.join(RESULTS, "kernels_attention.json"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.threads = 3, "1"
    result = run(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    except ImportError as e:
        print(f"warning: no plot ({e}); the JSON is written", file=sys.stderr)
    print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0]}.png")


if __name__ == "__main__":
    main()
