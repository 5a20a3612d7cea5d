"""Where a loaded worker's bytes sit, and putting a worker to sleep and waking it.

`measure` counts a worker's real tensors per device: the weights of its torch modules plus what the
worker reports beyond them (`worker.memory_bytes()`: an LLM engine's KV cache and workspaces, a video
worker's largest activation peak so far). That is what the pool charges against each device's
budget; workers whose charge grows with use (`memory_grows`) are measured again after each use.

Sleep frees what can be rebuilt cheaply and parks what cannot: an LLM engine frees its KV cache
and workspaces (their contents are only a cache), and weights on a GPU are copied to pinned host
memory so waking is one host-to-device copy instead of a load from disk. On a CPU-only host the
weights already live in host memory, so sleep frees the KV cache only (and waking allocates a
fresh one, as a cold start does). Workers with their own `sleep()`/`wake()` (the LLM engine) do it
themselves with `park_weights`/`restore_weights`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch


def modules_of(worker: Any) -> list[torch.nn.Module]:
    """The torch modules a worker computes with: an LLM engine's model, a pipeline's components."""
    model = getattr(worker, "model", None)
    if isinstance(model, torch.nn.Module):
        return [model]
    pipeline = getattr(worker, "pipeline", None)
    components = getattr(pipeline, "components", None) or {}
    return [c for c in components.values() if isinstance(c, torch.nn.Module)]


def _tensors(modules: list[torch.nn.Module]):
    """Every parameter and buffer once (tied weights are one tensor)."""
    seen: set[int] = set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


def weight_bytes(worker: Any) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for tensor in _tensors(modules_of(worker)):
        if not tensor.is_meta:
            totals[str(tensor.device)] += tensor.nbytes
    return dict(totals)


def cache_bytes(worker: Any) -> dict[str, int]:
    """What a worker holds beyond its weights, per device (an LLM engine's KV cache, a video
    worker's activation peak); empty for workers that report nothing."""
    own = getattr(worker, "memory_bytes", None)
    if not callable(own):
        return {}
    return {str(device): int(size) for device, size in own().items() if size}


def measure(worker: Any) -> dict[str, int]:
    """Bytes per device the worker holds right now: weights plus caches."""
    totals: dict[str, int] = defaultdict(int)
    for part in (weight_bytes(worker), cache_bytes(worker)):
        for device, size in part.items():
            totals[device] += size
    return {device: size for device, size in totals.items() if size}


def can_sleep(worker: Any) -> bool:
    return callable(getattr(worker, "sleep", None)) or bool(modules_of(worker))


def is_idle(worker: Any) -> bool:
    stats = getattr(worker, "stats", None)
    if callable(stats):
        s = stats()
        return not (s.get("running") or s.get("waiting") or s.get("active_requests"))
    return not getattr(worker, "_active", None) and not getattr(worker, "_pending", None)


def park_weights(modules: list[torch.nn.Module]) -> dict[int, torch.device]:
    """Copy every GPU parameter and buffer into pinned host memory (waking is then one fast
    host-to-device copy); returns each moved tensor's home device. CPU tensors stay."""
    homes: dict[int, torch.device] = {}
    for tensor in _tensors(modules):
        if tensor.device.type == "cuda":
            homes[id(tensor)] = tensor.device
            parked = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
            tensor.data = parked.copy_(tensor.data)
    if homes:
        torch.cuda.empty_cache()  # hand the freed blocks back so other processes see them too
    return homes


def restore_weights(modules: list[torch.nn.Module], homes: dict[int, torch.device]) -> None:
    """Undo `park_weights`."""
    for tensor in _tensors(modules):
        home = homes.get(id(tensor))
        if home is not None:
            tensor.data = tensor.data.to(home, non_blocking=True)
    if homes:
        torch.cuda.synchronize()


@dataclass
class Asleep:
    """What waking needs: each parked tensor's home device, or that the worker slept itself."""

    homes: dict[int, torch.device] = field(default_factory=dict)
    own: bool = False  # the worker slept itself (an LLM engine frees its KV cache too)


def sleep(worker: Any) -> Asleep:
    """Put the worker to sleep: its own `sleep()` when it has one (LLM engines), else park the
    weights of its modules (pipelines)."""
    own = getattr(worker, "sleep", None)
    if callable(own) and callable(getattr(worker, "wake", None)):
        own()
        return Asleep(own=True)
    return Asleep(homes=park_weights(modules_of(worker)))


def wake(worker: Any, asleep: Asleep) -> None:
    """Undo `sleep`."""
    if asleep.own:
        worker.wake()
    else:
        restore_weights(modules_of(worker), asleep.homes)
