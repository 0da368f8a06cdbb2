"""A bounded soak of an OpenAI-compatible metroline server (issue 16): a loopback load of mixed
requests for a set time, checked one by one, with the server's memory and KV usage sampled
every second.

The mix (weights in MIX, seeded): streamed completions, chat, streams the client aborts after
a few chunks, structured outputs (a JSON schema, parsed and checked), agent runs (polled to
their end), and bad requests of several kinds, each of which must get its 4xx. Every good
request must complete (finish_reason stop/length, a parseable body); a request without an
answer within `request_timeout_s` is a hang. At the end the server must drain back to zero KV
blocks in use.

    report = asyncio.run(soak("http://127.0.0.1:8000", duration_s=60, pid=server_pid))

`metroline bench soak --url ... --duration 60 [--pid PID]` prints the report as JSON;
benchmarks/reliability.py starts servers, runs the soak and a fault phase, and writes
benchmarks/results/reliability.{json,png}.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

MIX = {"stream": 5, "chat": 3, "abort": 2, "structured": 2, "agent": 1, "bad": 4}

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}

# kind -> (path, raw body or JSON body, the statuses it may get)
BAD = {
    "invalid_json": ("/v1/completions", b'{"prompt": "x", ', (400,)),
    "nan_temperature": ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "temperature": NaN}', (400,)),
    "out_of_vocab_token": ("/v1/completions", {"prompt": [1, 10**9], "max_tokens": 2}, (400,)),
    "huge_max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": 2**62}, (400,)),
    "int_past_int64": ("/v1/completions", {"prompt": "x", "max_tokens": 2, "seed": 2**64}, (400,)),
    "empty_messages": ("/v1/chat/completions", {"messages": [], "max_tokens": 2}, (400,)),
    "bad_schema": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                            "response_format": {"type": "json_schema",
                                                                "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
                   (400,)),
    "bad_regex": ("/v1/completions", {"prompt": "x", "max_tokens": 2, "regex": "a(b"}, (400,)),
    "wrong_type": ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, (400,)),
    "unknown_model": ("/v1/completions", {"model": "no-such-model", "prompt": "x", "max_tokens": 2}, (404,)),
    "lone_surrogate": ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', (400,)),
    "bad_agent_budget": ("/v1/agents/runs", {"task": "x", "budgets": {"max_steps": -1}}, (400,)),
}


@dataclass
class SoakReport:
    duration_s: float = 0.0
    requests: int = 0
    by_kind: dict = field(default_factory=dict)  # kind -> {"sent", "ok", "failed"}
    bad_inputs: dict = field(default_factory=dict)  # bad kind -> {"sent", "got_4xx"}
    server_errors: int = 0
    faulted: int = 0  # requests ended by an injected fault (metroline.faults), not server errors
    hangs: int = 0
    failures: list = field(default_factory=list)  # the first few, for the record
    samples: list = field(default_factory=list)  # {"t", "rss_mib", "kv_usage", "running", "waiting"}
    kv_usage_at_end: float | None = None
    rss_mib_after_warmup: float | None = None
    rss_mib_at_end: float | None = None

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_mib_after_warmup is None or self.rss_mib_at_end is None:
            return None
        return self.rss_mib_at_end - self.rss_mib_after_warmup

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["rss_growth_mib"] = self.rss_growth_mib
        return d


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


class _Soak:
    def __init__(self, url: str, model: str | None, api_key: str | None, request_timeout_s: float,
                 seed: int):
        self.url, self.model = url.rstrip("/"), model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = request_timeout_s
        self.rng = random.Random(seed)
        self.report = SoakReport()

    def _count(self, kind: str, ok: bool, why: str = "") -> None:
        k = self.report.by_kind.setdefault(kind, {"sent": 0, "ok": 0, "failed": 0})
        k["sent"] += 1
        k["ok" if ok else "failed"] += 1
        self.report.requests += 1
        if not ok and len(self.report.failures) < 20:
            self.report.failures.append(f"{kind}: {why}"[:300])

    def _body(self, body: dict) -> dict:
        return {**({"model": self.model} if self.model else {}), **body}

    async def one(self, http: httpx.AsyncClient, kind: str, i: int) -> None:
        try:
            await asyncio.wait_for(getattr(self, f"_{kind}")(http, i), self.timeout)
        except asyncio.TimeoutError:
            self.report.hangs += 1
            self._count(kind, False, f"no answer within {self.timeout:g} s")
        except _ServerError as e:
            if "InjectedFault" in str(e):  # a fault armed on purpose (METROLINE_FAULTS) hit it
                self.report.faulted += 1
                self.report.requests += 1
                return
            self.report.server_errors += 1
            self._count(kind, False, str(e))
        except Exception as e:  # noqa: BLE001 - a failed check is a failure of the server
            self._count(kind, False, f"{type(e).__name__}: {e}")

    async def _post(self, http, path, body, expect=(200,)):
        r = await http.post(path, json=self._body(body), headers=self.headers)
        if r.status_code >= 500:
            raise _ServerError(f"{path}: {r.status_code} {r.text[:200]}")
        if r.status_code not in expect:
            raise AssertionError(f"{path}: {r.status_code} {r.text[:200]}")
        return r

    async def _read_stream(self, http, i, abort_after: int | None = None):
        body = self._body({"prompt": f"Story number {i}: once upon a time", "stream": True,
                           "max_tokens": self.rng.randint(8, 32), "temperature": 0.7, "seed": i})
        finish = None
        chunks = 0
        async with http.stream("POST", "/v1/completions", json=body, headers=self.headers) as r:
            if r.status_code != 200:  # failed before its first event: an error body
                text = (await r.aread()).decode("utf-8", "replace")[:300]
                raise (_ServerError if r.status_code >= 500 else AssertionError)(f"stream: {r.status_code} {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    raise _ServerError(f"stream error event: {ev['error']}")
                chunks += 1
                for c in ev.get("choices", []):
                    finish = c.get("finish_reason") or finish
                if abort_after is not None and chunks >= abort_after:
                    return  # leaving the block closes the connection: the server aborts it
        if finish not in ("stop", "length"):
            raise AssertionError(f"stream ended without a finish_reason ({chunks} chunks)")

    async def _stream(self, http, i):
        await self._read_stream(http, i)
        self._count("stream", True)

    async def _abort(self, http, i):
        await self._read_stream(http, i, abort_after=2)
        self._count("abort", True)

    async def _chat(self, http, i):
        r = await self._post(http, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Say something about the number {i}."}],
            "max_tokens": self.rng.randint(4, 16)})
        if r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
            raise AssertionError(r.text[:200])
        self._count("chat", True)

    async def _structured(self, http, i):
        r = await self._post(http, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Invent a person: name and age, as JSON."}],
            "max_tokens": 60, "temperature": 0.8, "seed": i,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}})
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":  # complete: it must parse and fit the schema
            value = json.loads(choice["message"]["content"])
            if set(value) != {"name", "age"} or not isinstance(value["age"], int):
                raise AssertionError(f"output off the schema: {value}")
        self._count("structured", True)

    async def _agent(self, http, i):
        r = await self._post(http, "/v1/agents/runs", {
            "task": f"What is {i} * 3 + 1?", "tools": ["calculator"], "tool_choice": "required",
            "budgets": {"max_steps": 3, "max_tokens_per_call": 48}}, expect=(200, 201))
        run_id = r.json()["id"]
        while True:
            g = await http.get(f"/v1/agents/runs/{run_id}", headers=self.headers)
            if g.status_code >= 500:
                raise _ServerError(f"agent run: {g.status_code}")
            status = g.json()["status"]
            if status in ("completed", "stopped"):
                break
            if status in ("failed", "cancelled"):
                raise AssertionError(f"agent run {run_id} ended {status}: {g.json().get('reason')}")
            await asyncio.sleep(0.2)
        self._count("agent", True)

    async def _bad(self, http, i):
        kind = self.rng.choice(sorted(BAD))
        path, body, expect = BAD[kind]
        if isinstance(body, bytes):
            r = await http.post(path, content=body, headers={**self.headers, "content-type": "application/json"})
        else:
            r = await http.post(path, json=self._body(body), headers=self.headers)  # its own model wins
        b = self.report.bad_inputs.setdefault(kind, {"sent": 0, "got_4xx": 0})
        b["sent"] += 1
        if r.status_code >= 500:
            raise _ServerError(f"bad input {kind}: {r.status_code} {r.text[:200]}")
        if r.status_code not in expect or "error" not in r.json():
            raise AssertionError(f"bad input {kind}: {r.status_code} {r.text[:200]}")
        b["got_4xx"] += 1
        self._count("bad", True)

    async def sample(self, http, pid, t0):
        try:
            m = await http.get("/metrics", headers=self.headers)
            text = m.text
        except httpx.HTTPError:
            text = ""
        self.report.samples.append({
            "t": round(time.monotonic() - t0, 2), "rss_mib": rss_mib(pid) if pid else None,
            "kv_usage": _gauge(text, "metroline_kv_cache_usage_perc"),
            "running": _gauge(text, "metroline_num_requests_running"),
            "waiting": _gauge(text, "metroline_num_requests_waiting")})


class _ServerError(Exception):
    pass


async def soak(url: str, duration_s: float = 60.0, *, concurrency: int = 6, pid: int | None = None,
               model: str | None = None, api_key: str | None = None, request_timeout_s: float = 120.0,
               warmup_fraction: float = 0.25, drain_timeout_s: float = 60.0, seed: int = 0,
               mix: dict | None = None) -> SoakReport:
    """Run the mixed load against `url` for duration_s with `concurrency` clients; `pid`: the
    server's process, whose RSS is sampled (None: not measured)."""
    s = _Soak(url, model, api_key, request_timeout_s, seed)
    weights = mix or MIX
    kinds, w = list(weights), list(weights.values())
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=s.url, timeout=request_timeout_s + 10, limits=limits) as http:
        counter = iter(range(1 << 30))

        async def client():
            while time.monotonic() - t0 < duration_s:
                kind = s.rng.choices(kinds, w)[0]
                await s.one(http, kind, next(counter))

        async def sampler():
            while time.monotonic() - t0 < duration_s:
                await s.sample(http, pid, t0)
                await asyncio.sleep(1.0)

        await asyncio.gather(sampler(), *(client() for _ in range(concurrency)))
        s.report.duration_s = time.monotonic() - t0
        # Drained: no request running, and every KV block back in the pool.
        deadline = time.monotonic() + drain_timeout_s
        while True:
            await s.sample(http, pid, t0)
            last = s.report.samples[-1]
            if (last["kv_usage"] == 0.0 and not last["running"] and not last["waiting"]) \
                    or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    s.report.kv_usage_at_end = s.report.samples[-1]["kv_usage"]
    rss = [x for x in s.report.samples if x["rss_mib"] is not None]
    if rss:
        after = [x for x in rss if x["t"] >= warmup_fraction * duration_s] or rss
        s.report.rss_mib_after_warmup = after[0]["rss_mib"]
        s.report.rss_mib_at_end = rss[-1]["rss_mib"]
    return s.report
