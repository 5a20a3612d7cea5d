"""Shared fixtures and helpers for the image-to-video tests (registered in tests/conftest.py).

The tiny pipelines are built once per session into a temp folder and loaded once; tests share
the loaded pipelines, each with its own worker. Test modules also import the helpers below, so
pytest must not try to rewrite this module again when it loads it as a plugin: PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.video.demo import FAMILIES, TINY_DEFAULTS, build_tiny_i2v
from engine.video.families import VideoFamily, family_for, load_pipeline
from engine.video.worker import VideoEvent, VideoRequest, VideoWorker

PROMPTED = ("i2vgen-xl", "ltx")  # families that take a prompt


@pytest.fixture(scope="session")
def tiny_video_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-video")
    return {family: build_tiny_i2v(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_pipelines(tiny_video_dirs) -> dict:
    return {family: load_pipeline(str(path)) for family, path in tiny_video_dirs.items()}


@pytest.fixture
def make_worker(tiny_pipelines):
    """make_worker(family, **kwargs) -> a VideoWorker on the shared tiny pipeline, closed after."""
    workers = []

    def make(family: str, pipeline=None, **kwargs) -> VideoWorker:
        kwargs.setdefault("batch_window_s", 0.2)
        worker = VideoWorker(pipeline or tiny_pipelines[family], tiny_family(family), device="cpu", **kwargs)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.close()


def tiny_family(name: str) -> VideoFamily:
    return family_for(name).configure(defaults=TINY_DEFAULTS[name])


def test_image(width: int = 40, height: int = 32, seed: int = 0) -> Image.Image:
    """A smooth random-coloured RGB image (smooth so video frames are not pure noise)."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    top = corners[0, 0] * (1 - x) + corners[0, 1] * x
    bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
    return Image.fromarray((top * (1 - y) + bottom * y).astype(np.uint8), "RGB")


test_image.__test__ = False  # a helper, not a test


def inputs_for(family: str, **overrides) -> dict:
    inputs = {"image": test_image(), "seed": 1}
    if family in PROMPTED:
        inputs["prompt"] = "a red balloon drifts over a river"
    return {**inputs, **overrides}


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


async def collect(worker: VideoWorker, request_id: str, inputs: dict) -> list[VideoEvent]:
    return [event async for event in worker.generate(VideoRequest(request_id, inputs))]


def run_all(worker: VideoWorker, requests: dict[str, dict]) -> dict[str, list[VideoEvent]]:
    """Submit all requests at once (so they may batch) and wait for every stream to end."""

    async def main():
        results = await asyncio.gather(*(collect(worker, rid, inputs) for rid, inputs in requests.items()))
        return dict(zip(requests, results, strict=True))

    return asyncio.run(main())


def decode_mp4(data: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(data, extension=".mp4")


def step_logs(events: list[VideoEvent]) -> list[str]:
    return [e.text for e in events if e.type == "logs" and e.text.startswith("step ")]
