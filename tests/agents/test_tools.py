"""metroline.agents.tools: schemas from type hints, calls with timeouts, limits and errors as
observations, and the built-in tools (a calculator that never evals, a sandbox that holds)."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import time
from typing import Literal, Optional

import jsonschema
import pytest

from metroline.agents.tools import ToolError, ToolRegistry, builtin_tools, calculate, schema_of


def run(coro):
    return asyncio.run(coro)


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


def test_schema_from_type_hints_and_docstring():
    def weather(city: str, days: int = 3, unit: Unit = Unit.C, detail: Literal["short", "long"] = "short",
                tags: list[str] | None = None, scale: Optional[float] = None) -> str:
        """Forecast for a city.

        Args:
            city: the city's name
            days: how many days ahead
        """
        return ""

    desc, s = schema_of(weather)
    assert desc == "Forecast for a city."
    assert s["required"] == ["city"] and s["additionalProperties"] is False
    p = s["properties"]
    assert p["city"] == {"type": "string", "description": "the city's name"}
    assert p["days"] == {"type": "integer", "description": "how many days ahead", "default": 3}
    assert p["unit"] == {"enum": ["celsius", "fahrenheit"]}
    assert p["detail"]["enum"] == ["short", "long"]
    assert p["tags"] == {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None}
    assert p["scale"]["anyOf"] == [{"type": "number"}, {"type": "null"}]
    jsonschema.Draft202012Validator.check_schema(s)
    with pytest.raises(ToolError, match="kwargs"):
        schema_of(lambda **kw: None)


def test_registry_calls_validates_and_captures_errors():
    reg = ToolRegistry()

    @reg.tool
    def add(a: int, b: int = 1) -> int:
        "Add two integers."
        return a + b

    @reg.tool(name="boom", timeout_s=2)
    def explode(x: str) -> str:
        "Always fails."
        raise RuntimeError(f"broken on {x}")

    assert reg.specs()[0] == {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                                               "parameters": schema_of(add)[1]}}
    ok = run(reg.call("add", '{"a": 2, "b": 5}'))
    assert ok.ok and ok.content == "7" and ok.error is None
    assert run(reg.call("add", {"a": 2})).content == "3"
    bad = run(reg.call("add", '{"a": "two"}'))
    assert not bad.ok and bad.error == "invalid_arguments" and "'two' is not of type 'integer'" in bad.content
    assert run(reg.call("add", '{"a": 1, "c": 2}')).error == "invalid_arguments"  # no extra keys
    assert run(reg.call("add", "{not json")).error == "invalid_arguments"
    assert run(reg.call("add", "[1, 2]")).error == "invalid_arguments"
    failed = run(reg.call("boom", {"x": "purpose"}))
    assert not failed.ok and failed.error == "exception" and "RuntimeError: broken on purpose" in failed.content
    unknown = run(reg.call("nope", {}))
    assert unknown.error == "unknown_tool" and "add" in unknown.content
    with pytest.raises(ToolError, match="already registered"):
        reg.tool(add)
    with pytest.raises(ToolError, match="tool name"):
        reg.tool(name="bad name!")(add)


def test_timeout_and_concurrency_limit():
    reg = ToolRegistry()
    active, peak = [0], [0]

    @reg.tool(timeout_s=0.2)
    async def slow() -> str:
        "Never answers in time."
        await asyncio.sleep(5)
        return "late"

    @reg.tool(max_concurrency=2, timeout_s=5)
    async def busy(i: int) -> int:
        "Counts how many run at once."
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.05)
        active[0] -= 1
        return i

    t = time.perf_counter()
    r = run(reg.call("slow", {}))
    assert r.error == "timeout" and "0.2 s" in r.content and time.perf_counter() - t < 2

    async def many():
        return await asyncio.gather(*(reg.call("busy", {"i": i}) for i in range(7)))

    out = run(many())
    assert [o.content for o in out] == [str(i) for i in range(7)] and peak[0] == 2


@pytest.mark.parametrize("expr,value", [("17*23", 391), ("(1 + 2) ** 3 / 9", 3.0), ("2^10", 1024),
                                         ("sqrt(16) + abs(-2)", 6.0), ("7 // 2 + 7 % 2", 4), ("-pi", -3.141592653589793),
                                         ("max(1, 5, 3)", 5), ("1e3 * 2", 2000.0)])
def test_calculator_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr,why", [("__import__('os').system('true')", "not allowed"),
                                       ("().__class__", "not allowed"), ("'a' * 3", "not allowed"),
                                       ("x + 1", "not allowed"), ("9 ** 9 ** 9", "too large"),
                                       ("factorial(100000)", "too large"), ("1 / 0", "division by zero"),
                                       ("2 +", "not an arithmetic"), ("sqrt(-1)", "math domain")])
def test_calculator_refuses(expr, why):
    with pytest.raises(ValueError, match=why):
        calculate(expr)


def test_builtin_tools_notebook_clock_and_sandbox(tmp_path):
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "notes.txt").write_text("hello sandbox")
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", tmp_path / "box" / "link.txt")
    book: dict = {}
    reg = builtin_tools(sandbox=str(tmp_path / "box"), notebook=book)
    assert set(reg.names()) == {"calculator", "clock", "notebook_set", "notebook_get", "notebook_list", "fetch_url",
                                "read_file"}
    assert run(reg.call("calculator", {"expression": "17*23"})).content == "391"
    calc_err = run(reg.call("calculator", {"expression": "open('x')"}))
    # The schema's pattern refuses it before calculate()'s own AST check would.
    assert not calc_err.ok and calc_err.error == "invalid_arguments" and "does not match" in calc_err.content
    with pytest.raises(ValueError, match="not allowed"):
        calculate("open('x')")
    assert time.strptime(run(reg.call("clock", {})).content, "%Y-%m-%dT%H:%M:%SZ")
    assert run(reg.call("notebook_set", {"key": "a", "value": "1"})).content == "ok" and book == {"a": "1"}
    assert run(reg.call("notebook_get", {"key": "a"})).content == "1"
    assert json.loads(run(reg.call("notebook_list", {})).content) == ["a"]
    assert "no note named 'b'" in run(reg.call("notebook_get", {"key": "b"})).content
    assert run(reg.call("read_file", {"path": "notes.txt"})).content == "hello sandbox"
    assert run(reg.call("read_file", {"path": "notes.txt", "max_bytes": 5})).content == "hello"
    for escape in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt"):
        r = run(reg.call("read_file", {"path": escape}))
        assert not r.ok and "outside the sandbox" in r.content, escape
    assert "read_file" not in builtin_tools().names()  # no sandbox, no file access


def test_fetch_url_refuses_every_host_off_its_allowlist_before_any_connection(monkeypatch):
    """Loopback only by default; the refusal comes before any name is resolved or any socket
    connects (both are made to fail the test here; no traffic leaves the machine)."""
    import socket

    from metroline.agents.tools import check_url

    def no_network(*a, **k):
        raise AssertionError(f"a connection or lookup was attempted: {a}")

    reg = builtin_tools()
    with monkeypatch.context() as m:
        m.setattr(socket, "getaddrinfo", no_network)
        m.setattr(socket, "create_connection", no_network)
        m.setattr(socket.socket, "connect", no_network)
        for url in ("http://example.com/", "https://10.0.0.1/", "http://169.254.169.254/latest/meta-data",
                    "http://[::ffff:10.0.0.1]/", "http://127.0.0.1.nip.io/", "http://0.0.0.0/",
                    "http://127.0.0.2/", "http://localhost.evil.com/", "http://user:pw@127.0.0.1/",
                    "file:///etc/passwd", "ftp://127.0.0.1/", "gopher://127.0.0.1/", "//127.0.0.1/x"):
            with pytest.raises((PermissionError, ValueError)):
                check_url(url)
            r = run(reg.call("fetch_url", {"url": url}))
            assert not r.ok and r.error == "exception" and ("Permission" in r.content or "Value" in r.content), url
        assert check_url("http://127.0.0.1:9/x")[3] == "127.0.0.1"  # an IP on the list: no lookup
        assert check_url("http://[::1]:9/")[3] == "::1"
    # A name on the list must resolve to loopback only.
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(0, 0, 0, "", ("10.1.2.3", 80))])
    with pytest.raises(PermissionError, match="outside loopback"):
        check_url("http://localhost/")


def test_fetch_url_reads_a_loopback_page_and_does_not_follow_redirects():
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://example.com/")
                self.end_headers()
                return
            body = f"page {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        reg = builtin_tools()
        port = srv.server_address[1]
        r = run(reg.call("fetch_url", {"url": f"http://127.0.0.1:{port}/hello?x=1"}))
        assert r.ok and r.content == "page /hello?x=1", r
        r = run(reg.call("fetch_url", {"url": f"http://127.0.0.1:{port}/away"}))
        assert r.ok and "302" in r.content and "not followed" in r.content
        other = builtin_tools(allowed_hosts=("example.org",))
        r = run(other.call("fetch_url", {"url": f"http://127.0.0.1:{port}/hello"}))
        assert not r.ok and "not allowed" in r.content  # a custom list replaces loopback
    finally:
        srv.shutdown()
