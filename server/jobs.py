"""Submitting jobs from any router: persistence, metrics and the prediction record in one place.

Every job, whichever dialect created it, is recorded as a prediction (Replicate's object shape)
when it is created and at every status change (so it survives a restart). A job whose output is
read as a prediction (Replicate, Flowise) is also re-recorded as its output grows, at most every
SAVE_INTERVAL_S; an OpenAI job's partial output is only ever read from memory, so it is not.

Writes never run on the event loop: `RecordWriter` owns one thread that writes the newest record
of each job, many per transaction. Records are built on the loop (the job is only touched there)
and serialised on the writer thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

from engine.engine import Engine
from engine.jobs import Event, Job, utcnow
from server.metrics import Metrics
from server.store import Store

SAVE_INTERVAL_S = 0.5
logger = logging.getLogger("ember.jobs")


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


class RecordWriter:
    """Writes prediction records on its own thread; a newer record of a job replaces one that is
    still waiting. `put` returns a future done once that record is committed (or failing with
    the write's error)."""

    def __init__(self, store: Store):
        self.store = store
        self._pending: dict[str, dict] = {}
        self._waiters: list[concurrent.futures.Future] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ember-record-writer", daemon=True)
        self._thread.start()

    def put(self, doc: dict) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:  # after close (a late listener): write in the caller's thread
                self.store.save_prediction(doc)
                done.set_result(None)
                return done
            self._pending[doc["id"]] = doc
            self._waiters.append(done)
            self._cond.notify()
        return done

    def flush(self) -> concurrent.futures.Future:
        """A future done once every record put before is committed (at once after close, which
        writes what is pending itself)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                done.set_result(None)
                return done
            self._waiters.append(done)
            self._cond.notify()
        return done

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._waiters and not self._closing:
                    self._cond.wait()
                if not self._pending and not self._waiters:
                    return
                docs, self._pending = list(self._pending.values()), {}
                waiters, self._waiters = self._waiters, []
            failure = None
            try:
                if docs:
                    self.store.save_predictions(docs)
            except Exception as exc:  # noqa: BLE001 - a failed write must not stop later ones
                logger.exception("could not save %d prediction records", len(docs))
                failure = exc
            for waiter in waiters:
                if not waiter.set_running_or_notify_cancel():  # its waiter went away (a request canceled)
                    continue
                if failure is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(failure)

    def close(self) -> None:
        """Write what is pending, then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()


class JobService:
    def __init__(self, engine: Engine, store: Store, metrics: Metrics, base_url: str):
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.base_url = base_url
        self.hooks: list = []  # extra listeners (webhooks) added by routers: fn(job, event)
        self.writer = RecordWriter(store)
        self.stopping = False  # set while the server shuts down

    def stop_recording_ends(self) -> None:
        """The server is stopping: jobs it cancels now keep their last (unfinished) record, so the
        next start fails them as interrupted, or re-runs them when configured to."""
        self.stopping = True

    def record(self, job: Job) -> concurrent.futures.Future:
        return self.writer.put(prediction_doc(job, self.base_url))

    def close(self) -> None:
        self.writer.close()

    def _listener(self):
        last_save = [0.0]
        last_status = [None]

        def on_change(job: Job, event: Event | None) -> None:
            now = time.monotonic()
            changed = job.status != last_status[0] or job.done
            grown = job.source != "openai" and now - last_save[0] >= SAVE_INTERVAL_S
            if (changed or grown) and not (self.stopping and job.done):
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
        self.record(job)  # queued behind any record of this job already waiting: order is kept
        return job

    async def committed(self) -> None:
        """Returns once every record put so far is committed (a prediction answered to its creator
        is then in the store: readable through every replica, and adopted after a crash); raises
        the write's error when that failed."""
        await asyncio.wrap_future(self.writer.flush())

    def adopt_orphans(self, requeue: bool, lease_s: float, alone: bool = False) -> list[dict]:
        """Claim the predictions no live replica runs (Store.adopt_orphans): after a restart, those
        this server left; on a shared store, also those of a replica that died. Ones whose cancel
        was asked are canceled; the rest are failed as interrupted, or returned to be re-run when
        `requeue`."""
        rerun = []
        for doc in self.store.adopt_orphans(lease_s, alone=alone):
            if doc.pop("_cancel_requested"):
                self.end_adopted(doc, "canceled", None)
            elif requeue:
                rerun.append(doc)
            else:
                self.fail_interrupted(doc)
        return rerun

    def fail_interrupted(self, doc: dict) -> None:
        self.end_adopted(doc, "failed", "interrupted: the server stopped before this prediction finished")

    def end_adopted(self, doc: dict, status: str, error: str | None) -> None:
        doc.update(status=status, error=error, completed_at=doc.get("completed_at") or utcnow())
        self.store.save_prediction(doc)
