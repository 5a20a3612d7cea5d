"""Helpers every benchmark shares."""

from __future__ import annotations

import platform
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch


def device_label(device: str) -> str:
    """A file-name-safe name of the device the figures come from (GPU model, or CPU threads)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{torch.get_num_threads()}threads-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def build_once(folder: Path, ready: str, build: Callable[[Path], None]) -> Path:
    """`folder`, built on first use: `build` fills a sibling `.partial` folder that is renamed only
    once complete, so an interrupted build is never taken for a finished one (`ready` names a file
    a finished folder has)."""
    if (folder / ready).exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder
