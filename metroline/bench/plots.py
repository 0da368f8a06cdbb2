"""PNG figures of `bench serve` results: latency CDFs, sweeps, TTFT by turn, comparisons."""

from __future__ import annotations

import math
import os


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def _maybe_log(ax, values: list[float], axis: str = "x") -> None:
    """Log scale only when the values span more than a decade."""
    pos = [v for v in values if v and v > 0 and not math.isnan(v)]
    if pos and max(pos) / min(pos) > 10:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _concurrency_ticks(ax, xs: list[float], labels: list[str] | None = None) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, labels or [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label)


def plot_cdfs(result: dict, path: str) -> None:
    plt = _plt()
    keys = [k for k in ("ttft", "tpot", "itl", "e2e")
            if any(request_values(run, k) for run in result["runs"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run in result["runs"]:
            _cdf(ax, request_values(run, key), run_name(run))
        ax.set_xlabel(f"{key.upper()} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
        if key in ("ttft", "e2e"):
            _maybe_log(ax, [v for run in result["runs"] for v in request_values(run, key)])
    axes[0][0].legend(fontsize=8)
    model = os.path.basename(str(result.get("model", "")))
    fig.suptitle(f"{result.get('label', '')}: {result['dataset']['name']} against {model}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweep_axis(runs: list[dict]) -> tuple[str, list[float], list[str]]:
    """x label, positions and tick labels; an unbounded value sits at twice the largest."""
    key = "request_rate" if len({r.get("request_rate") for r in runs}) > 1 else "max_concurrency"
    vals = [r.get(key) for r in runs]
    finite = [v for v in vals if v]
    top = 2 * max(finite) if finite else 1
    xs = [v if v else top for v in vals]
    labels = [f"{v:g}" if v else "inf" for v in vals]
    return ("request rate (programs/s)" if key == "request_rate" else "max concurrency"), xs, labels


def plot_sweep(result: dict, path: str) -> None:
    """Throughput and latency against the swept concurrency (or rate)."""
    plt = _plt()
    runs = result["runs"]
    xlabel, xs, ticks = _sweep_axis(runs)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8))
    a1.plot(xs, [r["metrics"]["output_throughput"] for r in runs], "o-", label="output tok/s")
    a1.plot(xs, [r["metrics"]["total_token_throughput"] for r in runs], "s--", label="input+output tok/s")
    a1.set_title("throughput")
    for key, ax in (("ttft", a2), ("tpot", a3)):
        for p, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [r["metrics"][f"{key}_ms"][p] or math.nan for r in runs], style, label=p)
        ax.set_title(f"{key.upper()} (ms)")
    for ax in (a1, a2, a3):
        ax.set_xlabel(xlabel)
        _concurrency_ticks(ax, xs, ticks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.get('label', '')}: {result['dataset']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_turns(result: dict, path: str) -> None:
    """Median and p90 TTFT by call index (conversation turn or agent call)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run in result["runs"]:
        turns = run.get("per_turn") or {}
        ks = sorted(turns, key=int)
        line, = ax.plot([int(k) for k in ks], [turns[k]["ttft_ms"]["p50"] for k in ks], "o-",
                        label=f"{run_name(run)} p50")
        ax.plot([int(k) for k in ks], [turns[k]["ttft_ms"]["p90"] for k in ks], "--",
                color=line.get_color(), alpha=0.6, label=f"{run_name(run)} p90")
    ax.set_xlabel("call index within the program (turn)")
    ax.set_ylabel("TTFT (ms)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _maybe_log(ax, [t["ttft_ms"][p] for run in result["runs"] for t in (run.get("per_turn") or {}).values()
                    for p in ("p50", "p90")], "y")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{result.get('label', '')}: TTFT by turn, {result['dataset']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def plot_compare(labels: list[str], results: list[dict], points: list, path: str) -> None:
    """One panel per metric: lines against concurrency when several points are shared, else
    bars; ratios against the first result are written on the bars / at the points."""
    plt = _plt()
    shown = COMPARE_METRICS[:1] + COMPARE_METRICS[2:3] + COMPARE_METRICS[4:5] + COMPARE_METRICS[6:7]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.9))
    for ax, (key, title, _) in zip(axes, shown):
        if len(points) > 1:
            finite = [p[0] for p in points if p[0]]
            xs = [p[0] or 2 * max(finite or [1]) for p in points]
            for label, res in zip(labels, results):
                ys = [metric(res.get(p), key) for p in points]
                ax.plot(xs, [math.nan if y is None else y for y in ys], "o-", label=label)
            base = [metric(results[0].get(p), key) for p in points]
            for res in results[1:]:
                for x, p, b in zip(xs, points, base):
                    v = metric(res.get(p), key)
                    if v and b:
                        ax.annotate(f"{v / b:.2f}x", (x, v), fontsize=7, textcoords="offset points",
                                    xytext=(0, 4), ha="center")
            _concurrency_ticks(ax, xs)
            ax.set_xlabel("max concurrency")
        else:
            p = points[0]
            vals = [metric(res.get(p), key) or 0 for res in results]
            bars = ax.bar(range(len(labels)), vals, color=[f"C{i}" for i in range(len(labels))])
            ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
            for i, (b, v) in enumerate(zip(bars, vals)):
                txt = f"{v:.1f}" + (f"\n{v / vals[0]:.2f}x" if i and vals[0] else "")
                ax.text(b.get_x() + b.get_width() / 2, v, txt, ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if len(points) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle("ratios are against " + labels[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
