"""Scale-out on Ray Serve (server/cluster.py, server/cluster_router.py): engine replicas behind
one OpenAI endpoint, kept small for 2 cores.

One local Ray cluster for the module (no dashboard, a small object store, loopback only),
two replicas of the default model with one thread and a small KV cache each; `ray.shutdown()`
always runs. What must hold: the official client gets the same greedy text through the cluster
as from one engine; a session's turns land on one replica and hit its cache; killing a
replica loses no request that had not started streaming, ends the ones that had with an error
event, and the service comes back; overload is a quick 429, never a hang.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import TIMEOUT, wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow  # a Ray cluster and two model loads: ~40 s of set-up

MAX_ONGOING = 3
MAX_QUEUED = 8  # Serve counts a request as queued while it is being routed, too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from metroline.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig, SpeculativeConfig
    from metroline.server import cluster as c

    port = _free_port()
    config = c.ClusterConfig(replicas=2, num_cpus=1, max_ongoing_requests=MAX_ONGOING,
                             max_queued_requests=MAX_QUEUED, stats_period_s=0.5,
                             health_check_period_s=2.0, health_check_timeout_s=20.0,
                             ray_num_cpus=4, object_store_bytes=80 * 2**20)
    spec = c.EngineSpec(model=None, load={}, cache=CacheConfig(num_blocks=160),
                        scheduler=SchedulerConfig(max_num_seqs=MAX_ONGOING, max_num_batched_tokens=128),
                        model_config=ModelConfig(), speculative=SpeculativeConfig(), threads=1)
    try:
        c.start_ray(config, "127.0.0.1", port)
        store = str(tmp_path_factory.mktemp("cluster") / "agents.sqlite3")
        c.deploy(spec, ServerConfig(shutdown_timeout=5, agent_store_path=store), config)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: len(replica_series(url, "generation_tokens")) == 2, 60, "2 replicas reporting", 0.2)
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def replica_series(url: str, name: str) -> dict[str, float]:
    """{replica id: value} of metroline_replica_<name> from the one /metrics endpoint."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    pattern = rf'^metroline_replica_{name}(?:_total)?{{[^}}]*replica="([^"]+)"[^}}]*}} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def total(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^metroline_{name}(?:_total)?{{[^}}]*}} (\S+)$", text, re.M)
    return float(m.group(1))


PROMPTS = ["Name three colors.", "What is 2 + 2?", "Say hello in French.", "Name a planet.",
           "What is the capital of Italy?", "Count to three."]


def test_two_replicas_answer_as_one_engine_does(cluster, server):
    """The official client, concurrent requests: the cluster's greedy text equals one local
    engine's, both replicas took work, and /metrics sums them."""
    before = replica_series(cluster, "generation_tokens")
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client(cluster).chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=8, temperature=0)
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert len(results) == len(PROMPTS)
    local = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    for i, prompt in enumerate(PROMPTS):
        ref = local.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": prompt}])
        assert results[i] == ref.choices[0].message.content, prompt

    def spread():
        after = replica_series(cluster, "generation_tokens")
        return (sum(after.values()) - sum(before.values()) >= len(PROMPTS)
                and all(after[r] > before.get(r, 0) for r in after))
    wait_for(spread, 20, "both replicas to have generated", 0.2)
    per = replica_series(cluster, "generation_tokens")
    assert total(cluster, "generation_tokens") >= sum(per.values())


def test_streaming_and_structured_output_cross_to_the_replica(cluster):
    """A grammar is compiled in the ingress and rebuilt in the replica; streams stream."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = client(cluster).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Give a number as JSON."}],
        max_tokens=20, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}})
    assert isinstance(json.loads(r.choices[0].message.content)["n"], int)
    chunks = list(client(cluster).completions.create(model="SmolLM2-135M-Instruct", prompt="One, two,",
                                                     max_tokens=6, temperature=0, stream=True))
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2


def routing(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^metroline_routing_decisions_total{[^}]*reason="([^"]+)"[^}]*} (\S+)$', text, re.M)}


REPORTS_SETTLE_S = 1.5  # three report periods: every replica has reported what it computed


def test_a_session_sticks_to_one_replica_and_hits_its_cache(cluster):
    time.sleep(REPORTS_SETTLE_S)  # the earlier tests' counts are in
    before, decided = replica_series(cluster, "prompt_tokens"), routing(cluster)
    messages = [{"role": "system", "content": "You are a terse assistant. " * 6}]
    cached = []
    c = client(cluster)
    for turn in ("Hi.", "Name a fruit.", "Another one.", "And a vegetable."):
        messages.append({"role": "user", "content": turn})
        r = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=6,
                                      temperature=0, extra_body={"session_id": "cluster-trip"})
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert all(n > 0 for n in cached[1:]), cached  # every later turn reused the earlier KV

    def grew():
        after = replica_series(cluster, "prompt_tokens")
        return [r for r in after if after[r] > before.get(r, 0)]
    wait_for(lambda: grew(), 10, "the session's prompt tokens to be reported", 0.2)
    time.sleep(REPORTS_SETTLE_S)
    assert len(grew()) == 1, (before, replica_series(cluster, "prompt_tokens"))
    assert routing(cluster).get("session", 0) - decided.get("session", 0) == 3


def test_an_agent_run_is_served_through_the_ingress_and_its_calls_stick(cluster):
    """The run lives in the ingress (its store); its model calls carry the run as session_id,
    so after the first they are routed to the replica that holds the run's KV."""
    before = routing(cluster)
    with httpx.Client(base_url=cluster, timeout=TIMEOUT) as http:
        r = http.post("/v1/agents/runs", json={"task": "What is 12 * 7 + 3? Use the calculator.",
                                               "tools": ["calculator"], "tool_choice": "required",
                                               "budgets": {"max_steps": 3, "max_tokens_per_call": 48}})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while (run := http.get(f"/v1/agents/runs/{run_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, run
            time.sleep(0.2)
    assert run["status"] in ("completed", "stopped"), run
    calls = [e for e in run["events"] if e["kind"] == "model_call"]
    assert len(calls) >= 2 and any(e["kind"] == "tool_finished" and e["ok"] for e in run["events"])
    after = routing(cluster)
    assert after.get("session", 0) - before.get("session", 0) >= len(calls) - 1, (before, after)


def test_overload_is_a_quick_429_never_a_hang(cluster):
    """More concurrent requests than the replicas take plus the bounded queue: the rest are
    refused at once with 429 and Retry-After; every accepted one completes."""
    statuses: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(timeout=TIMEOUT) as h:
            r = h.post(f"{cluster}/v1/completions", json={"prompt": "Tell a long story.",
                                                          "max_tokens": 48, "ignore_eos": True})
        with lock:
            statuses.append((r.status_code, r.headers.get("retry-after")))

    n = 2 * MAX_ONGOING + MAX_QUEUED + 10
    start = time.monotonic()
    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert len(statuses) == n, "a request hung"
    codes = [s for s, _ in statuses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 2 * MAX_ONGOING, codes
    assert all(ra for s, ra in statuses if s == 429)
    assert time.monotonic() - start < TIMEOUT


def _replica_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "EngineReplica" in a["name"])


def test_a_killed_replica_loses_no_request_that_had_not_started(cluster):
    c = client(cluster)
    streams: dict[int, list] = {}
    ended: dict[int, str] = {}

    def stream(i: int) -> None:
        try:
            out = streams.setdefault(i, [])
            for chunk in c.completions.create(model="SmolLM2-135M-Instruct", prompt=f"Story {i}:",
                                              max_tokens=120, stream=True,
                                              extra_body={"ignore_eos": True}):
                out.append(chunk)
            ended[i] = "done"
        except Exception as e:  # the error event of a stream whose replica died
            ended[i] = f"error: {e}"

    started = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in started:
        t.start()
    wait_for(lambda: len(streams) == 2 and all(streams[i] for i in streams), 30, "streams to start", 0.05)
    victim = _replica_actors()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # Sent right after the kill, before Serve notices: some go to the dead replica first.
    fresh: dict[int, str] = {}

    def ask(i: int) -> None:
        r = c.completions.create(model="SmolLM2-135M-Instruct", prompt=f"Fresh {i}:", max_tokens=4)
        fresh[i] = r.choices[0].text

    asks = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in asks:
        t.start()
    for t in asks + started:
        t.join(TIMEOUT)
    assert len(fresh) == 4, "a request that had not started streaming was lost"
    assert len(ended) == 2
    for i, how in ended.items():  # each stream either finished or ended with a clear error
        assert how == "done" or "engine replica" in how, how
    assert any(how != "done" for how in ended.values()), "the killed replica held a stream"
    # Serve replaces the replica: two report again, and requests are served.
    wait_for(lambda: victim not in _replica_actors() and len(_replica_actors()) == 2, 90,
             "a replacement replica", 0.5)
    wait_for(lambda: httpx.get(f"{cluster}/ready", timeout=10).status_code == 200, 60, "/ready", 0.5)
    r = c.completions.create(model="SmolLM2-135M-Instruct", prompt="Back:", max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_one_machine_serve_never_imports_ray():
    code = ("import sys, metroline.cli as c, metroline.server.app, metroline.server.openai; "
            "c.build_parser().parse_args(['serve']); "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("flags, message", [(["--replicas", "0"], "--replicas must be >= 1"),
                                            (["--replicas", "two"], "a number or auto"),
                                            (["--replicas", "auto", "--min-replicas", "3", "--max-replicas", "2"],
                                             "--min-replicas <= --max-replicas")])
def test_bad_cluster_flags_are_one_line_errors(flags, message):
    p = subprocess.run([sys.executable, "-m", "metroline.cli", "serve", *flags], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
