"""Prediction records: written off the event loop, newest record per job, flushed on close; OpenAI
jobs are recorded at state changes only."""

from __future__ import annotations

import threading

from engine.jobs import Job
from server.jobs import JobService, RecordWriter
from server.store import Store


def job(source: str) -> Job:
    return Job(model="o/m", version="v" * 64, kind="text-generation", input={"prompt": "hi"}, source=source)


class CountingStore(Store):
    def __init__(self, path):
        super().__init__(path)
        self.batches: list[list[str]] = []
        self.gate = threading.Event()

    def save_predictions(self, docs):
        self.gate.wait()
        self.batches.append([d["status"] for d in docs])
        super().save_predictions(docs)


def test_writer_keeps_the_newest_record_and_flushes_on_close(tmp_path):
    store = CountingStore(tmp_path / "db.sqlite")
    writer = RecordWriter(store)
    j = job("replicate")
    first = writer.put({**_doc(j), "status": "starting"})
    for status in ("processing", "processing", "succeeded"):  # queued while the first write waits
        writer.put({**_doc(j), "status": status})
    store.gate.set()
    first.result(timeout=10)
    writer.close()
    assert store.get_prediction(j.id, None)["status"] == "succeeded"
    assert sum(len(b) for b in store.batches) <= 2  # the three later records became one
    store.close()


def _doc(j: Job) -> dict:
    return {"id": j.id, "created_at": j.created_at, "model": j.model, "version": j.version, "source": j.source}


def test_openai_jobs_are_recorded_at_state_changes_only(tmp_path, monkeypatch):
    store = Store(tmp_path / "db.sqlite")
    service = JobService(engine=None, store=store, metrics=None, base_url="http://x")
    monkeypatch.setattr("server.jobs.SAVE_INTERVAL_S", 0.0)  # every bit of output growth is due
    written: dict[str, list[str]] = {}
    for source in ("openai", "replicate"):
        j = job(source)
        j.listeners.append(service._listener())
        calls = written[source] = []
        monkeypatch.setattr(service, "record", lambda job, calls=calls: calls.append(job.status))
        j.status = "processing"
        for chunk in "abc":
            j.emit("output", chunk)
    assert written["openai"] == ["processing"]
    assert written["replicate"] == ["processing"] * 3
    service.close()
    store.close()


def test_a_flush_whose_waiter_went_away_does_not_stop_the_writer(tmp_path):
    """A request canceled while it waits for its record (the client hung up) cancels its future;
    the writer skips it and keeps writing."""
    store = CountingStore(tmp_path / "db.sqlite")
    writer = RecordWriter(store)
    j = job("replicate")
    abandoned = writer.flush()
    abandoned.cancel()
    store.gate.set()
    writer.put({**_doc(j), "status": "starting"}).result(timeout=10)
    writer.flush().result(timeout=10)
    writer.put({**_doc(j), "status": "succeeded"}).result(timeout=10)
    assert store.get_prediction(j.id, None)["status"] == "succeeded"
    writer.close()
    store.close()
