"""A worker that serves one diffusers image-to-video pipeline to many concurrent requests.

Requests queue up; a background thread takes the oldest one plus every queued request with the
same batch key (size, frames, steps, guidance, ...) up to `max_batch_size`, and runs them as one
pipeline call with one image, one prompt and one seeded generator per request, so each video
depends only on its own inputs and seed. Each request gets an async stream of events: a seed
log, a "step i/n" log per denoising step, then exactly one "output" (an mp4) or "error".

The per-step hook is the pipeline's progress bar: every diffusers denoising loop advances it once
per step, including I2VGen-XL's, which has no `callback_on_step_end`. Raising from it is how an
aborted call stops between steps without running the VAE decoder on half-denoised latents.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Literal

import torch

from engine import residency
from engine.errors import ModelUnavailable
from engine.video.export import to_mp4
from engine.video.families import MAX_SEED, VideoFamily

log = logging.getLogger(__name__)

CANCELED = "canceled"


@dataclass
class VideoRequest:
    """`inputs` as validated by the version's schema, with `image` already a PIL image."""

    request_id: str
    inputs: dict


@dataclass
class VideoEvent:
    request_id: str
    type: Literal["logs", "output", "error"]
    text: str | None = None  # logs
    video: bytes | None = None  # output: H.264 mp4
    fps: float | None = None
    frames: int = 0
    error: str | None = None  # error: "canceled" or what went wrong


@dataclass(eq=False)
class _Member:
    """One request inside the worker. `canceled` is set by any thread; `done` under the lock."""

    request_id: str
    inputs: dict
    key: tuple
    seed: int
    emit: Callable[[VideoEvent], None]
    canceled: bool = False
    done: bool = False


class _Canceled(Exception):
    """Unwinds a pipeline call whose requests were all aborted."""


class _StepBar:
    """Stands in for the tqdm bar a pipeline opens with `self.progress_bar(...)`."""

    def __init__(self, iterable, total: int | None, on_step: Callable[[int, int], None]):
        self.iterable = iterable
        self.total = total if total is not None else len(iterable)
        self.on_step = on_step
        self.n = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.on_step(self.n, self.total)

    def close(self) -> None:
        pass


@contextmanager
def _step_hook(pipeline, on_step: Callable[[int, int], None]):
    """Route the pipeline's progress bar to `on_step(step, total)` for the duration."""
    pipeline.progress_bar = lambda iterable=None, total=None: _StepBar(iterable, total, on_step)
    try:
        yield
    finally:
        del pipeline.progress_bar


def _device_key(device: torch.device) -> str:
    """The device as the pool's memory maps name it ("cuda:0", never a bare "cuda")."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


@contextmanager
def _activation_peak(worker: "VideoWorker"):
    """Record how far device memory rose during a pipeline call (CUDA; the peak counter is the
    device's, so another model's allocations in the same moment count too, which errs on the safe side)."""
    if worker.device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(worker.device)
    before = torch.cuda.memory_allocated(worker.device)
    try:
        yield
    finally:
        peak = torch.cuda.max_memory_allocated(worker.device) - before
        worker.activation_peak_bytes = max(worker.activation_peak_bytes, peak)


def is_out_of_memory(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom_type) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class VideoWorker:
    """Serves one pipeline from one background thread. Give each pipeline object one worker: the
    step hook is installed on the pipeline itself for the duration of each call."""

    def __init__(self, pipeline, family: VideoFamily, max_batch_size: int = 4, device=None,
                 batch_window_s: float = 0.0):
        """`family` should carry the version's defaults (`family_for(cls).configure(defaults=...)`).
        `batch_window_s`: how long an idle worker waits for compatible requests to join the first."""
        self.pipeline = pipeline
        self.family = family
        self.max_batch_size = max(1, max_batch_size)
        self.device = torch.device(device) if device is not None else pipeline._execution_device
        self.batch_window_s = batch_window_s
        self.batch_sizes: Counter[int] = Counter()  # pipeline calls run, by batch size
        # The most device memory one pipeline call has needed beyond what was allocated before it
        # (CUDA only): activations at 16 frames of 1280x704 take several times the weights.
        self.activation_peak_bytes = 0
        self._lock = threading.Condition()
        self._pending: list[_Member] = []
        self._active: dict[str, _Member] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"ember-video-{family.name}", daemon=True)
        self._thread.start()

    memory_grows = True  # the pool re-measures `memory_bytes` after each use

    def memory_bytes(self) -> dict[str, int]:
        """What the pool should charge beyond the weights: the largest activation peak seen so far,
        while the weights are on the device (the caching allocator keeps those blocks between calls,
        and the next call of that size needs them again)."""
        key = _device_key(self.device)
        if not self.activation_peak_bytes or not residency.weight_bytes(self).get(key):
            return {}
        return {key: self.activation_peak_bytes}

    async def generate(self, request: VideoRequest) -> AsyncIterator[VideoEvent]:
        """Queue `request` and stream its events. Raises InvalidInput (before any event) when the
        inputs break the family's rules. Leaving the stream early aborts the request."""
        inputs = self.family.normalize(request.inputs)
        seed = inputs["seed"] if inputs["seed"] is not None else random.randint(0, MAX_SEED)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[VideoEvent] = asyncio.Queue()

        def emit(event: VideoEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        events.put_nowait(VideoEvent(request.request_id, "logs", text=f"Using seed: {seed}"))
        self._submit(_Member(request.request_id, inputs, self.family.batch_key(inputs), seed, emit))
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.type != "logs"
                yield event
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request. A queued one ends now; a running one at the pipeline's next step,
        which stops the call when no other request of its batch is still wanted."""
        with self._lock:
            member = self._active.get(request_id)
            if member is None:
                return
            member.canceled = True
            if member in self._pending:
                self._pending.remove(member)
                self._finish(member, type="error", error=CANCELED)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop serving: queued requests fail, the running batch stops at its next step."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, []
            for member in self._active.values():
                member.canceled = True
            self._lock.notify_all()
        for member in pending:
            self._finish(member, type="error", error="the video worker was closed")
        self._thread.join(timeout_s)

    def _submit(self, member: _Member) -> None:
        with self._lock:
            if self._closed:
                raise ModelUnavailable("the video worker is closed")
            if member.request_id in self._active:
                raise ValueError(f"request {member.request_id!r} is already queued or running")
            self._active[member.request_id] = member
            self._pending.append(member)
            self._lock.notify_all()

    def _finish(self, member: _Member, **fields) -> None:
        """Send a request's final event, exactly once."""
        with self._lock:
            if member.done:
                return
            member.done = True
            self._active.pop(member.request_id, None)
        member.emit(VideoEvent(member.request_id, **fields))

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[_Member] | None:
        """The oldest queued request and compatible ones ([] if it was aborted while waiting);
        None once closed."""
        with self._lock:
            while not self._pending and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            head = self._pending[0]
            deadline = time.monotonic() + self.batch_window_s
            while (not self._closed and head in self._pending
                   and len(self._compatible(head)) < self.max_batch_size
                   and (remaining := deadline - time.monotonic()) > 0):
                self._lock.wait(remaining)
            if self._closed or head not in self._pending:
                return []
            batch = self._compatible(head)[: self.max_batch_size]
            for member in batch:
                self._pending.remove(member)
            return batch

    def _compatible(self, head: _Member) -> list[_Member]:
        return [m for m in self._pending if m.key == head.key]

    def _run(self, batch: list[_Member]) -> None:
        """Run one batch; on out-of-memory retry its requests one by one, else fail them."""
        error, oom = None, False
        try:
            self._call_pipeline(batch)
            return
        except _Canceled:
            pass
        except Exception as exc:  # the worker must outlive any one request
            oom = is_out_of_memory(exc)
            if not oom:
                log.exception("video pipeline failed")
            error = self._oom_message(batch) if oom else f"{type(exc).__name__}: {exc}"
        # Here, outside the handler, the traceback and the tensors its frames held are gone.
        self._free_memory()
        live = [m for m in batch if not m.done]
        if error is None or not live:
            return
        if oom and len(live) > 1:
            for member in live:
                member.emit(VideoEvent(member.request_id, "logs",
                                       text=f"out of memory in a batch of {len(live)}; retrying alone"))
            for member in live:
                self._run([member])
            return
        for member in live:
            self._finish(member, type="error", error=error)

    def _call_pipeline(self, batch: list[_Member]) -> None:
        for member in batch:
            if member.canceled:
                self._finish(member, type="error", error=CANCELED)
        live = [m for m in batch if not m.done]
        if not live:
            return
        self.batch_sizes[len(live)] += 1
        generators = [torch.Generator("cpu").manual_seed(m.seed) for m in live]
        kwargs = self.family.call_kwargs([m.inputs for m in live], generators)
        with _step_hook(self.pipeline, lambda step, total: self._on_step(live, step, total)), \
                _activation_peak(self):
            videos = self.pipeline(**kwargs).frames
        fps = live[0].inputs["fps"]
        for member, frames in zip(live, videos, strict=True):
            if member.canceled:
                self._finish(member, type="error", error=CANCELED)
            else:
                self._finish(member, type="output", video=to_mp4(frames, fps), fps=fps, frames=len(frames))

    def _on_step(self, batch: list[_Member], step: int, total: int) -> None:
        for member in batch:
            if member.canceled:
                self._finish(member, type="error", error=CANCELED)
        live = [m for m in batch if not m.done]
        if not live:
            raise _Canceled
        for member in live:
            member.emit(VideoEvent(member.request_id, "logs", text=f"step {step}/{total}"))

    def _oom_message(self, batch: list[_Member]) -> str:
        inputs = batch[0].inputs
        return (f"out of memory generating {len(batch)} video(s) of {inputs['max_frames']} frames at "
                f"{inputs['width']}x{inputs['height']}; try fewer frames or a smaller size")

    def _free_memory(self) -> None:
        """After a failed or stopped call: put offloaded models back and release cached blocks."""
        free_hooks = getattr(self.pipeline, "maybe_free_model_hooks", None)
        if free_hooks is not None:
            try:
                free_hooks()
            except Exception:
                log.exception("could not reset the pipeline's offload hooks")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
