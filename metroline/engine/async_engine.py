"""AsyncEngine: the engine loop in a background thread, an asyncio front for servers and agents.

The loop thread owns the EngineCore; nothing else touches it. Callers talk to it through a
command queue (add, abort) and get outputs back on per-request asyncio queues. An add is
validated in the loop thread and its error comes back to the caller, so bad input raises
where it was submitted and never reaches a step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from metroline.engine.core import EngineCore
from metroline.engine.request import EngineInfo, EngineStats, RequestHints, RequestOutput, SamplingParams
from metroline.errors import EngineDeadError

__all__ = ["AsyncEngine", "EngineDeadError"]

logger = logging.getLogger("metroline.engine")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)


class AsyncEngine:
    def __init__(self, core: EngineCore, *, idle_wait_s: float = 0.05):
        self.core = core
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self.dead_error: BaseException | None = None
        # Set by the loop thread when it stops (death or shutdown), before it fails what is left.
        self._closed_error: EngineDeadError | None = None
        self._thread = threading.Thread(target=self._loop, name="metroline-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def info(self) -> EngineInfo:
        return self.core.info

    @property
    def is_alive(self) -> bool:
        return self._closed_error is None and self.dead_error is None and self._thread.is_alive()

    def num_requests(self) -> int:
        return len(self._streams)

    def get_stats(self) -> EngineStats:
        """EngineCore.get_stats() plus this front's open streams (callable from any thread)."""
        return replace(self.core.get_stats(), num_streams=len(self._streams))

    # ------------------------------------------------------------------ front

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None,
                       hints: RequestHints | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and iterate over its output deltas until it finishes.

        Raises InvalidRequestError / QueueFullError at submission. Closing the iterator early
        (a client that went away, a cancelled task) aborts the request and frees its KV.
        """
        if not self.is_alive:
            raise EngineDeadError(str(self._closed_error) if self._closed_error
                                  else f"engine is not running: {self.dead_error!r}")
        rid = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("add", rid, (prompt_token_ids, params, hints, stream), fut))
        if self._closed_error is not None:
            # The loop stopped meanwhile: it may have drained the queue before our add landed.
            _fail_future(fut, self._closed_error)
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            # Cancelled while the add was in flight: if the loop still applies it, abort it then
            # (an add it never ran, or one that failed, is left alone: its id may be another's).
            self._cmds.put(("abort", rid, fut, None))
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    async def probe(self) -> None:
        """One greedy token of an internal request (served first, left out of the engine's
        counts): proof that the loop steps, for readiness and health checks."""
        prompt = self.tokenizer.encode("ready", add_special_tokens=False) or [0]
        params = SamplingParams(max_tokens=1, temperature=0.0)
        async for _ in self.generate(prompt, params, hints=RequestHints(priority=-(2**31), internal=True)):
            pass

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id, None, None))

    async def release_session(self, session_id: str) -> bool:
        """Drop a session's retained KV (in the loop thread, which owns the KV manager)."""
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self.dead_error!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("release_session", session_id, None, fut))
        return await asyncio.wrap_future(fut)

    async def cached_block_hashes(self, limit: int | None = None) -> list[int]:
        """The prefix cache's block hashes, newest last (read in the loop thread, which owns
        the KV manager): what a router outside the engine matches prompts against."""
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self.dead_error!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("cached_block_hashes", limit, None, fut))
        return await asyncio.wrap_future(fut)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cmds.put(("wake", None, None, None))
        self._thread.join(timeout)

    # ------------------------------------------------------------------- loop

    def _handle(self, cmd) -> None:
        kind, rid, payload, fut = cmd
        if kind == "add":
            prompt, params, hints, stream = payload
            if not fut.set_running_or_notify_cancel():
                return  # the caller gave up (cancelled) before we got to it
            try:
                self.core.add_request(rid, prompt, params, hints)
            except BaseException as e:
                fut.set_exception(e)
                return
            self._streams[rid] = stream
            fut.set_result(None)
        elif kind == "abort":
            add_fut = payload  # set when aborting an add that was cancelled in flight
            if add_fut is not None and (not add_fut.done() or add_fut.cancelled()
                                        or add_fut.exception() is not None):
                return
            self.core.abort_request(rid)
            self._streams.pop(rid, None)
        elif kind == "release_session":
            if fut.set_running_or_notify_cancel():
                fut.set_result(self.core.release_session(rid))
        elif kind == "cached_block_hashes":
            if fut.set_running_or_notify_cancel():
                fut.set_result(self.core.kv_manager.cached_block_hashes(rid))

    def _deliver(self, outs) -> None:
        """Hand a step's outputs to their streams: one wake-up of each event loop per step
        (a self-pipe write, and a GIL hand-over), not one per request."""
        by_loop: dict = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                self._streams.pop(out.request_id, None)
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody will read these streams again
                for _, out in items:
                    if not out.finished:
                        self._streams.pop(out.request_id, None)
                        self.core.abort_request(out.request_id)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                # Block only when idle; while busy, drain commands between steps.
                if not self.core.has_unfinished_requests():
                    try:
                        self._handle(self._cmds.get(timeout=self._idle_wait_s))
                    except queue.Empty:
                        continue
                while True:
                    try:
                        self._handle(self._cmds.get_nowait())
                    except queue.Empty:
                        break
                if self.core.has_unfinished_requests():
                    self._deliver(self.core.step())
        except BaseException as e:  # engine death: report it truthfully and fail every stream
            logger.exception("engine loop died")
            self.dead_error = e
            self._close(EngineDeadError(f"engine loop died: {type(e).__name__}: {e}"))
        else:  # shutdown: abort what is still running (freeing its KV) and fail its streams
            for rid in list(self._streams):
                try:
                    self.core.abort_request(rid)
                except Exception:
                    logger.exception("abort of %s at shutdown failed", rid)
            self._close(EngineDeadError("the engine was shut down"))

    def _close(self, err: EngineDeadError) -> None:
        self._closed_error = err  # before draining: see generate()
        for stream in list(self._streams.values()):
            _post(stream, err)
        self._streams.clear()
        while True:
            try:
                _, _, _, fut = self._cmds.get_nowait()
            except queue.Empty:
                break
            if fut is not None:
                _fail_future(fut, err)


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


def _post(stream: _Stream, item) -> bool:
    """Hand an item to a stream's event loop; False when that loop is closed."""
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        return True
    except RuntimeError:
        return False


def _fail_future(fut: concurrent.futures.Future, err: BaseException) -> None:
    try:
        if not fut.done():
            fut.set_exception(err)
    except concurrent.futures.InvalidStateError:
        pass  # completed or cancelled meanwhile by the other thread
