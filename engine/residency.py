"""Where a loaded worker's bytes sit, and putting a worker to sleep and waking it.

`measure` counts a worker's real tensors per device: the weights of its torch modules plus an LLM
engine's KV cache and workspaces (`engine.memory_bytes()` when the engine offers it, else the
runner's cache tensors). That is what the pool charges against each device's budget.

Sleep frees what can be rebuilt cheaply and parks what cannot: an LLM engine's KV cache and
workspaces are freed (their contents are only a cache), and weights on a GPU are copied to pinned
host memory so waking is one host-to-device copy instead of a load from disk. On a CPU-only host
the weights already live in host memory, so sleep frees the KV cache only (and waking allocates a
fresh zeroed cache, the same as a cold start does). An engine that brings
its own `sleep()`/`wake()` is asked to do it itself.
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
    """An LLM engine's KV cache and workspaces per device (empty for other workers)."""
    own = getattr(worker, "memory_bytes", None)
    if callable(own):
        return {str(device): int(size) for device, size in own().items()}
    runner = getattr(worker, "runner", None)
    if runner is None:
        return {}
    totals: dict[str, int] = defaultdict(int)
    tensors = [runner.kv, runner.workspace.k, runner.workspace.v]
    graphs = getattr(runner, "graphs", None)
    if graphs is not None:  # CUDA graphs keep their own gather workspace (their private pool is not counted)
        tensors += [graphs.workspace.k, graphs.workspace.v]
    for tensor in tensors:
        totals[str(tensor.device)] += tensor.untyped_storage().nbytes()
    return {device: size for device, size in totals.items() if size}


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


@dataclass
class Asleep:
    """What waking needs: each moved tensor's home device, and the freed cache's shape."""

    homes: dict[int, torch.device] = field(default_factory=dict)
    kv_shape: tuple[int, ...] = ()
    graphs: bool = False
    own: bool = False  # the engine slept itself


def sleep(worker: Any) -> Asleep:
    """Free the worker's caches and park its GPU weights in pinned host memory."""
    own = getattr(worker, "sleep", None)
    if callable(own) and callable(getattr(worker, "wake", None)):
        own()
        return Asleep(own=True)
    asleep = Asleep()
    runner = getattr(worker, "runner", None)
    if runner is not None:
        asleep.kv_shape = tuple(runner.kv.shape)
        asleep.graphs = runner.graphs is not None
        runner.graphs = None  # captured against addresses that are about to go away
        runner.kv = torch.empty(0, dtype=runner.dtype, device=runner.device)
        runner.k_caches, runner.v_caches = [], []
        runner.workspace.capacity = 0
        runner.workspace.k = runner.workspace.v = torch.empty(0, dtype=runner.dtype, device=runner.device)
        _forget_prefix_cache(worker)
    for tensor in _tensors(modules_of(worker)):
        if tensor.device.type == "cuda":
            asleep.homes[id(tensor)] = tensor.device
            parked = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
            tensor.data = parked.copy_(tensor.data)
    if asleep.homes or (runner is not None and runner.device.type == "cuda"):
        torch.cuda.empty_cache()  # hand the freed blocks back so other processes see them too
    return asleep


def wake(worker: Any, asleep: Asleep) -> None:
    """Undo `sleep`: weights back to their devices, a zeroed KV cache of the same size."""
    if asleep.own:
        worker.wake()
        return
    for tensor in _tensors(modules_of(worker)):
        home = asleep.homes.get(id(tensor))
        if home is not None:
            tensor.data = tensor.data.to(home, non_blocking=True)
    runner = getattr(worker, "runner", None)
    if runner is not None:
        # The old storage went back to the allocator at sleep; the per-layer views follow the new one.
        runner.kv = torch.zeros(asleep.kv_shape, dtype=runner.dtype, device=runner.device)
        runner.k_caches, runner.v_caches = list(runner.kv[0]), list(runner.kv[1])
        if asleep.graphs:
            from engine.llm.cuda_graphs import DecodeGraphs

            runner.graphs = DecodeGraphs(runner, worker.config.max_num_seqs, worker.max_model_len)
    if any(home.type == "cuda" for home in asleep.homes.values()) or (
            runner is not None and runner.device.type == "cuda"):
        torch.cuda.synchronize()


def _forget_prefix_cache(worker: Any) -> None:
    """The cached prefixes' keys and values are gone with the cache; their hashes must go too."""
    manager = getattr(worker, "block_manager", None)
    if manager is None:
        return
    fresh = type(manager)(manager.num_blocks, manager.block_size, manager.enable_prefix_caching)
    worker.block_manager = fresh
    worker.scheduler.bm = fresh
