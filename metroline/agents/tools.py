"""Tools an agent calls: Python functions registered with a decorator, their JSON schema read
from the type hints, each call with a timeout, a concurrency limit and its errors captured (a
failing tool is an observation for the model, never a crash of the run).

    registry = ToolRegistry()

    @registry.tool(timeout_s=5, idempotent=True)
    def add(a: int, b: int = 1) -> int:
        "Add two integers."
        return a + b

    registry.specs()                      # OpenAI `tools` entries (structured.tools parses them)
    await registry.call("add", '{"a": 2}')  # ToolResult(ok=True, content="3", ...)

Built-in tools for demos and tests (`builtin_tools()`): calculator (arithmetic on an AST, no
eval), clock, a key-value notebook, and file reading under a sandbox folder.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import contextvars
import enum
import inspect
import json
import math
import operator
import os
import re
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from metroline import faults

__all__ = ["Tool", "ToolResult", "ToolRegistry", "ToolError", "schema_of", "builtin_tools", "calculate"]


class ToolError(ValueError):
    """A tool definition or call that cannot be made (bad schema, unknown tool, bad arguments)."""


@dataclass
class ToolResult:
    name: str
    ok: bool
    content: str  # what the model sees: the result as text, or the error's message
    error: str | None = None  # "invalid_arguments" | "timeout" | "exception" | "unknown_tool"
    duration_s: float = 0.0


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., Any]
    timeout_s: float = 30.0
    max_concurrency: int = 4
    idempotent: bool = False  # safe to run again when its outcome is unknown (a restart mid-call)
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


# ------------------------------------------------------------------ schemas from type hints

_PRIMITIVES = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
               bool: {"type": "boolean"}, type(None): {"type": "null"}}


def _schema_of_type(tp) -> dict:
    if tp in _PRIMITIVES:
        return dict(_PRIMITIVES[tp])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        subs = [_schema_of_type(a) for a in args]
        return subs[0] if len(subs) == 1 else {"anyOf": subs}
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        item = args[0] if args else None
        return {"type": "array", **({"items": _schema_of_type(item)} if item not in (None, Ellipsis) else {})}
    if origin is dict or tp is dict:
        out: dict = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _schema_of_type(args[1])
        return out
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if tp is Any or tp is inspect.Parameter.empty:
        return {}
    raise ToolError(f"no JSON schema for the type {tp!r}")


def _arg_docs(doc: str) -> dict[str, str]:
    """`name: text` lines of a docstring's Args: section."""
    out, in_args = {}, False
    for line in doc.splitlines():
        s = line.strip()
        if s.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            m = re.match(r"(\w+)\s*(\([^)]*\))?\s*:\s*(.+)", s)
            if m:
                out[m.group(1)] = m.group(3)
            elif not s:
                in_args = False
    return out


def schema_of(fn: Callable) -> tuple[str, dict]:
    """(description, JSON schema of the arguments) of `fn` from its signature and docstring."""
    hints = typing.get_type_hints(fn)
    doc = inspect.getdoc(fn) or ""
    docs = _arg_docs(doc)
    props, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolError(f"tool {fn.__name__}: *args / **kwargs have no schema")
        s = _schema_of_type(hints.get(name, inspect.Parameter.empty))
        if name in docs:
            s["description"] = docs[name]
        if p.default is p.empty:
            required.append(name)
        elif p.default is None or isinstance(p.default, (int, float, str, bool)):
            s["default"] = p.default
        props[name] = s
    schema = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return (doc.split("\n\n")[0].strip() or fn.__name__), schema


# ------------------------------------------------------------------ the registry


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class ToolRegistry:
    def __init__(self, tools: list[Tool] | None = None):
        self._tools: dict[str, Tool] = {}
        for t in tools or []:
            self.add(t)

    def add(self, t: Tool) -> Tool:
        if not _NAME.match(t.name):
            raise ToolError(f"tool name {t.name!r}: letters, digits, _ and -, at most 64")
        if t.name in self._tools:
            raise ToolError(f"a tool named {t.name!r} is already registered")
        if t.timeout_s <= 0 or t.max_concurrency < 1:
            raise ToolError(f"tool {t.name!r}: timeout_s must be > 0 and max_concurrency >= 1")
        self._tools[t.name] = t
        return t

    def tool(self, fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
             timeout_s: float = 30.0, max_concurrency: int = 4, idempotent: bool = False):
        """Decorator: register `fn` as a tool (usable bare, @registry.tool, or with options)."""
        def register(f: Callable) -> Callable:
            desc, params = schema_of(f)
            self.add(Tool(name or f.__name__, description or desc, params, f, timeout_s, max_concurrency,
                          idempotent))
            return f
        return register(fn) if fn is not None else register

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self, names: list[str] | None = None) -> list[dict]:
        """OpenAI `tools` entries of these tools (all by default)."""
        return [self._tools[n].spec() for n in (names or self._tools) if n in self._tools]

    async def call(self, name: str, arguments: str | dict | None) -> ToolResult:
        """Run one call. Never raises for what the model chose: an unknown tool, arguments that
        do not parse or do not match the schema, an exception or a timeout come back as a
        ToolResult with ok False and a message the model can read."""
        t0 = time.perf_counter()
        t = self._tools.get(name)
        if t is None:
            return ToolResult(name, False, f"error: no tool named {name!r} (tools: {', '.join(self._tools)})",
                              "unknown_tool")
        try:
            args = _parse_arguments(arguments, t.parameters)
        except ToolError as e:
            return ToolResult(name, False, f"error: {e}", "invalid_arguments", time.perf_counter() - t0)
        if t._slots is None:
            t._slots = asyncio.Semaphore(t.max_concurrency)
        async with t._slots:
            try:
                if faults.ACTIVE:  # a test's injected failure or stall, inside the timeout
                    await asyncio.wait_for(asyncio.to_thread(faults.hit, "tool", name), t.timeout_s)
                if inspect.iscoroutinefunction(t.fn):
                    value = await asyncio.wait_for(t.fn(**args), t.timeout_s)
                else:
                    value = await asyncio.wait_for(asyncio.to_thread(t.fn, **args), t.timeout_s)
            except asyncio.TimeoutError:
                return ToolResult(name, False, f"error: {name} did not answer within {t.timeout_s:g} s", "timeout",
                                  time.perf_counter() - t0)
            except Exception as e:  # the tool's own failure: an observation, not a crash
                return ToolResult(name, False, f"error: {type(e).__name__}: {e}", "exception",
                                  time.perf_counter() - t0)
        return ToolResult(name, True, _as_text(value), None, time.perf_counter() - t0)


def _parse_arguments(arguments, schema: dict) -> dict:
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ToolError(f"arguments are not JSON: {e.msg} at {e.pos}") from None
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object")
    import jsonschema

    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ToolError(f"{'at ' + where + ': ' if where else ''}{e.message}") from None
    return arguments


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


# ------------------------------------------------------------------ built-in tools

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {n: getattr(math, n) for n in ("sqrt", "exp", "log", "log10", "log2", "sin", "cos", "tan", "asin",
                                         "acos", "atan", "floor", "ceil", "factorial", "gcd", "hypot")}
_FUNCS.update(abs=abs, round=round, min=min, max=max)
_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
_WORDS = "|".join(sorted([*_FUNCS, *_CONSTS], key=len, reverse=True))
CALCULATOR_PATTERN = f"^(?:[-(0-9]|{_WORDS})(?:[-+*/%(). ,0-9]|{_WORDS})*$"
_MAX_POWER = 10_000  # |exponent| and factorial argument bounds: no expression may run for minutes
_MAX_DIGITS = 10_000


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic on the expression's syntax tree: numbers, + - * / // % **, parentheses,
    pi / e / tau and a few math functions. Names, attributes, strings and anything else are
    refused (ValueError); so are powers and factorials big enough to stall the process."""
    if len(expression) > 2000:
        raise ValueError("expression longer than 2000 characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return n.value
        if isinstance(n, ast.Name) and n.id in _CONSTS:
            return _CONSTS[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in _BINARY:
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Pow) and (abs(b) > _MAX_POWER or (isinstance(a, int) and isinstance(b, int)
                                                                      and abs(a) > 1 and abs(b) * math.log10(abs(a)) > _MAX_DIGITS)):
                raise ValueError("power too large")
            out = _BINARY[type(n.op)](a, b)
            if isinstance(out, int) and out.bit_length() > 4 * _MAX_DIGITS:
                raise ValueError("result too large")
            return out
        if isinstance(n, ast.UnaryOp) and type(n.op) in _UNARY:
            return _UNARY[type(n.op)](ev(n.operand))
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FUNCS and not n.keywords):
            args = [ev(a) for a in n.args]
            if n.func.id == "factorial" and (len(args) != 1 or args[0] > 2000):
                raise ValueError("factorial argument too large")
            return _FUNCS[n.func.id](*args)
        raise ValueError(f"not allowed in an expression: {ast.dump(n)[:60]}")

    try:
        value = ev(tree)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except (OverflowError, TypeError) as e:
        raise ValueError(str(e)) from None
    if isinstance(value, complex):
        raise ValueError("complex result")
    return value


# The notebook of the agent run whose tool call is running (set by the runtime around each call;
# asyncio tasks and to_thread carry it along). None: the registry's own notebook.
_RUN_NOTEBOOK: contextvars.ContextVar[dict | None] = contextvars.ContextVar("metroline_run_notebook",
                                                                           default=None)
NOTEBOOK_WRITE = "notebook_set"


@contextlib.contextmanager
def run_notebook(book: dict):
    """Inside this block the notebook tools read and write `book` (one agent run's notes)."""
    token = _RUN_NOTEBOOK.set(book)
    try:
        yield book
    finally:
        _RUN_NOTEBOOK.reset(token)


def replay_notebook(calls) -> dict:
    """A run's notebook rebuilt from its successful tool calls, (name, arguments) in order:
    the notes are the fold of its notebook_set calls, so they live in the run's trace and come
    back with it after a restart (no second copy to keep in step)."""
    book: dict = {}
    for name, arguments in calls:
        if name != NOTEBOOK_WRITE:
            continue
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                continue
        if isinstance(arguments, dict) and isinstance(arguments.get("key"), str) \
                and isinstance(arguments.get("value"), str):
            book[arguments["key"]] = arguments["value"][:100_000]
    return book


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def check_url(url: str, allowed_hosts=LOOPBACK_HOSTS) -> tuple[str, str, int, str]:
    """(scheme, host, port, the address to connect to) for a URL fetch_url may open, or
    PermissionError / ValueError before any connection is made or any name resolved: only
    http(s), no credentials in the URL, a host in `allowed_hosts` (exact, case-insensitive), and
    a name resolves only when it is on the list, to addresses that must all be loopback when the
    list is the loopback default (no DNS answer can send the request elsewhere)."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise PermissionError(f"only http and https URLs may be fetched, not {parts.scheme or 'no scheme'!r}")
    if parts.username is not None or parts.password is not None:
        raise PermissionError("a URL with credentials is refused")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"no host in {url!r}")
    allowed = {h.lower().strip("[]") for h in allowed_hosts}
    if host not in allowed:
        raise PermissionError(f"host {host!r} is not allowed (allowed: {', '.join(sorted(allowed))})")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"bad port in {url!r}: {e}") from None
    try:
        addr = str(ipaddress.ip_address(host))
        addrs = [addr]
    except ValueError:
        addrs = sorted({ai[4][0] for ai in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        if not addrs:
            raise PermissionError(f"{host!r} does not resolve") from None
        addr = addrs[0]
    if set(allowed) <= set(LOOPBACK_HOSTS) and not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        raise PermissionError(f"{host!r} resolves outside loopback ({', '.join(addrs)})")
    return parts.scheme, host, port, addr


def fetch(url: str, allowed_hosts=LOOPBACK_HOSTS, max_bytes: int = 65536, timeout_s: float = 10.0) -> str:
    """GET a URL that check_url allows; redirects are not followed (their target was not
    checked); the body is read up to max_bytes."""
    import http.client
    from urllib.parse import urlsplit

    scheme, host, port, addr = check_url(url, allowed_hosts)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if scheme == "https":  # TLS checks the certificate against the name
        conn = http.client.HTTPSConnection(host, port, timeout=timeout_s)
    else:  # connect to the address that was checked, not a second resolution of the name
        conn = http.client.HTTPConnection(addr, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Host": host if port in (80, 443) else f"{host}:{port}",
                                           "User-Agent": "metroline-agent"})
        resp = conn.getresponse()
        body = resp.read(max(0, min(max_bytes, 1 << 20)))
    finally:
        conn.close()
    if 300 <= resp.status < 400:
        return f"HTTP {resp.status} redirect to {resp.getheader('Location')!r} (not followed)"
    text = body.decode(resp.headers.get_content_charset() or "utf-8", errors="replace")
    return text if resp.status < 400 else f"HTTP {resp.status}: {text}"


def builtin_tools(sandbox: str | None = None, notebook: dict | None = None,
                  allowed_hosts=LOOPBACK_HOSTS) -> ToolRegistry:
    """calculator, clock, notebook_set / notebook_get / notebook_list, fetch_url (hosts in
    `allowed_hosts` only: loopback by default), and read_file under `sandbox` (only when a
    folder is given). The notebook is the agent run's own (run_notebook,
    set by AgentRuntime: each run sees only its notes, kept in its trace); called outside a run
    the tools use `notebook`, a dict the caller may persist (a fresh one by default)."""
    reg = ToolRegistry()
    own = {} if notebook is None else notebook

    def _book() -> dict:
        book = _RUN_NOTEBOOK.get()
        return own if book is None else book

    @reg.tool(timeout_s=5, idempotent=True)
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression (+ - * / // % **, parentheses, sqrt, log, sin, pi, ...).

        Args:
            expression: the expression, e.g. "(17 * 23) + sqrt(2)"
        """
        return repr(calculate(expression))

    # The grammar keeps a call's expression to what calculate() reads (numbers, operators,
    # parentheses, its functions and constants): a small model cannot write prose in it.
    reg["calculator"].parameters["properties"]["expression"].update(
        minLength=1, maxLength=500, pattern=CALCULATOR_PATTERN)

    @reg.tool(timeout_s=5, idempotent=True)
    def clock() -> str:
        """The current date and time (UTC, ISO 8601)."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @reg.tool(timeout_s=5, idempotent=True)
    def notebook_set(key: str, value: str) -> str:
        """Write a note under a key (overwrites).

        Args:
            key: the note's name
            value: its text
        """
        book = _book()
        if len(book) >= 1000 and key not in book:
            raise ValueError("the notebook is full (1000 keys)")
        book[key] = value[:100_000]
        return "ok"

    @reg.tool(timeout_s=5, idempotent=True)
    def notebook_get(key: str) -> str:
        """Read the note under a key.

        Args:
            key: the note's name
        """
        book = _book()
        if key not in book:
            raise KeyError(f"no note named {key!r}")
        return book[key]

    @reg.tool(timeout_s=5, idempotent=True)
    def notebook_list() -> list[str]:
        """The keys of every note."""
        return sorted(_book())

    @reg.tool(timeout_s=15, idempotent=True)
    def fetch_url(url: str, max_bytes: int = 65536) -> str:
        """Fetch a web page by GET (only hosts on the allowlist; loopback by default).

        Args:
            url: the http(s) URL
            max_bytes: read at most this many bytes
        """
        return fetch(url, allowed_hosts, max_bytes)

    if sandbox is not None:
        root = os.path.realpath(sandbox)

        @reg.tool(timeout_s=10, idempotent=True)
        def read_file(path: str, max_bytes: int = 65536) -> str:
            """Read a text file under the sandbox folder.

            Args:
                path: the file's path, relative to the sandbox folder
                max_bytes: read at most this many bytes
            """
            full = os.path.realpath(os.path.join(root, path))
            if os.path.commonpath([full, root]) != root:
                raise PermissionError(f"{path!r} is outside the sandbox")
            if not os.path.isfile(full):
                raise FileNotFoundError(f"no file {path!r} in the sandbox")
            with open(full, "rb") as f:
                data = f.read(max(0, min(max_bytes, 1 << 20)))
            return data.decode("utf-8", errors="replace")

    return reg
