"""`metroline bench compare A.json B.json ...`: runs side by side, with ratios against A."""

from __future__ import annotations

import os

from metroline.bench.noise import input_load_warning, is_loaded, result_load_at_start
from metroline.bench.plots import COMPARE_METRICS, metric, plot_compare
from metroline.bench.serve import load_result


def label_of(result: dict, path: str) -> str:
    return result.get("label") or os.path.splitext(os.path.basename(path))[0]


def _point(run: dict) -> tuple:
    return (run.get("max_concurrency"), run.get("request_rate"))


def align(results: list[dict]) -> tuple[list[tuple], list[dict]]:
    """The (max_concurrency, request_rate) points every result has, and per result a map
    point -> metrics. Results of one run each are compared even when their points differ."""
    maps = [{_point(r): r["metrics"] for r in res["runs"]} for res in results]
    common = set(maps[0])
    for m in maps[1:]:
        common &= set(m)
    if common:
        points = sorted(common, key=lambda p: (p[0] or 1 << 30, p[1] or float("inf")))
        return points, maps
    if all(len(m) == 1 for m in maps):
        only = ("single", None)
        return [only], [{only: next(iter(m.values()))} for m in maps]
    raise ValueError("the results share no (max_concurrency, request_rate) point")


def compare(paths: list[str]) -> dict:
    results = [load_result(p) for p in paths]
    labels = [label_of(r, p) for r, p in zip(results, paths)]
    points, maps = align(results)
    rows = []
    for p in points:
        for key, title, higher_better in COMPARE_METRICS:
            vals = [metric(m.get(p), key) for m in maps]
            base = vals[0]
            rows.append({"point": {"max_concurrency": p[0], "request_rate": p[1]}, "metric": key,
                         "title": title, "higher_is_better": higher_better, "values": vals,
                         "ratios": [v / base if (v is not None and base) else None for v in vals]})
    datasets = {r["dataset"]["name"] for r in results}
    inputs = []
    for r, p, label in zip(results, paths, labels):
        rec = result_load_at_start(r)
        inputs.append({"path": p, "label": label, "load_at_start": rec, "loaded": is_loaded(rec),
                       "warning": input_load_warning(p, r)})
    return {"labels": labels, "paths": paths, "datasets": sorted(datasets), "inputs": inputs,
            "rows": rows, "_points": points, "_maps": maps}


def load_warnings(cmp: dict) -> list[str]:
    """One line per input recorded under load or without a load record."""
    return [i["warning"] for i in cmp["inputs"] if i["warning"]]


def format_table(cmp: dict) -> str:
    labels = cmp["labels"]
    w = max(10, *(len(s) for s in labels))
    rw = max(w + 8, *(len(s) + len(labels[0]) + 3 for s in labels[1:]))
    head = f"{'':22}" + "".join(f"{s:>{w + 2}}" for s in labels) + "".join(
        f"{s + '/' + labels[0]:>{rw}}" for s in labels[1:])
    lines = []
    if len(cmp["datasets"]) > 1:
        lines.append(f"warning: different datasets: {', '.join(cmp['datasets'])}")
    last = None
    for row in cmp["rows"]:
        p = row["point"]
        if p != last:
            lines += ["", f"max_concurrency={p['max_concurrency'] or 'inf'} request_rate={p['request_rate'] or 'inf'}"
                      if p["max_concurrency"] != "single" else "(one run each)", head]
            last = p
        vals = "".join(f"{v:>{w + 2}.2f}" if v is not None else f"{'-':>{w + 2}}" for v in row["values"])
        ratios = "".join(f"{r:>{rw - 1}.2f}x" if r is not None else f"{'-':>{rw}}" for r in row["ratios"][1:])
        arrow = "(higher is better)" if row["higher_is_better"] else "(lower is better)"
        lines.append(f"{row['title']:22}{vals}{ratios}  {arrow}")
    return "\n".join(lines)


def compare_plot(cmp: dict, path: str) -> None:
    notes = []
    for i in cmp["inputs"]:
        rec = i["load_at_start"]
        if rec is None:
            notes.append(f"{i['label']}: no load record")
        else:
            notes.append(f"{i['label']}: load {rec['load_avg'][0]:.2f} on {rec.get('cpu_count') or '?'} cores"
                         + (" (BUSY)" if i["loaded"] else ""))
    plot_compare(cmp["labels"], cmp["_maps"], cmp["_points"], path, notes)


def public(cmp: dict) -> dict:
    return {k: v for k, v in cmp.items() if not k.startswith("_")}
