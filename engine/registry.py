"""The model registry: `models.yaml` parsed into versioned, content-addressed model specs.

A version pins its weights and every setting that changes outputs. Its id is a sha256 over the
weights' file hashes and that configuration, so `owner/name:<id>` names exactly one thing. When the
weights are not on this machine (a hub repo that was never downloaded), the id is taken over the
pinned hub reference instead (repo and revision), and the version is listed as unavailable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.errors import InvalidInput, ModelNotFound

Kind = Literal["text-generation", "image-to-video"]
KINDS = ("text-generation", "image-to-video")
QUANTIZATIONS = ("none", "bnb-8bit", "bnb-4bit")
DTYPES = ("auto", "float32", "float16", "bfloat16")
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$", re.IGNORECASE)

# Settings that change outputs, hence part of the version id. Placement and batching limits
# are not: the same weights on another GPU answer the same.
IDENTITY_FIELDS = ("kind", "dtype", "quantization", "pipeline_class", "model_class",
                   "prompt_template", "chat_template", "default_inputs")


@dataclass(frozen=True)
class Weights:
    """Where a version's weights come from: a local folder, a demo build, or a hub repo."""

    path: str | None = None  # local folder
    repo: str | None = None  # hub repo id
    revision: str = "main"
    demo: str | None = None  # name of a locally built demo model


@dataclass
class Version:
    model: str  # owner/name
    kind: Kind
    weights: Weights
    dtype: str = "auto"
    quantization: str = "none"
    placement: Any = "auto"  # "auto" | "cpu" | "cuda:N" | [0, 1] | {module: device}
    pipeline_class: str | None = None
    model_class: str | None = None
    prompt_template: str | None = None
    chat_template: str | None = None
    default_inputs: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)  # batching and engine limits (max_num_seqs, ...)
    load: Literal["lazy", "eager"] = "lazy"
    keep_alive: float | None = None  # seconds idle before unloading; None or negative: never
    pin: bool = False  # never evicted to make room for another version
    scale: dict = field(default_factory=dict)  # replicas and resources under `ember serve --ray`
    aliases: tuple[str, ...] = ()
    description: str = ""
    id: str = ""
    created_at: str = ""
    local_path: Path | None = None  # resolved weights folder, None when absent here
    unavailable_reason: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.id}"

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def identity(self) -> dict:
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}


@dataclass
class ModelEntry:
    name: str  # owner/name
    description: str
    versions: list[Version]  # newest (default) first

    @property
    def owner(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def short_name(self) -> str:
        return self.name.split("/", 1)[1]


@dataclass
class Flow:
    """A Flowise-style chatflow: a named, preconfigured conversation over one model."""

    id: str
    name: str
    model: str
    system_prompt: str = ""
    settings: dict = field(default_factory=dict)
    allow_overrides: tuple[str, ...] = ("temperature", "maxTokens", "max_tokens", "topP", "top_p",
                                        "sessionId", "vars", "seed")
    streaming: bool = True
    sessions: bool = True
    api_key: str | None = None


class Registry:
    """Models, their versions and flows, resolved from references like `owner/name:<id>`."""

    def __init__(self, models: list[ModelEntry], flows: list[Flow] | None = None):
        self.models = {m.name: m for m in models}
        self.flows = {f.id: f for f in flows or []}

    def versions(self) -> list[Version]:
        return [v for m in self.models.values() for v in m.versions]

    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name) or next(
            (m for m in self.models.values() if m.name.lower() == name.lower()), None)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"Model '{name}' does not exist. Known models: {known}.", param="model")
        return entry

    def resolve(self, ref: str) -> Version:
        """Resolve `owner/name`, `owner/name:<id or unique prefix or alias>`, or a bare id/prefix."""
        ref = (ref or "").strip()
        if not ref:
            raise InvalidInput("A model or version is required.", param="model")
        name, _, version_ref = ref.partition(":")
        if "/" in name:
            entry = self.model(name)
            if not version_ref:
                return entry.versions[0]
            return self._match(version_ref, entry.versions, f"model '{entry.name}'")
        return self._match(ref, self.versions(), "any model")

    def _match(self, version_ref: str, candidates: list[Version], where: str) -> Version:
        exact = [v for v in candidates if version_ref == v.id or version_ref in v.aliases]
        if exact:
            return exact[0]
        prefixed = [v for v in candidates if len(version_ref) >= 4 and v.id.startswith(version_ref)]
        if len(prefixed) == 1:
            return prefixed[0]
        listing = ", ".join(v.ref for v in candidates) or "none"
        if len(prefixed) > 1:
            raise ModelNotFound(f"Version prefix '{version_ref}' is ambiguous in {where}: {listing}.",
                                param="version")
        raise ModelNotFound(f"Version '{version_ref}' does not exist in {where}. Versions: {listing}.",
                            param="version")

    def flow(self, flow_id: str) -> Flow:
        flow = self.flows.get(flow_id)
        if flow is None:
            raise ModelNotFound(f"Chatflow {flow_id} not found", param="id")
        return flow


# ---------------------------------------------------------------- content addressing

class HashCache:
    """sha256 of files, remembered by (path, size, mtime) so restarts do not re-read 13 GB."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        if path and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def file_hash(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        cached = self.entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        return digest.hexdigest()

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)


def weights_digest(folder: Path, cache: HashCache) -> dict[str, str]:
    """Hashes of every file under a weights folder, keyed by relative path (hidden files skipped)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return {str(p.relative_to(folder)): cache.file_hash(p) for p in files}


def version_id(weights_pin: dict, identity: dict) -> str:
    blob = json.dumps({"weights": weights_pin, "config": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _hub_snapshot(repo: str, revision: str) -> Path | None:
    """The local hub-cache snapshot of `repo@revision`, if one was downloaded before."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not on this machine"
        return None


# ---------------------------------------------------------------- parsing

def _parse_weights(raw: Any, where: str) -> Weights:
    if isinstance(raw, str):
        if raw.startswith("demo:"):
            return Weights(demo=raw.split(":", 1)[1])
        if raw.startswith(("/", ".", "~")) or os.sep in raw and Path(raw).expanduser().exists():
            return Weights(path=raw)
        repo, _, revision = raw.partition("@")
        return Weights(repo=repo, revision=revision or "main")
    if isinstance(raw, dict):
        unknown = set(raw) - {"path", "repo", "revision", "demo"}
        if unknown:
            raise InvalidInput(f"{where}: unknown weights keys {sorted(unknown)}")
        return Weights(path=raw.get("path"), repo=raw.get("repo"),
                       revision=str(raw.get("revision", "main")), demo=raw.get("demo"))
    raise InvalidInput(f"{where}: weights must be a path, 'owner/repo[@revision]', or a mapping")


VERSION_KEYS = {"weights", "kind", "dtype", "quantization", "placement", "device_map",
                "pipeline_class", "model_class", "prompt_template", "chat_template",
                "default_inputs", "limits", "load", "keep_alive", "pin", "aliases", "description",
                "created_at", "scale"}

# The `scale:` block (used only by `ember serve --ray`; placement, not identity).
SCALE_KEYS = {"replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
              "upscale_delay_s", "downscale_delay_s", "look_back_period_s", "num_cpus", "num_gpus", "memory"}

DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: Any, where: str = "keep_alive") -> float | None:
    """Seconds from `300`, `"30s"`, `"5m"`, `"1h"`; `-1` (or any negative) means never unload.
    Numbers without a unit are seconds (Ollama's convention for integers)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"{where} must be a duration like 300, '30s', '5m' or -1, not {value!r}", param="keep_alive")
    if isinstance(value, (int, float)):
        return float(value)
    match = DURATION.match(str(value))
    if match is None:
        raise InvalidInput(f"{where} must be a duration like 300, '30s', '5m' or -1, not {value!r}", param="keep_alive")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def parse_scale(raw: Any, where: str) -> dict:
    """A version's `scale:` block: known keys, non-negative numbers; `memory` may say "8GiB"."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: scale must be a mapping")
    unknown = set(raw) - SCALE_KEYS
    if unknown:
        raise InvalidInput(f"{where}: unknown scale keys {sorted(unknown)}; allowed: {sorted(SCALE_KEYS)}")
    scale = dict(raw)
    if isinstance(scale.get("memory"), str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GiB|MiB|GB|MB)?\s*", scale["memory"])
        if match is None:
            raise InvalidInput(f"{where}: scale.memory must be bytes or like '8GiB', not {scale['memory']!r}")
        unit = {"GiB": 2**30, "MiB": 2**20, "GB": 10**9, "MB": 10**6, None: 1}[match.group(2)]
        scale["memory"] = int(float(match.group(1)) * unit)
    for key, value in scale.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise InvalidInput(f"{where}: scale.{key} must be a non-negative number, not {value!r}")
    low, high = scale.get("min_replicas", 1), scale.get("max_replicas", scale.get("min_replicas", 1))
    if high < max(low, 1):
        raise InvalidInput(f"{where}: scale.max_replicas must be at least min_replicas and at least 1")
    return scale


def _parse_version(model: str, raw: dict, where: str) -> Version:
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: a version must be a mapping")
    unknown = set(raw) - VERSION_KEYS
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(VERSION_KEYS)}")
    if "weights" not in raw:
        raise InvalidInput(f"{where}: 'weights' is required")
    kind = raw.get("kind", "text-generation")
    if kind not in KINDS:
        raise InvalidInput(f"{where}: kind must be one of {KINDS}, not {kind!r}")
    quantization = raw.get("quantization", "none")
    if quantization not in QUANTIZATIONS:
        raise InvalidInput(f"{where}: quantization must be one of {QUANTIZATIONS}")
    dtype = raw.get("dtype", "auto")
    if dtype not in DTYPES:
        raise InvalidInput(f"{where}: dtype must be one of {DTYPES}")
    load = raw.get("load", "lazy")
    if load not in ("lazy", "eager"):
        raise InvalidInput(f"{where}: load must be 'lazy' or 'eager'")
    pin = raw.get("pin", False)
    if not isinstance(pin, bool):
        raise InvalidInput(f"{where}: pin must be true or false")
    placement = raw.get("device_map", raw.get("placement", "auto"))
    return Version(
        model=model, kind=kind, weights=_parse_weights(raw["weights"], where), dtype=dtype,
        quantization=quantization, placement=placement,
        pipeline_class=raw.get("pipeline_class"), model_class=raw.get("model_class"),
        prompt_template=raw.get("prompt_template"), chat_template=raw.get("chat_template"),
        default_inputs=dict(raw.get("default_inputs") or {}), limits=dict(raw.get("limits") or {}),
        load=load, keep_alive=parse_keep_alive(raw.get("keep_alive"), f"{where}: keep_alive"), pin=pin,
        aliases=tuple(str(a) for a in raw.get("aliases") or ()),
        description=raw.get("description", ""), created_at=str(raw.get("created_at", "")),
        scale=parse_scale(raw.get("scale"), f"{where}: scale"),
    )


def _parse_flow(raw: dict, index: int) -> Flow:
    where = f"flows[{index}]"
    if not isinstance(raw, dict) or "id" not in raw or "model" not in raw:
        raise InvalidInput(f"{where}: a flow needs at least 'id' and 'model'")
    known = {"id", "name", "model", "system_prompt", "settings", "allow_overrides", "streaming",
             "sessions", "api_key"}
    unknown = set(raw) - known
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {sorted(unknown)}")
    flow = Flow(id=str(raw["id"]), name=str(raw.get("name", raw["id"])), model=str(raw["model"]),
                system_prompt=raw.get("system_prompt", ""), settings=dict(raw.get("settings") or {}),
                streaming=bool(raw.get("streaming", True)), sessions=bool(raw.get("sessions", True)),
                api_key=raw.get("api_key"))
    if "allow_overrides" in raw:
        flow.allow_overrides = tuple(raw["allow_overrides"])
    return flow


def _pin_version(version: Version, home: Path, demo_folders: dict[str, Path], cache: HashCache) -> None:
    """Find the weights on this machine and compute the content-addressed id."""
    weights = version.weights
    folder: Path | None = None
    if weights.demo:
        folder = demo_folders.get(weights.demo)
        if folder is None:
            version.unavailable_reason = f"demo model '{weights.demo}' is not built (run `ember demo`)"
    elif weights.path:
        folder = Path(os.path.expandvars(weights.path)).expanduser()
        if not folder.is_absolute():
            folder = (home / folder) if not folder.exists() else folder.resolve()
        if not folder.exists():
            version.unavailable_reason = f"weights folder {folder} does not exist"
            folder = None
    elif weights.repo:
        folder = _hub_snapshot(weights.repo, weights.revision)
        if folder is None:
            version.unavailable_reason = (f"weights for {weights.repo}@{weights.revision} are not on "
                                          "this machine; run `ember pull` where the hub is reachable")
    if folder is not None and (not folder.is_dir() or not any(folder.iterdir())):
        version.unavailable_reason = f"weights folder {folder} is missing or empty"
        folder = None
    if folder is not None:
        pin: dict = {"files": weights_digest(folder, cache)}
        version.local_path = folder
    else:
        pin = {"repo": weights.repo, "revision": weights.revision, "path": weights.path,
               "demo": weights.demo}
    version.id = version_id(pin, version.identity())
    if not version.created_at:
        stamp = folder.stat().st_mtime if folder is not None else 0
        version.created_at = datetime.fromtimestamp(stamp, timezone.utc).isoformat()


def load_registry(models_file: Path | str, home: Path, demo_folders: dict[str, Path] | None = None,
                  text: str | None = None) -> Registry:
    """Parse a models.yaml (or its text) into a Registry. Bad entries raise InvalidInput naming them."""
    data = yaml.safe_load(text if text is not None else Path(models_file).read_text()) or {}
    if not isinstance(data, dict):
        raise InvalidInput("models.yaml must be a mapping with 'models' (and optionally 'flows')")
    raw_models = data.get("models") or {}
    if not isinstance(raw_models, dict):
        raise InvalidInput("'models' must map 'owner/name' to a model")
    cache = HashCache(home / "cache" / "weight-hashes.json")
    entries = []
    for name, raw in raw_models.items():
        if not MODEL_NAME.match(str(name)):
            raise InvalidInput(f"model name {name!r} must look like 'owner/name'")
        raw = raw or {}
        raw_versions = raw.get("versions")
        if not raw_versions:
            raise InvalidInput(f"model {name}: at least one entry under 'versions' is required")
        versions = []
        for index, raw_version in enumerate(raw_versions):
            version = _parse_version(name, raw_version, f"model {name} versions[{index}]")
            _pin_version(version, home, demo_folders or {}, cache)
            versions.append(version)
        entries.append(ModelEntry(name=name, description=raw.get("description", ""), versions=versions))
    cache.save()
    flows = [_parse_flow(f, i) for i, f in enumerate(data.get("flows") or [])]
    registry = Registry(entries, flows)
    for flow in flows:
        registry.resolve(flow.model)
    return registry
