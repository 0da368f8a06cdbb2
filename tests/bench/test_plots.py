"""The figures: valid PNGs, CDFs from 0 to 1, plain and non-overlapping tick labels, a few
ticks per axis, throughputs on their own axes from 0, legends."""

from __future__ import annotations

import re
import struct

import pytest

pytest.importorskip("matplotlib")

from metroline.bench import plots  # noqa: E402
from tests.bench.fake_results import fake_result  # noqa: E402

PLAIN = re.compile(r"^(0|\d{1,3}(,\d{3})*|\d+\.\d+|inf)$")  # 0, 300, 25,000, 0.25, inf


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails unless the file is a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    assert w > 200 and h > 200
    return w, h


def visible_labels(ax, which: str):
    fig = ax.figure
    fig.canvas.draw()
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for tick in axis.get_major_ticks():
        label = tick.label1
        if label.get_visible() and label.get_text() and lo - 1e-9 * abs(lo) <= tick.get_loc() <= hi * (1 + 1e-9):
            out.append(label)
    return out


def check_axis(ax, which: str, categorical: bool = False) -> None:
    labels = visible_labels(ax, which)
    texts = [t.get_text() for t in labels]
    assert 2 <= len(labels) <= 10, (which, texts)
    if not categorical:
        for t in texts:
            assert PLAIN.match(t), f"{which} tick label {t!r} is not a plain number"
    axis = ax.xaxis if which == "x" else ax.yaxis
    assert axis.get_offset_text().get_text() == "", "offset / scientific notation on the axis"
    r = ax.figure.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), f"{which} tick labels overlap: {texts}"
    minor = [t.label1.get_text() for t in axis.get_minor_ticks() if t.label1.get_visible()]
    assert not any(minor), minor


def check_figure(fig, categorical_x=(), bars: bool = False):
    for k, ax in enumerate(fig.axes):
        check_axis(ax, "x", categorical=k in categorical_x)
        check_axis(ax, "y")
        assert ax.get_ylabel(), "y axis label (with units) is missing"
        assert bars or ax.get_xlabel(), "x axis label (with units) is missing"


def test_fmt_number():
    assert [plots.fmt_number(v) for v in (0, 0.25, 2.5, 40, 300, 1000, 25000, 1e6)] == \
        ["0", "0.25", "2.5", "40", "300", "1,000", "25,000", "1,000,000"]


@pytest.mark.parametrize("concurrencies", [(1, 4, 16), (1, 2, 4, 8, 16, 32, 64, None), (8,)])
def test_cdf_plot(tmp_path, concurrencies):
    res = fake_result(concurrencies=concurrencies)
    fig = plots.cdf_figure(res)
    assert [ax.get_xlabel().split(" ")[0] for ax in fig.axes] == ["TTFT", "TPOT", "ITL:", "end-to-end"]
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo == 0 and 1 <= hi <= 1.05
        for line in ax.get_lines():
            ys = list(line.get_ydata())
            assert ys[0] == 0 and ys[-1] == pytest.approx(1)
            assert ys == sorted(ys)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == \
        [plots.run_name(r) for r in res["runs"]]
    check_figure(fig)
    assert "load 0.63 on 2 cores" in fig._suptitle.get_text()
    path = tmp_path / "cdf.png"
    fig.savefig(path, dpi=plots.DPI)
    png_size(path)
    plots.plot_cdfs(res, str(tmp_path / "again.png"))
    png_size(tmp_path / "again.png")


@pytest.mark.parametrize("concurrencies", [(1, 4, 16), (1, 2, 4, 8, 16, 32, 64, None)])
def test_sweep_plot_has_throughputs_on_separate_axes(tmp_path, concurrencies):
    res = fake_result(concurrencies=concurrencies)
    fig = plots.sweep_figure(res)
    by_label = {ax.get_ylabel(): ax for ax in fig.axes}
    out, tot = by_label["output tokens/s"], by_label["input + output tokens/s"]
    assert out is not tot
    for ax, key in ((out, "output_throughput"), (tot, "total_token_throughput")):
        (line,) = ax.get_lines()
        assert list(line.get_ydata()) == [r["metrics"][key] for r in res["runs"]]
        assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= max(line.get_ydata())
    for ax in fig.axes:
        assert ax.get_legend() is not None and ax.get_legend().get_texts()
        ticks = [t.get_text() for t in visible_labels(ax, "x")]
        assert ticks == [f"{c}" if c else "inf" for c in concurrencies]
    check_figure(fig, categorical_x=range(4))
    plots.plot_sweep(res, str(tmp_path / "sweep.png"))
    png_size(tmp_path / "sweep.png")


def test_turns_plot(tmp_path):
    res = fake_result(concurrencies=(2,), turns=6, dataset="multiturn")
    fig = plots.turns_figure(res)
    check_figure(fig)
    assert fig.axes[0].get_legend() is not None
    plots.plot_turns(res, str(tmp_path / "turns.png"))
    png_size(tmp_path / "turns.png")


def test_compare_plots(tmp_path):
    from metroline.bench.compare import compare, compare_plot
    from metroline.bench.serve import write_result

    paths = []
    for label, itl, concurrencies in (("A", 0.09, (1, 4, 16)), ("B", 0.02, (1, 4, 16)),
                                      ("C", 0.05, (4,)), ("D", 0.03, (4,))):
        paths.append(str(tmp_path / f"{label}.json"))
        write_result(paths[-1], fake_result(label, concurrencies, itl_s=itl))
    lines = compare(paths[:2])
    fig = plots.compare_figure(lines["labels"], lines["_maps"], lines["_points"])
    check_figure(fig, categorical_x=range(4))
    assert all(ax.get_ylim()[0] == 0 for ax in fig.axes)
    assert fig.axes[0].get_legend() is not None
    bars = compare(paths[2:])
    fig = plots.compare_figure(bars["labels"], bars["_maps"], bars["_points"])
    check_figure(fig, categorical_x=range(4), bars=True)
    assert [t.get_text() for t in visible_labels(fig.axes[0], "x")] == ["C", "D"]
    for cmp, name in ((lines, "lines.png"), (bars, "bars.png")):
        compare_plot(cmp, str(tmp_path / name))
        png_size(tmp_path / name)


def roofline_out():
    from metroline.bench import roofline as rl

    shape = rl.ModelShape("toy", num_layers=30, hidden_size=576, intermediate_size=1536, q_size=576,
                          kv_size=192, vocab_size=49152)
    bw, flops = 20.9e9, 65e9
    out = {"machine": {"bandwidth_gb_s": bw / 1e9, "fp32_matmul_gflop_s": flops / 1e9},
           "load": {"start": {"time": "t", "load_avg": [0.5, 0.5, 0.5], "cpu_count": 2}},
           "model": rl.shape_json(shape), "results": [],
           "ceilings": [rl.decode_ceilings(shape, f, bw, flops, 100) for f in ("fp32", "bf16", "q4_1")]}
    res = fake_result(concurrencies=(1, 4, 16))
    for fmt in ("fp32", "bf16"):
        for row in rl.achieved(res, shape, fmt, bw, flops, 100):
            out["results"].append({"path": "x.json", "weight_format": fmt, **row})
    return out


def test_roofline_plot(tmp_path):
    out = roofline_out()
    fig = plots.roofline_figure(out)
    roof, batch = fig.axes
    assert "GB/s" in roof.get_legend().get_texts()[0].get_text()
    names = [t.get_text() for t in batch.get_legend().get_texts()]
    assert names[:3] == ["fp32 ceiling", "bf16 ceiling", "q4_1 ceiling"]
    assert sum(n.startswith("achieved") for n in names) == 3  # once per run, not per format
    check_figure(fig)
    plots.plot_roofline(out, str(tmp_path / "roof.png"))
    png_size(tmp_path / "roof.png")
