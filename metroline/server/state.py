"""What every route of one server shares: its configuration, the engine front and what the
engine told about itself (EngineInfo), the tokenizer, the runs in flight, drain state, metrics.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time

from metroline.agents.store import RunStore, SQLiteRunStore
from metroline.config import ServerConfig
from metroline.engine.async_engine import AsyncEngine
from metroline.server.metrics import ServerMetrics
from metroline.server.protocol import APIError

logger = logging.getLogger("metroline.server")


class ServerState:
    """What the routes share: the engine front, the tokenizer, in-flight runs, drain state."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        info = engine.info
        tokenizer = engine.tokenizer
        if config.chat_template is not None:
            # A copy, so the override never leaks into the model shared with others.
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = config.chat_template
        self.tokenizer = tokenizer
        self.info = info
        self.source_name = info.model_name
        self.model_names = config.served_model_names or (self.source_name,)
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.created = int(time.time())
        self.runs: set = set()  # server.runs.Run objects in flight
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once started
        self.draining = False
        self._drain_now: asyncio.Event | None = None
        # An engine front over several replicas (server/cluster.py) also reports each one.
        self.metrics = ServerMetrics(engine.get_stats, self._gauges, self.model_names[0],
                                     getattr(engine, "replica_stats", None),
                                     getattr(engine, "routing_decisions", None))
        self._store: RunStore | None = None
        self._store_lock = threading.Lock()

    @property
    def store(self) -> RunStore:
        """The one store of agent runs and stored responses (SQLite at
        config.agent_store_path, default under $METROLINE_DATA_DIR), opened on first use."""
        with self._store_lock:
            if self._store is None:
                self._store = SQLiteRunStore(self.config.agent_store_path)
            return self._store

    def _gauges(self) -> dict:
        return {"engine_alive": int(self.engine.is_alive), "draining": int(self.draining),
                "in_flight": len(self.runs)}

    def check_admitting(self) -> None:
        """Raise 503 unless new generation work may start."""
        if self.draining:
            raise APIError(503, "the server is shutting down and admits no new requests",
                           "service_unavailable", None, "server_draining")
        if not self.engine.is_alive:
            raise APIError(503, "the engine loop is not running", "service_unavailable", None,
                           "engine_dead")

    async def drain(self, timeout: float) -> None:
        """Stop admitting (503, /ready 503), let in-flight requests finish for up to `timeout`
        seconds, then end the rest with an error (a final error event for streams)."""
        loop = asyncio.get_running_loop()
        self.draining = True
        if self._drain_now is None:
            self._drain_now = asyncio.Event()
        logger.warning("draining: %d request(s) in flight, waiting up to %g s",
                       len(self.runs), timeout)
        deadline = loop.time() + timeout
        while self.runs and loop.time() < deadline and not self._drain_now.is_set():
            await asyncio.sleep(0.05)
        if self.runs:
            logger.warning("ending %d request(s) still in flight", len(self.runs))
            err = APIError(503, "the server shut down before this request finished",
                           "service_unavailable", None, "server_shutdown")
            for run in list(self.runs):
                run.kill(err)
            await asyncio.sleep(0.1)  # their handlers write the error; uvicorn then waits for them

    def end_drain_now(self) -> None:
        self.draining = True
        if self._drain_now is None:
            self._drain_now = asyncio.Event()
        self._drain_now.set()
