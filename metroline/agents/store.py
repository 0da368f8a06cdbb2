"""Where agent runs live: every run and every step of it, written as it happens.

A run is a record (task, model, tools, budgets, status, result, which guard ended it, usage)
plus an append-only list of events, one per thing that happened: a model call and what it
answered, a tool call's start and its end, a guard's trip, the final answer. The runtime
rebuilds a run's conversation and counters from its events alone, so a run read back after a
restart continues from its last recorded step.

A tool call is recorded twice, before it runs (`tool_started`) and after (`tool_finished`):
a start without an end means the process died while the tool ran, and the runtime decides
from the tool's `idempotent` flag whether to run it again or report its outcome unknown.

`RunStore` is the interface (small, so a Postgres store can follow); `SQLiteRunStore` is the
default: one file, WAL mode (readers never block the writer), each event its own committed
transaction with synchronous=FULL, so a killed process loses nothing it recorded.

The same store keeps the Responses API's responses, so `previous_response_id` survives a
restart too.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunRecord", "RunEvent", "RunStore", "SQLiteRunStore", "MemoryRunStore", "RUN_STATUSES",
           "FINISHED_STATUSES", "new_run_id", "default_store_path"]

# queued -> running -> completed (the model answered) | stopped (a guard ended it; the result
# is the final answer it was then asked for) | failed (an error) | cancelled.
RUN_STATUSES = ("queued", "running", "completed", "stopped", "failed", "cancelled")
FINISHED_STATUSES = frozenset({"completed", "stopped", "failed", "cancelled"})


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex[:24]}"


def default_store_path() -> str:
    """$METROLINE_DATA_DIR/agents.sqlite3 (default ~/.local/share/metroline)."""
    base = os.environ.get("METROLINE_DATA_DIR") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "metroline")
    return os.path.join(base, "agents.sqlite3")


@dataclass
class RunRecord:
    id: str
    task: str
    model: str = ""
    tools: list[str] = field(default_factory=list)
    budgets: dict = field(default_factory=dict)
    status: str = "queued"
    result: str | None = None
    ended_by: str | None = None  # the guard that ended the run ("max_steps", "deadline", ...)
    reason: str | None = None  # why, in words; or the error of a failed run
    usage: dict = field(default_factory=dict)  # input/output tokens, cost, model/tool calls
    metadata: dict = field(default_factory=dict)  # system prompt, tenant, caller's tags
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, events: "list[RunEvent] | None" = None) -> dict:
        """The run as its users see it, the same over HTTP and from `metroline agent show
        --json`: the record with `object: agent.run`, without the bookkeeping metadata (tenant,
        system prompt), and its trace when `events` are given."""
        out = {"id": self.id, "object": "agent.run", **{k: v for k, v in asdict(self).items() if k != "id"}}
        out["metadata"] = {k: v for k, v in self.metadata.items() if k not in PRIVATE_METADATA}
        if events is not None:
            out["events"] = [e.to_dict() for e in events]
        return out


# Metadata the runtime keeps for itself (who owns the run, its system prompt), not shown.
PRIVATE_METADATA = frozenset({"tenant", "system"})


@dataclass
class RunEvent:
    run_id: str
    seq: int  # 1, 2, ... within the run
    kind: str  # model_call | tool_started | tool_finished | tool_unknown | guard | final | ...
    data: dict
    ts: float

    def to_dict(self) -> dict:
        return {**self.data, "seq": self.seq, "kind": self.kind, "ts": self.ts}


_RUN_FIELDS = ("task", "model", "tools", "budgets", "status", "result", "ended_by", "reason", "usage",
               "metadata", "created_at", "updated_at")
_JSON_FIELDS = frozenset({"tools", "budgets", "usage", "metadata"})


class RunStore(ABC):
    """What the agent runtime and the HTTP routes need from a store. Thread-safe."""

    @abstractmethod
    def create_run(self, run: RunRecord) -> RunRecord: ...

    @abstractmethod
    def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    def update_run(self, run_id: str, **fields: Any) -> None: ...

    @abstractmethod
    def append_event(self, run_id: str, kind: str, data: dict) -> RunEvent: ...

    @abstractmethod
    def events(self, run_id: str, after: int = 0) -> list[RunEvent]: ...

    @abstractmethod
    def list_runs(self, status: str | None = None, limit: int = 100) -> list[RunRecord]: ...

    def unfinished_runs(self) -> list[RunRecord]:
        """Runs a restart should resume (queued or running when the process stopped)."""
        return [r for s in ("running", "queued") for r in self.list_runs(status=s, limit=10_000)]

    @abstractmethod
    def save_response(self, response_id: str, previous_id: str | None, data: dict) -> None: ...

    @abstractmethod
    def get_response(self, response_id: str) -> dict | None: ...

    def delete_response(self, response_id: str) -> bool:
        """Forget a stored response; False if there was none."""
        raise NotImplementedError

    def response_chain(self, response_id: str, max_depth: int = 1000) -> list[dict]:
        """The responses from the first of a previous_response_id chain to this one; [] if
        the id is unknown."""
        chain, rid = [], response_id
        while rid is not None and len(chain) < max_depth:
            r = self.get_response(rid)
            if r is None:
                if rid == response_id:
                    return []
                break
            chain.append(r)
            rid = r.get("previous_response_id")
        return chain[::-1]

    def close(self) -> None:
        pass


def _check_fields(fields: dict) -> None:
    bad = set(fields) - set(_RUN_FIELDS)
    if bad:
        raise ValueError(f"unknown run fields: {sorted(bad)}")
    if "status" in fields and fields["status"] not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}")


class SQLiteRunStore(RunStore):
    def __init__(self, path: str | None = None):
        self.path = path or default_store_path()
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS runs (
                id TEXT PRIMARY KEY, task TEXT NOT NULL, model TEXT, tools TEXT, budgets TEXT,
                status TEXT NOT NULL, result TEXT, ended_by TEXT, reason TEXT, usage TEXT,
                metadata TEXT, created_at REAL, updated_at REAL);
            CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created_at);
            CREATE TABLE IF NOT EXISTS events (
                run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
                ts REAL NOT NULL, PRIMARY KEY (run_id, seq));
            CREATE TABLE IF NOT EXISTS responses (
                id TEXT PRIMARY KEY, previous_id TEXT, data TEXT NOT NULL, created_at REAL);
        """)

    def _row(self, row) -> RunRecord:
        values = dict(zip(("id", *_RUN_FIELDS), row))
        for k in _JSON_FIELDS:
            values[k] = json.loads(values[k]) if values[k] else ({} if k != "tools" else [])
        return RunRecord(**values)

    def create_run(self, run: RunRecord) -> RunRecord:
        _check_fields({k: getattr(run, k) for k in _RUN_FIELDS})
        values = [getattr(run, k) for k in _RUN_FIELDS]
        values = [json.dumps(v) if k in _JSON_FIELDS else v for k, v in zip(_RUN_FIELDS, values)]
        with self._lock:
            try:
                self._db.execute(f"INSERT INTO runs (id, {', '.join(_RUN_FIELDS)}) VALUES "
                                 f"({', '.join('?' * (len(_RUN_FIELDS) + 1))})", [run.id, *values])
            except sqlite3.IntegrityError:
                raise ValueError(f"a run with id {run.id!r} already exists") from None
        return run

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT id, {', '.join(_RUN_FIELDS)} FROM runs WHERE id = ?",
                                   (run_id,)).fetchone()
        return self._row(row) if row else None

    def update_run(self, run_id: str, **fields: Any) -> None:
        fields.setdefault("updated_at", time.time())
        _check_fields(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(v) if k in _JSON_FIELDS else v for k, v in fields.items()]
        with self._lock:
            cur = self._db.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*values, run_id])
        if cur.rowcount == 0:
            raise KeyError(run_id)

    def append_event(self, run_id: str, kind: str, data: dict) -> RunEvent:
        ts = time.time()
        text = json.dumps(data, ensure_ascii=False)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (last,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ?",
                                           (run_id,)).fetchone()
                self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                                 (run_id, last + 1, kind, text, ts))
                self._db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (ts, run_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return RunEvent(run_id, last + 1, kind, data, ts)

    def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        with self._lock:
            rows = self._db.execute("SELECT seq, kind, data, ts FROM events WHERE run_id = ? AND seq > ? "
                                    "ORDER BY seq", (run_id, after)).fetchall()
        return [RunEvent(run_id, s, k, json.loads(d), t) for s, k, d, t in rows]

    def list_runs(self, status: str | None = None, limit: int = 100) -> list[RunRecord]:
        q = f"SELECT id, {', '.join(_RUN_FIELDS)} FROM runs"
        args: list = []
        if status is not None:
            q += " WHERE status = ?"
            args.append(status)
        q += " ORDER BY created_at DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(q, [*args, limit]).fetchall()
        return [self._row(r) for r in rows]

    def save_response(self, response_id: str, previous_id: str | None, data: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                             (response_id, previous_id, json.dumps(data, ensure_ascii=False), time.time()))

    def get_response(self, response_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM responses WHERE id = ?", (response_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def delete_response(self, response_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryRunStore(SQLiteRunStore):
    """The same store in memory: for tests and one-off runs that need no history."""

    def __init__(self):
        super().__init__(":memory:")
