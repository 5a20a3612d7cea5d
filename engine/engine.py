"""The Engine: registry + model pool + running jobs. The server's only way into the models.

`submit` resolves nothing itself: callers build a Job for a resolved version (with a TextTask or
VideoTask). With `wait_ready=True` the model is loaded and the task checked before `submit`
returns, so synchronous dialects can answer bad input with an error instead of a failed job.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from engine import text_task, video_task
from engine.errors import BadRequest, EmberError, NotFound, QueueFull
from engine.files import FileStore
from engine.jobs import Job
from engine.loading import (Loaded, ModelPool, estimate_bytes, load_embedding_model, load_text_model,
                            load_video_pipeline)
from engine.registry import Registry, Version

if TYPE_CHECKING:
    from engine.embeddings import Embeddings

log = logging.getLogger("ember.engine")

REAP_INTERVAL_S = 0.5


@dataclass
class EngineOptions:
    allow_http_inputs: bool = True
    allow_private_urls: bool = False
    max_running_jobs: int = 1024
    file_url: Callable[[str], str] = lambda file_id: f"/v1/files/{file_id}/content"
    memory_budgets: dict[str, int] | None = None
    job_retention_s: float = 300.0  # finished jobs stay in memory this long (the store keeps them)
    llm_overrides: dict = field(default_factory=dict)  # LLMEngineConfig fields for every text model


def build_worker(version: Version, options: EngineOptions) -> Loaded:
    """Load a version and start the worker that serves it."""
    if version.kind == "text-generation":
        from engine.llm.engine import LLMEngine, LLMEngineConfig

        model, tokenizer, devices = load_text_model(version)
        fields = set(LLMEngineConfig.__dataclass_fields__)
        settings = {k: v for k, v in {**version.limits, **options.llm_overrides}.items() if k in fields}
        llm = LLMEngine(model, tokenizer, LLMEngineConfig(**settings))
        llm.tokenizer = tokenizer
        size = model.get_memory_footprint() + int(settings.get("kv_cache_bytes") or 0)
        return Loaded(version=version, worker=llm, devices=devices, bytes=size, close=llm.close)
    if version.kind == "embedding":
        from engine.embeddings import EmbeddingWorker

        model, tokenizer, devices = load_embedding_model(version)
        worker = EmbeddingWorker.for_version(model, tokenizer, version, devices[0])
        return Loaded(version=version, worker=worker, devices=devices, bytes=model.get_memory_footprint(),
                      close=worker.close)
    from engine.schemas import video_family
    from engine.video.worker import VideoWorker

    pipeline, devices = load_video_pipeline(version)
    worker = VideoWorker(pipeline, video_family(version),
                         max_batch_size=int(version.limits.get("max_batch_size", 4)), device=devices[0])
    return Loaded(version=version, worker=worker, devices=devices, bytes=estimate_bytes(version),
                  close=worker.close)


async def warm_up(loaded: Loaded) -> None:
    """One real forward pass so the first request does not pay for lazy initialisation: a
    one-token generation for text models. Video pipelines are not warmed (a denoising run is the
    cost of a request, not of a warm-up)."""
    if loaded.version.kind != "text-generation":
        return
    from engine.jobs import new_id
    from engine.llm.types import GenerationRequest, SamplingParams

    llm = loaded.worker
    token = llm.tokenizer.bos_token_id if llm.tokenizer.bos_token_id is not None else 0
    request = GenerationRequest(request_id=f"warmup-{new_id(8)}", prompt_token_ids=[token],
                                params=SamplingParams(max_new_tokens=1, temperature=0))
    async for _ in llm.generate(request):
        pass


class Engine:
    def __init__(self, registry: Registry, files: FileStore, options: EngineOptions | None = None):
        self.registry = registry
        self.files = files
        self.options = options or EngineOptions()
        self.pool = ModelPool(lambda v: build_worker(v, self.options), self.options.memory_budgets)
        self.jobs: dict[str, Job] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._reaper: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the versions marked `load: eager` (failures are recorded, not raised), then keep
        unloading versions whose keep_alive ran out."""
        for version in self.registry.versions():
            if version.load == "eager" and version.available:
                try:
                    await asyncio.to_thread(self.pool.acquire, version)
                    self.pool.release(version)
                except EmberError as exc:
                    log.warning("eager load of %s failed: %s", version.ref, exc)
        self._reaper = asyncio.create_task(self._reap_expired())

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                await asyncio.to_thread(self.pool.reap)
            except Exception:  # noqa: BLE001 - the sweep must never stop
                log.exception("keep_alive sweep failed")

    async def load(self, version: Version, on_phase: Callable[[str], None] | None = None,
                   keep_alive: float | None = None) -> None:
        """Load (or wake) a version and warm it up; it then stays per `keep_alive`."""
        loaded = await self._acquire(version, on_phase)
        try:
            if on_phase is not None:
                on_phase("warming up")
            await warm_up(loaded)
        finally:
            self.pool.release(version, keep_alive)

    async def wake(self, version: Version, keep_alive: float | None = None) -> None:
        await self._acquire(version)
        self.pool.release(version, keep_alive)

    async def sleep(self, version: Version) -> None:
        await asyncio.to_thread(self.pool.sleep, version.id)

    async def unload(self, version: Version) -> None:
        await asyncio.to_thread(self.pool.unload, version.id)

    def version_of(self, job: Job) -> Version:
        return self.registry.resolve(f"{job.model}:{job.version}")

    async def submit(self, job: Job, *, wait_ready: bool = True) -> Job:
        """Queue a job. With wait_ready, load and validate first and raise errors directly."""
        if sum(not j.done for j in self.jobs.values()) >= self.options.max_running_jobs:
            raise QueueFull("Too many requests are queued; retry shortly.")
        version = self.version_of(job)
        self.jobs[job.id] = job
        if wait_ready:
            try:
                prepared = await self._prepare(job, version)
            except BaseException:
                self.jobs.pop(job.id, None)
                raise
            task = asyncio.create_task(self._execute(job, version, prepared))
        else:
            task = asyncio.create_task(self._prepare_and_execute(job, version))
        self.tasks[job.id] = task
        task.add_done_callback(lambda _: self._task_done(job.id))
        return job

    def _task_done(self, job_id: str) -> None:
        self.tasks.pop(job_id, None)
        asyncio.get_running_loop().call_later(self.options.job_retention_s, self.forget, job_id)

    async def _acquire(self, version: Version, on_phase: Callable[[str], None] | None = None):
        """pool.acquire off the loop; a caller cancelled mid-load still releases what it loads."""
        acquiring = asyncio.ensure_future(asyncio.to_thread(self.pool.acquire, version, on_phase))
        try:
            return await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            acquiring.add_done_callback(
                lambda done: done.cancelled() or done.exception() is not None or self.pool.release(version))
            raise

    async def _prepare(self, job: Job, version: Version):
        loaded = await self._acquire(version)
        try:
            # Tokenizing, grammar compiling and image decoding are CPU work: keep them off the loop.
            if version.kind == "text-generation":
                llm = loaded.worker
                prepared = await asyncio.to_thread(text_task.prepare, job.task, job, version, llm.tokenizer,
                                                   llm.max_model_len)
            else:
                prepared = await asyncio.to_thread(video_task.prepare, job.task, job, self.files,
                                                   self.options.allow_http_inputs, loaded.worker.family,
                                                   self.options.allow_private_urls)
            return loaded, prepared
        except BaseException:
            self.pool.release(version)
            raise

    async def _prepare_and_execute(self, job: Job, version: Version) -> None:
        try:
            prepared = await self._prepare(job, version)
        except EmberError as exc:
            job.finish("failed", exc.message)
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("preparing job %s failed", job.id)
            job.finish("failed", f"{type(exc).__name__}: {exc}")
            return
        await self._execute(job, version, prepared)

    async def _execute(self, job: Job, version: Version, prepared) -> None:
        loaded, request = prepared
        try:
            if job.cancel_requested:
                job.finish("canceled")
                return
            job.start()
            if version.kind == "text-generation":
                await text_task.run(job, request, loaded.worker)
            else:
                await video_task.run(job, request, loaded.worker, self.files, self.options.file_url,
                                     job.task.inline)
        except asyncio.CancelledError:
            loaded.worker.abort(job.id)
            job.finish("canceled")
        except EmberError as exc:
            job.finish("failed", exc.message)
        except Exception as exc:  # noqa: BLE001 - one job's failure never takes the engine down
            log.exception("job %s failed", job.id)
            job.finish("failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.pool.release(version, job.keep_alive)

    async def embed(self, version: Version, inputs: list[str] | list[list[int]],
                    dimensions: int | None = None) -> "Embeddings":
        """Vectors for texts or token-id lists from an embedding version (loading it if needed)."""
        if version.kind != "embedding":
            raise BadRequest(f"Model '{version.model}' is a {version.kind} model, not an embedding model.",
                             param="model")
        loaded = await self._acquire(version)
        try:
            worker = loaded.worker
            worker.check_dimensions(dimensions)
            token_ids = await asyncio.to_thread(worker.tokenize, inputs)
            return await worker.embed(token_ids, dimensions)
        finally:
            self.pool.release(version)

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"Prediction {job_id} not found")
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop; the scheduler frees its resources within one step. Idempotent."""
        job = self.get(job_id)
        if job.done:
            return job
        job.cancel_requested = True
        state = self.pool.states.get(job.version)
        if state is not None and state.loaded is not None:
            state.loaded.worker.abort(job.id)
        elif job.status == "starting":
            job.finish("canceled")  # still loading: _execute sees cancel_requested and only releases
        return job

    def forget(self, job_id: str) -> None:
        """Drop a finished job from memory (the store keeps the record)."""
        job = self.jobs.get(job_id)
        if job is not None and job.done:
            self.jobs.pop(job_id, None)

    async def close(self) -> None:
        for job_id in list(self.jobs):
            if not self.jobs[job_id].done:
                self.cancel(job_id)
        for task in [*self.tasks.values(), *([self._reaper] if self._reaper else [])]:
            task.cancel()
        await asyncio.sleep(0)
        await asyncio.to_thread(self.pool.close)


def demo_registry(home: Path, models_file: Path) -> Registry:
    """The registry for `models_file`, building the demo models first if it names any."""
    from engine.demo import ensure_demo_models
    from engine.registry import load_registry

    text = Path(models_file).read_text()
    folders = ensure_demo_models(home) if "demo:" in text else {}
    return load_registry(models_file, home, folders)
