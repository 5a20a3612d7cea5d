"""Prefix-affine routing between the replicas of one LLM version on Ray Serve.

Each replica's engine keeps a prefix cache: the KV blocks of prompt starts it has computed. A job
whose prompt starts like a recent one is cheapest on the replica that served that one, where its
prefill skips the shared blocks. The router reduces a job's prompt to the part requests share
(engine.text_task.shared_prefix_key), remembers which replica served each such prefix, and sends
a job with a known prefix there, unless that replica holds more than `imbalance` requests beyond
the least busy candidate. Everything else (short prompts, new prefixes, a busy owner, calls that
are not jobs) goes to the less busy of two random replicas (the power of two choices, as Ray
Serve's default router does).
"""

from __future__ import annotations

import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from engine.text_task import TextTask, shared_prefix_key

def job_prefix_key(pending_request: PendingRequest | None) -> str | None:
    """The prefix key of a `run_job(spec)` call; None for other calls (stats, health)."""
    if pending_request is None or not pending_request.args:
        return None
    spec = pending_request.args[0]
    if not isinstance(spec, dict) or spec.get("kind") != "text-generation":
        return None
    task = spec.get("task")
    return shared_prefix_key(task) if isinstance(task, TextTask) else None


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, imbalance: int = 8, max_prefixes: int = 100_000) -> None:
        self.imbalance = imbalance
        self.max_prefixes = max_prefixes
        self.owners: OrderedDict[str, ReplicaID] = OrderedDict()  # prefix key -> replica, least recent first

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = job_prefix_key(pending_request)
        owner_id = self.owners.get(key) if key is not None else None
        owner = next((r for r in candidate_replicas if r.replica_id == owner_id), None)
        if owner is not None and self._not_overloaded(owner, candidate_replicas):
            return [[owner]]
        # power of two choices: the router probes both and takes the shorter queue
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def _not_overloaded(self, owner: RunningReplica, candidates: list[RunningReplica]) -> bool:
        """The owner has room and is within `imbalance` requests of the least busy candidate
        (replicas whose queue length is not known yet are not counted)."""
        cache = self.replica_queue_len_cache
        own = cache.get(owner.replica_id)
        if own is None:
            return True
        if own >= owner.max_ongoing_requests:
            return False
        known = [q for q in (cache.get(r.replica_id) for r in candidates) if q is not None]
        return own - min(known, default=own) <= self.imbalance

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        key = job_prefix_key(pending_request)
        if key is None:
            return
        self.owners[key] = replica_id
        self.owners.move_to_end(key)
        while len(self.owners) > self.max_prefixes:
            self.owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self.owners.items() if r == replica_id]:
            del self.owners[key]
