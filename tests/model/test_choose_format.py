"""--weights auto by measurement (metroline.quant.choose, `metroline eval formats`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from metroline.kernels import fused
from metroline.quant.choose import FormatChoice, FormatMeasure, pick, record_path, recorded_choice, save_choice


def M(name, ppl, tok_s):
    return FormatMeasure(name, ppl, tok_s, 1000)


def test_pick_is_the_fastest_within_the_bound():
    ms = [M("fp32", 10.0, 10), M("packed", 10.1, 100), M("q8_0", 10.0, 80), M("q4_0", 12.0, 120)]
    assert pick(ms, 10.0, 0.02) == "packed"  # q4_0 is faster but 20% worse
    assert pick(ms, 10.0, 0.25) == "q4_0"
    assert pick(ms, 10.0, 0.0) == "q8_0"  # only exact-or-better formats qualify
    # a tie within the noise (5%) goes to the lower perplexity
    assert pick([M("a", 10.1, 100), M("b", 10.0, 97)], 10.0, 0.05) == "b"
    with pytest.raises(ValueError, match="no measured format"):
        pick([M("q4_0", 12.0, 120)], 10.0, 0.02)
    with pytest.raises(ValueError, match=">= 0"):
        pick(ms, 10.0, -0.1)


def test_record_round_trip_and_a_changed_file_is_measured_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("METROLINE_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    assert recorded_choice(str(model)) is None
    path = save_choice(str(model), FormatChoice("q8_0", 0.02, 10.0, [M("q8_0", 10.1, 50)]))
    got = recorded_choice(str(model))
    assert got.choice == "q8_0" and got.measures[0].decode_tok_s == 50 and got.measured_at
    assert json.load(open(path))["model"] == str(model)
    model.write_bytes(b"y" * 11)  # another file now: its record is not this one
    assert recorded_choice(str(model)) is None
    open(record_path(str(model)), "w").write("{not json")
    assert recorded_choice(str(model)) is None  # unreadable: the static rule applies


@pytest.mark.skipif(not fused.available("rope_kv_write"), reason="C++ kernels not built")
def test_eval_formats_records_what_auto_then_loads(tmp_path):
    env = dict(os.environ, METROLINE_CACHE_DIR=str(tmp_path / "cache"))
    cli = [sys.executable, "-m", "metroline.cli"]
    proc = subprocess.run(cli + ["eval", "formats", "--formats", "q8_0", "--num-seqs", "1", "--tokens", "48",
                                 "--max-ppl-increase", "1000", "--output", str(tmp_path / "f.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    rec = json.load(open(tmp_path / "f.json"))
    assert {m["weights"] for m in rec["measures"]} == {"fp32", "q8_0"}
    assert all(m["perplexity"] > 1 and m["decode_tok_s"] > 0 for m in rec["measures"])
    # With a 1000% bound the fp32 reference and q8_0 both qualify: q8_0 reads 4x fewer bytes.
    assert rec["choice"] == "q8_0" and "--weights auto" in proc.stdout
    gen = subprocess.run(cli + ["generate", "Hi", "--max-tokens", "2"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert gen.returncode == 0, gen.stderr
    assert "auto: q8_0, the fastest within" in gen.stderr
    bad = subprocess.run(cli + ["eval", "formats", "--formats", "q9_9"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2 and "unknown format 'q9_9'" in bad.stderr and "Traceback" not in bad.stderr
