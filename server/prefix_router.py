"""Prefix-affine routing between the replicas of one LLM version on Ray Serve.

Each replica's engine keeps a prefix cache: the KV blocks of prompt starts it has computed. A job
whose prompt starts like a recent one is cheapest on the replica that served that one, where its
prefill skips the shared blocks. The router reduces a job's prompt to the part requests share (the
system prompt, the tools and every message but the last; for a plain prompt, its first
PREFIX_CHARS characters or PREFIX_TOKENS token ids), remembers which replica served each such
prefix, and sends a job with a known prefix there, unless that replica holds more than
`imbalance` requests beyond the least busy candidate. Everything else (short prompts, new
prefixes, a busy owner, calls that are not jobs) goes to the less busy of two random replicas
(the power of two choices, as Ray Serve's default router does).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

PREFIX_CHARS = 1024
PREFIX_TOKENS = 256
MIN_PREFIX_CHARS = 64  # shorter shared starts fill less than a few KV blocks: not worth steering


def prefix_key(task: Any) -> str | None:
    """A digest of the part of a text task's prompt that other requests may share, or None."""
    messages = getattr(task, "messages", None)
    system = getattr(task, "system_prompt", None)
    if messages and (len(messages) > 1 or system):
        return _digest(json.dumps([system, getattr(task, "tools", None), messages[:-1]], sort_keys=True, default=str))
    ids = getattr(task, "prompt_token_ids", None)
    if ids:
        return _digest(json.dumps(ids[:PREFIX_TOKENS])) if len(ids) >= PREFIX_TOKENS else None
    if messages:
        content = messages[0].get("content") if isinstance(messages[0], dict) else None
        text = content if isinstance(content, str) else ""
    else:
        text = (system or "") + (getattr(task, "prompt", None) or "")
    return _digest(text[:PREFIX_CHARS]) if len(text) >= PREFIX_CHARS else None


def _digest(text: str) -> str | None:
    if len(text) < MIN_PREFIX_CHARS:
        return None
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def job_prefix_key(pending_request: PendingRequest | None) -> str | None:
    """The prefix key of a `run_job(spec)` call; None for other calls (stats, health)."""
    if pending_request is None or not pending_request.args:
        return None
    spec = pending_request.args[0]
    if not isinstance(spec, dict) or spec.get("kind") != "text-generation":
        return None
    return prefix_key(spec.get("task"))


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
