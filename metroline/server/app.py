"""The HTTP server: app factory, auth and body-size limits, error shapes, health/readiness,
metrics, and a uvicorn runner whose SIGTERM drains instead of dropping work.

`create_app(engine, config)` builds an app over an already running AsyncEngine, so a test (or
a process serving several configurations) can share one loaded model. The engine loop runs in
its own thread (AsyncEngine); the HTTP event loop only parses, tokenizes and streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from metroline.engine.async_engine import AsyncEngine
from metroline.server.metrics import CONTENT_TYPE
from metroline.server.protocol import APIError
from metroline.server.runs import engine_error
from metroline.server.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "ServerState", "api_key_from_env", "create_app", "serve"]

logger = logging.getLogger("metroline.server")

API_KEY_ENV = "METROLINE_API_KEY"
# Routes answered without an API key: liveness must be probe-able by an orchestrator that
# holds no secret. Everything else, /metrics and /openapi.json included, needs the key.
# The page (/ and its two assets) loads without one too: it asks for the key, and every call it
# makes for data sends it.
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
AUTH_ALLOWLIST = frozenset({"/health", "/", *(f"/static/{name}" for name in _ASSETS)})


# ---------------------------------------------------------------------------- middleware

async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _AuthMiddleware:
    """Bearer-token check on every HTTP route except AUTH_ALLOWLIST (404s included: an
    unauthenticated client learns nothing about which routes exist)."""

    def __init__(self, app, api_key: str | None, metrics_token: str | None = None,
                 public_metrics: bool = False):
        self.app = app
        # Several keys (comma-separated) are several tenants; a tenant is named by a digest of
        # its key, which scopes its prefix cache and sessions (openai.tenant_scoped).
        self.keys = [(k.encode(), hashlib.sha256(k.encode()).hexdigest()[:16])
                     for k in (api_key or "").split(",") if k.strip()]
        # /metrics: open (public_metrics), or also open to a scraper's own bearer token.
        self.metrics_token = metrics_token.encode() if metrics_token else None
        self.public_metrics = public_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in AUTH_ALLOWLIST:
            return await self.app(scope, receive, send)
        if scope["path"] == "/metrics" and self.public_metrics:
            return await self.app(scope, receive, send)
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
                break
        if (scope["path"] == "/metrics" and self.metrics_token is not None
                and hmac.compare_digest(token, self.metrics_token)):
            return await self.app(scope, receive, send)
        if not self.keys and scope["path"] != "/metrics":
            return await self.app(scope, receive, send)  # only /metrics is protected
        tenant = None
        for key, name in self.keys:  # compare against all, in constant time each
            if hmac.compare_digest(token, key):
                tenant = name
        if tenant is None:
            return await _send_error(send, APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                "invalid_request_error", None, "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"}))
        scope.setdefault("state", {})["tenant"] = tenant
        return await self.app(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException, so FastAPI's body reader re-raises it as is (it wraps other errors
    # into a 400) and the exception handler answers 413.
    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds {limit} bytes")


class _BodyLimitMiddleware:
    """413 for a body over the limit: at once from Content-Length, else while it streams in."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    return await _send_error(send, APIError(
                        413, f"the request body exceeds {limit} bytes", "invalid_request_error",
                        None, "request_too_large"))
                break
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------- errors

def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc)


async def _validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            return _error_response(APIError(400, f"the request body is not valid JSON: {detail}",
                                            "invalid_request_error", None, "invalid_json"))
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "invalid_unicode":
        return _error_response(APIError(400, f"{param or 'body'}: {first.get('msg')}",
                                        "invalid_request_error", param, "invalid_unicode"))
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg')}")
    # OpenAI answers 400 invalid_request_error for a wrong type as for a value out of range.
    return _error_response(APIError(400, "; ".join(parts), "invalid_request_error", param,
                                    first.get("type")))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message, code = str(exc.detail), _HTTP_CODES.get(exc.status_code)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        message, code = "the request body is not valid UTF-8", "invalid_utf8"
    elif exc.status_code == 400:
        code = "invalid_body"
    elif exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    err = APIError(exc.status_code, message,
                   "invalid_request_error" if exc.status_code < 500 else "server_error", None, code,
                   headers=dict(exc.headers) if exc.headers else None)
    return _error_response(err)


async def _unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error",
                                    None, "internal_error"))


# ---------------------------------------------------------------------------- the app

def create_app(engine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app over a running AsyncEngine (the caller owns the engine)."""
    from metroline import __version__
    from metroline.server import agents
    from metroline.server.openai import add_routes
    from metroline.server.responses import add_routes as add_responses_routes

    config = config or ServerConfig()
    state = ServerState(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        await agents.startup(state)
        yield
        await agents.shutdown(state)
        # uvicorn waited for open connections first; whatever is left ends now.
        err = APIError(503, "the server shut down", "service_unavailable", None, "server_shutdown")
        for run in list(state.runs):
            run.kill(err)

    app = FastAPI(title="metroline", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM inference server")
    app.state.metroline = state
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unhandled_error_handler)
    app.add_middleware(_BodyLimitMiddleware, limit=config.max_request_body_bytes)
    if config.api_key or (config.metrics_token and not config.public_metrics):
        app.add_middleware(_AuthMiddleware, api_key=config.api_key,  # outermost: before reading
                           metrics_token=config.metrics_token, public_metrics=config.public_metrics)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 200 while the engine loop runs, 503 once it died."""
        if not engine.is_alive:
            return _error_response(APIError(503, f"the engine loop is not running: "
                                                 f"{engine.dead_error!r}", "service_unavailable",
                                            None, "engine_dead"))
        return JSONResponse({"status": "ok"})

    ready_cache: dict = {"at": None}

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: a one-token generation goes through; 503 while draining or failing. A
        success is remembered for ready_cache_s, so a frequent probe costs no generation;
        the probe's tokens are not counted in the engine's metrics."""
        try:
            state.check_admitting()
            now = time.monotonic()
            if ready_cache["at"] is None or now - ready_cache["at"] > config.ready_cache_s:
                await asyncio.wait_for(_one_token(state), config.ready_timeout)
                ready_cache["at"] = time.monotonic()
        except asyncio.TimeoutError:
            return _error_response(APIError(503, f"a one-token generation took over "
                                                 f"{config.ready_timeout:g} s",
                                            "service_unavailable", None, "not_ready"))
        except APIError as e:
            ready_cache["at"] = None
            return _error_response(APIError(503, f"not ready: {e.message}",
                                            "service_unavailable", None, e.code or "not_ready"))
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    _add_page(app, state)
    add_routes(app)
    agents.add_routes(app)
    add_responses_routes(app)
    _describe_responses(app)
    return app


def _add_page(app: FastAPI, state: ServerState) -> None:
    """The web page (server/static: dashboard, playground, agent traces) and the one figure it
    cannot read from /metrics: this machine's bandwidth roofline for one stream's decode."""
    from importlib.resources import files

    from fastapi.responses import HTMLResponse

    static = files("metroline.server") / "static"

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in _ASSETS:
            raise APIError(404, f"no asset {name!r}", "invalid_request_error", None, "not_found")
        return Response((static / name).read_bytes(), media_type=_ASSETS[name])

    roof: dict = {}

    @app.get("/v1/metroline/roofline")
    async def roofline() -> dict:
        """Read bandwidth of this machine (measured once, 256 MiB x 3), the weight bytes one
        decode step reads, and so the batch-1 decode ceiling in tokens/s."""
        if "bandwidth_bytes_s" not in roof:
            from metroline.bench.hardware import measure_bandwidth

            roof["bandwidth_bytes_s"] = await asyncio.to_thread(measure_bandwidth, state.info.device, 1 << 28, 3)
        w = state.info.weight_bytes
        return {"bandwidth_bytes_s": roof["bandwidth_bytes_s"], "weight_bytes_per_token": w,
                "decode_ceiling_tok_s": roof["bandwidth_bytes_s"] / w if w else None}


# The statuses each kind of route may answer besides its success, all in OpenAI's error shape.
_ERROR_STATUSES = {"400": "invalid request (a wrong type, a value out of range, a prompt too long)",
                   "401": "missing or wrong API key", "404": "unknown model, run or response",
                   "413": "request body too large", "429": "queue full (Retry-After)",
                   "500": "the request failed inside the engine", "503": "draining or the engine is not running"}
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}}}}}


_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0}
                         for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_FINISH = {"type": ["string", "null"]}
# The 200 bodies of the routes clients generate code for (OpenAI's object shapes, the fields
# metroline always sends; more may come).
_BODIES = {
    "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                   "properties": {"id": {"type": "string"}, "object": {"const": "text_completion"},
                                  "created": {"type": "integer"}, "model": {"type": "string"},
                                  "choices": {"type": "array", "items": {
                                      "type": "object", "required": ["index", "text", "finish_reason"],
                                      "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                                     "finish_reason": _FINISH}}},
                                  "usage": _USAGE}},
    "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion"},
                                      "created": {"type": "integer"}, "model": {"type": "string"},
                                      "choices": {"type": "array", "items": {
                                          "type": "object", "required": ["index", "message", "finish_reason"],
                                          "properties": {"index": {"type": "integer"}, "finish_reason": _FINISH,
                                                         "message": {"type": "object", "required": ["role"],
                                                                     "properties": {
                                                                         "role": {"const": "assistant"},
                                                                         "content": {"type": ["string", "null"]},
                                                                         "tool_calls": {"type": "array"}}}}}},
                                      "usage": _USAGE}},
    "ResponseObject": {"type": "object", "required": ["id", "object", "created_at", "status", "output"],
                       "properties": {"id": {"type": "string"}, "object": {"const": "response"},
                                      "created_at": {"type": ["integer", "number"]}, "status": {"type": "string"},
                                      "output": {"type": "array", "items": {"type": "object", "required": ["type"]}}}},
    "ModelList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                      "type": "object", "required": ["id", "object"],
                      "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}}}},
    "Tokenized": {"type": "object", "required": ["tokens", "count", "max_model_len"],
                  "properties": {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                 "count": {"type": "integer", "minimum": 0},
                                 "max_model_len": {"type": "integer", "minimum": 1}}},
    "Detokenized": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    "AgentRun": {"type": "object", "required": ["id", "object", "status", "task"],
                 "properties": {"id": {"type": "string"}, "object": {"const": "agent.run"},
                                "status": {"enum": ["queued", "running", "completed", "stopped", "failed",
                                                    "cancelled"]},
                                "task": {"type": "string"}, "events": {"type": "array"}}},
    "AgentRunList": {"type": "object", "required": ["object", "data"],
                     "properties": {"object": {"const": "list"},
                                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/AgentRun"}}}},
}
_BODY_OF = {("post", "/v1/completions"): "Completion", ("post", "/v1/chat/completions"): "ChatCompletion",
            ("post", "/v1/responses"): "ResponseObject", ("get", "/v1/responses/{response_id}"): "ResponseObject",
            ("get", "/v1/models"): "ModelList", ("post", "/tokenize"): "Tokenized", ("post", "/v1/agents/runs"): "AgentRun",
            ("post", "/detokenize"): "Detokenized", ("get", "/v1/agents/runs"): "AgentRunList",
            ("get", "/v1/agents/runs/{run_id}"): "AgentRun", ("post", "/v1/agents/runs/{run_id}/cancel"): "AgentRun"}


def _describe_responses(app: FastAPI) -> None:
    """/openapi.json says what the server answers: the 200 bodies in _BODY_OF, SSE for the
    streaming routes, and, instead of FastAPI's generated 422 (never sent here: validation
    errors are 400s), the OpenAI error shape for every 4xx/5xx a route can send."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas["ErrorResponse"] = _ERROR_SCHEMA
            schemas.update(_BODIES)
            ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for path, ops in spec.get("paths", {}).items():
                for method, op in ops.items():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)
                    body = _BODY_OF.get((method, path))
                    if body is not None:
                        ok = "201" if (method, path) == ("post", "/v1/agents/runs") else "200"
                        responses.setdefault(ok, {"description": "Successful Response"})["content"] = {
                            "application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}
                    codes = ["401", "413", "500"] if path not in AUTH_ALLOWLIST else ["500"]
                    if method in ("post", "delete") or "{" in path or op.get("parameters"):
                        codes += ["400", "404"]  # anything it reads can be refused
                    generates = path in ("/v1/completions", "/v1/chat/completions", "/v1/responses")
                    if generates or (method, path) == ("post", "/v1/agents/runs"):
                        codes += ["429", "503"]  # they admit work
                    if generates and "200" in responses:  # with "stream": true, server-sent events
                        responses["200"].setdefault("content", {})["text/event-stream"] = {"schema": {
                            "description": "one `data: {json}` event per chunk (OpenAI's chunk objects, "
                                           "or an {\"error\": ...} event), then `data: [DONE]`"}}
                    elif (method, path) == ("post", "/v1/agents/runs"):  # stream: true is a 200
                        responses["200"] = {"description": "the run's events (stream: true)", "content": {
                            "text/event-stream": {"schema": {
                                "description": "`event: KIND` + `data: {json}` per trace event, then "
                                               "`event: done` with the finished run"}}}}
                    if path == "/ready":
                        codes.append("503")
                    for code in codes:
                        responses.setdefault(code, {"description": _ERROR_STATUSES[code], **ref})
            for name in ("HTTPValidationError", "ValidationError"):
                spec["components"]["schemas"].pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


async def _one_token(state: ServerState) -> None:
    try:
        await state.engine.probe()
    except Exception as e:
        raise engine_error(e) from None


# ---------------------------------------------------------------------------- running it

# Named, not "auto": uvicorn would switch to httptools and uvloop when they are installed (as
# ray[serve] does), and httptools buffers a header block of any size; h11 bounds it (16 KiB).
UVICORN_CHOICES = {"http": "h11", "loop": "asyncio"}


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          access_log: bool = True) -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM; returns after the drain."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=10, server_header=False, **UVICORN_CHOICES)
    DrainingServer(config, app.state.metroline).run()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (ServerState.drain, up to
    shutdown_timeout) before exiting; a second ends in-flight work at once; a third exits
    without waiting for connections."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs as a signal handler: it only hands work to the loop (call_soon_threadsafe is
        # safe here). Not calling uvicorn's handler also keeps it from re-raising the signal
        # after shutdown, so the process exits 0 after a clean drain.
        self._signals += 1
        loop = self._loop
        if loop is None or self._signals >= 3:
            self.force_exit = self._signals >= 3
            self.should_exit = True
            return
        if self._signals == 1:
            logger.warning("signal %d: draining", sig)
            loop.call_soon_threadsafe(self._begin_drain)
        else:
            logger.warning("signal %d: ending in-flight requests now", sig)
            loop.call_soon_threadsafe(self.state.end_drain_now)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain(self.state.config.shutdown_timeout)
        finally:
            self.should_exit = True


def api_key_from_env(explicit: str | None) -> str | None:
    return explicit or os.environ.get(API_KEY_ENV) or None
