"""Loading versions onto devices, and keeping them there under a per-device memory budget.

Text models load with transformers `from_pretrained` (dtype, accelerate device maps, bitsandbytes
4/8-bit); image-to-video pipelines with diffusers. A `ModelPool` loads lazily on first use (or
eagerly at start), counts each version's bytes against the budget of the devices it sits on, and
unloads the least-recently-used idle version when a new one does not fit. A failed load marks only
that version failed; everything else keeps serving.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import ModelUnavailable
from engine.registry import Version

log = logging.getLogger("ember.loading")

QUANT_FACTOR = {"none": 1.0, "bnb-8bit": 0.55, "bnb-4bit": 0.3}


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def torch_dtype(name: str, device: str):
    """The torch dtype for a version's `dtype` setting; `auto` is bf16 on CUDA, fp32 on CPU."""
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def device_map_for(placement: Any) -> tuple[Any, list[str], dict | None]:
    """Translate a version's placement into (device_map, devices charged, max_memory)."""
    if isinstance(placement, dict):
        devices = sorted({_device_name(d) for d in placement.values()})
        return placement, devices, None
    if isinstance(placement, list):
        if not cuda_available():
            raise ModelUnavailable(f"placement {placement} needs CUDA devices, and none is present")
        import torch

        max_memory = {int(i): torch.cuda.get_device_properties(int(i)).total_memory for i in placement}
        return "auto", [f"cuda:{int(i)}" for i in placement], max_memory
    placement = str(placement or "auto")
    if placement == "auto":
        return ("auto", ["cuda:0"], None) if cuda_available() else ("cpu", ["cpu"], None)
    if placement == "cpu":
        return "cpu", ["cpu"], None
    if placement.startswith("cuda"):
        if not cuda_available():
            raise ModelUnavailable(f"placement {placement} needs CUDA, and no CUDA device is present")
        return {"": placement}, [placement], None
    raise ModelUnavailable(f"unknown placement {placement!r}")


def _device_name(device: Any) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device) if str(device) in ("cpu", "disk") or str(device).startswith("cuda") else "cpu"


def weights_bytes(folder: Path) -> int:
    files = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")]
    return sum(p.stat().st_size for p in files)


def estimate_bytes(version: Version) -> int:
    """Bytes a version will take once loaded, before loading it (weights × quantization)."""
    if version.local_path is None:
        return 0
    base = weights_bytes(version.local_path) * QUANT_FACTOR[version.quantization]
    return int(base + int(version.limits.get("kv_cache_bytes", 0)))


def quantization_config(version: Version, dtype):
    if version.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if version.quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_text_model(version: Version):
    """transformers model + tokenizer for a text-generation version."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map, devices, max_memory = device_map_for(version.placement)
    dtype = torch_dtype(version.dtype, devices[0])
    model_cls = getattr(transformers, version.model_class) if version.model_class else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map}
    if max_memory:
        kwargs["max_memory"] = max_memory
    quant = quantization_config(version, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if kwargs["device_map"] == "cpu":
            kwargs["device_map"] = {"": "cpu"}
    model = model_cls.from_pretrained(version.local_path, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(version.local_path)
    if version.chat_template:
        tokenizer.chat_template = version.chat_template
    return model, tokenizer, devices


def load_video_pipeline(version: Version):
    """diffusers pipeline for an image-to-video version (the family adapts its quirks)."""
    from engine.video.families import load_pipeline

    _, devices, _ = device_map_for(version.placement)
    dtype = torch_dtype(version.dtype, devices[0])
    pipeline = load_pipeline(str(version.local_path), version.pipeline_class, dtype=dtype,
                             device=devices[0], cpu_offload=bool(version.limits.get("cpu_offload")),
                             compile=bool(version.limits.get("compile")))
    return pipeline, devices


def download(version: Version, progress: bool = True) -> Path:
    """Fetch a hub version's weights into the hub cache (with progress bars) where a hub is reachable."""
    from huggingface_hub import snapshot_download

    if not version.weights.repo:
        raise ModelUnavailable(f"{version.model} has no hub repo to download")
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return Path(snapshot_download(version.weights.repo, revision=version.weights.revision))


# ---------------------------------------------------------------- the pool


@dataclass
class Loaded:
    """A version resident on its devices, with the worker that serves it."""

    version: Version
    worker: Any  # LLMEngine or VideoWorker
    devices: list[str]
    bytes: int
    close: Callable[[], None] = lambda: None


@dataclass
class VersionState:
    status: str = "unloaded"  # unloaded | loading | ready | failed | unavailable
    error: str | None = None
    devices: list[str] = field(default_factory=list)
    bytes: int = 0
    last_used: float = 0.0
    in_use: int = 0
    loaded: Loaded | None = None


def default_budgets() -> dict[str, int]:
    """90% of each GPU; half of system RAM for the CPU."""
    import psutil

    budgets = {"cpu": int(psutil.virtual_memory().total * 0.5)}
    if cuda_available():
        import torch

        for i in range(torch.cuda.device_count()):
            budgets[f"cuda:{i}"] = int(torch.cuda.get_device_properties(i).total_memory * 0.9)
    return budgets


class ModelPool:
    """Loads versions on demand under per-device memory budgets, evicting LRU idle ones."""

    def __init__(self, build: Callable[[Version], Loaded], budgets: dict[str, int] | None = None):
        self.build = build
        self.budgets = budgets if budgets is not None else default_budgets()
        self.states: dict[str, VersionState] = {}
        self.lock = threading.RLock()
        self.loading: dict[str, threading.Event] = {}

    def state(self, version: Version) -> VersionState:
        with self.lock:
            state = self.states.setdefault(version.id, VersionState())
            if not version.available and state.status == "unloaded":
                state.status, state.error = "unavailable", version.unavailable_reason
            return state

    def used(self, device: str) -> int:
        return sum(s.bytes // max(1, len(s.devices)) for s in self.states.values()
                   if s.status in ("ready", "loading") and device in s.devices)

    def acquire(self, version: Version) -> Loaded:
        """The loaded version (loading it first if needed); pair every call with `release`."""
        while True:
            with self.lock:
                state = self.state(version)
                if state.status == "ready" and state.loaded is not None:
                    state.in_use += 1
                    state.last_used = time.monotonic()
                    return state.loaded
                if state.status == "unavailable":
                    raise ModelUnavailable(f"{version.ref} is unavailable: {state.error}")
                if state.status == "failed":
                    raise ModelUnavailable(f"{version.ref} failed to load: {state.error}")
                waiter = self.loading.get(version.id)
                if waiter is None:
                    waiter = self.loading[version.id] = threading.Event()
                    state.status = "loading"
                    break
            waiter.wait()
        try:
            self._make_room(version)
            loaded = self.build(version)
        except Exception as exc:  # noqa: BLE001 - a failed load must not take the server down
            log.exception("loading %s failed", version.ref)
            with self.lock:
                state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
                self.loading.pop(version.id).set()
            raise ModelUnavailable(f"{version.ref} failed to load: {state.error}") from exc
        with self.lock:
            state.status, state.error, state.loaded = "ready", None, loaded
            state.devices, state.bytes = loaded.devices, loaded.bytes
            state.in_use, state.last_used = 1, time.monotonic()
            self.loading.pop(version.id).set()
        return loaded

    def release(self, version: Version) -> None:
        with self.lock:
            state = self.states[version.id]
            state.in_use = max(0, state.in_use - 1)
            state.last_used = time.monotonic()

    def _make_room(self, version: Version) -> None:
        """Unload least-recently-used idle versions until `version`'s estimate fits its devices."""
        need = estimate_bytes(version)
        _, devices, _ = device_map_for(version.placement)
        for device in devices:
            budget = self.budgets.get(device)
            if budget is None:
                continue
            share = need // len(devices)
            if share > budget:
                raise ModelUnavailable(f"{version.ref} needs about {share / 2**30:.2f} GiB on {device}, "
                                       f"more than its budget of {budget / 2**30:.2f} GiB")
            while self.used(device) + share > budget:
                victim = self._lru_idle(device)
                if victim is None:
                    raise ModelUnavailable(
                        f"{version.ref} needs about {share / 2**30:.2f} GiB on {device}; "
                        f"{self.used(device) / 2**30:.2f} of {budget / 2**30:.2f} GiB are held by busy models")
                self.unload(victim)

    def _lru_idle(self, device: str) -> str | None:
        with self.lock:
            idle = [(s.last_used, vid) for vid, s in self.states.items()
                    if s.status == "ready" and s.in_use == 0 and device in s.devices]
        return min(idle)[1] if idle else None

    def unload(self, version_id: str) -> None:
        with self.lock:
            state = self.states.get(version_id)
            if state is None or state.loaded is None:
                return
            loaded, state.loaded = state.loaded, None
            state.status, state.bytes = "unloaded", 0
        log.info("unloading %s", loaded.version.ref)
        loaded.close()
        del loaded
        gc.collect()
        if cuda_available():
            import torch

            torch.cuda.empty_cache()

    def close(self) -> None:
        for version_id in list(self.states):
            self.unload(version_id)
