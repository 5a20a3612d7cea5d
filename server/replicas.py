"""This server as one replica of several sharing a store: its heartbeat, cancels asked through
other replicas, adopting the predictions of replicas that died, and the state /health reports.

Every `replica_heartbeat_s` the replica (1) heartbeats, (2) cancels its jobs that another replica
was asked to cancel, (3) adopts the unfinished predictions of replicas silent for
`replica_lease_s` (server/jobs.JobService.adopt_orphans: re-run when `requeue_interrupted`, else
failed as interrupted). A replica that stops cleanly leaves at once, so its interrupted
predictions are adopted on the next beat of another replica rather than after the lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from server import replicate
from server.store import redacted

log = logging.getLogger("ember.replicas")

PING_TIMEOUT_S = 5.0


@dataclass
class ReplicaState:
    id: str
    backend: str  # "sqlite" | "postgresql"
    database: str  # the store's URL, password hidden
    last_beat: float | None = None  # time.time() of the last heartbeat the store took
    last_error: str | None = None  # why the last beat failed, while it fails
    stopping: bool = False


async def keep_alive(app) -> None:
    """The replica's loop (a task for the server's life)."""
    state: ReplicaState = app.state.replica
    settings, store, engine, jobs = app.state.settings, app.state.store, app.state.engine, app.state.jobs
    while True:
        try:
            await asyncio.to_thread(store.heartbeat)
            state.last_beat, state.last_error = time.time(), None
            for prediction_id in await asyncio.to_thread(store.cancel_requests):
                job = engine.jobs.get(prediction_id)
                if job is not None and not job.done:
                    engine.cancel(prediction_id)
            orphans = await asyncio.to_thread(jobs.adopt_orphans, settings.requeue_interrupted,
                                              settings.replica_lease_s)
            if orphans:
                log.info("adopted %d predictions of replicas that stopped", len(orphans))
                await replicate.resubmit(app, orphans)
        except Exception as exc:  # noqa: BLE001 - an unreachable store must not end the loop
            state.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("replica heartbeat failed: %s", state.last_error)
        await asyncio.sleep(settings.replica_heartbeat_s)


async def health(app) -> tuple[bool, dict]:
    """(serving, details): a replica serves while it is not stopping and its store answers."""
    state: ReplicaState = app.state.replica
    store = app.state.store
    try:
        await asyncio.wait_for(asyncio.to_thread(store.ping), PING_TIMEOUT_S)
        reachable, error = True, None
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        reachable, error = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
    details = {"id": state.id, "stopping": state.stopping,
               "store": {"backend": state.backend, "database": state.database, "reachable": reachable,
                         "error": error,
                         "last_heartbeat_age_s": None if state.last_beat is None
                         else round(time.time() - state.last_beat, 3)}}
    if reachable:
        details["replicas"] = await asyncio.to_thread(store.live_replicas, app.state.settings.replica_lease_s)
    return reachable and not state.stopping, details


def new_state(store) -> ReplicaState:
    return ReplicaState(id=store.replica_id, backend=store.backend, database=redacted(store.url))
