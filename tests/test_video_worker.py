"""The video worker end to end on tiny pipelines of each family: outputs, progress, batching,
cancellation and out-of-memory recovery."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from engine.errors import InvalidInput
from engine.video.worker import VideoRequest
from tests.video_fixtures import (collect, decode_mp4, inputs_for, run_all, step_logs, test_image,
                                  tiny_family)


FAMILIES = ("i2vgen-xl", "svd", "ltx")


@pytest.mark.parametrize("family", FAMILIES)
def test_video_has_requested_frames_and_ordered_progress(make_worker, family):
    worker = make_worker(family)
    frames = tiny_family(family).param("max_frames").default
    events = run_all(worker, {"r1": inputs_for(family, num_inference_steps=3, fps=12)})["r1"]

    assert [e.type for e in events[:-1]] == ["logs"] * (len(events) - 1)
    assert events[0].text == "Using seed: 1"
    assert step_logs(events) == ["step 1/3", "step 2/3", "step 3/3"]
    final = events[-1]
    assert final.type == "output" and final.error is None
    assert final.frames == frames and final.fps == 12
    video = decode_mp4(final.video)
    assert video.shape == (frames, 32, 32, 3)
    assert video.std() > 0  # not a blank video


def test_mp4_is_h264_yuv420p_at_requested_fps(make_worker, tmp_path):
    import imageio_ffmpeg

    events = run_all(make_worker("ltx"), {"r": inputs_for("ltx", fps=10)})["r"]
    path = tmp_path / "out.mp4"
    path.write_bytes(events[-1].video)
    meta = next(imageio_ffmpeg.read_frames(str(path)))
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 10


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_outputs_match_single_runs(make_worker, family):
    """Two requests batched into one call give the videos each gives alone (mp4 round trip
    allows small differences), and different seeds give different videos."""
    worker = make_worker(family)
    a = inputs_for(family, seed=11)
    b = inputs_for(family, seed=22, image=test_image(seed=5))
    if family in ("i2vgen-xl", "ltx"):
        b["prompt"] = "a quiet harbour at dawn"
    single_a = run_all(worker, {"a": a})["a"][-1]
    single_b = run_all(worker, {"b": b})["b"][-1]
    batched = run_all(worker, {"a": a, "b": b})

    assert worker.batch_sizes == {1: 2, 2: 1}
    for single, pair in ((single_a, batched["a"][-1]), (single_b, batched["b"][-1])):
        diff = np.abs(decode_mp4(single.video).astype(int) - decode_mp4(pair.video).astype(int))
        assert diff.mean() < 2
    other = np.abs(decode_mp4(single_a.video).astype(int) - decode_mp4(single_b.video).astype(int))
    assert other.mean() > 2


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_call_matches_single_calls_exactly(tiny_pipelines, family):
    """The raw frames, without the mp4 round trip: one member per request, own generator each."""
    pipe, fam = tiny_pipelines[family], tiny_family(family)
    members = [fam.normalize(inputs_for(family, seed=s, image=test_image(seed=s))) for s in (3, 4)]

    def frames(batch):
        generators = [torch.Generator().manual_seed(m["seed"]) for m in batch]
        return pipe(**fam.call_kwargs(batch, generators)).frames

    batched = frames(members)
    for i, member in enumerate(members):
        np.testing.assert_allclose(batched[i], frames([member])[0], atol=1e-4)


def test_incompatible_requests_run_in_separate_batches(make_worker):
    worker = make_worker("ltx")
    results = run_all(worker, {
        "a": inputs_for("ltx"), "b": inputs_for("ltx", seed=2),
        "c": inputs_for("ltx", num_inference_steps=3), "d": inputs_for("ltx", image=test_image(48, 32)),
    })
    assert all(events[-1].type == "output" for events in results.values())
    assert worker.batch_sizes == {2: 1, 1: 2}


def test_max_batch_size_is_respected(make_worker):
    worker = make_worker("ltx", max_batch_size=2)
    results = run_all(worker, {f"r{i}": inputs_for("ltx", seed=i) for i in range(5)})
    assert all(events[-1].type == "output" for events in results.values())
    assert worker.batch_sizes == {2: 2, 1: 1}


def test_cancel_stops_the_pipeline_at_the_next_step(make_worker):
    worker = make_worker("i2vgen-xl")

    async def main():
        events = []
        async for event in worker.generate(VideoRequest("long", inputs_for("i2vgen-xl", num_inference_steps=100))):
            events.append(event)
            if event.text == "step 2/100":
                worker.abort("long")
        after = await collect(worker, "next", inputs_for("i2vgen-xl"))
        return events, after

    events, after = asyncio.run(main())
    assert events[-1].type == "error" and events[-1].error == "canceled"
    assert len(step_logs(events)) < 10
    assert after[-1].type == "output"  # the worker keeps serving


def test_cancel_one_member_of_a_batch_keeps_the_other(make_worker):
    worker = make_worker("i2vgen-xl")
    a = inputs_for("i2vgen-xl", num_inference_steps=6, seed=1)
    b = inputs_for("i2vgen-xl", num_inference_steps=6, seed=2)

    async def main():
        async def watch_a():
            events = []
            async for event in worker.generate(VideoRequest("a", a)):
                events.append(event)
                if event.text == "step 2/6":
                    worker.abort("a")
            return events

        return await asyncio.gather(watch_a(), collect(worker, "b", b))

    events_a, events_b = asyncio.run(main())
    alone_b = run_all(worker, {"b": b})["b"]
    assert worker.batch_sizes[2] == 1
    assert events_a[-1].error == "canceled"
    assert events_b[-1].type == "output"
    assert step_logs(events_b) == [f"step {i}/6" for i in range(1, 7)]
    diff = np.abs(decode_mp4(events_b[-1].video).astype(int) - decode_mp4(alone_b[-1].video).astype(int))
    assert diff.mean() < 2


def test_abort_queued_request_ends_it_at_once(make_worker):
    worker = make_worker("i2vgen-xl", batch_window_s=0.0)

    async def main():
        long = asyncio.create_task(collect(worker, "long", inputs_for("i2vgen-xl", num_inference_steps=30)))
        await asyncio.sleep(0.05)
        queued = worker.generate(VideoRequest("queued", inputs_for("i2vgen-xl", num_inference_steps=3)))
        first = await queued.__anext__()
        worker.abort("queued")
        rest = [event async for event in queued]
        worker.abort("long")
        return [first, *rest], await long

    queued_events, long_events = asyncio.run(main())
    assert [e.type for e in queued_events] == ["logs", "error"]
    assert queued_events[-1].error == "canceled"
    assert long_events[-1].error == "canceled"


def test_leaving_the_stream_aborts_the_request(make_worker):
    worker = make_worker("i2vgen-xl")
    steps = []
    on_step = worker._on_step
    worker._on_step = lambda batch, step, total: (steps.append(step), on_step(batch, step, total))

    async def main():
        stream = worker.generate(VideoRequest("gone", inputs_for("i2vgen-xl", num_inference_steps=100)))
        async for event in stream:
            if event.text == "step 1/100":
                break
        await stream.aclose()
        return await collect(worker, "next", inputs_for("i2vgen-xl"))

    after = asyncio.run(main())
    assert after[-1].type == "output"
    assert worker.batch_sizes[1] == 2
    assert len(steps) < 20  # the abandoned request's steps (< 100) plus the next one's 2


class _RunsOutOfMemory:
    """Wraps a pipeline and fails calls larger than `max_batch` like a CUDA OOM would."""

    def __init__(self, pipeline, max_batch: int):
        self.__dict__.update(pipeline=pipeline, max_batch=max_batch, calls=[])

    def __call__(self, **kwargs):
        self.calls.append(len(kwargs["generator"]))
        if len(kwargs["generator"]) > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.pipeline(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __setattr__(self, name, value):  # the worker's step hook goes to the real pipeline
        if name == "progress_bar":
            setattr(self.pipeline, name, value)
        else:
            object.__setattr__(self, name, value)

    def __delattr__(self, name):
        delattr(self.pipeline, name)


def test_out_of_memory_batch_is_retried_one_by_one(make_worker, tiny_pipelines):
    flaky = _RunsOutOfMemory(tiny_pipelines["ltx"], max_batch=1)
    worker = make_worker("ltx", pipeline=flaky)
    results = run_all(worker, {"a": inputs_for("ltx", seed=1), "b": inputs_for("ltx", seed=2)})
    assert flaky.calls == [2, 1, 1]
    for events in results.values():
        assert events[-1].type == "output"
        assert any("out of memory" in (e.text or "") for e in events)


def test_out_of_memory_single_request_fails_clearly_and_worker_keeps_serving(make_worker, tiny_pipelines):
    flaky = _RunsOutOfMemory(tiny_pipelines["ltx"], max_batch=0)
    worker = make_worker("ltx", pipeline=flaky)
    failed = run_all(worker, {"a": inputs_for("ltx")})["a"][-1]
    assert failed.type == "error" and failed.error.startswith("out of memory")
    assert "try fewer frames or a smaller size" in failed.error
    flaky.max_batch = 1
    assert run_all(worker, {"b": inputs_for("ltx")})["b"][-1].type == "output"


def test_invalid_inputs_raise_before_any_event(make_worker):
    worker = make_worker("ltx")
    with pytest.raises(InvalidInput, match="8k\\+1"):
        run_all(worker, {"a": inputs_for("ltx", max_frames=10)})
    with pytest.raises(InvalidInput, match="prompt is required"):
        run_all(worker, {"a": {"image": test_image()}})


def test_close_fails_queued_requests(make_worker):
    worker = make_worker("i2vgen-xl", batch_window_s=0.0)

    async def main():
        running = asyncio.create_task(collect(worker, "a", inputs_for("i2vgen-xl", num_inference_steps=50)))
        queued = asyncio.create_task(collect(worker, "b", inputs_for("i2vgen-xl", num_inference_steps=3)))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(worker.close)
        return await running, await queued

    running, queued = asyncio.run(main())
    assert running[-1].error == "canceled"
    assert queued[-1].error == "the video worker was closed"
