"""Every command `metroline --help` lists: its --help works, every option says what it does,
and a minimal real invocation ends in exit 0 or a one-line error (exit 2), never a traceback.
The heavier invocations (serve, bench serve against servers) have their own tests in
tests/server and tests/bench; this file makes sure no listed command is left out."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from metroline.cli import build_parser

CLI = [sys.executable, "-m", "metroline.cli"]


def _commands(parser=None, prefix=()):
    parser = parser or build_parser()
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((prefix + (name,), sub))
                out += _commands(sub, prefix + (name,))
    return out


COMMANDS = _commands()


def test_the_commands_are_the_documented_ones():
    names = {" ".join(c) for c, _ in COMMANDS}
    assert {"generate", "chat", "serve", "bench", "bench serve", "bench compare",
            "bench roofline", "agent run", "agent show", "agent list", "agent resume"} <= names


@pytest.mark.parametrize("command", [c for c, _ in COMMANDS], ids=" ".join)
def test_help_works_and_every_option_is_described(command):
    proc = subprocess.run(CLI + list(command) + ["--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("usage: metroline " + " ".join(command))
    sub = dict(COMMANDS)[command]
    for action in sub._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS:
            assert action.help, f"metroline {' '.join(command)} {action.option_strings[0]}: no help"
    # A default is shown at most once per option.
    for line in proc.stdout.splitlines():
        assert line.count("(default:") <= 1, line


def test_version():
    from metroline import __version__

    proc = subprocess.run(CLI + ["--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"metroline {__version__}"


def test_chat_minimal_invocation_and_bad_flag():
    proc = subprocess.run(CLI + ["chat", "--max-tokens", "4"], input="Hi\n/exit\n",
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip(), "no reply was printed"
    proc = subprocess.run(CLI + ["chat", "--top-p", "3"], input="", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "top_p" in proc.stderr


def test_agent_run_shows_its_steps_and_agent_show_reads_the_run_back(tmp_path):
    store = str(tmp_path / "runs.sqlite3")
    proc = subprocess.run(CLI + ["agent", "run", "What is 6 * 7?", "--tools", "calculator", "--max-steps", "2",
                                 "--store", store], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "step  1  model  calculator(" in proc.stderr and "-> calculator:" in proc.stderr
    run_id = proc.stderr.split("run ", 1)[1].split()[0]
    shown = subprocess.run(CLI + ["agent", "show", run_id, "--json", "--store", store], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    run = json.loads(shown.stdout)
    assert run["id"] == run_id and run["status"] in ("completed", "stopped")
    assert [e["kind"] for e in run["events"]][:3] == ["model_call", "tool_started", "tool_finished"]
    listed = subprocess.run(CLI + ["agent", "list", "--store", store], capture_output=True, text=True, timeout=60)
    assert listed.stdout.startswith(run_id)
    for args in (["agent", "show", "run_nope", "--store", store], ["agent", "run", "x", "--tools", "rm"]):
        bad = subprocess.run(CLI + args, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_unknown_command_and_option_are_usage_errors():
    for args in (["nope"], ["generate", "hi", "--no-such-flag"]):
        proc = subprocess.run(CLI + args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
