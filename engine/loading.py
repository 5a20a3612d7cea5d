"""Loading versions onto devices, and keeping them there under a per-device memory budget.

Text models load with transformers `from_pretrained` (dtype, accelerate device maps, bitsandbytes
4/8-bit); GGUF files are dequantized once through transformers' GGUF support and kept as a
safetensors folder under EMBER_HOME, so only the first start pays for it; embedding models load as
transformers encoders (or decoders) without their heads; image-to-video pipelines with diffusers. A `ModelPool` loads lazily on first use (or
eagerly at start), counts each version's bytes against the budget of the devices it sits on, and
unloads the least-recently-used idle version when a new one does not fit. A failed load marks only
that version failed; everything else keeps serving.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import threading
import time
from functools import lru_cache
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


@lru_cache(maxsize=32)
def gguf_parameter_count(path: Path) -> int:
    """Number of weights in a GGUF file (read from its tensor index, not its data)."""
    from gguf import GGUFReader

    return sum(int(tensor.n_elements) for tensor in GGUFReader(str(path)).tensors)


def estimate_bytes(version: Version) -> int:
    """Bytes a version will take once loaded, before loading it (weights × quantization)."""
    if version.local_path is None:
        return 0
    if version.gguf_file is not None:
        _, devices, _ = device_map_for(version.placement)
        itemsize = torch_dtype(version.dtype, devices[0]).itemsize
        base = gguf_parameter_count(version.gguf_file) * itemsize * QUANT_FACTOR[version.quantization]
    else:
        base = weights_bytes(version.local_path) * QUANT_FACTOR[version.quantization]
    return int(base + int(version.limits.get("kv_cache_bytes", 0)))


def quantization_config(version: Version, dtype):
    if version.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if version.quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def dequantized_folder(version: Version, dtype, model_cls) -> Path:
    """A GGUF version as an ordinary safetensors folder (weights, config, tokenizer, chat template).

    The first call dequantizes the GGUF through transformers (with its progress bar) and writes the
    folder under the version's cache; later calls, in this process or the next start, find it there.
    The folder is keyed by the GGUF's sha256 and the dtype, and written atomically under a file lock,
    so two servers starting together dequantize once.
    """
    from filelock import FileLock
    from transformers import AutoTokenizer

    folder = version.gguf_cache / str(dtype).removeprefix("torch.")
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "config.json").exists():
            return folder
        source, name = version.gguf_file.parent, version.gguf_file.name
        log.warning("dequantizing %s (%s) once; later starts load the cached copy in %s",
                    version.model, name, folder)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        model = model_cls.from_pretrained(source, gguf_file=name, dtype=dtype)
        # The weights are plain tensors now; drop the GGUF marker so the model saves as safetensors.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
        log.warning("dequantized %s in %.1f s", version.model, time.perf_counter() - started)
        del model
        gc.collect()
    return folder


def load_text_model(version: Version):
    """transformers model + tokenizer for a text-generation version (a folder or a GGUF file)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map, devices, max_memory = device_map_for(version.placement)
    dtype = torch_dtype(version.dtype, devices[0])
    model_cls = getattr(transformers, version.model_class) if version.model_class else AutoModelForCausalLM
    source = dequantized_folder(version, dtype, model_cls) if version.gguf_file else version.local_path
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map}
    if max_memory:
        kwargs["max_memory"] = max_memory
    quant = quantization_config(version, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if kwargs["device_map"] == "cpu":
            kwargs["device_map"] = {"": "cpu"}
    model = model_cls.from_pretrained(source, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if version.chat_template:
        tokenizer.chat_template = version.chat_template
    return model, tokenizer, devices


def load_embedding_model(version: Version):
    """transformers base model (no LM head) + tokenizer for an embedding version."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    device_map, devices, _ = device_map_for(version.placement)
    dtype = torch_dtype(version.dtype, devices[0])
    model_cls = getattr(transformers, version.model_class) if version.model_class else AutoModel
    source = dequantized_folder(version, dtype, model_cls) if version.gguf_file else version.local_path
    model = model_cls.from_pretrained(source, dtype=dtype, device_map=device_map)
    model.eval()
    return model, AutoTokenizer.from_pretrained(source), devices


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
    if version.weights.file:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(version.weights.repo, version.weights.file,
                                    revision=version.weights.revision))
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
