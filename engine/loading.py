"""Loading versions onto devices, and keeping them there under a per-device memory budget.

Text models load with transformers `from_pretrained` (dtype, accelerate device maps, bitsandbytes
4/8-bit); GGUF files are dequantized once through transformers' GGUF support and kept as a
safetensors folder under EMBER_HOME, so only the first start pays for it; embedding models load as
transformers encoders (or decoders) without their heads; image-to-video pipelines with diffusers. A `ModelPool` loads lazily on first use (or
eagerly at start), counts each version's bytes against the budget of the devices it sits on, and
makes room by putting least-recently-used idle versions to sleep or unloading them (see ModelPool).
A failed load marks only that version failed; everything else keeps serving.
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

from engine import residency
from engine.errors import ModelBusy, ModelUnavailable
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
    return int(base + _kv_cache_estimate(version))


def _kv_cache_estimate(version: Version) -> int:
    """A text version's KV cache: its `kv_cache_bytes`, else the engine's CPU default on a CPU
    placement. On a GPU without a setting the engine takes a share of the memory left free, which
    the pool measures once loaded."""
    if version.kind != "text-generation":
        return 0
    if version.limits.get("kv_cache_bytes"):
        return int(version.limits["kv_cache_bytes"])
    from engine.llm.engine import CPU_KV_CACHE_BYTES

    _, devices, _ = device_map_for(version.placement)
    return CPU_KV_CACHE_BYTES if devices == ["cpu"] else 0


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
    bytes: int  # the builder's own count; the pool measures real tensors where it can
    close: Callable[[], None] = lambda: None


class NoRoom(ModelUnavailable):
    """A version does not fit its devices right now (busy or pinned versions hold the memory)."""



@dataclass
class VersionState:
    """One version's place in the lifecycle, and the bytes it holds on each device right now."""

    status: str = "unloaded"  # unloaded | loading | sleeping | ready | failed | unavailable
    error: str | None = None
    phase: str | None = None  # what a transition in progress is doing (loading weights, waking, ...)
    devices: list[str] = field(default_factory=list)  # where it serves from
    memory: dict[str, int] = field(default_factory=dict)  # bytes held per device, charged to budgets
    awake_memory: dict[str, int] = field(default_factory=dict)  # what it held before it slept
    last_used: float = 0.0  # monotonic
    last_used_at: float | None = None  # wall clock, for people
    expires_at: float | None = None  # monotonic time its keep_alive runs out (None: never)
    in_use: int = 0
    loaded: Loaded | None = None
    asleep: residency.Asleep | None = None

    @property
    def bytes(self) -> int:
        return sum(self.memory.values())


@dataclass
class PoolEvent:
    """A finished lifecycle transition, for metrics and logs."""

    kind: str  # load | wake | sleep | unload | fail
    version: Version
    seconds: float = 0.0
    reason: str = "request"  # request | evict | expired | keep_alive | shutdown


def default_budgets() -> dict[str, int]:
    """90% of each GPU; half of system RAM for the CPU."""
    import psutil

    budgets = {"cpu": int(psutil.virtual_memory().total * 0.5)}
    if cuda_available():
        import torch

        for i in range(torch.cuda.device_count()):
            budgets[f"cuda:{i}"] = int(torch.cuda.get_device_properties(i).total_memory * 0.9)
    return budgets


def _split(total: int, devices: list[str]) -> dict[str, int]:
    return {device: total // max(1, len(devices)) for device in devices}


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


class ModelPool:
    """Versions on devices under per-device memory budgets.

    Lifecycle: unloaded -> loading -> ready <-> sleeping, and back to unloaded on unload, eviction
    or keep_alive expiry; a failed load is `failed` and touches nothing else. When a version does
    not fit, idle versions make room least-recently-used first: each is put to sleep if that frees
    bytes on the crowded device and the host has room for what it parks, else unloaded. Pinned and
    busy versions are never chosen. `memory` is re-measured from real tensors after every change.
    """

    def __init__(self, build: Callable[[Version], Loaded], budgets: dict[str, int] | None = None):
        self.build = build
        self.budgets = budgets if budgets is not None else default_budgets()
        self.states: dict[str, VersionState] = {}
        self.lock = threading.RLock()
        self.transitions: dict[str, threading.Event] = {}  # version id -> set when its change ends
        self.listeners: list[Callable[[PoolEvent], None]] = []

    # -- reading ------------------------------------------------------------------------------

    def state(self, version: Version) -> VersionState:
        with self.lock:
            state = self.states.setdefault(version.id, VersionState())
            if not version.available and state.status == "unloaded":
                state.status, state.error = "unavailable", version.unavailable_reason
            return state

    def used(self, device: str, exclude: str | None = None) -> int:
        with self.lock:
            return sum(s.memory.get(device, 0) for vid, s in self.states.items() if vid != exclude)

    # -- serving ------------------------------------------------------------------------------

    def acquire(self, version: Version, on_phase: Callable[[str], None] | None = None) -> Loaded:
        """The ready version (loading or waking it first if needed); pair every call with `release`."""
        while True:
            with self.lock:
                state = self.state(version)
                waiter = self.transitions.get(version.id)
                if waiter is None:
                    dead = self._detach_if_dead(state)
                    if dead is not None:
                        log.warning("%s: its worker died; loading it again", version.ref)
                        threading.Thread(target=dead.close, name="ember-pool-close", daemon=True).start()
                    if state.status == "ready" and state.loaded is not None:
                        state.in_use += 1
                        self._touch(state)
                        return state.loaded
                    if state.status == "unavailable":
                        raise ModelUnavailable(f"{version.ref} is unavailable: {state.error}")
                    if state.status == "failed":
                        raise ModelUnavailable(f"{version.ref} failed to load: {state.error}")
                    waking = state.status == "sleeping"
                    self.transitions[version.id] = threading.Event()
                    state.status = "loading"
                    break
            waiter.wait()
        phase = on_phase or (lambda _: None)
        kind, start = ("wake" if waking else "load"), time.perf_counter()
        try:
            loaded = self._wake(version, state, phase) if waking else self._load(version, state, phase)
        except NoRoom:
            with self.lock:  # nothing changed for this version: it may fit later
                state.status, state.phase = ("sleeping" if waking else "unloaded"), None
                self.transitions.pop(version.id).set()
            raise
        except Exception as exc:  # noqa: BLE001 - a failed load must not take the server down
            log.exception("%s of %s failed", kind, version.ref)
            self._failed(version, state, exc)
            raise ModelUnavailable(f"{version.ref} failed to load: {state.error}") from exc
        with self.lock:
            state.status, state.error, state.phase = "ready", None, None
            state.in_use = 1
            self._touch(state)
            self.transitions.pop(version.id).set()
        self._emit(PoolEvent(kind, version, time.perf_counter() - start))
        phase("ready")
        return loaded

    @staticmethod
    def _detach_if_dead(state: VersionState) -> Loaded | None:
        """A ready or sleeping version whose worker has died (an LLM engine process killed: `alive`
        turned False) becomes unloaded, so this acquire loads it again; returns the dead one to close."""
        loaded = state.loaded
        if state.status not in ("ready", "sleeping") or loaded is None or getattr(loaded.worker, "alive", True):
            return None
        state.loaded = state.asleep = None
        state.status, state.memory, state.awake_memory, state.in_use = "unloaded", {}, {}, 0
        return loaded

    def release(self, version: Version, keep_alive: float | None = None) -> None:
        """Done with one `acquire`. `keep_alive` (seconds; this request's, else the version's) starts
        counting once nobody uses the version: 0 unloads it now, negative or None never."""
        with self.lock:
            state = self.states[version.id]
            state.in_use = max(0, state.in_use - 1)
            self._touch(state)
            loaded = state.loaded
            if (loaded is not None and getattr(loaded.worker, "memory_grows", False) and state.asleep is None
                    and version.id not in self.transitions):
                state.memory = self._measure(loaded)  # e.g. a video call's activation peak, now known
            idle_for = keep_alive if keep_alive is not None else version.keep_alive
            if state.in_use or version.pin or idle_for is None or idle_for < 0:
                state.expires_at = None
                return
            state.expires_at = state.last_used + idle_for
        if idle_for == 0:
            threading.Thread(target=self.reap, name="ember-pool-reap", daemon=True).start()

    def reap(self, now: float | None = None) -> list[str]:
        """Unload idle versions whose keep_alive ran out; returns their ids."""
        now = time.monotonic() if now is None else now
        with self.lock:
            due = [vid for vid, s in self.states.items() if s.expires_at is not None and s.expires_at <= now
                   and s.in_use == 0 and vid not in self.transitions and s.loaded is not None]
        for version_id in due:
            try:
                self.unload(version_id, reason="expired")
            except ModelBusy:
                pass  # picked up again by a request in between: its release re-arms the timer
        return due

    # -- transitions ----------------------------------------------------------------------------

    def _load(self, version: Version, state: VersionState, phase: Callable[[str], None]) -> Loaded:
        _, devices, _ = device_map_for(version.placement)
        estimate = _split(estimate_bytes(version), devices)
        phase("making room")
        self._make_room(version, estimate)
        with self.lock:
            state.memory, state.devices = estimate, devices  # reserved until measured
            state.phase = "loading weights"
        phase("loading weights")
        loaded = self.build(version)
        with self.lock:
            state.loaded, state.devices = loaded, loaded.devices
            state.memory = self._measure(loaded)
        return loaded

    def _wake(self, version: Version, state: VersionState, phase: Callable[[str], None]) -> Loaded:
        loaded = state.loaded
        moving_in = {d: size - state.memory.get(d, 0) for d, size in state.awake_memory.items()
                     if size > state.memory.get(d, 0)}
        phase("making room")
        self._make_room(version, moving_in)
        with self.lock:
            state.phase = "waking"
        phase("waking")
        residency.wake(loaded.worker, state.asleep)
        with self.lock:
            state.asleep, state.awake_memory = None, {}
            state.memory = self._measure(loaded)
        return loaded

    def sleep(self, version_id: str, reason: str = "request") -> None:
        """Free an idle version's caches and park its GPU weights in pinned host memory."""
        with self.lock:
            state = self.states.get(version_id)
            if state is not None and state.status == "sleeping" and version_id not in self.transitions:
                return
            loaded = self._claim_idle(version_id, state, "put to sleep")
            if not residency.can_sleep(loaded.worker):
                raise ModelBusy(f"{loaded.version.ref} cannot sleep: it has no torch modules to park")
            if not residency.is_idle(loaded.worker):
                raise ModelBusy(f"{loaded.version.ref} is still finishing requests")
            waiter = self.transitions[version_id] = threading.Event()
            state.phase = "sleeping"
        start = time.perf_counter()
        try:
            asleep = residency.sleep(loaded.worker)
        except Exception as exc:  # noqa: BLE001
            log.exception("sleep of %s failed", loaded.version.ref)
            with self.lock:
                self.transitions.pop(version_id)
            waiter.set()
            self._failed(loaded.version, state, exc)
            raise ModelUnavailable(f"{loaded.version.ref} failed to sleep: {state.error}") from exc
        with self.lock:
            state.asleep, state.awake_memory = asleep, state.memory
            state.memory = self._measure(loaded)
            state.status, state.phase = "sleeping", None
            self.transitions.pop(version_id)
        waiter.set()
        self._emit(PoolEvent("sleep", loaded.version, time.perf_counter() - start, reason))

    def unload(self, version_id: str, reason: str = "request", force: bool = False) -> None:
        """Free a version entirely. Refuses (ModelBusy) while it serves requests unless `force`."""
        with self.lock:
            state = self.states.get(version_id)
            if state is None or state.loaded is None:
                return
            if force:
                loaded = state.loaded
                waiter = self.transitions.setdefault(version_id, threading.Event())
            else:
                loaded = self._claim_idle(version_id, state, "unloaded", allow_sleeping=True)
                waiter = self.transitions[version_id] = threading.Event()
            state.phase = "unloading"
        version = loaded.version
        log.info("unloading %s (%s)", version.ref, reason)
        start = time.perf_counter()
        loaded.close()
        del loaded
        with self.lock:
            state.loaded = state.asleep = None
            gc.collect()
            if cuda_available():
                import torch

                torch.cuda.empty_cache()
            state.status, state.phase, state.memory, state.awake_memory = "unloaded", None, {}, {}
            state.expires_at = None
            self.transitions.pop(version_id, None)
        waiter.set()
        self._emit(PoolEvent("unload", version, time.perf_counter() - start, reason))

    def close(self) -> None:
        for version_id in list(self.states):
            self.unload(version_id, reason="shutdown", force=True)

    # -- making room ------------------------------------------------------------------------------

    def _make_room(self, version: Version, need: dict[str, int]) -> None:
        """Sleep or unload LRU idle versions until `need` (bytes per device) fits every budget."""
        for device, share in need.items():
            budget = self.budgets.get(device)
            if budget is None:
                continue
            if share > budget:
                raise NoRoom(f"{version.ref} needs about {_gib(share)} on {device}, "
                                       f"more than its budget of {_gib(budget)}")
            while self.used(device, exclude=version.id) + share > budget:
                victim = self._victim(device, exclude=version.id)
                if victim is None:
                    raise NoRoom(
                        f"{version.ref} needs about {_gib(share)} on {device}; "
                        f"{_gib(self.used(device, exclude=version.id))} of {_gib(budget)} are held by busy "
                        "or pinned models")
                try:
                    if self._sleep_helps(victim, device):
                        self.sleep(victim, reason="evict")
                    else:
                        self.unload(victim, reason="evict")
                except ModelBusy:
                    continue  # it got busy meanwhile; the next pass picks another

    def _victim(self, device: str, exclude: str) -> str | None:
        with self.lock:
            idle = [(s.last_used, vid) for vid, s in self.states.items()
                    if vid != exclude and s.status in ("ready", "sleeping") and s.in_use == 0
                    and vid not in self.transitions and s.memory.get(device, 0) > 0
                    and not (s.loaded is not None and s.loaded.version.pin)]
        return min(idle)[1] if idle else None

    def _sleep_helps(self, version_id: str, device: str) -> bool:
        """Sleeping frees bytes on `device`, and the host budget has room for the parked weights."""
        with self.lock:
            state = self.states[version_id]
            if state.status != "ready" or state.loaded is None or not residency.can_sleep(state.loaded.worker):
                return False
            after = _asleep_memory(state.loaded.worker)
            host_budget = self.budgets.get("cpu")
            parked = after.get("cpu", 0) - state.memory.get("cpu", 0)
            host_fits = host_budget is None or parked <= 0 or self.used("cpu") + parked <= host_budget
            return after.get(device, 0) < state.memory.get(device, 0) and host_fits

    # -- helpers ----------------------------------------------------------------------------------

    def _claim_idle(self, version_id: str, state: VersionState | None, doing: str,
                    allow_sleeping: bool = False) -> Loaded:
        """The loaded object of a version that may change now (caller holds the lock)."""
        if state is None or state.loaded is None:
            raise ModelBusy(f"version {version_id} is not loaded, so it cannot be {doing}")
        ref = state.loaded.version.ref
        if version_id in self.transitions:
            raise ModelBusy(f"{ref} is {state.phase or 'changing state'}; try again when it is done")
        if state.status != "ready" and not (allow_sleeping and state.status == "sleeping"):
            raise ModelBusy(f"{ref} is {state.status}, so it cannot be {doing}")
        if state.in_use:
            raise ModelBusy(f"{ref} is serving {state.in_use} request(s); it can be {doing} once idle")
        return state.loaded

    def _failed(self, version: Version, state: VersionState, exc: Exception) -> None:
        with self.lock:
            loaded, state.loaded, state.asleep = state.loaded, None, None
            state.status, state.error, state.phase = "failed", f"{type(exc).__name__}: {exc}", None
            state.in_use = 0
            waiter = self.transitions.pop(version.id, None)
        if loaded is not None:
            loaded.close()
        with self.lock:
            state.memory, state.awake_memory = {}, {}
        if waiter is not None:
            waiter.set()
        self._emit(PoolEvent("fail", version))

    @staticmethod
    def _measure(loaded: Loaded) -> dict[str, int]:
        """Real bytes per device where the worker has tensors to count, else the builder's figure."""
        if residency.modules_of(loaded.worker):
            return residency.measure(loaded.worker)
        return _split(loaded.bytes, loaded.devices)

    @staticmethod
    def _touch(state: VersionState) -> None:
        state.last_used, state.last_used_at = time.monotonic(), time.time()
        state.expires_at = None

    def _emit(self, event: PoolEvent) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - observers never break the pool
                log.exception("pool listener failed")


def _asleep_memory(worker: Any) -> dict[str, int]:
    """Where a worker's bytes would sit asleep: caches freed, GPU weights parked on the host."""
    after: dict[str, int] = {}
    for device, size in residency.weight_bytes(worker).items():
        home = "cpu" if device.startswith("cuda") else device
        after[home] = after.get(home, 0) + size
    return after
