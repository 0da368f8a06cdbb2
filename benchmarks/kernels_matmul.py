"""metroline's packed-weight matmul kernels against fp32 F.linear and dequantize + matmul.

For the default model's shapes (out x in: 576x576, 192x576, 1536x576, 576x1536 and the
49152x576 output matrix), every format (Q8_0, Q4_0, Q4_1), every kernel path this CPU runs
(scalar only at small M: it is the slow twin), M rows of activations, 1 and 2 threads:
microseconds per call and GB/s of weight bytes read per call.

Weights are cold, as in decode, where a step streams the whole model (66-96 MB) past the
caches: each variant rotates over enough copies of its weight to exceed the L3 cache. The
machine is shared and noisy: variants are interleaved in a shuffled order within each round
and the median over rounds is reported; the load average is recorded before and after. Read
bandwidth is measured the same way (torch sum over 256 MB) as the M=1 roofline.

Writes benchmarks/results/kernels_matmul.json and kernels_matmul.png.
Waits (up to 10 minutes) for the 1-minute load average to drop below 0.7 first.
Usage: python benchmarks/kernels_matmul.py [--rounds 7] [--threads 1,2] [--ms 1,4,16,64]
       [--shapes 1536x576,49152x576] [--max-load 0.7] [--max-wait 600] [--quick]
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

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as GT
from gguf.quants import quantize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import metroline.kernels as K  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
COLD_BYTES = 96 << 20  # > L3 (32 MB here) with margin
TARGET_S = 0.004  # time each measurement at least this long


def read_bandwidth(threads: int, rounds: int) -> float:
    torch.set_num_threads(threads)
    a = torch.ones(64 << 20)  # 256 MB
    a.sum()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(ts) / 1e9


class Variant:
    """One thing to time: fn(weight_copy, x) over rotating weight copies."""

    def __init__(self, key: dict, fn, copies, x, weight_bytes: int, isa: str = "auto"):
        self.key, self.fn, self.copies, self.x, self.weight_bytes = key, fn, copies, x, weight_bytes
        self.isa = isa  # forced around the timed loop, not per call (a context manager costs us)
        self.i, self.samples, self.reps = 0, [], 1

    def call(self):
        self.i = (self.i + 1) % len(self.copies)
        self.fn(self.copies[self.i], self.x)

    def calibrate(self):
        with K.force_isa(self.isa):
            self.call()
            t = time.perf_counter()
            self.call()
            dt = time.perf_counter() - t
        self.reps = max(1, min(200, int(TARGET_S / max(dt, 1e-7))))

    def measure(self):
        with K.force_isa(self.isa):
            t = time.perf_counter()
            for _ in range(self.reps):
                self.call()
            self.samples.append((time.perf_counter() - t) / self.reps)


def copies_of(t: torch.Tensor) -> list[torch.Tensor]:
    n = max(1, -(-COLD_BYTES // (t.numel() * t.element_size())))
    return [t] + [t.clone() for _ in range(n - 1)]


def variants_for(N: int, Kd: int, ms: list[int], isas: list[str], rng: np.random.Generator) -> list[Variant]:
    w = (rng.standard_normal((N, Kd)) * 0.05).astype(np.float32)
    out = []
    wf = copies_of(torch.from_numpy(w))
    xs = {M: torch.randn(M, Kd) for M in ms}
    for M in ms:
        out.append(Variant({"impl": "fp32 F.linear", "fmt": "F32", "isa": "mkl", "M": M},
                           lambda wt, x: F.linear(x, wt), wf, xs[M], N * Kd * 4))
    for fmt in (K.Q8_0, K.Q4_0, K.Q4_1):
        packed = K.repack(quantize(w, GT(int(fmt))), fmt)
        pc = copies_of(packed)
        nbytes = packed.numel()
        for M in ms:
            x = xs[M]
            for isa in isas:
                if isa == "scalar" and (M > 4 or N > 2000):
                    continue

                out.append(Variant({"impl": "qmatmul", "fmt": fmt.name, "isa": isa, "M": M},
                                   lambda p, x, fmt=fmt: K.qmatmul(x, p, fmt, N, Kd), pc, x, nbytes, isa))
            out.append(Variant({"impl": "dequant+matmul", "fmt": fmt.name, "isa": K.cpu_isa(), "M": M},
                               lambda p, x, fmt=fmt: F.linear(x, K.dequant(p, fmt, N, Kd)), pc, x, nbytes))
    return out


def wait_for_quiet(max_load: float, max_wait: float, step: float = 20.0) -> list:
    """Sleep until the 1-minute load average is below max_load (at most max_wait s): with
    another busy process on a 2-core machine, every 2-thread figure is an OpenMP barrier
    waiting out the other process's time slice (~8 ms), not a kernel."""
    samples = [os.getloadavg()]
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"load {os.getloadavg()[0]:.2f} > {max_load}: waiting {step:.0f} s", file=sys.stderr, flush=True)
        time.sleep(step)
        samples.append(os.getloadavg())
    return samples


def run(args) -> dict:
    if not K.available():
        sys.exit(f"the C++ kernels are not built: {K.unavailable_reason()}")
    isas = K.supported_isas()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(m) for m in args.ms.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    waited = wait_for_quiet(args.max_load, args.max_wait) if args.max_wait > 0 else []
    result = {
        "machine": {"cpu": _cpu_name(), "features": K.cpu_features(), "kernel_isa": K.cpu_isa(),
                    "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "loadavg_before": os.getloadavg(),
        "loadavg_while_waiting": waited,
        "settings": {"rounds": args.rounds, "cold_bytes": COLD_BYTES, "threads": threads, "ms": ms},
        "read_bandwidth_gbps": {},
        "results": [],
    }
    for t in threads:
        result["read_bandwidth_gbps"][str(t)] = round(read_bandwidth(t, args.rounds), 2)
        print(f"read bandwidth, {t} thread(s): {result['read_bandwidth_gbps'][str(t)]} GB/s", flush=True)
    for N, Kd in shapes:
        vs = variants_for(N, Kd, ms, isas, rng)
        for t in threads:
            torch.set_num_threads(t)
            for v in vs:
                v.samples = []
                v.calibrate()
            order = list(vs)
            for _ in range(args.rounds):
                random.shuffle(order)
                for v in order:
                    v.measure()
            for v in vs:
                med = statistics.median(v.samples)
                row = {"N": N, "K": Kd, **v.key, "threads": t, "us": round(med * 1e6, 2),
                       "us_min": round(min(v.samples) * 1e6, 2), "weight_bytes": v.weight_bytes,
                       "gbps": round(v.weight_bytes / med / 1e9, 2)}
                result["results"].append(row)
            _print_table(result["results"], N, Kd, t)
        del vs
    result["loadavg_after"] = os.getloadavg()
    return result


def _cpu_name() -> str:
    try:
        from metroline.bench.hardware import cpu_name

        return cpu_name()
    except Exception:
        return platform.processor()


def _print_table(rows, N, Kd, t):
    rows = [r for r in rows if r["N"] == N and r["K"] == Kd and r["threads"] == t]
    print(f"\n{N}x{Kd}, {t} thread(s): us/call (GB/s of weights)")
    for M in sorted({r["M"] for r in rows}):
        cells = [f"{r['fmt']}/{r['isa'] if r['impl'] == 'qmatmul' else r['impl']}: {r['us']:.0f} ({r['gbps']:.1f})"
                 for r in rows if r["M"] == M]
        print(f"  M={M:<3d} " + " | ".join(cells))
    sys.stdout.flush()


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: s[0] * s[1])
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(len(threads), len(shapes), figsize=(4.2 * len(shapes), 3.6 * len(threads)), squeeze=False)
    styles = {"Q8_0": "tab:blue", "Q4_0": "tab:green", "Q4_1": "tab:orange", "F32": "black"}
    for i, t in enumerate(threads):
        for j, (N, Kd) in enumerate(shapes):
            ax = axes[i][j]
            sel = [r for r in rows if r["N"] == N and r["K"] == Kd and r["threads"] == t]
            series = sorted({(r["impl"], r["fmt"], r["isa"]) for r in sel})
            for impl, fmt, isa in series:
                pts = sorted((r["M"], r["us"]) for r in sel if (r["impl"], r["fmt"], r["isa"]) == (impl, fmt, isa))
                if impl == "dequant+matmul" and fmt != "Q4_1":
                    continue  # one dequant line is enough to show the gap
                ls = {"avx512": "-", "avx2": "--", "scalar": ":", "mkl": "-"}.get(isa, "-.")
                if impl == "dequant+matmul":
                    ls = "-."
                label = "fp32 F.linear" if fmt == "F32" else (f"{fmt} {isa}" if impl == "qmatmul" else f"{fmt} dequant+matmul")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3,
                        color=styles.get(fmt, "gray"), label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{N}x{Kd}, {t} thread(s)", fontsize=9)
            ax.set_xlabel("M (rows of x)")
            ax.set_ylabel("us / call")
            ax.grid(True, which="both", alpha=0.3)
    bw = result["read_bandwidth_gbps"]
    fig.suptitle(f"metroline qmatmul vs fp32 ({result['machine']['cpu']}, {result['machine']['kernel_isa']}; "
                 f"read bandwidth {bw} GB/s; load {result['loadavg_before'][0]:.1f})", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ms", default="1,4,16,64")
    ap.add_argument("--shapes", default="", help="e.g. 1536x576,49152x576 (default: the model's five)")
    ap.add_argument("--max-load", type=float, default=0.7, help="wait for a 1-min load average below this")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for it (0: do not wait)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1536x576 and 49152x576 only")
    ap.add_argument("--out", default=os.path.join(RESULTS, "kernels_matmul.json"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.shapes = 3, args.shapes or "1536x576,49152x576"
    result = run(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0]}.png")


if __name__ == "__main__":
    main()
