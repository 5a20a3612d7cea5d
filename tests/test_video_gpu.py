"""The video worker on CUDA: half precision, model CPU offload and torch.compile, on the tiny
pipelines. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from engine.video.families import load_pipeline
from engine.video.worker import VideoWorker
from tests.video_fixtures import decode_mp4, inputs_for, run_all, step_logs, tiny_family


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family, dtype, cpu_offload, compile", [
    ("i2vgen-xl", "float16", False, False),
    ("svd", "float16", True, False),
    ("ltx", "bfloat16", False, True),
])
def test_worker_on_cuda(tiny_video_dirs, family, dtype, cpu_offload, compile):
    pipe = load_pipeline(str(tiny_video_dirs[family]), dtype=dtype, device="cuda",
                         cpu_offload=cpu_offload, compile=compile)
    worker = VideoWorker(pipe, tiny_family(family), device="cuda", batch_window_s=0.2)
    try:
        results = run_all(worker, {"a": inputs_for(family, seed=1), "b": inputs_for(family, seed=2)})
    finally:
        worker.close()
    frames = tiny_family(family).param("max_frames").default
    for events in results.values():
        assert events[-1].type == "output", events[-1].error
        assert step_logs(events) == ["step 1/2", "step 2/2"]
        assert decode_mp4(events[-1].video).shape[0] == frames
    assert worker.batch_sizes == {2: 1}
    if not cpu_offload:  # the activation peak is charged to the pool while the weights are on the GPU
        assert worker.activation_peak_bytes > 0
        assert worker.memory_bytes() == {f"cuda:{torch.cuda.current_device()}": worker.activation_peak_bytes}
