"""One HTTP generation request in flight, and everything that may end it early.

A Run submits one engine request per prompt and pumps their output deltas into one queue. It
ends normally when every engine request finished, or early when it is killed: the client went
away, the per-request timeout fired, or the server drained. Killing cancels the pumps, which
closes the AsyncEngine iterators: the engine aborts those requests and frees their KV at once,
while every other request flows on.

Submission errors (bad input, full queue, dead engine) surface from `start()`, before any
byte of the response is written, so they can still become an HTTP status.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator

from metroline.engine.request import RequestHints, RequestOutput, SamplingParams
from metroline.errors import EngineDeadError, InvalidRequestError, QueueFullError
from metroline.server.protocol import APIError, renamed_param
from metroline.server.state import ServerState

if TYPE_CHECKING:
    from starlette.requests import Request

logger = logging.getLogger("metroline.server")

_ids = itertools.count()


class ClientDisconnected(APIError):
    def __init__(self):
        # 499: nginx's "client closed request"; nobody reads it, but logs and metrics do.
        super().__init__(499, "the client disconnected", "client_closed_request",
                         code="client_disconnected")


def engine_error(e: BaseException, retry_after: int = 1,
                 param_names: dict[str, str] | None = None) -> APIError:
    """The API error for an exception raised by AsyncEngine.generate; `param_names` renames
    the engine's parameter names to those of the request (e.g. prompt -> messages)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        param, message = renamed_param(e, param_names)
        return APIError(400, message, "invalid_request_error", param, e.code)
    if isinstance(e, QueueFullError):
        return APIError(429, f"the server is busy: {e}", "rate_limit_error", None, "queue_full",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine is not running: {e}", "service_unavailable", None,
                        "engine_dead")
    logger.error("generation failed: %r", e, exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error", None,
                    "internal_error")


class Run:
    def __init__(self, server: ServerState, request: Request | None, prompts: list[list[int]],
                 params: SamplingParams, hints: RequestHints, *, arrival: float | None = None,
                 prefix: str = "run", param_names: dict[str, str] | None = None):
        self.server = server
        self.prompts = prompts
        self.params = params
        self.hints = hints
        self.param_names = param_names
        self.arrival = time.monotonic() if arrival is None else arrival
        self.request_id = f"{prefix}-{next(_ids)}"
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._open = len(prompts)  # engine requests not finished yet
        self._error: APIError | None = None
        self._closed = False
        self.first_token_time: list[float | None] = [None] * len(prompts)
        self.num_output_tokens = [0] * len(prompts)
        self.num_cached_tokens = [0] * len(prompts)
        self.num_accepted_draft_tokens = [0] * len(prompts)
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task | None = None
        self._request = request
        server.runs.add(self)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Submit every prompt; return once each has produced its first output. Raises
        APIError (400, 429, 503, 408, 499, 500) with nothing of this run left in the engine."""
        loop = asyncio.get_running_loop()
        timeout = self.server.config.request_timeout
        if timeout:
            self._timer = loop.call_later(timeout, self.kill, APIError(
                408, f"the request did not finish within {timeout:g} s", "timeout_error", None,
                "request_timeout"))
        if self._request is not None:
            self._watcher = loop.create_task(self._watch_disconnect(self._request))
        engine = self.server.engine
        for i, prompt in enumerate(self.prompts):
            gen = engine.generate(prompt, self.params, request_id=f"{self.request_id}-{i}",
                                  hints=self.hints)
            self._pumps.append(loop.create_task(self._pump(i, gen)))
        pending = set(range(len(self.prompts)))
        try:
            while pending:
                i, out = await self._next()
                self._buffer.append((i, out))
                pending.discard(i)
        except BaseException:
            self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output delta) until every engine request finished; raises APIError
        when the run fails or is killed."""
        while self._buffer:
            yield self._buffer.pop(0)
        while self._open > 0:
            yield await self._next()

    def kill(self, error: APIError) -> None:
        """End the run early with `error`: its engine requests are aborted now."""
        if self._error is not None or self._closed:
            return
        self._error = error
        self._stop_tasks()
        self._queue.put_nowait((-1, error))
        # No longer in flight: its engine requests are gone; the handler only writes the error.
        self.server.runs.discard(self)

    def close(self) -> None:
        """Release everything (idempotent): aborts whatever of the run is still in the engine."""
        if self._closed:
            return
        self._closed = True
        self._stop_tasks()
        self.server.runs.discard(self)

    # ------------------------------------------------------------------ internals

    def _stop_tasks(self) -> None:
        for t in self._pumps:
            t.cancel()  # closes the engine iterator: abort + KV freed
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()

    async def _pump(self, i: int, gen) -> None:
        try:
            async for out in gen:
                self._queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._queue.put_nowait((i, e))

    async def _next(self) -> tuple[int, RequestOutput]:
        if self._error is not None:
            raise self._error
        i, item = await self._queue.get()
        if isinstance(item, BaseException):
            err = engine_error(item, self.server.config.retry_after, self.param_names)
            self.kill(err)
            raise self._error
        self._note(i, item)
        if item.error:
            if getattr(item.error, "invalid_input", False):  # e.g. its grammar led nowhere: its input
                err = APIError(400, f"the output cannot follow the requested grammar: {item.error}",
                               "invalid_request_error", None, "grammar_failed")
            else:
                err = APIError(500, f"generation failed: {item.error}", "server_error", None,
                               "generation_failed")
            self.kill(err)
            raise err
        return i, item

    def _note(self, i: int, out: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.server.metrics
        n_new = sum(len(o.token_ids) for o in out.outputs)
        if n_new and self.first_token_time[i] is None:
            self.first_token_time[i] = now
            metrics.ttft.observe(now - self.arrival)
        self.num_output_tokens[i] += n_new
        self.num_cached_tokens[i] = max(self.num_cached_tokens[i], out.num_cached_tokens)
        self.num_accepted_draft_tokens[i] = max(self.num_accepted_draft_tokens[i], out.num_spec_accepted_tokens)
        if out.finished:
            self._open -= 1
            reasons = [o.finish_reason for o in out.outputs if o.finish_reason]
            metrics.observe_finished(reasons, self.arrival, self.first_token_time[i], now,
                                     self.num_output_tokens[i] / max(1, self.params.n))

    async def _watch_disconnect(self, request: Request) -> None:
        # After the body is read, the server's receive() returns only once the client is gone.
        try:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    self.kill(ClientDisconnected())
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # the connection is unusable: treat it as gone
            self.kill(ClientDisconnected())
