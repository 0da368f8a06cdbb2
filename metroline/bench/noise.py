"""How busy the machine was: the load record every bench result carries, and the warning.

A benchmark on a machine whose 1-minute load average is above its core count shares the cores
with something else: its figures are unreliable (the project's 2-core machine has drifted 2x
in a day). Each result records `{"time", "load_avg": [1, 5, 15 min], "cpu_count"}` at the start
(and at the end of a long run), and each command warns on one line when the start was loaded.
"""

from __future__ import annotations

import os
import sys
import time


def load_record() -> dict:
    """Now: {'time', 'load_avg': [1, 5, 15 min] (None where the OS has none), 'cpu_count'}."""
    try:
        avg = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # no load average on this OS
        avg = None
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg": avg, "cpu_count": os.cpu_count()}


def is_loaded(rec: dict | None) -> bool | None:
    """True when the 1-minute load average was above the core count; None when unknown."""
    if not rec or not rec.get("load_avg") or not rec.get("cpu_count"):
        return None
    return rec["load_avg"][0] > rec["cpu_count"]


def load_warning(rec: dict | None) -> str | None:
    """The one-line warning for a loaded record, else None."""
    if not is_loaded(rec):
        return None
    return (f"warning: load average {rec['load_avg'][0]:.2f} on {rec['cpu_count']} cores: "
            "figures are unreliable; compare only side by side")


def warn_if_loaded(rec: dict | None, file=None) -> bool:
    """Print the warning (stderr) when `rec` was loaded; returns whether it was."""
    text = load_warning(rec)
    if text:
        print(text, file=file or sys.stderr)
    return text is not None


def result_load_at_start(result: dict) -> dict | None:
    """The load record at the start of a `bench serve` result: `load.start`, or, in results
    written before it existed, `machine.load_avg_at_start` with `machine.cores`."""
    rec = (result.get("load") or {}).get("start")
    if rec and rec.get("load_avg"):
        return rec
    m = result.get("machine") or {}
    if m.get("load_avg_at_start"):
        return {"time": result.get("date"), "load_avg": m["load_avg_at_start"], "cpu_count": m.get("cores")}
    return None


def input_load_warning(path: str, result: dict) -> str | None:
    """One line when a result to compare was recorded under load or has no load record."""
    rec = result_load_at_start(result)
    if rec is None or not rec.get("cpu_count"):
        return (f"warning: {path} has no load record: cannot tell whether it was measured on a "
                "busy machine; compare only side by side")
    if is_loaded(rec):
        return (f"warning: {path} was recorded under load (load average {rec['load_avg'][0]:.2f} on "
                f"{rec['cpu_count']} cores): figures are unreliable; compare only side by side")
    return None
