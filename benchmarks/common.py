"""Helpers every benchmark shares."""

from __future__ import annotations

import platform
import re

import torch


def device_label(device: str) -> str:
    """A file-name-safe name of the device the figures come from (GPU model, or CPU threads)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{torch.get_num_threads()}threads-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
