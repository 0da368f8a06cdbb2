"""A crash mid-run (the process killed with SIGKILL), then a restart that resumes the run from
its last recorded step: no completed tool call runs twice, a non-idempotent call cut off by the
crash is reported as of unknown outcome and not retried, an idempotent one runs again."""

import os
import signal
import subprocess
import sys

import pytest

from metroline.agents import SQLiteRunStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(store, effects, mode, crash="-"):
    return subprocess.run([sys.executable, "-m", "tests.agents.crash_worker", str(store), str(effects), mode, crash],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("crash, expected_lines, unknown, retried", [
    # killed inside the non-idempotent call "b", after its side effect: b is never run again
    ("in:b", ["a", "flag x", "b", "c"], ["call-2"], []),
    # killed between steps (a model call in flight): nothing is repeated
    ("model:2", ["a", "flag x", "b", "c"], [], []),
    # killed inside the idempotent set_flag: it runs again (twice is the same as once)
    ("in:flag x", ["a", "flag x", "flag x", "b", "c"], [], ["call-1"]),
])
def test_a_killed_run_resumes_without_duplicated_side_effects(tmp_path, crash, expected_lines, unknown, retried):
    store_path, effects = tmp_path / "runs.sqlite3", tmp_path / "effects.txt"
    first = _worker(store_path, effects, "start", crash)
    assert first.returncode == -signal.SIGKILL, (first.returncode, first.stderr[-2000:])
    store = SQLiteRunStore(str(store_path))
    assert store.get_run("run-crash").status == "running"  # as the crash left it
    store.close()

    second = _worker(store_path, effects, "resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.split()[:2] == ["completed", "done"]
    assert effects.read_text().splitlines() == expected_lines

    store = SQLiteRunStore(str(store_path))
    rec, events = store.get_run("run-crash"), store.events("run-crash")
    assert rec.status == "completed" and rec.result == "done"
    kinds = [e.kind for e in events]
    assert kinds.count("resumed") == 1
    assert [e.data["call_id"] for e in events if e.kind == "tool_unknown"] == unknown
    assert [e.data["call_id"] for e in events if e.kind == "tool_started" and e.data["retry"]] == retried
    # Every planned call ended exactly once in the trace, and the usage counts each call once.
    ends = [e.data["call_id"] for e in events if e.kind in ("tool_finished", "tool_unknown")]
    assert ends == ["call-0", "call-1", "call-2", "call-3"]
    assert rec.usage["tool_calls"] == 4
    store.close()
