"""Load records in every result, and the one-line warnings on a busy machine."""

from __future__ import annotations

import json
import os
import re

import pytest

from metroline.bench import noise
from metroline.cli import main
from tests.bench.fake_results import fake_result

WARNING = re.compile(r"^warning: load average (\d+\.\d\d) on (\d+) cores: figures are unreliable; "
                     r"compare only side by side$")


def busy(monkeypatch, load=(9.5, 4.0, 2.0), cores=2):
    monkeypatch.setattr(os, "getloadavg", lambda: load)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)


def test_load_record_and_warning(monkeypatch):
    rec = noise.load_record()
    assert set(rec) == {"time", "load_avg", "cpu_count"}
    assert len(rec["load_avg"]) == 3 and rec["cpu_count"] == os.cpu_count()
    busy(monkeypatch, (2.5, 1.0, 1.0), 2)
    rec = noise.load_record()
    assert rec["load_avg"] == [2.5, 1.0, 1.0] and noise.is_loaded(rec)
    assert WARNING.match(noise.load_warning(rec)).groups() == ("2.50", "2")
    busy(monkeypatch, (1.99, 5.0, 5.0), 2)  # the 1-minute figure decides
    assert noise.is_loaded(noise.load_record()) is False and noise.load_warning(noise.load_record()) is None
    assert noise.is_loaded({"load_avg": None, "cpu_count": 2}) is None

    def no_load():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert noise.load_record()["load_avg"] is None


def test_old_results_still_have_a_load_record():
    old = {"date": "d", "machine": {"cores": 2, "load_avg_at_start": [3.0, 1.0, 1.0]}}
    assert noise.result_load_at_start(old) == {"time": "d", "load_avg": [3.0, 1.0, 1.0], "cpu_count": 2}
    assert "recorded under load (load average 3.00 on 2 cores)" in noise.input_load_warning("x.json", old)
    assert "has no load record" in noise.input_load_warning("y.json", {"machine": {}})
    assert noise.input_load_warning("z.json", fake_result(load1=0.5)) is None


def test_serve_records_load_and_warns_when_busy(monkeypatch, tmp_path, capsys):
    from tests.bench.fake_server import FakeServer

    s = FakeServer(ttft=0.01, itl=0.002)
    out = tmp_path / "r.json"
    try:
        busy(monkeypatch)
        rc = main(["bench", "serve", "--base-url", s.url, "--dataset", "random", "--num-prompts", "2",
                   "--random-input-len", "4", "--random-output-len", "3", "--disable-tqdm",
                   "--no-plots", "--output", str(out)])
    finally:
        s.stop()
    assert rc == 0
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if ln.startswith("warning")] == [
        "warning: load average 9.50 on 2 cores: figures are unreliable; compare only side by side"]
    res = json.loads(out.read_text())
    for when in ("start", "end"):
        assert res["load"][when]["load_avg"] == [9.5, 4.0, 2.0] and res["load"][when]["cpu_count"] == 2
    assert res["machine"]["load_avg_at_start"] == [9.5, 4.0, 2.0]
    assert res["runs"][0]["load_avg"]["start"] == [9.5, 4.0, 2.0]


def test_serve_is_quiet_on_a_quiet_machine(monkeypatch, tmp_path, capsys):
    from tests.bench.fake_server import FakeServer

    s = FakeServer(ttft=0.01, itl=0.002)
    try:
        busy(monkeypatch, (0.3, 0.2, 0.1), 2)
        assert main(["bench", "serve", "--base-url", s.url, "--dataset", "random", "--num-prompts", "1",
                     "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm",
                     "--no-plots", "--output", str(tmp_path / "q.json")]) == 0
    finally:
        s.stop()
    assert "warning" not in capsys.readouterr().err


def test_compare_warns_about_loaded_or_unrecorded_inputs(tmp_path, capsys):
    from metroline.bench.serve import write_result

    paths = {}
    for label, load1 in (("quiet", 0.4), ("busy", 3.2), ("old", None)):
        paths[label] = str(tmp_path / f"{label}.json")
        write_result(paths[label], fake_result(label, load1=load1))
    table = tmp_path / "cmp.json"
    assert main(["bench", "compare", paths["quiet"], paths["busy"], paths["old"], "--no-plots",
                 "--json", str(table)]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert warnings == [
        f"warning: {paths['busy']} was recorded under load (load average 3.20 on 2 cores): figures "
        "are unreliable; compare only side by side",
        f"warning: {paths['old']} has no load record: cannot tell whether it was measured on a busy "
        "machine; compare only side by side"]
    cmp = json.loads(table.read_text())
    assert [i["loaded"] for i in cmp["inputs"]] == [False, True, None]
    assert cmp["inputs"][0]["load_at_start"]["load_avg"][0] == 0.4
    assert len(cmp["load"]["start"]["load_avg"]) == 3 and cmp["load"]["start"]["cpu_count"] == os.cpu_count()

    assert main(["bench", "compare", paths["quiet"], paths["quiet"], "--no-plots"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_roofline_records_load_warns_and_plots(monkeypatch, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from metroline.bench import roofline as rl
    from metroline.bench.serve import write_result
    from tests.bench.test_plots import png_size

    monkeypatch.setattr(rl, "measure", lambda device: (20e9, 60e9, {"cpu": "fake"}))
    busy(monkeypatch, (3.0, 2.0, 1.0), 2)
    res = str(tmp_path / "a.json")
    write_result(res, fake_result("A"))
    out = tmp_path / "roof.json"
    assert main(["bench", "roofline", "--weight-format", "fp32,q4_1", "--result", res,
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if ln.startswith("warning")] == [
        "warning: load average 3.00 on 2 cores: figures are unreliable; compare only side by side"]
    roof = json.loads(out.read_text())
    assert roof["load"]["start"]["load_avg"] == [3.0, 2.0, 1.0] and roof["load"]["end"]["cpu_count"] == 2
    assert roof["machine"]["bandwidth_gb_s"] == 20
    png_size(tmp_path / "roof.png")
    assert f"wrote {tmp_path / 'roof.png'}" in err

    # figures given, nothing measured: recorded, but no warning about the measurement
    out2 = tmp_path / "given.json"
    assert main(["bench", "roofline", "--bandwidth-gbs", "20", "--flops-gflops", "60",
                 "--weight-format", "fp32", "--output", str(out2), "--no-plots"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads(out2.read_text())["load"]["start"]["load_avg"] == [3.0, 2.0, 1.0]
    assert not (tmp_path / "given.png").exists()
