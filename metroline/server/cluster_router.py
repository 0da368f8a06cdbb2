"""Ray Serve request router for engine replicas: sessions stick, prefixes find their KV.

Ray Serve calls `choose_replicas` in the process that holds the DeploymentHandle (the ingress)
for every handle call to the engine deployment. The ingress passes what it parsed as the
keyword argument `routing`: {"session": session id or None, "hashes": the prompt's block
hashes (kv_manager.prefix_block_hashes, the tenant's cache salt included)}. The ranking:

1. a session's replica (agent runs, multi-turn chats), unless it has `imbalance` more
   requests in flight than the least loaded one;
2. otherwise the replica with the longest cached prefix of the prompt (same rule), known from
   what each replica reports (`record_routing_stats`: its cache's block hashes, every
   `request_routing_stats_period_s`) and from what this router sent it since;
3. otherwise, and as the fallback ranks, the least loaded replicas.

Ray Serve then takes the first rank that has room (`max_ongoing_requests`), so a full replica
is skipped rather than waited for. `policy="round_robin"` ignores all that (the benchmark's
baseline). Ray is only imported in cluster mode.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

# The routers in this process, by deployment name: the ingress's RemoteEngine reads the
# replicas' reported stats from here (they reach the router with the replica set). Serve
# may ship the router class by value, so its methods reach this dict through an import.
ROUTERS: dict[str, "KVAwareRouter"] = {}


def _registry() -> dict:
    from metroline.server import cluster_router

    return cluster_router.ROUTERS


POLICIES = ("kv", "round_robin")


class KVAwareRouter(RequestRouter):
    def initialize_state(self, policy: str = "kv", imbalance: int = 4, memory_s: float = 30.0,
                         max_sessions: int = 65536, max_remembered: int = 65536, **kwargs: Any) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r}: one of {', '.join(POLICIES)}")
        self.policy = policy
        self.imbalance = imbalance
        self.memory_s = memory_s  # how long a routed prompt's blocks count before a report has them
        self._sessions: OrderedDict[str, ReplicaID] = OrderedDict()
        self._max_sessions = max_sessions
        # Per replica: block hash -> when a prompt holding it was sent there (newest last).
        self._sent: dict[ReplicaID, OrderedDict[int, float]] = {}
        self._max_remembered = max_remembered
        self._reported: dict[ReplicaID, tuple[int, frozenset]] = {}  # (id of stats dict, hashes)
        self._turn = itertools.count()
        self.decisions = {"session": 0, "prefix": 0, "least_loaded": 0, "round_robin": 0}
        self._ongoing: dict[ReplicaID, int] = {}  # requests this router sent, not yet completed
        _registry()[self._deployment_id.name] = self

    # ------------------------------------------------------------------ what it knows

    def replicas(self) -> list[RunningReplica]:
        return list(self.curr_replicas.values())

    def _load(self, r: RunningReplica) -> int:
        return self._ongoing.get(r.replica_id, 0)

    def _cached(self, r: RunningReplica) -> frozenset:
        stats = r.routing_stats or {}
        seen = self._reported.get(r.replica_id)
        if seen is None or seen[0] != id(stats):
            seen = self._reported[r.replica_id] = (id(stats), frozenset(stats.get("hashes") or ()))
        return seen[1]

    def _matched(self, r: RunningReplica, hashes: list[int], now: float) -> int:
        cached, sent = self._cached(r), self._sent.get(r.replica_id, {})
        n = 0
        for h in hashes:
            if h in cached or now - sent.get(h, -1e18) < self.memory_s:
                n += 1
            else:
                break
        return n

    # ------------------------------------------------------------------ Ray Serve's hooks

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if self.policy == "round_robin":
            self.decisions["round_robin"] += 1
            k = next(self._turn) % len(candidate_replicas)
            ordered = sorted(candidate_replicas, key=lambda r: str(r.replica_id))
            return [[r] for r in ordered[k:] + ordered[:k]]
        routing = (pending_request.kwargs.get("routing") if pending_request is not None else None) or {}
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))  # ties: at random
        by_load = sorted(shuffled, key=self._load)
        floor = self._load(by_load[0])

        def first(r: RunningReplica, why: str) -> list[list[RunningReplica]]:
            self.decisions[why] += 1
            return [[r], [x for x in by_load if x is not r]]

        session = routing.get("session")
        if session is not None and session in self._sessions:
            home = self._sessions[session]
            for r in candidate_replicas:
                if r.replica_id == home and self._load(r) <= floor + self.imbalance:
                    return first(r, "session")
        hashes = routing.get("hashes") or []
        if hashes:
            now = time.time()
            matched = [(self._matched(r, hashes, now), -self._load(r), r) for r in candidate_replicas]
            n, _, best = max(matched, key=lambda m: m[:2])
            if n > 0 and self._load(best) <= floor + self.imbalance:
                return first(best, "prefix")
        self.decisions["least_loaded"] += 1
        return [by_load]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        self._ongoing[replica_id] = self._ongoing.get(replica_id, 0) + 1
        routing = pending_request.kwargs.get("routing") or {}
        session = routing.get("session")
        if session is not None:
            self._sessions[session] = replica_id
            self._sessions.move_to_end(session)
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        hashes = routing.get("hashes")
        if hashes:
            sent = self._sent.setdefault(replica_id, OrderedDict())
            now = time.time()
            for h in hashes:
                sent[h] = now
                sent.move_to_end(h)
            while len(sent) > self._max_remembered:
                sent.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        n = self._ongoing.get(replica_id, 0)
        if n > 0:
            self._ongoing[replica_id] = n - 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        for replica_id in [r for r in self._sent if r not in alive]:
            self._forget(replica_id)

    def _forget(self, replica_id: ReplicaID) -> None:
        """A replica that died took its KV with it: its sessions go where routing sends them."""
        self._sent.pop(replica_id, None)
        self._reported.pop(replica_id, None)
        self._ongoing.pop(replica_id, None)
        for session in [s for s, r in self._sessions.items() if r == replica_id]:
            del self._sessions[session]
