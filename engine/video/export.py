"""Frames to browser-playable files.

mp4 is H.264 in yuv420p with the index at the front (`+faststart`), written by the ffmpeg that
imageio-ffmpeg ships, so it works offline. yuv420p needs even sides: odd frames are padded by
repeating the last row/column rather than rescaled.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Sequence

import numpy as np


def to_uint8_frames(frames) -> np.ndarray:
    """(F, H, W, 3) uint8 from float frames in [0, 1], uint8 frames, or PIL images."""
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
        array = frames
    elif isinstance(frames, np.ndarray) or hasattr(frames, "numpy"):
        array = np.asarray(frames, dtype=np.float32)
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    else:
        array = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (frames, height, width, 3), got {array.shape}")
    return array


def to_mp4(frames: Sequence | np.ndarray, fps: float) -> bytes:
    """Encode frames as an H.264 mp4 and return its bytes."""
    import imageio.v2 as imageio

    array = _pad_even(to_uint8_frames(frames))
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio.get_writer(
            path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=1, ffmpeg_log_level="error", output_params=["-movflags", "+faststart"],
        )
        with writer:
            for frame in array:
                writer.append_data(frame)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def to_gif(frames: Sequence | np.ndarray, fps: float) -> bytes:
    """Encode frames as a looping GIF (Pillow only)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in to_uint8_frames(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    return buffer.getvalue()


def _pad_even(array: np.ndarray) -> np.ndarray:
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return array
