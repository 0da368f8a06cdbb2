"""PNG figures of bench results: latency CDFs, sweeps, TTFT by turn, comparisons, roofline.

Every figure uses plain tick labels (no scientific notation or offsets), a handful of ticks
per axis, units in the axis labels, CDFs from 0 to 1 and throughputs from 0. Each `plot_*`
writes a PNG; each `*_figure` builds the matplotlib figure (tests inspect it). matplotlib is
imported here only, when a figure is drawn (the [bench] extra): callers catch ImportError.
"""

from __future__ import annotations

import math
import os

DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _plt()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- axes

def fmt_number(v: float, _pos=None) -> str:
    """A tick label: 0, 0.05, 2.5, 40, 1,000, 25,000 (never 1e+04 or 2x10^3)."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else ""
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.3g}" if a < 10 else f"{v:.4g}"
    return f"{v:.2g}" if a >= 0.001 else f"{v:.1e}"


def _plain(axis, nbins: int = 6) -> None:
    """Linear axis: at most `nbins` nicely spaced ticks, plain labels."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(fmt_number))


def _log(ax, values: list[float], which: str = "x") -> bool:
    """Log scale with plain labels when the positive values span more than a decade; else a
    plain linear axis. Ticks at 1-2-5, 1-3 or 1 per decade, by how many decades are shown."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    pos = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not pos or max(pos) / min(pos) <= 10:
        _plain(axis)
        return False
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    decades = math.log10(max(pos) / min(pos))
    subs = (1.0, 2.0, 5.0) if decades <= 1.3 else (1.0, 3.0) if decades <= 2.6 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(fmt_number))
    axis.set_minor_locator(LogLocator(base=10, subs=[s for s in range(2, 10)], numticks=12))
    axis.set_minor_formatter(NullFormatter())
    return True


def _categorical_log_x(ax, xs: list[float], labels: list[str]) -> None:
    """Concurrency-like x: log2 positions, a tick and label at each measured point only."""
    from matplotlib.ticker import NullFormatter, NullLocator

    if len(set(xs)) > 1 and min(xs) > 0:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(xs, labels)


def load_note(result: dict) -> str:
    """'load 0.63 on 2 cores at start' (or '' without a record), for figure titles."""
    from metroline.bench.noise import is_loaded, result_load_at_start

    rec = result_load_at_start(result)
    if not rec or not rec.get("load_avg"):
        return ""
    note = f"load {rec['load_avg'][0]:.2f} on {rec.get('cpu_count') or '?'} cores at start"
    return note + (" (BUSY: figures unreliable)" if is_loaded(rec) else "")


def _title(fig, *parts: str) -> None:
    fig.suptitle("; ".join(p for p in parts if p), fontsize=10)


# ---------------------------------------------------------------------- serve result

def run_name(run: dict) -> str:
    if run.get("request_rate"):
        cap = f", c={run['max_concurrency']}" if run.get("max_concurrency") else ""
        return f"rate {run['request_rate']:g}/s{cap}"
    return f"concurrency {run.get('max_concurrency') or 'inf'}"


def request_values(run: dict, key: str) -> list[float]:
    """Milliseconds of `key` (ttft, tpot, itl, e2e) over the run's successful requests."""
    out: list[float] = []
    for r in run.get("requests", []):
        if not r.get("success"):
            continue
        if key == "itl":
            t = r.get("chunk_times") or []
            out += [(b - a) * 1000 for a, b in zip(t, t[1:])]
        else:
            v = r.get("latency" if key == "e2e" else key)
            if v is not None:
                out.append(v * 1000)
    return out


def _cdf(ax, values: list[float], label: str) -> None:
    """Empirical CDF as a step from 0 (before the smallest value) to 1 (at the largest)."""
    if not values:
        return
    xs = sorted(values)
    n = len(xs)
    ax.step([xs[0]] + xs, [0.0] + [(i + 1) / n for i in range(n)], where="post", label=label)


CDF_KEYS = (("ttft", "TTFT (ms)", "fraction of requests"),
            ("tpot", "TPOT (ms per output token)", "fraction of requests"),
            ("itl", "ITL: gap between chunks (ms)", "fraction of gaps"),
            ("e2e", "end-to-end latency (ms)", "fraction of requests"))


def cdf_figure(result: dict):
    plt = _plt()
    keys = [k for k in CDF_KEYS if any(request_values(run, k[0]) for run in result["runs"])]
    if not keys:
        raise ValueError("no successful requests to plot")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.9), squeeze=False)
    for ax, (key, xlabel, ylabel) in zip(axes[0], keys):
        values = []
        for run in result["runs"]:
            vals = request_values(run, key)
            values += vals
            _cdf(ax, vals, run_name(run))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "0.25", "0.5", "0.75", "1"])
        _log(ax, values, "x")  # log only when the values span more than a decade
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    model = os.path.basename(str(result.get("model", "")))
    _title(fig, f"{result.get('label', '')}: {result['dataset']['name']} against {model}", load_note(result))
    fig.tight_layout()
    return fig


def plot_cdfs(result: dict, path: str) -> None:
    _save(cdf_figure(result), path)


def _sweep_axis(runs: list[dict]) -> tuple[str, list[float], list[str]]:
    """x label, positions and tick labels; an unbounded value sits at twice the largest."""
    key = "request_rate" if len({r.get("request_rate") for r in runs}) > 1 else "max_concurrency"
    vals = [r.get(key) for r in runs]
    finite = [v for v in vals if v]
    top = 2 * max(finite) if finite else 1
    xs = [v if v else top for v in vals]
    labels = [f"{v:g}" if v else "inf" for v in vals]
    return ("request rate (programs/s)" if key == "request_rate" else "max concurrency"), xs, labels


def _nan(v):
    return math.nan if v is None else v


def sweep_figure(result: dict):
    """Output and total throughput (each on its own axes, from 0) and TTFT / TPOT
    percentiles, against the swept concurrency (or rate)."""
    plt = _plt()
    runs = result["runs"]
    xlabel, xs, ticks = _sweep_axis(runs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.2))
    (a_out, a_tot), (a_ttft, a_tpot) = axes
    out_tps = [r["metrics"]["output_throughput"] for r in runs]
    tot_tps = [r["metrics"]["total_token_throughput"] for r in runs]
    a_out.plot(xs, out_tps, "o-", color="C0", label="output tokens/s")
    a_out.set_ylabel("output tokens/s")
    a_out.set_title("output throughput")
    a_tot.plot(xs, tot_tps, "s-", color="C1", label="input + output tokens/s")
    a_tot.set_ylabel("input + output tokens/s")
    a_tot.set_title("total throughput (prompt and output tokens)")
    for ax, ys in ((a_out, out_tps), (a_tot, tot_tps)):
        ax.set_ylim(0, (max(ys) or 1) * 1.12)
        _plain(ax.yaxis)
    for key, ax in (("ttft", a_ttft), ("tpot", a_tpot)):
        vals = []
        for p, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ys = [_nan(r["metrics"][f"{key}_ms"].get(p)) for r in runs]
            vals += ys
            ax.plot(xs, ys, style, label=p)
        ax.set_ylabel(f"{key.upper()} (ms)")
        ax.set_title(f"{key.upper()} percentiles")
        _log(ax, vals, "y")
    for ax in axes.flat:
        ax.set_xlabel(xlabel)
        _categorical_log_x(ax, xs, ticks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    _title(fig, f"{result.get('label', '')}: {result['dataset']['name']}", load_note(result))
    fig.tight_layout()
    return fig


def plot_sweep(result: dict, path: str) -> None:
    _save(sweep_figure(result), path)


def turns_figure(result: dict):
    """Median and p90 TTFT by call index (conversation turn or agent call)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    values = []
    for run in result["runs"]:
        turns = run.get("per_turn") or {}
        ks = sorted(turns, key=int)
        p50 = [_nan(turns[k]["ttft_ms"].get("p50")) for k in ks]
        p90 = [_nan(turns[k]["ttft_ms"].get("p90")) for k in ks]
        values += p50 + p90
        line, = ax.plot([int(k) for k in ks], p50, "o-", label=f"{run_name(run)} p50")
        ax.plot([int(k) for k in ks], p90, "--", color=line.get_color(), alpha=0.6,
                label=f"{run_name(run)} p90")
    ax.set_xlabel("call index within the program (turn)")
    ax.set_ylabel("TTFT (ms)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    _log(ax, values, "y")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{result.get('label', '')}: TTFT by turn, {result['dataset']['name']}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_turns(result: dict, path: str) -> None:
    _save(turns_figure(result), path)


# --------------------------------------------------------------------------- compare

COMPARE_METRICS = (("output_throughput", "output tok/s", True),
                   ("request_throughput", "requests/s", True),
                   ("ttft_ms.p50", "TTFT p50 (ms)", False),
                   ("ttft_ms.p99", "TTFT p99 (ms)", False),
                   ("tpot_ms.p50", "TPOT p50 (ms)", False),
                   ("itl_ms.p50", "ITL p50 (ms)", False),
                   ("e2e_ms.p50", "e2e p50 (ms)", False))


def metric(m: dict, dotted: str):
    for part in dotted.split("."):
        if m is None:
            return None
        m = m.get(part)
    return m


def _points_axis(points: list) -> tuple[str, list[float], list[str]]:
    """x of shared (max_concurrency, request_rate) points: the one that varies."""
    by_rate = len({p[1] for p in points}) > 1 and len({p[0] for p in points}) == 1
    vals = [p[1] if by_rate else p[0] for p in points]
    finite = [v for v in vals if v]
    top = 2 * max(finite) if finite else 1
    xs = [v if v else top for v in vals]
    labels = [f"{v:g}" if v else "inf" for v in vals]
    return ("request rate (programs/s)" if by_rate else "max concurrency"), xs, labels


def compare_figure(labels: list[str], results: list[dict], points: list, notes: list[str] | None = None):
    """One panel per metric: lines against concurrency when several points are shared, else
    bars; ratios against the first result are written on the bars / at the points."""
    plt = _plt()
    shown = COMPARE_METRICS[:1] + COMPARE_METRICS[2:3] + COMPARE_METRICS[4:5] + COMPARE_METRICS[6:7]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.4 * len(shown), 4.1))
    for ax, (key, title, _) in zip(axes, shown):
        if len(points) > 1:
            xlabel, xs, ticks = _points_axis(points)
            top = 0.0
            for label, res in zip(labels, results):
                ys = [_nan(metric(res.get(p), key)) for p in points]
                top = max([top] + [y for y in ys if math.isfinite(y)])
                ax.plot(xs, ys, "o-", label=label)
            base = [metric(results[0].get(p), key) for p in points]
            for res in results[1:]:
                for x, p, b in zip(xs, points, base):
                    v = metric(res.get(p), key)
                    if v and b:
                        ax.annotate(f"{v / b:.2f}x", (x, v), fontsize=7, textcoords="offset points",
                                    xytext=(0, 4), ha="center")
            _categorical_log_x(ax, xs, ticks)
            ax.set_xlabel(xlabel)
            ax.set_ylim(0, top * 1.15 or 1)
            ax.legend(fontsize=8, loc="best")
        else:
            p = points[0]
            vals = [metric(res.get(p), key) or 0 for res in results]
            bars = ax.bar(range(len(labels)), vals, color=[f"C{i}" for i in range(len(labels))])
            ax.set_xticks(range(len(labels)), labels, rotation=15 if len(labels) > 2 else 0, fontsize=8)
            for i, (b, v) in enumerate(zip(bars, vals)):
                txt = (f"{v:,.0f}" if v >= 100 else f"{v:.3g}") + (f"\n{v / vals[0]:.2f}x" if i and vals[0] else "")
                ax.text(b.get_x() + b.get_width() / 2, v, txt, ha="center", va="bottom", fontsize=8)
            ax.set_ylim(0, (max(vals) or 1) * 1.3)
        _plain(ax.yaxis)
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    _title(fig, "ratios are against " + labels[0], *(notes or []))
    fig.tight_layout()
    return fig


def plot_compare(labels: list[str], results: list[dict], points: list, path: str,
                 notes: list[str] | None = None) -> None:
    _save(compare_figure(labels, results, points, notes), path)


# -------------------------------------------------------------------------- roofline

def roofline_figure(out: dict):
    """Two panels from `bench roofline`'s JSON: the classic roofline of the measured machine
    (attainable GFLOP/s against arithmetic intensity: read bandwidth is the slope, fp32
    matmul throughput the roof; each weight format's batch-1 decode is a point on it), and
    decode tokens/s against batch size per weight format, with the results' achieved
    throughputs as markers."""
    from metroline.bench.roofline import throughput_at

    plt = _plt()
    bw = out["machine"]["bandwidth_gb_s"] * 1e9
    flops = out["machine"]["fp32_matmul_gflop_s"] * 1e9
    ceilings = out["ceilings"]
    fig, (a_roof, a_batch) = plt.subplots(1, 2, figsize=(12, 4.8))

    # 1. attainable FLOP/s = min(flops, bandwidth * intensity)
    ridge = flops / bw
    intens = [c["flops_per_token"] / (c["weight_bytes_per_step"] + c["kv_bytes_per_sequence"])
              for c in ceilings]
    lo = min([ridge / 100] + [i / 2 for i in intens])
    hi = max(ridge * 20, *(i * 2 for i in intens)) if intens else ridge * 20
    grid = [lo * (hi / lo) ** (k / 200) for k in range(201)]
    a_roof.plot(grid, [min(flops, bw * i) / 1e9 for i in grid], "k-", lw=2,
                label=f"roof: {bw / 1e9:.1f} GB/s read, {flops / 1e9:.0f} GFLOP/s fp32 matmul")
    a_roof.axvline(ridge, color="grey", ls=":", lw=1, label=f"ridge: {ridge:.1f} FLOP/byte")
    for k, (c, i) in enumerate(zip(ceilings, intens)):
        a_roof.plot([i], [min(flops, bw * i) / 1e9], "o", color=f"C{k}", ms=7,
                    label=f"{c['weight_format']}: batch-1 decode, "
                          f"{c['decode_ceiling_batch1_tok_s']:.1f} tok/s")
    a_roof.set_xlabel("arithmetic intensity (FLOP per byte read)")
    a_roof.set_ylabel("attainable GFLOP/s")
    a_roof.set_title("roofline of this machine (measured)")
    _log(a_roof, grid, "x")
    _log(a_roof, [min(flops, bw * i) / 1e9 for i in grid], "y")
    a_roof.set_ylim(min(bw * lo, flops) / 1e9 / 1.5, flops / 1e9 * 2.5)  # room above the roof
    a_roof.legend(fontsize=7, loc="lower right")

    # 2. decode tokens/s against batch
    achieved: dict = {}
    for row in out.get("results", []):
        tok = row.get("output_tok_s", row.get("tok_s"))
        if tok is not None and row.get("batch"):
            achieved.setdefault((row.get("path"), row.get("what")), (row["batch"], tok))
    takeovers = [c["compute_bound_batch"] for c in ceilings if math.isfinite(c["compute_bound_batch"])]
    top = max([64.0] + [4 * t for t in takeovers] + [2 * b for b, _ in achieved.values()])
    top = min(top, 8192.0)
    batches = [top ** (k / 120) for k in range(121)]
    values = []
    for k, c in enumerate(ceilings):
        ys = [throughput_at(b, c["weight_bytes_per_step"], bw, flops, c["flops_per_token"],
                            c["kv_bytes_per_sequence"]) for b in batches]
        values += ys
        a_batch.plot(batches, ys, "-", color=f"C{k}", label=f"{c['weight_format']} ceiling")
    for n, ((path, what), (b, tok)) in enumerate(achieved.items()):
        values.append(tok)
        a_batch.plot([b], [tok], "X", color="black", ms=8, mfc=f"C{n % 10}",
                     label=f"achieved: {what} ({tok:.1f} tok/s)")
    a_batch.set_xlabel("batch size (sequences decoded per step)")
    a_batch.set_ylabel("decode throughput (tokens/s, all sequences)")
    ctx = ceilings[0]["context"] if ceilings else 0
    a_batch.set_title(f"decode ceilings at context {ctx} tokens")
    _log(a_batch, batches, "x")
    _log(a_batch, values, "y")
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    if finite:  # markers at the edges stay whole
        a_batch.set_ylim(min(finite) / 1.6, max(finite) * 1.6)
    a_batch.legend(fontsize=7, loc="best")
    for ax in (a_roof, a_batch):
        ax.grid(alpha=0.3, which="both")
    model = (out.get("model") or {}).get("name", "")
    load = ((out.get("load") or {}).get("start") or {})
    note = (f"load {load['load_avg'][0]:.2f} on {load.get('cpu_count')} cores at start"
            if load.get("load_avg") else "")
    _title(fig, f"bench roofline: {model}", note)
    fig.tight_layout()
    return fig


def plot_roofline(out: dict, path: str) -> None:
    _save(roofline_figure(out), path)
