"""Lifecycle: clients that go away at every stage, the bounded queue (429), per-request
timeouts, draining, and a dead engine loop. After each test conftest also checks that every
engine is idle with an empty KV cache."""

from __future__ import annotations

import concurrent.futures
import json
import time

import openai
import pytest

from tests.server.conftest import ServerThread, make_engine, raw_post, wait_for, wait_idle

MODEL = "SmolLM2-135M-Instruct"
LONG = {"ignore_eos": True}


def running(engine):
    return list(engine.core.scheduler.running)


def read_events(sock, n: int) -> bytes:
    """Read from a raw SSE response until `n` data events have arrived."""
    buf = b""
    while buf.count(b"data: ") < n:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early: {buf[-300:]!r}"
        buf += chunk
    return buf


def read_response(sock) -> tuple[int, bytes]:
    """Status and body of a (non-streaming, Content-Length) response on a raw socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the headers"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(int(v) for k, v in (ln.split(": ", 1) for ln in lines[1:])
                  if k.lower() == "content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the body"
        body += chunk
    return int(lines[0].split()[1]), body


def side_request(client, max_tokens=6):
    """A normal request running concurrently with the one under test."""
    return client.completions.create(model=MODEL, prompt="Hello there", max_tokens=max_tokens,
                                     temperature=0, extra_body=LONG)


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        yield ex


# ---------------------------------------------------------------------------- disconnects

def test_disconnect_while_queued(tiny, tiny_engine, tiny_client, pool):
    # max_num_seqs=1: A runs, B waits in the queue; B's client goes away.
    a = raw_post(tiny.port, "/v1/completions", {"prompt": "Once", "max_tokens": 2000,
                                                "stream": True, **LONG})
    wait_for(lambda: tiny_engine.get_stats().num_running == 1, what="A running")
    b = raw_post(tiny.port, "/v1/completions", {"prompt": "Twice", "max_tokens": 5, **LONG})
    wait_for(lambda: tiny_engine.get_stats().num_waiting == 1, what="B queued")
    b.close()
    wait_for(lambda: tiny_engine.get_stats().num_waiting == 0, what="B aborted")
    assert tiny_engine.get_stats().num_running == 1  # A flows on
    read_events(a, 2)
    a.close()
    wait_idle(tiny_engine)
    out = tiny_client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body=LONG)
    assert out.usage.completion_tokens == 3


def test_disconnect_mid_prefill(server, engine, client, tok, pool):
    prompt = tok.encode("lorem ipsum dolor sit amet " * 700)[:6000]
    sock = raw_post(server.port, "/v1/completions", {"prompt": prompt, "max_tokens": 4,
                                                     "stream": True})

    def mid_prefill():
        reqs = [r for r in running(engine) if r.num_prompt_tokens == len(prompt)]
        return bool(reqs) and 0 < reqs[0].num_computed_tokens < len(prompt)

    side = pool.submit(side_request, client, 8)
    wait_for(mid_prefill, what="the long prompt mid-prefill")
    sock.close()
    wait_for(lambda: not any(r.num_prompt_tokens == len(prompt) for r in running(engine)),
             what="the prefill to be aborted")
    assert side.result(timeout=60).usage.completion_tokens == 8
    wait_idle(engine)


def test_disconnect_mid_decode_non_streaming(server, engine, client, pool):
    sock = raw_post(server.port, "/v1/completions", {"prompt": "A long story:",
                                                     "max_tokens": 2000, **LONG})
    side = pool.submit(side_request, client, 8)

    def decoding():
        return any(r.num_output_tokens >= 3 and r.sampling_params.max_tokens == 2000
                   for r in running(engine))

    wait_for(decoding, what="decode to start")
    sock.close()
    assert side.result(timeout=60).usage.completion_tokens == 8
    wait_idle(engine)


def test_disconnect_mid_stream(server, engine, client, pool):
    sock = raw_post(server.port, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 2000,
        "stream": True, **LONG})
    side = pool.submit(side_request, client, 8)
    head = read_events(sock, 3)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    sock.close()
    assert side.result(timeout=60).usage.completion_tokens == 8
    wait_idle(engine)


def test_disconnect_with_openai_client_stream(client, engine):
    stream = client.completions.create(model=MODEL, prompt="Count:", max_tokens=2000,
                                       stream=True, extra_body=LONG)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    wait_idle(engine)


# ---------------------------------------------------------------------------- queue limit

def test_queue_full_is_429_with_retry_after(tiny, tiny_engine, tiny_client):
    a = raw_post(tiny.port, "/v1/completions", {"prompt": "One", "max_tokens": 2000,
                                                "stream": True, **LONG})
    wait_for(lambda: tiny_engine.get_stats().num_running == 1, what="A running")
    b = raw_post(tiny.port, "/v1/completions", {"prompt": "Two", "max_tokens": 3, **LONG})
    wait_for(lambda: tiny_engine.get_stats().num_waiting == 1, what="B queued")
    with pytest.raises(openai.RateLimitError) as e:
        tiny_client.completions.create(model=MODEL, prompt="Three", max_tokens=2)
    assert e.value.code == "queue_full"
    assert int(e.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        tiny_client.chat.completions.create(model=MODEL, max_tokens=2, stream=True,
                                            messages=[{"role": "user", "content": "x"}])
    a.close()  # A goes: B runs and completes
    status, body = read_response(b)
    b.close()
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3


def test_more_samples_than_the_queue_ever_holds_is_400_not_429(tiny, tiny_client):
    """The tiny server's queue holds one request: n=2 can never be admitted, so it is a 400
    (a 429 would have the client retry forever), idle or not; n=1 still works."""
    for create in (lambda: tiny_client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2),
                   lambda: tiny_client.chat.completions.create(model=MODEL, max_tokens=2, n=3,
                                                               messages=[{"role": "user", "content": "x"}])):
        with pytest.raises(openai.BadRequestError) as e:
            create()
        assert e.value.code == "n_exceeds_queue" and e.value.param == "n"
    assert tiny_client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices


# ---------------------------------------------------------------------------- timeouts

def test_request_timeout(aux_server, engine):
    srv = aux_server(request_timeout=0.5)
    client = srv.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="Go", max_tokens=2000, extra_body=LONG)
    assert e.value.status_code == 408 and e.value.code == "request_timeout"
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as e:
        for _ in client.completions.create(model=MODEL, prompt="Go", max_tokens=2000,
                                           stream=True, extra_body=LONG):
            pass
    assert e.value.code == "request_timeout" and time.monotonic() - t0 < 30
    wait_idle(engine)
    ok = client.completions.create(model=MODEL, prompt="Go", max_tokens=2)
    assert ok.choices[0].text is not None


# ---------------------------------------------------------------------------- drain

@pytest.fixture
def fresh(default_loaded):
    """A private engine + server (draining and death are one-way), stopped after the test."""
    from metroline.server.app import ServerConfig, create_app

    made = []

    def make(num_blocks=128, **cfg) -> tuple[ServerThread, object]:
        eng = make_engine(default_loaded, num_blocks=num_blocks)
        srv = ServerThread(create_app(eng, ServerConfig(**cfg)))
        made.append((srv, eng))
        return srv, eng

    yield make
    for srv, eng in made:
        srv.stop()
        eng.shutdown(timeout=10)
        assert not srv.thread.is_alive()


def test_drain_finishes_in_flight_work_then_ends_the_rest(fresh):
    """Draining: new work 503, /ready 503, /health 200; in-flight requests finish; what is
    still running when the drain is cut short ends with an error event in its stream."""
    srv, eng = fresh()
    client = srv.client()
    long_stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=2000,
                                            stream=True, extra_body=LONG)
    assert next(iter(long_stream)).choices[0].text is not None
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        short = pool.submit(client.completions.create, model=MODEL, prompt="Hi",
                            max_tokens=6, temperature=0, extra_body=LONG)
        wait_for(lambda: len(srv.state.runs) == 2, what="both requests in flight")
        drain = srv.submit(srv.state.drain(120.0))
        wait_for(lambda: srv.state.draining, what="draining")
        with srv.http() as http:
            assert http.get("/ready").status_code == 503
            assert http.get("/health").status_code == 200
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="new", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "server_draining"
        assert short.result(timeout=60).usage.completion_tokens == 6  # finished normally
        assert not drain.done() and len(srv.state.runs) == 1  # still waiting for the long one
        srv.state.loop.call_soon_threadsafe(srv.state.end_drain_now)  # a second SIGTERM
        with pytest.raises(openai.APIError) as e:
            for _ in long_stream:
                pass
        assert e.value.code == "server_shutdown"
        drain.result(timeout=30)
    wait_idle(eng)
    assert not srv.state.runs


def test_drain_timeout_ends_streams_and_waiting_requests(fresh):
    srv, eng = fresh()
    client = srv.client()
    streams = [client.completions.create(model=MODEL, prompt=f"Story {i}", max_tokens=2000,
                                         stream=True, extra_body=LONG) for i in range(2)]
    for st in streams:
        next(iter(st))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        plain = pool.submit(client.completions.create, model=MODEL, prompt="Plain",
                            max_tokens=2000, extra_body=LONG)
        wait_for(lambda: len(srv.state.runs) == 3, what="three requests in flight")
        t0 = time.monotonic()
        srv.call(srv.state.drain(0.5))
        assert time.monotonic() - t0 < 10
        for st in streams:
            with pytest.raises(openai.APIError) as e:
                for _ in st:
                    pass
            assert e.value.code == "server_shutdown"
        with pytest.raises(openai.InternalServerError) as e:
            plain.result(timeout=30)
        assert e.value.status_code == 503 and e.value.code == "server_shutdown"
    wait_idle(eng)


# ---------------------------------------------------------------------------- engine death

def test_dead_engine_loop_is_reported(fresh):
    srv, eng = fresh(num_blocks=32)
    client = srv.client()
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices

    def boom():
        raise RuntimeError("simulated engine crash")

    eng.core.step = boom
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert e.value.status_code == 503 and e.value.code == "engine_dead"
    wait_for(lambda: not eng.is_alive, what="the loop to die")
    with srv.http() as http:
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert http.get("/ready").status_code == 503
    with pytest.raises(openai.InternalServerError) as e:  # refused at once, not hung
        client.chat.completions.create(model=MODEL, max_tokens=2,
                                       messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "engine_dead"
