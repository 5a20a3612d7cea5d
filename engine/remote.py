"""Jobs served by another process: the two halves of a job that crosses a process boundary.

`serve_job` runs on the serving side (a Ray Serve replica holding an ordinary `Engine`): it submits
a job rebuilt from its spec and turns the job's life into plain messages. `RemoteEngine` runs on
the front side: an `Engine` whose versions with a handle are not loaded locally; their jobs are
sent through the handle and the messages that come back are replayed into the local job, so the
store, SSE and every dialect see the same job as in one process.

Nothing here imports Ray: a handle is anything with `options(stream=True).run_job.remote(spec)`
returning an async iterator of messages with a `cancel()` (a Ray Serve deployment handle).

Messages, in order: ("error", payload) alone when the job was rejected before it ran;
otherwise ("ready", prompt_tokens), then ("events", [Event, ...]) with the output/log events
ready at that moment (under load many tokens share one message; see `serve_job`'s interval), then
("end", outcome). Cancelling the stream cancels the serving side's generator, whose `finally`
cancels the job there: the LLM aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from engine import errors
from engine.engine import Engine
from engine.errors import EmberError, ModelUnavailable, QueueFull
from engine.jobs import Job

log = logging.getLogger("ember.remote")

SPEC_FIELDS = ("model", "version", "kind", "input", "task", "id", "owner", "source")
OPEN_ATTEMPTS = 2  # a replica that dies before the job started: try another replica once


def job_spec(job: Job) -> dict:
    """What the serving side needs to run a job: no listeners, events or asyncio state."""
    return {name: getattr(job, name) for name in SPEC_FIELDS}


def error_payload(exc: EmberError) -> dict:
    extra = {k: v for k, v in vars(exc).items() if k not in ("message", "param")}
    return {"class": type(exc).__name__, "message": exc.message, "param": exc.param, "extra": extra}


def error_from(payload: dict) -> EmberError:
    """The EmberError a payload describes, of the same class so each dialect renders it the same."""
    cls = getattr(errors, payload["class"], EmberError)
    if not (isinstance(cls, type) and issubclass(cls, EmberError)):
        cls = EmberError
    exc = cls.__new__(cls)
    EmberError.__init__(exc, payload["message"], param=payload["param"])
    vars(exc).update(payload["extra"])
    return exc


def outcome(job: Job) -> dict:
    return {"status": job.status, "error": job.error, "output": job.output, "choices": job.choices,
            "prompt_tokens": job.prompt_tokens, "prompt_text": job.prompt_text}


async def serve_job(engine: Engine, spec: dict, interval_s: float = 0.0) -> AsyncIterator[tuple[str, Any]]:
    """Run one job on this side's engine and yield its messages (see the module docstring).

    Consecutive "events" messages are at least `interval_s` apart (the first goes at once): each
    message costs both processes a fixed amount of work, which with many streams and small steps
    outweighs the tokens themselves, so tokens ready within the interval travel together."""
    job = Job(**spec)
    try:
        await engine.submit(job, wait_ready=True)
    except EmberError as exc:
        yield ("error", error_payload(exc))
        return
    loop = asyncio.get_running_loop()
    try:
        yield ("ready", job.prompt_tokens)
        batch, last_sent = [], float("-inf")
        async for event in job.follow():
            if event.type == "done":
                break
            batch.append(event)
            if event.id < len(job.events) - 1:
                continue  # more is ready already
            wait = last_sent + interval_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                if event.id < len(job.events) - 1:
                    continue  # more arrived meanwhile: collect it first
            yield ("events", batch)
            batch, last_sent = [], loop.time()
        if batch:
            yield ("events", batch)
        yield ("end", outcome(job))
    finally:
        if not job.done:  # the stream was cancelled: the caller went away or cancelled the job
            engine.cancel(job.id)


class ManagedByServe(EmberError):
    """A lifecycle change asked of a version whose replicas Ray Serve manages."""

    status = 409
    code = "managed_by_ray_serve"


class RemoteEngine(Engine):
    """An Engine whose versions listed in `handles` run behind those handles, not in its pool."""

    def __init__(self, *args, handles: dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.handles = handles  # version ref (owner/name:id) -> handle
        self.streams: dict[str, Any] = {}  # job id -> the open message stream

    async def start(self) -> None:
        self._reaper = None  # nothing is loaded here; replicas own their models' lifecycles

    def _check_local(self, version) -> None:
        if version.ref in self.handles:
            raise ManagedByServe(f"{version.ref} runs on Ray Serve replicas, which keep it loaded for their "
                                 "life; change its replicas with the `scale:` block in models.yaml")

    async def load(self, version, on_phase=None, keep_alive=None) -> None:
        self._check_local(version)
        await super().load(version, on_phase, keep_alive)

    async def wake(self, version, keep_alive=None) -> None:
        self._check_local(version)
        await super().wake(version, keep_alive)

    async def sleep(self, version) -> None:
        self._check_local(version)
        await super().sleep(version)

    async def unload(self, version) -> None:
        self._check_local(version)
        await super().unload(version)

    async def submit(self, job: Job, *, wait_ready: bool = True) -> Job:
        handle = self.handles.get(f"{job.model}:{job.version}")
        if handle is None:
            return await super().submit(job, wait_ready=wait_ready)
        if sum(not j.done for j in self.jobs.values()) >= self.options.max_running_jobs:
            raise QueueFull("Too many requests are queued; retry shortly.")
        self.jobs[job.id] = job
        if wait_ready:
            try:
                stream, prompt_tokens = await self._open(job, handle)
            except BaseException:
                self.jobs.pop(job.id, None)
                raise
            self.streams[job.id] = stream
            task = asyncio.create_task(self._forward(job, stream, prompt_tokens))
        else:
            task = asyncio.create_task(self._open_and_forward(job, handle))
        self.tasks[job.id] = task
        task.add_done_callback(lambda _: self._forwarding_done(job))
        return job

    def _forwarding_done(self, job: Job) -> None:
        """A task cancelled before it ran never saw its stream: cancel that and end the job here."""
        stream = self.streams.pop(job.id, None)
        if stream is not None:
            stream.cancel()
        job.finish("canceled")  # a no-op for a job that already ended
        self._task_done(job.id)

    async def _open(self, job: Job, handle) -> tuple[Any, int]:
        """Send the job and wait until the serving side accepted it (or raise its error)."""
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            stream = handle.options(stream=True).run_job.remote(job_spec(job))
            try:
                kind, payload = await stream.__anext__()
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as exc:  # the replica died or could not be reached
                log.warning("job %s: replica failed before the job started (attempt %d): %s", job.id, attempt, exc)
                if attempt == OPEN_ATTEMPTS:
                    raise ModelUnavailable(f"the model's replica failed before the job started: "
                                           f"{type(exc).__name__}") from exc
                continue
            if kind == "error":
                raise error_from(payload)
            return stream, payload
        raise AssertionError("unreachable")

    async def _open_and_forward(self, job: Job, handle) -> None:
        try:
            stream, prompt_tokens = await self._open(job, handle)
        except EmberError as exc:
            job.finish("failed", exc.message)
            return
        self.streams[job.id] = stream
        await self._forward(job, stream, prompt_tokens)

    async def _forward(self, job: Job, stream, prompt_tokens: int) -> None:
        """Replay the serving side's messages into the local job until it ends."""
        job.prompt_tokens = prompt_tokens
        chunks: list[str] = []
        try:
            if job.cancel_requested:
                raise asyncio.CancelledError
            job.start()
            async for kind, payload in stream:
                if kind == "events":
                    for event in payload:
                        job.emit(event.type, event.data, choice=event.choice, logprobs=event.logprobs,
                                 prompt_logprobs=event.prompt_logprobs, finish_reason=event.finish_reason)
                        if event.type == "output" and event.choice == 0 and isinstance(event.data, str):
                            chunks.append(event.data)
                elif kind == "end":
                    job.output, job.choices = payload["output"], payload["choices"]
                    job.prompt_tokens, job.prompt_text = payload["prompt_tokens"], payload["prompt_text"]
                    job.finish(payload["status"], payload["error"])
            if not job.done:
                job.finish("failed", "the model's replica ended the stream without a result")
        except asyncio.CancelledError:
            stream.cancel()
            if job.kind == "text-generation" and job.output is None:
                job.output = chunks
            job.finish("canceled")
            self.streams.pop(job.id, None)
        except Exception as exc:  # noqa: BLE001 - a dead replica fails its jobs, never the server
            log.warning("job %s: replica failed mid-stream: %s", job.id, exc)
            job.finish("failed", f"the model's replica failed while running this job ({type(exc).__name__}); "
                                 "retry the request")
        else:
            self.streams.pop(job.id, None)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if f"{job.model}:{job.version}" not in self.handles or job.done:
            return super().cancel(job_id)
        job.cancel_requested = True
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()
        return job
