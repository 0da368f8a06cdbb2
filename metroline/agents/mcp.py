"""MCP servers over stdio as a source of tools for metroline's agents (the official `mcp` SDK,
1.x or 2.x; `pip install metroline[mcp]`).

    async with McpToolSource(sys.executable, ["-m", "mypkg.server"], name="files") as src:
        src.register(registry, prefix="files")      # files__read, files__search, ... as Tools
        await registry.call("files__read", {"path": "a.txt"})

    src = await McpToolSource("npx", ["-y", "some-server"]).open()   # a long-lived runtime
    ...
    await src.aclose()                                                # or src.close() from sync code

Each MCP tool becomes a `Tool`: its name (optionally `PREFIX__name`; characters outside the
registry's rule become `_`, a name over 64 characters is shortened with a hash), description,
`inputSchema` as the parameters (so ToolRegistry validates arguments before anything is sent),
`idempotent` True when the server marks it `readOnlyHint` or `idempotentHint`, else False, and
an async fn that sends `tools/call`. The result's text parts are joined into the observation
(images, audio and resources as short placeholders; structured content as JSON when there is no
text); a result with `isError` raises McpToolError, so ToolRegistry.call reports it as
ToolResult(ok=False, error="exception"). A tool whose schema is not a valid JSON schema is left
out with a warning (`src.skipped`): ToolRegistry could not validate calls against it.

Lifetime and tasks. The SDK's stdio client and session are anyio task groups, which must be
entered and exited by the same task, and its streams belong to one event loop. So each source
runs its own thread with its own event loop, and one task there (the owner) enters the stdio
client and the session, runs `initialize` and `tools/list`, then waits for the stop signal and
exits both in order. A call from any event loop (or from several, e.g. one `asyncio.run` per
agent run) is submitted to that loop with run_coroutine_threadsafe and awaited through
asyncio.wrap_future; cancelling the caller (ToolRegistry's timeout_s) cancels the request in the
owner loop. Closing signals the owner, which cancels the calls in flight (they fail with
McpSourceError) and leaves the SDK's contexts: the SDK closes the server's stdin, then sends
SIGTERM and SIGKILL to its process group if it has not exited (about 2 s each), and reaps it.
A failed start (no such command, a server that exits, no answer to `initialize` within
startup_timeout_s) unwinds the same way and raises McpSourceError with the end of the server's
stderr. By default the server's stderr goes to a pipe read by a small thread: its last lines are
kept for those messages and each line is logged at DEBUG under metroline.agents.mcp.

Configuration for the CLI (`metroline agent run --mcp ...`): `parse_mcp_spec("mcp:[NAME=]COMMAND
ARGS...")` reads one server from a command line (shell-style quoting); `load_mcp_config(path)`
reads a JSON file in Claude Desktop's shape, `{"mcpServers": {"name": {"command": ...,
"args": [...], "env": {...}, "cwd": ...}}}` (also VS Code's `"servers"` key); `mcp_specs(value)`
takes either. Each gives McpServerSpec objects; `spec.source()` makes the McpToolSource. The
server's environment is the SDK's safe default (HOME, PATH, ... on POSIX) plus `env`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shlex
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from metroline.agents.tools import Tool, ToolError, ToolRegistry

__all__ = ["McpToolSource", "McpServerSpec", "McpSourceError", "McpToolError", "McpConfigError",
           "parse_mcp_spec", "load_mcp_config", "mcp_specs"]

logger = logging.getLogger(__name__)

try:
    _Group: Any = BaseExceptionGroup
except NameError:  # Python 3.10: anyio's backport
    try:
        from exceptiongroup import BaseExceptionGroup as _Group
    except ImportError:
        _Group = ()

_INSTALL_HINT = "the MCP tool source needs the `mcp` package: pip install metroline[mcp]"
_NAME_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_STDERR_LINES = 40


class McpSourceError(RuntimeError):
    """An MCP server that cannot be started, answered badly, or is closed."""


class McpToolError(RuntimeError):
    """A tool call the server answered with isError: its text is the message."""


class McpConfigError(ValueError):
    """An MCP server spec or config file that cannot be used."""


def _import_mcp():
    try:
        import mcp
        from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return mcp, StdioServerParameters, stdio_client, get_default_environment


def _attr(obj, *names, default=None):
    """The first present attribute: mcp 2.x names fields in snake_case, 1.x in camelCase."""
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return default


def _root_cause(e: BaseException) -> BaseException:
    while isinstance(e, _Group) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def _tool_name(prefix: str | None, name: str) -> str:
    full = f"{prefix}__{name}" if prefix else name
    full = re.sub(r"[^A-Za-z0-9_-]", "_", full)
    if not re.match(r"[A-Za-z_]", full):
        full = "_" + full
    if len(full) > 64:
        full = full[:55] + "_" + hashlib.sha1(full.encode()).hexdigest()[:8]
    return full


def content_text(result) -> str:
    """The text of a CallToolResult: text parts joined by newlines, placeholders for the rest."""
    parts = []
    for c in _attr(result, "content", default=[]) or []:
        kind = getattr(c, "type", None)
        if kind == "text":
            parts.append(c.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind}: {_attr(c, 'mime_type', 'mimeType', default='?')}, "
                         f"{len(getattr(c, 'data', '') or '')} base64 characters]")
        elif kind == "resource":
            r = c.resource
            text = getattr(r, "text", None)
            parts.append(text if text is not None else
                         f"[resource {r.uri}: {_attr(r, 'mime_type', 'mimeType', default='binary')}]")
        elif kind == "resource_link":
            parts.append(f"[resource link: {c.uri}]")
        else:
            parts.append(f"[{kind} content]")
    if not parts:
        structured = _attr(result, "structured_content", "structuredContent")
        if structured is not None:
            return json.dumps(structured, ensure_ascii=False, default=str)
    return "\n".join(parts)


class _StderrTail:
    """A pipe for the server's stderr: a daemon thread logs each line and keeps the last few."""

    def __init__(self, name: str):
        r, w = os.pipe()
        self.file = open(w, "w", closefd=True)  # what the child gets; ours is closed once spawned
        self.lines: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._log = logger.getChild(re.sub(r"[^A-Za-z0-9_-]", "_", name))
        self._thread = threading.Thread(target=self._read, args=(r,), name=f"mcp-stderr-{name}", daemon=True)
        self._thread.start()

    def _read(self, fd: int) -> None:
        with open(fd, "r", encoding="utf-8", errors="replace", closefd=True) as f:
            for line in f:
                line = line.rstrip("\n")
                self.lines.append(line)
                self._log.debug("%s", line)

    def close_writer(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()

    def text(self, wait_s: float = 1.0) -> str:
        self.close_writer()
        self._thread.join(wait_s)  # the server is gone: let the reader reach the end
        return "\n".join(self.lines)


class McpToolSource:
    """One MCP server over stdio and its tools. Use as `async with`, or open() / aclose()."""

    def __init__(self, command: str, args: Sequence[str] = (), *, env: dict[str, str] | None = None,
                 cwd: str | None = None, name: str | None = None, startup_timeout_s: float = 30.0,
                 close_timeout_s: float = 15.0, stderr=None):
        """startup_timeout_s bounds initialize + tools/list; close_timeout_s bounds a close (the
        SDK's own stop sequence takes at most ~7 s). stderr: None keeps the server's stderr (last
        lines in errors, DEBUG log lines); a file object with a fileno (e.g. sys.stderr) passes
        it through instead."""
        self.command, self.args = command, [str(a) for a in args]
        self.env, self.cwd = dict(env) if env else None, cwd
        self.name = name or _default_name([command, *self.args]) or "mcp"
        self.startup_timeout_s, self.close_timeout_s = startup_timeout_s, close_timeout_s
        self._stderr_file = stderr
        self._stderr: _StderrTail | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self._session = None
        self._calls: set[asyncio.Task] = set()
        self._closing = False
        self.server_info: Any = None
        self.mcp_tools: list = []  # the server's tool descriptions (mcp.types.Tool)
        self.skipped: dict[str, str] = {}  # tool name -> why register() left it out

    def __repr__(self) -> str:
        return f"McpToolSource({self.name!r}, {self.cmdline!r}, open={self.is_open})"

    @property
    def cmdline(self) -> str:
        return shlex.join([self.command, *self.args])

    @property
    def is_open(self) -> bool:
        return self._session is not None and not self._closing

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> "McpToolSource":
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def open(self) -> "McpToolSource":
        """Start the server, initialize, list its tools. Raises McpSourceError (the subprocess
        is gone by then) or ImportError when `mcp` is not installed."""
        _import_mcp()
        if self._thread is not None:
            raise McpSourceError(f"MCP server {self.name!r} is already open")
        self._closing = False
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name=f"mcp-{self.name}",
                                        daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:  # a failed start (already unwound) or the caller cancelled
            await asyncio.shield(asyncio.to_thread(self._shutdown))
            raise
        return self

    async def aclose(self) -> None:
        """Stop the server (calls in flight fail) and wait until its process is reaped; a no-op
        when not open. McpSourceError if it takes over close_timeout_s."""
        await asyncio.to_thread(self._shutdown)

    def close(self) -> None:
        """aclose() for synchronous code (blocks until the server is stopped)."""
        self._shutdown()

    def _shutdown(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._closing = True  # before reading the loop: see the check at the top of _owner
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(self._signal_stop)
        thread.join(self.close_timeout_s)
        if thread.is_alive():  # never expected: the SDK bounds every wait; do not hang the caller
            raise McpSourceError(f"MCP server {self.name!r} did not stop within {self.close_timeout_s:g} s")
        self._thread = self._loop = self._main = self._stop = None

    def _signal_stop(self) -> None:
        for t in list(self._calls):
            t.cancel()
        if self._session is not None and self._stop is not None:
            self._stop.set()  # started: leave the contexts in order
        elif self._main is not None:
            self._main.cancel()  # still starting: interrupt it

    def _thread_main(self, ready: concurrent.futures.Future) -> None:
        try:
            asyncio.run(self._owner(ready))
        except BaseException as e:  # asyncio.run itself failed: never leave open() waiting
            if not ready.done():
                ready.set_exception(McpSourceError(f"MCP server {self.name!r}: {type(e).__name__}: {e}"))

    async def _owner(self, ready: concurrent.futures.Future) -> None:
        """The one task that enters and exits the SDK's contexts."""
        import anyio

        mcp, StdioServerParameters, stdio_client, default_env = _import_mcp()
        self._loop, self._main, self._stop = asyncio.get_running_loop(), asyncio.current_task(), asyncio.Event()
        if self._closing:  # closed before this thread got going (_shutdown saw no loop yet)
            ready.set_exception(McpSourceError(f"MCP server {self.name!r} was closed while starting"))
            return
        env = {**default_env(), **(self.env or {})}
        params = StdioServerParameters(command=self.command, args=self.args, env=env, cwd=self.cwd)
        self._stderr = _StderrTail(self.name) if self._stderr_file is None else None
        errlog = self._stderr.file if self._stderr is not None else self._stderr_file
        stage = "start"
        try:
            async with stdio_client(params, errlog=errlog) as (read, write):
                if self._stderr is not None:
                    self._stderr.close_writer()  # the child holds its own copy
                stage = "initialize"
                async with mcp.ClientSession(read, write) as session:
                    with anyio.fail_after(self.startup_timeout_s):
                        init = await session.initialize()
                        stage = "tools/list"
                        has_tools = getattr(_attr(init, "capabilities"), "tools", None) is not None
                        self.mcp_tools = await _list_tools(session) if has_tools else []
                    self.server_info = _attr(init, "server_info", "serverInfo")
                    # The session is in place before open() returns (it may call tools() at once).
                    self._session = session
                    try:
                        ready.set_result(None)
                    except concurrent.futures.InvalidStateError:  # open() gave up (cancelled)
                        self._session = None
                        return
                    try:
                        await self._stop.wait()
                    finally:
                        self._session = None
                        for t in list(self._calls):
                            t.cancel()
                        if self._calls:
                            await asyncio.wait(list(self._calls), timeout=5)
        except BaseException as e:
            if ready.done():
                if not isinstance(e, asyncio.CancelledError):
                    logger.warning("MCP server %r ended: %s", self.name, _root_cause(e))
                return
            cause = _root_cause(e)
            if isinstance(cause, asyncio.CancelledError):
                msg = "cancelled while starting"
            elif isinstance(cause, TimeoutError) and stage != "start":
                msg = f"no answer to {stage} within {self.startup_timeout_s:g} s"
            elif stage == "start" and isinstance(cause, OSError):
                msg = f"cannot run {self.command!r}: {cause}"
            else:
                msg = f"{stage} failed: {type(cause).__name__}: {cause}"
            tail = self._stderr.text() if self._stderr is not None else ""
            err = McpSourceError(f"MCP server {self.name!r} ({self.cmdline}) did not start: {msg}"
                                 + (f"\n--- its stderr ended with:\n{tail}" if tail.strip() else ""))
            ready.set_exception(err)
        finally:
            if self._stderr is not None:
                self._stderr.close_writer()

    # ------------------------------------------------------------------ calls

    async def call_tool(self, name: str, arguments: dict | None = None) -> str:
        """Call one tool by its MCP name; the result's text, McpToolError for isError."""
        loop = self._loop
        if loop is None or self._session is None or self._closing:
            raise McpSourceError(f"MCP server {self.name!r} is not open")
        try:
            fut = asyncio.run_coroutine_threadsafe(self._call(name, arguments or {}), loop)
        except RuntimeError:  # its loop has ended
            raise McpSourceError(f"MCP server {self.name!r} is closed") from None
        return await asyncio.wrap_future(fut)

    async def _call(self, name: str, arguments: dict) -> str:
        session = self._session
        if session is None:
            raise McpSourceError(f"MCP server {self.name!r} is closed")
        task = asyncio.current_task()
        self._calls.add(task)
        try:
            result = await session.call_tool(name, arguments)
        except asyncio.CancelledError:
            if self._closing:
                raise McpSourceError(f"MCP server {self.name!r} was closed during the call") from None
            raise
        finally:
            self._calls.discard(task)
        text = content_text(result)
        if _attr(result, "is_error", "isError", default=False):
            raise McpToolError(text or f"{name} reported an error")
        return text

    # ------------------------------------------------------------------ tools

    def tools(self, *, prefix: str | None = None, timeout_s: float = 30.0, max_concurrency: int = 4,
              include: Sequence[str] | None = None) -> list[Tool]:
        """The server's tools as metroline Tools (named PREFIX__name when a prefix is given;
        only those in `include`, MCP names, when given). Needs an open source."""
        import jsonschema

        if self._session is None:
            raise McpSourceError(f"MCP server {self.name!r} is not open")
        out, self.skipped = [], {}
        for t in self.mcp_tools:
            if include is not None and t.name not in include:
                continue
            schema = _attr(t, "input_schema", "inputSchema", default={}) or {}
            schema = dict(schema) if isinstance(schema, dict) else None
            try:
                if schema is None or schema.get("type", "object") != "object":
                    raise ValueError("the input schema is not an object schema")
                schema.setdefault("type", "object")
                jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator).check_schema(schema)
            except (ValueError, jsonschema.SchemaError) as e:
                reason = getattr(e, "message", str(e))
                self.skipped[t.name] = reason
                logger.warning("MCP server %r: tool %r left out: %s", self.name, t.name, reason)
                continue
            ann = getattr(t, "annotations", None)
            idempotent = bool(ann is not None and (_attr(ann, "read_only_hint", "readOnlyHint")
                                                   or _attr(ann, "idempotent_hint", "idempotentHint")))
            description = t.description or _attr(t, "title") or f"{t.name} (MCP server {self.name})"
            out.append(Tool(_tool_name(prefix, t.name), description, schema, self._bound(t.name),
                            timeout_s=timeout_s, max_concurrency=max_concurrency, idempotent=idempotent))
        return out

    def _bound(self, mcp_name: str):
        async def call(**arguments):
            return await self.call_tool(mcp_name, arguments)
        call.__name__ = call.__qualname__ = _tool_name(None, mcp_name)
        return call

    def register(self, registry: ToolRegistry, **kw) -> list[Tool]:
        """Add tools() to `registry`, all or none: a clashing name raises ToolError and adds nothing."""
        tools = self.tools(**kw)
        names = [t.name for t in tools]
        clashes = sorted({n for n in names if n in registry or names.count(n) > 1})
        if clashes:
            raise ToolError(f"MCP server {self.name!r}: tool names already taken: {', '.join(clashes)} "
                            "(register with a prefix)")
        for t in tools:
            registry.add(t)
        return tools


async def _list_tools(session) -> list:
    takes_params = "params" in inspect.signature(session.list_tools).parameters
    tools, cursor = [], None
    for _ in range(1000):
        if cursor is None:
            res = await session.list_tools()
        elif takes_params:  # mcp 2.x
            from mcp.types import PaginatedRequestParams
            res = await session.list_tools(params=PaginatedRequestParams(cursor=cursor))
        else:  # mcp 1.x
            res = await session.list_tools(cursor=cursor)
        tools.extend(res.tools)
        cursor = _attr(res, "next_cursor", "nextCursor")
        if not cursor:
            break
    return tools


# ------------------------------------------------------------------ configuration


@dataclass
class McpServerSpec:
    """How to start one MCP server (stdio)."""
    name: str
    command: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: str | None = None

    def source(self, **kw) -> McpToolSource:
        """An McpToolSource for this server (kw: startup_timeout_s, close_timeout_s, stderr)."""
        return McpToolSource(self.command, self.args, env=self.env, cwd=self.cwd, name=self.name, **kw)


def _default_name(argv: list[str]) -> str:
    """A server's name from its command line: the module after -m, else a script's stem, else
    the command's base name."""
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1].rsplit(".", 1)[-1]
    for a in reversed(argv[1:]):
        if re.search(r"\.(py|js|mjs|ts)$", a):
            return os.path.splitext(os.path.basename(a))[0]
    return os.path.basename(argv[0])


def parse_mcp_spec(text: str) -> McpServerSpec:
    """`mcp:[NAME=]COMMAND ARGS...` (shell-style quoting, no shell) -> McpServerSpec.
    `mcp:python -m mypkg.server` is named `server`; `mcp:fs=npx -y server-filesystem /data` `fs`."""
    if not text.startswith("mcp:"):
        raise McpConfigError(f"an MCP server spec starts with 'mcp:': {text!r}")
    try:
        argv = shlex.split(text[4:])
    except ValueError as e:
        raise McpConfigError(f"{text!r}: {e}") from None
    name = None
    if argv:
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_-]*)=(.+)$", argv[0])
        if m:
            name, argv[0] = m.group(1), m.group(2)
    if not argv:
        raise McpConfigError(f"{text!r}: no command")
    return McpServerSpec(name or _default_name(argv), argv[0], argv[1:])


def load_mcp_config(path: str | os.PathLike) -> list[McpServerSpec]:
    """The stdio servers of a JSON config in Claude Desktop's shape: {"mcpServers": {NAME:
    {"command": str, "args": [str], "env": {str: str}, "cwd": str}}} ("servers" as in VS Code's
    mcp.json also works). A relative cwd is taken from the file's folder; entries with
    "disabled": true, and remote ones ("url", or a "type" other than stdio), are left out (the
    latter with a warning). McpConfigError names the file and the entry for anything malformed."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise McpConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise McpConfigError(f"{path}: not JSON: {e.msg} at line {e.lineno}") from None
    servers = data.get("mcpServers", data.get("servers")) if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise McpConfigError(f"{path}: expected an object with \"mcpServers\": {{name: {{command, args}}}}")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for name, entry in servers.items():
        where = f"{path}: server {name!r}"
        if not isinstance(entry, dict):
            raise McpConfigError(f"{where}: expected an object")
        if entry.get("disabled"):
            continue
        if "url" in entry or entry.get("type", "stdio") != "stdio":
            logger.warning("%s: left out, only stdio servers are supported", where)
            continue
        command, args, env, cwd = entry.get("command"), entry.get("args", []), entry.get("env"), entry.get("cwd")
        if not isinstance(command, str) or not command:
            raise McpConfigError(f"{where}: \"command\" must be a non-empty string")
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
            raise McpConfigError(f"{where}: \"args\" must be a list of strings")
        if env is not None and not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
            raise McpConfigError(f"{where}: \"env\" must map names to strings")
        if cwd is not None and not isinstance(cwd, str):
            raise McpConfigError(f"{where}: \"cwd\" must be a string")
        out.append(McpServerSpec(str(name), command, [str(a) for a in args], dict(env) if env else None,
                                 os.path.join(base, os.path.expanduser(cwd)) if cwd else None))
    return out


def mcp_specs(value: str) -> list[McpServerSpec]:
    """A `--mcp` value: `mcp:COMMAND ...` for one server, else the path of a JSON config."""
    return [parse_mcp_spec(value)] if value.startswith("mcp:") else load_mcp_config(value)
