"""Real servers on free loopback ports, in this process, over the session's one loaded model.

* `engine` / `server`    the shared engine (512 KV blocks) and the default app over it.
* `tiny_engine` / `tiny` an engine that runs one sequence at a time with a one-deep queue
                         (queueing, 429, mid-prefill in small chunks), and its app.
* `aux_server(**cfg)`    more apps over the shared engine with other ServerConfigs (auth, a
                         small body limit, a chat template override, a timeout).
* `client` / `tiny_client`  the official openai client for `server` / `tiny`.

Every uvicorn server runs in its own thread with its own event loop; apps cost nothing to
build, so only the two engines hold KV caches. After every test, every shared engine must be
idle with its KV cache empty and no run left in any app: one test's requests (bad, aborted,
disconnected) may never leak into the next.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from metroline.config import CacheConfig, SchedulerConfig
from metroline.engine.async_engine import AsyncEngine
from metroline.engine.core import EngineCore
from metroline.server.app import UVICORN_CHOICES, ServerConfig, create_app

TIMEOUT = 60.0


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app):
        self.app = app
        self.state = app.state.metroline
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, **UVICORN_CHOICES)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn thread died at start-up"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def call(self, coro, timeout: float = 30.0):
        """Run a coroutine on the server's event loop (e.g. state.drain) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.state.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.state.loop)

    def client(self, api_key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=TIMEOUT,
                             max_retries=0, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def make_engine(loaded, num_blocks=512, **sched) -> AsyncEngine:
    core = EngineCore(loaded, CacheConfig(num_blocks=num_blocks),
                      SchedulerConfig(**{"max_num_batched_tokens": 256, "max_num_seqs": 16,
                                         **sched}))
    return AsyncEngine(core, idle_wait_s=0.01)


def wait_idle(engine: AsyncEngine, timeout: float = 20.0) -> dict:
    """Poll until the engine has no request, no stream and an empty KV cache; return stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.get_stats()
        if (s.num_running == 0 and s.num_waiting == 0 and s.num_streams == 0
                and s.kv_cache_usage == 0.0 and not engine.core.has_unfinished_requests()):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout} s: {s}")
        time.sleep(0.02)


def wait_for(cond, timeout: float = 20.0, what: str = "condition", interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def raw_post(port: int, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    """Send a POST on a raw socket (the test decides when the 'client' goes away)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return sock


_servers: list[ServerThread] = []
_shared_engines: list[AsyncEngine] = []


@pytest.fixture(scope="session")
def engine(default_loaded):
    eng = make_engine(default_loaded)
    _shared_engines.append(eng)
    yield eng
    eng.shutdown(timeout=10)


@pytest.fixture(scope="session")
def tiny_engine(default_loaded):
    eng = make_engine(default_loaded, num_blocks=256, max_num_seqs=1, max_queued_requests=1,
                      max_num_batched_tokens=16)
    _shared_engines.append(eng)
    yield eng
    eng.shutdown(timeout=10)


def _start(app) -> ServerThread:
    st = ServerThread(app)
    _servers.append(st)
    return st


@pytest.fixture(scope="session")
def server(engine):
    return _start(create_app(engine, ServerConfig()))


@pytest.fixture(scope="session")
def tiny(tiny_engine):
    return _start(create_app(tiny_engine, ServerConfig(request_timeout=None)))


@pytest.fixture(scope="session")
def aux_server(engine):
    """Factory: another app over the shared engine, e.g. aux_server(api_key="k")."""
    cache: dict = {}

    def make(**cfg) -> ServerThread:
        key = tuple(sorted(cfg.items()))
        if key not in cache:
            cache[key] = _start(create_app(engine, ServerConfig(**cfg)))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def tiny_client(tiny):
    return tiny.client()


@pytest.fixture(scope="session")
def tok(default_loaded):
    return default_loaded.tokenizer


@pytest.fixture(scope="session", autouse=True)
def _stop_servers():
    yield
    for st in _servers:
        st.stop()
    for st in _servers:
        assert not st.thread.is_alive(), f"server on port {st.port} did not stop"


@pytest.fixture(autouse=True)
def _engines_clean_after_each_test():
    yield
    for eng in _shared_engines:
        if eng.is_alive:
            wait_idle(eng)
    for st in _servers:
        wait_for(lambda: not st.state.runs, 10, f"runs of server {st.port} to end")
