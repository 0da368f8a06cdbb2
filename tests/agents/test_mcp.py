"""metroline.agents.mcp: an MCP server over stdio (tests/agents/mcp_server_fixture.py, a subprocess)
as a tool source: its tools listed with their schemas, calls through ToolRegistry, errors and
timeouts as observations, arguments validated before they are sent, the subprocess reaped on
close and on a failed start; and the spec / config parsers (these run without `mcp`)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shlex
import sys
import time

import pytest

from metroline.agents.mcp import (McpConfigError, McpServerSpec, McpSourceError, McpToolSource, _tool_name,
                                  load_mcp_config, mcp_specs, parse_mcp_spec)
from metroline.agents.tools import Tool, ToolError, ToolRegistry

FIXTURE = os.path.join(os.path.dirname(__file__), "mcp_server_fixture.py")
# a process that never speaks MCP; it writes its pid to argv[1] so a test can check it was reaped
SILENT = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
needs_mcp = pytest.mark.skipif(importlib.util.find_spec("mcp") is None,
                               reason="the `mcp` SDK is not installed (pip install metroline[mcp])")


def run(coro, timeout_s: float = 20):
    """Each test's coroutine in a fresh event loop, bounded: a hang fails instead of stalling."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def reaped(pid: int) -> bool:
    """The process is gone from the process table (a zombie would still answer signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def fixture_source(**kw) -> McpToolSource:
    return parse_mcp_spec(f"mcp:fx={shlex.quote(sys.executable)} {shlex.quote(FIXTURE)}").source(**kw)


@pytest.fixture(scope="module")
def src():
    """One server for the module, opened in its own event loop: every test calls it from another."""
    s = run(fixture_source().open())
    yield s
    s.close()


# ------------------------------------------------------------------ a running server


@needs_mcp
def test_tools_listed_with_their_schemas_and_hints(src):
    assert src.is_open and src.name == "fx" and src.server_info.name == "metroline-test"
    by_name = {t.name: t for t in src.tools(prefix="fx")}
    assert set(by_name) == {"fx__add", "fx__echo", "fx__fail", "fx__slow", "fx__pid", "fx__blob"}
    add = by_name["fx__add"]
    assert add.description == "Add two integers."
    assert add.parameters["type"] == "object" and add.parameters["required"] == ["a", "b"]
    assert add.parameters["properties"]["a"]["type"] == "integer"
    assert by_name["fx__echo"].parameters["properties"]["times"]["default"] == 1
    # readOnlyHint (add) and idempotentHint (echo) make a tool idempotent; no hint, not
    assert add.idempotent and by_name["fx__echo"].idempotent
    assert not by_name["fx__fail"].idempotent and not by_name["fx__slow"].idempotent
    assert src.skipped == {}
    assert {t.name for t in src.tools()} == {"add", "echo", "fail", "slow", "pid", "blob"}
    assert [t.name for t in src.tools(include=["echo"])] == ["echo"]


@needs_mcp
def test_calls_return_results_through_the_registry(src):
    reg = ToolRegistry()
    src.register(reg, prefix="fx")

    async def go():
        r = await reg.call("fx__add", '{"a": 2, "b": 40}')
        assert (r.ok, r.content, r.error) == (True, "42", None)
        assert (await reg.call("fx__echo", {"text": "hi"})).content == "hi"
        assert (await reg.call("fx__echo", {"text": "hi", "times": 3})).content == "hi hi hi"
        assert (await reg.call("fx__blob", {})).content == "caption\n[image: image/png, 12 base64 characters]"
        many = await asyncio.gather(*(reg.call("fx__add", {"a": i, "b": i}) for i in range(8)))
        assert [m.content for m in many] == [str(2 * i) for i in range(8)]

    run(go())


@needs_mcp
def test_a_tool_error_is_an_exception_observation(src):
    reg = ToolRegistry()
    src.register(reg)
    r = run(reg.call("fail", {"message": "the disk"}))
    assert not r.ok and r.error == "exception"
    assert r.content.startswith("error: McpToolError:") and "boom: the disk" in r.content
    assert run(reg.call("add", {"a": 1, "b": 1})).content == "2"  # the server is still fine


@needs_mcp
def test_the_registry_timeout_is_enforced_and_the_server_stays_usable(src):
    reg = ToolRegistry()
    src.register(reg, timeout_s=0.5)
    t0 = time.perf_counter()
    r = run(reg.call("slow", {"seconds": 30}))
    assert not r.ok and r.error == "timeout" and "0.5 s" in r.content
    assert time.perf_counter() - t0 < 5
    assert run(reg.call("slow", {"seconds": 0.01})).content == "slept 0.01"


@needs_mcp
def test_arguments_are_validated_against_the_input_schema_before_sending(src, monkeypatch):
    sent = []
    real = src.call_tool

    async def spy(name, arguments=None):
        sent.append((name, arguments))
        return await real(name, arguments)

    monkeypatch.setattr(src, "call_tool", spy)
    reg = ToolRegistry()
    src.register(reg)
    for bad in ({"a": 1}, {"a": "one", "b": 2}, '{"a": 1, "b": ', [1, 2]):
        r = run(reg.call("add", bad))
        assert not r.ok and r.error == "invalid_arguments", (bad, r)
    assert sent == []
    assert run(reg.call("add", {"a": 1, "b": 2})).content == "3"
    assert sent == [("add", {"a": 1, "b": 2})]


@needs_mcp
def test_register_is_all_or_nothing_on_a_name_clash(src):
    reg = ToolRegistry()
    reg.tool(lambda: "mine", name="echo")
    with pytest.raises(ToolError, match="echo"):
        src.register(reg)
    assert reg.names() == ["echo"]
    src.register(reg, prefix="fx")
    assert "fx__echo" in reg and "fx__add" in reg


# ------------------------------------------------------------------ lifetime


@needs_mcp
def test_closing_reaps_the_subprocess_and_fails_calls_in_flight():
    async def go():
        async with fixture_source(close_timeout_s=8) as s:
            reg = ToolRegistry()
            s.register(reg, timeout_s=60)
            pid = int((await reg.call("pid", {})).content)
            assert not reaped(pid)
            in_flight = asyncio.create_task(reg.call("slow", {"seconds": 60}))
            await asyncio.sleep(0.3)
        # leaving `async with` waited for the server: it is gone, not a zombie
        assert reaped(pid), f"MCP server {pid} still in the process table"
        r = await in_flight
        assert not r.ok and r.error == "exception" and "closed" in r.content
        after = await reg.call("add", {"a": 1, "b": 2})
        assert not after.ok and after.error == "exception" and "not open" in after.content
        assert not s.is_open
        await s.aclose()  # a second close is a no-op

    t0 = time.perf_counter()
    run(go(), timeout_s=30)
    assert time.perf_counter() - t0 < 15


@needs_mcp
def test_a_source_opens_and_closes_from_different_event_loops_and_sync_code():
    s = run(fixture_source().open())
    pid = int(run(s.call_tool("pid")))
    assert run(s.call_tool("add", {"a": 5, "b": 6})) == "11"
    s.close()
    assert reaped(pid) and not s.is_open


@needs_mcp
def test_a_server_that_cannot_start_gives_a_clear_error(tmp_path):
    with pytest.raises(McpSourceError, match=r"did not start: cannot run '/nonexistent/mcp-server'"):
        run(McpToolSource("/nonexistent/mcp-server", ["--stdio"]).open())

    # exits before speaking the protocol: the error carries the end of its stderr
    with pytest.raises(McpSourceError, match=r"(?s)did not start: initialize failed.*refusing to start"):
        run(McpToolSource(sys.executable, [FIXTURE, "--crash"], startup_timeout_s=10).open())

    # runs but never answers: the startup timeout, and the process is killed
    pid_file = tmp_path / "pid"
    silent = McpToolSource(sys.executable, ["-c", SILENT, str(pid_file)], name="silent", startup_timeout_s=1)
    t0 = time.perf_counter()
    with pytest.raises(McpSourceError, match=r"'silent'.*no answer to initialize within 1 s"):
        run(silent.open())
    assert time.perf_counter() - t0 < 10
    assert reaped(int(pid_file.read_text()))
    assert not silent.is_open
    with pytest.raises(McpSourceError, match="not open"):
        silent.tools()


@needs_mcp
def test_an_open_given_up_on_mid_start_takes_the_process_down(tmp_path):
    pid_file = tmp_path / "pid"
    with pytest.raises(asyncio.TimeoutError):
        run(asyncio.wait_for(McpToolSource(sys.executable, ["-c", SILENT, str(pid_file)]).open(), 1.5))
    assert reaped(int(pid_file.read_text()))


@needs_mcp
def test_missing_sdk_says_how_to_install(monkeypatch):
    for mod in [m for m in sys.modules if m == "mcp" or m.startswith("mcp.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "mcp", None)
    with pytest.raises(ImportError, match=r"pip install metroline\[mcp\]"):
        run(McpToolSource(sys.executable, [FIXTURE]).open())


# ------------------------------------------------------------------ names, specs and config files


def test_tool_names_follow_the_registry_rule():
    assert _tool_name(None, "read_file") == "read_file"
    assert _tool_name("my.server", "fs/read.v2") == "my_server__fs_read_v2"
    assert _tool_name(None, "2fa") == "_2fa"
    long = _tool_name("srv", "x" * 100)
    assert len(long) == 64 and long != _tool_name("srv", "x" * 99)
    ToolRegistry().add(Tool(long, "d", {"type": "object"}, lambda: None))  # the registry accepts it


def test_parse_mcp_spec():
    s = parse_mcp_spec("mcp:python -m mypkg.server --root '/data dir'")
    assert (s.name, s.command, s.args) == ("server", "python", ["-m", "mypkg.server", "--root", "/data dir"])
    s = parse_mcp_spec("mcp:fs=npx -y @modelcontextprotocol/server-filesystem /tmp")
    assert (s.name, s.command, s.args) == ("fs", "npx", ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"])
    assert parse_mcp_spec("mcp:node build/index.js").name == "index"
    assert parse_mcp_spec("mcp:/usr/bin/weather-mcp").name == "weather-mcp"
    for bad in ("python -m x", "mcp:", "mcp:   ", "mcp:python 'unclosed"):
        with pytest.raises(McpConfigError):
            parse_mcp_spec(bad)


def test_load_mcp_config_in_claude_desktop_shape(tmp_path):
    cfg = tmp_path / "mcp.json"
    cfg.write_text(json.dumps({"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "server-filesystem", "/data"], "env": {"TOKEN": "t"}},
        "local": {"command": "python", "args": ["-m", "srv", 8080], "cwd": "servers"},
        "off": {"command": "x", "disabled": True},
        "remote": {"url": "https://example.com/mcp"},
    }}))
    specs = load_mcp_config(cfg)
    assert [s.name for s in specs] == ["files", "local"]
    assert specs[0] == McpServerSpec("files", "npx", ["-y", "server-filesystem", "/data"], {"TOKEN": "t"}, None)
    assert specs[1].args == ["-m", "srv", "8080"] and specs[1].cwd == str(tmp_path / "servers")
    assert mcp_specs(str(cfg)) == specs
    assert [s.name for s in mcp_specs("mcp:python -m a.b")] == ["b"]
    src = specs[0].source(startup_timeout_s=5)
    assert (src.name, src.command, src.env, src.startup_timeout_s) == ("files", "npx", {"TOKEN": "t"}, 5)

    vscode = tmp_path / "vscode.json"
    vscode.write_text(json.dumps({"servers": {"a": {"type": "stdio", "command": "a"},
                                              "b": {"type": "http", "url": "http://localhost"}}}))
    assert [s.name for s in load_mcp_config(vscode)] == ["a"]


@pytest.mark.parametrize("content, message", [
    ("{", "not JSON"),
    ('{"servers": []}', "mcpServers"),
    ('{"mcpServers": {"a": {"args": []}}}', "server 'a'.*command"),
    ('{"mcpServers": {"a": {"command": "x", "args": "-v"}}}', "server 'a'.*args"),
    ('{"mcpServers": {"a": {"command": "x", "env": {"N": 1}}}}', "server 'a'.*env"),
    ('{"mcpServers": {"a": "x"}}', "server 'a'.*object"),
])
def test_load_mcp_config_errors_name_the_file_and_entry(tmp_path, content, message):
    cfg = tmp_path / "bad.json"
    cfg.write_text(content)
    with pytest.raises(McpConfigError, match=f"bad.json.*{message}"):
        load_mcp_config(cfg)
    with pytest.raises(McpConfigError, match="cannot read"):
        load_mcp_config(tmp_path / "missing.json")


@needs_mcp
def test_the_agent_cli_registers_mcp_tools_with_the_builtins_and_closes_them(tmp_path):
    """`metroline agent run|resume --mcp`: the server's tools (SERVER__tool) next to the built-in
    ones asked for, callable; a server that cannot start is a one-line error, not a traceback."""
    import argparse
    import subprocess

    from metroline.agents.cli import _close, _tools
    from metroline.errors import MetrolineError

    spec = f"mcp:fx={shlex.quote(sys.executable)} {shlex.quote(FIXTURE)}"
    args = argparse.Namespace(mcp=[spec], sandbox=None)
    reg, sources = _tools(args, ["calculator", "fx__add"])  # resume passes the run's names: MCP ones too
    try:
        assert "calculator" in reg and "fx__add" in reg and "fx__echo" in reg
        assert run(reg.call("fx__add", {"a": 2, "b": 3})).content == "5"
        assert run(reg.call("calculator", {"expression": "2+3"})).content == "5"
    finally:
        _close(sources)
    assert not sources[0].is_open
    # resume without the server: its tools are left out (the runtime refuses their calls)
    reg, sources = _tools(argparse.Namespace(mcp=[], sandbox=None), ["calculator", "fx__add"], strict=False)
    assert reg.names() == ["calculator"] and sources == []
    with pytest.raises(MetrolineError, match="cannot run '/nonexistent/mcp-server'"):
        _tools(argparse.Namespace(mcp=["mcp:/nonexistent/mcp-server"], sandbox=None), [])
    proc = subprocess.run([sys.executable, "-m", "metroline.cli", "agent", "run", "x", "--mcp",
                           "mcp:/nonexistent/mcp-server", "--store", str(tmp_path / "r.sqlite3")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
