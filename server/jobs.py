"""Submitting jobs from any router: persistence, metrics and the prediction record in one place.

Every job, whichever dialect created it, is recorded as a prediction (Replicate's object shape)
when it starts, as its output grows (throttled) and when it ends.
"""

from __future__ import annotations

import time

from engine.engine import Engine
from engine.jobs import Event, Job, utcnow
from server.metrics import Metrics
from server.store import Store

SAVE_INTERVAL_S = 0.5


def request_base_url(request) -> str:
    """The base for links in answers: the configured public URL, else the one the caller used."""
    return (request.app.state.settings.public_url or str(request.base_url)).rstrip("/")


def prediction_urls(prediction_id: str, base_url: str) -> dict:
    base = f"{base_url.rstrip('/')}/v1/predictions/{prediction_id}"
    return {"get": base, "cancel": f"{base}/cancel", "stream": f"{base}/stream"}


def partial_output(job: Job):
    """The output so far: a text job's chunks grow while it runs (clients poll them as an iterator)."""
    if job.output is not None or job.kind != "text-generation":
        return job.output
    chunks = [e.data for e in job.events if e.type == "output" and e.choice == 0 and e.data]
    return chunks or None


def prediction_doc(job: Job, base_url: str) -> dict:
    """The Replicate prediction object for a job (no nulls where the client needs strings)."""
    urls = prediction_urls(job.id, base_url)
    metrics: dict = {}
    if job.predict_time is not None:
        metrics["predict_time"] = job.predict_time
    if job.total_time is not None:
        metrics["total_time"] = job.total_time
    if job.prompt_tokens:
        metrics["input_token_count"] = job.prompt_tokens
    if job.choices:
        metrics["output_token_count"] = sum(c.completion_tokens for c in job.choices)
    return {
        "id": job.id, "model": job.model, "version": job.version, "input": job.input,
        "output": partial_output(job), "logs": job.logs, "error": job.error, "status": job.status,
        "created_at": job.created_at, "started_at": job.started_at, "completed_at": job.completed_at,
        "urls": urls, "metrics": metrics, "data_removed": False, "source": job.source,
        "webhook": job.webhook, "webhook_events_filter": list(job.webhook_events_filter),
        "_owner": job.owner,
    }


class JobService:
    def __init__(self, engine: Engine, store: Store, metrics: Metrics, base_url: str):
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.base_url = base_url
        self.hooks: list = []  # extra listeners (webhooks) added by routers: fn(job, event)

    def record(self, job: Job) -> None:
        self.store.save_prediction(prediction_doc(job, self.base_url))

    def _listener(self):
        last_save = [0.0]
        last_status = [None]

        def on_change(job: Job, event: Event | None) -> None:
            now = time.monotonic()
            if job.status != last_status[0] or job.done or now - last_save[0] >= SAVE_INTERVAL_S:
                last_status[0], last_save[0] = job.status, now
                self.record(job)
            if event is not None and event.type == "done":
                self.metrics.job_finished(job)
            for hook in self.hooks:
                hook(job, event)

        return on_change

    async def submit(self, job: Job, *, wait_ready: bool = True) -> Job:
        job.listeners.append(self._listener())
        await self.engine.submit(job, wait_ready=wait_ready)
        self.record(job)
        return job

    def mark_interrupted(self, requeue: bool = False) -> list[dict]:
        """After a restart: predictions left unfinished are failed as interrupted (returned when
        the caller wants to re-run them instead)."""
        unfinished = self.store.unfinished_predictions()
        if requeue:
            return unfinished
        for doc in unfinished:
            self.fail_interrupted(doc)
        return []

    def fail_interrupted(self, doc: dict) -> None:
        doc.update(status="failed", error="interrupted: the server stopped before this prediction finished",
                   completed_at=doc.get("completed_at") or utcnow())
        self.store.save_prediction(doc)

