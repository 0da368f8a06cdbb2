"""Scale-out on Ray Serve: engine replicas behind one OpenAI endpoint (`metroline serve
--replicas N | auto`). Imported only then: a one-machine server never imports Ray.

    client -> Serve's HTTP proxy -> Ingress: the same FastAPI app as one machine's (auth,
              validation, tokenization, templates, agent runs, /metrics), over a RemoteEngine
           -> DeploymentHandle + KVAwareRouter (cluster_router.py: session, cached prefix,
              least loaded) -> EngineReplica: one EngineCore + AsyncEngine, its own threads

The RemoteEngine is the AsyncEngine front the routes already use (generate, release_session,
probe, info, tokenizer, get_stats), so every route works unchanged. A request that had not
streamed a token when its replica died is sent again (to another replica: Serve drops the
dead one); one that had ends with an EngineDeadError, which the routes turn into their error
event. Agent runs keep their state in the ingress's store, not in a replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError

from metroline.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig, SpeculativeConfig
from metroline.engine.request import EngineInfo, EngineStats, RequestHints, RequestOutput, SamplingParams
from metroline.errors import EngineDeadError, InvalidRequestError, QueueFullError
from metroline.kv.kv_manager import prefix_block_hashes
from metroline.structured import portable_processors, restore_processors

logger = logging.getLogger("metroline.server")

APP_NAME = "metroline"
ENGINE = "EngineReplica"
_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)
_SENT: list[int] = []  # a delta's prompt_token_ids on the wire: the caller puts its own back


@dataclass
class EngineSpec:
    """What a replica needs to build its engine (it loads the model itself, from `model`)."""

    model: str | None
    load: dict  # load_model's keyword arguments
    cache: CacheConfig
    scheduler: SchedulerConfig
    model_config: ModelConfig
    speculative: SpeculativeConfig
    threads: int = 1


@dataclass
class ClusterConfig:
    """How the engine deployment is laid out and scaled."""

    replicas: int | None = 2  # None: autoscaled between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # per replica, what autoscaling aims at
    max_ongoing_requests: int = 32  # per replica; more wait in the handle's queue
    max_queued_requests: int = 128  # in the ingress's handle; beyond it 429
    num_cpus: float = 1.0  # per replica (Ray's logical CPUs; its torch threads match)
    routing: str = "kv"  # or "round_robin"
    routing_imbalance: int = 4
    stats_period_s: float = 1.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    retries: int = 2  # sends of a request that had not started streaming, after the first
    ray_address: str | None = None  # None: start a local Ray cluster
    object_store_bytes: int = 128 * 2**20
    ray_num_cpus: int | None = None  # logical CPUs of the local cluster (default: enough)
    extra_env: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.replicas is not None and self.replicas < 1:
            raise ValueError("--replicas must be >= 1 (or auto)")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= --min-replicas <= --max-replicas")
        from metroline.server.cluster_router import POLICIES

        if self.routing not in POLICIES:
            raise ValueError(f"--routing: one of {', '.join(POLICIES)}")


@dataclass(frozen=True)
class Refusal:
    """An engine error crossing from a replica, raised again as itself in the ingress (Ray
    would wrap it in a RayTaskError whose message holds the remote traceback)."""

    kind: str
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, e: BaseException) -> "Refusal":
        return cls(type(e).__name__, str(e), getattr(e, "param", None), getattr(e, "code", None))

    def error(self) -> BaseException:
        if self.kind == "QueueFullError":
            return QueueFullError(self.message)
        if self.kind == "EngineDeadError":
            return EngineDeadError(self.message)
        if self.kind in ("InvalidRequestError", "GrammarError"):
            return InvalidRequestError(self.message, self.param, self.code)
        return RuntimeError(f"{self.kind}: {self.message}")


# ---------------------------------------------------------------------------- the replica

class EngineReplica:
    """One engine in one Ray actor. Its methods are what the RemoteEngine calls; `routing`
    is read by the router in the caller's process, not here."""

    def __init__(self, spec: EngineSpec, report_hashes: int = 8192):
        import torch

        from metroline.engine.async_engine import AsyncEngine
        from metroline.engine.core import EngineCore
        from metroline.model.loader import load_model

        torch.set_num_threads(spec.threads)
        loaded = load_model(spec.model, **spec.load)
        core = EngineCore(loaded, spec.cache, spec.scheduler, spec.model_config,
                          speculative_config=spec.speculative)
        self.engine = AsyncEngine(core)
        self.report_hashes = report_hashes

    def describe(self, routing: dict | None = None) -> dict:
        return {"info": self.engine.info, "tokenizer": self.engine.tokenizer}

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str,
                       hints: RequestHints | None = None, routing: dict | None = None):
        params.logits_processors = restore_processors(self.engine.tokenizer, params.logits_processors)
        try:
            async for out in self.engine.generate(prompt, params, request_id, hints):
                out.prompt_token_ids = _SENT  # the caller has the prompt: not pickled per delta
                yield out
        except (InvalidRequestError, QueueFullError, EngineDeadError) as e:
            yield Refusal.of(e)

    async def release_session(self, session_id: str, routing: dict | None = None) -> bool:
        return await self.engine.release_session(session_id)

    async def probe(self, routing: dict | None = None) -> None:
        await self.engine.probe()

    async def check_health(self) -> None:
        """Serve's health check: the loop is alive and one token goes through."""
        if not self.engine.is_alive:
            raise RuntimeError(f"the engine loop is not running: {self.engine.dead_error!r}")
        await self.engine.probe()

    async def record_routing_stats(self) -> dict:
        """What the router and the ingress's /metrics read (Serve polls it)."""
        hashes = await self.engine.cached_block_hashes(self.report_hashes) if self.engine.is_alive else []
        return {"stats": dataclasses.asdict(self.engine.get_stats()), "hashes": hashes}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ---------------------------------------------------------------------------- the ingress's engine

def _sum_stats(stats: list[EngineStats]) -> EngineStats:
    total: dict[str, Any] = {}
    for f in dataclasses.fields(EngineStats):
        total[f.name] = sum(getattr(s, f.name) for s in stats)
    blocks = total["num_blocks"]
    total["kv_cache_usage"] = (sum(s.kv_cache_usage * s.num_blocks for s in stats) / blocks
                               if blocks else 0.0)
    return EngineStats(**total)


_COUNTERS = ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits", "kv_evictions",
             "host_tier_hits", "prompt_tokens", "generation_tokens", "steps", "spec_draft_tokens",
             "spec_accepted_tokens", "spec_verifications", "fast_forward_tokens")


class RemoteEngine:
    """AsyncEngine's front over the engine deployment (what ServerState.engine needs)."""

    def __init__(self, handle, described: dict, retries: int = 2):
        self._handle = handle
        self._stream = handle.options(stream=True)  # after the first call: shares its router
        self._info: EngineInfo = described["info"]
        self._tokenizer = described["tokenizer"]
        self.retries = retries
        self.dead_error: BaseException | None = None
        self._closed = False
        self._last: dict[str, EngineStats] = {}  # per replica, its latest report
        self._retired = EngineStats()  # counters of replicas gone, so totals never go back
        self._lock = threading.Lock()
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def info(self) -> EngineInfo:
        return self._info

    def _router(self):
        from metroline.server.cluster_router import _registry

        return _registry().get(ENGINE)

    @property
    def is_alive(self) -> bool:
        """False once shut down, or while no replica is running (Serve is replacing them)."""
        if self._closed:
            return False
        router = self._router()
        return router is None or bool(router.curr_replicas)

    def replica_stats(self) -> dict[str, EngineStats]:
        """Each running replica's latest report, by replica id."""
        router = self._router()
        now: dict[str, EngineStats] = {}
        for r in (router.replicas() if router is not None else []):
            stats = (r.routing_stats or {}).get("stats")
            if stats:
                now[r.replica_id.unique_id] = EngineStats(**stats)
        with self._lock:
            gone = [s for rid, s in self._last.items() if rid not in now]
            if gone:
                retired = dataclasses.asdict(self._retired)
                for s in gone:
                    for name in _COUNTERS:
                        retired[name] += getattr(s, name)
                self._retired = EngineStats(**retired)
            self._last = now
        return now

    def routing_decisions(self) -> dict[str, int]:
        router = self._router()
        return dict(router.decisions) if router is not None else {}

    def get_stats(self) -> EngineStats:
        """The replicas' stats summed, with the counters of replicas gone (the retired
        stats hold only counters, so they add nothing else)."""
        live = list(self.replica_stats().values())
        with self._lock:
            return _sum_stats([*live, self._retired])

    def num_requests(self) -> int:
        return self.get_stats().num_streams

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None,
                       hints: RequestHints | None = None) -> AsyncIterator[RequestOutput]:
        if self._closed:
            raise EngineDeadError("the engine front was shut down")
        hints = hints or RequestHints()
        routing = {"session": hints.session_id,
                   "hashes": prefix_block_hashes(prompt_token_ids, self._info.block_size, hints.cache_salt)}
        params = dataclasses.replace(params, logits_processors=portable_processors(params.logits_processors))
        rid = request_id or f"remote-{next(self._ids)}"
        sends = 0
        while True:
            sends += 1
            started = finished = False
            try:
                gen = self._stream.generate.remote(prompt_token_ids, params, rid, hints, routing=routing)
            except BackPressureError as e:
                raise QueueFullError(f"every engine replica is busy ({e})") from None
            try:
                async for item in gen:
                    if isinstance(item, Refusal):
                        finished = True
                        raise item.error()
                    started = True
                    item.prompt_token_ids = prompt_token_ids
                    finished = item.finished
                    yield item
                    if finished:
                        return
                finished = True
                raise EngineDeadError("the engine replica ended the stream before the request finished")
            except BackPressureError as e:
                finished = True
                raise QueueFullError(f"every engine replica is busy ({e})") from None
            except _LOST as e:
                finished = True
                if started:
                    raise EngineDeadError("the engine replica serving this request was lost after it "
                                          f"had started streaming: {type(e).__name__}") from None
                if sends > self.retries:
                    raise EngineDeadError(f"the request was sent {sends} times and each engine replica "
                                          f"was lost before it started: {type(e).__name__}") from None
                logger.warning("request %s: engine replica lost before streaming (%s); sending it again",
                               rid, type(e).__name__)
            finally:
                if not finished:
                    gen.cancel()  # a client that went away: the replica aborts the request

    async def release_session(self, session_id: str) -> bool:
        return await self._handle.release_session.remote(session_id, routing={"session": session_id})

    async def probe(self) -> None:
        await self._handle.probe.remote(routing={})

    def shutdown(self, timeout: float = 5.0) -> None:
        self._closed = True


# ---------------------------------------------------------------------------- deployments

class Ingress:
    """Serve's ingress: the one-machine FastAPI app over a RemoteEngine (built after the
    constructor, once the engine deployment has described itself)."""

    async def __init__(self, engine_handle, server_config: ServerConfig, retries: int = 2):
        described = await engine_handle.describe.remote(routing={})
        self.engine = RemoteEngine(engine_handle, described, retries)
        self.server_config = server_config

    def __serve_build_asgi_app__(self):
        from metroline.server.app import create_app

        return create_app(self.engine, self.server_config)


def build_application(spec: EngineSpec, server_config: ServerConfig, cluster: ClusterConfig):
    """The Serve application: an Ingress bound to the engine deployment."""
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(spec.threads), **cluster.extra_env}
    router = RequestRouterConfig(
        request_router_class="metroline.server.cluster_router:KVAwareRouter",
        request_router_kwargs={"policy": cluster.routing, "imbalance": cluster.routing_imbalance},
        request_routing_stats_period_s=cluster.stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 5 * cluster.stats_period_s))
    options: dict[str, Any] = dict(
        name=ENGINE, max_ongoing_requests=cluster.max_ongoing_requests,
        max_queued_requests=cluster.max_queued_requests,
        ray_actor_options={"num_cpus": cluster.num_cpus, "runtime_env": {"env_vars": env}},
        health_check_period_s=cluster.health_check_period_s,
        health_check_timeout_s=cluster.health_check_timeout_s,
        request_router_config=router, graceful_shutdown_timeout_s=server_config.shutdown_timeout)
    if cluster.replicas is None:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=cluster.min_replicas, max_replicas=cluster.max_replicas,
            target_ongoing_requests=cluster.target_ongoing_requests,
            upscale_delay_s=5.0, downscale_delay_s=60.0)
    else:
        options["num_replicas"] = cluster.replicas
    engine = serve.deployment(EngineReplica).options(**options)
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress", num_replicas=1, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}})
    return ingress.bind(engine.bind(spec), server_config, cluster.retries)


def start_ray(cluster: ClusterConfig, host: str, port: int) -> None:
    """Join cluster.ray_address, or start a small local cluster (no dashboard, a small object
    store, no usage stats), and Serve's HTTP proxy on host:port."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cluster.ray_address:
        ray.init(address=cluster.ray_address, log_to_driver=False, configure_logging=False)
    else:
        replicas = cluster.replicas or cluster.max_replicas
        num_cpus = cluster.ray_num_cpus or max(os.cpu_count() or 1, int(replicas * cluster.num_cpus + 1))
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=cluster.object_store_bytes, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})


def deploy(spec: EngineSpec, server_config: ServerConfig, cluster: ClusterConfig) -> None:
    serve.run(build_application(spec, server_config, cluster), name=APP_NAME, route_prefix="/")


def run(spec: EngineSpec, server_config: ServerConfig, cluster: ClusterConfig, host: str,
        port: int) -> int:
    """`metroline serve --replicas ...`: deploy, serve until SIGINT/SIGTERM, then tear down
    (Serve drains each replica for up to the shutdown timeout)."""
    stop = threading.Event()
    start_ray(cluster, host, port)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(spec, server_config, cluster)
        shape = (f"{cluster.replicas} engine replicas" if cluster.replicas else
                 f"{cluster.min_replicas}-{cluster.max_replicas} engine replicas (autoscaled)")
        print(f"metroline serve: {shape} on Ray Serve, routing {cluster.routing}; "
              f"serving http://{host}:{port}/v1", flush=True)
        stop.wait()
        print("metroline serve: shutting down", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
