"""`ember serve --ray`: the same server spread over a Ray cluster with Ray Serve.

One ingress deployment runs the FastAPI app (every dialect, the store, auth) over a RemoteEngine;
each available model version is its own deployment (`ModelWorker`) whose replicas run today's
Engine restricted to that version, placed with `ray_actor_options` and scaled per the version's
`scale:` block. Jobs travel as plain specs through deployment handles and their events stream back
(engine.remote). Only `ember serve --ray` and the Ray tests import this module.
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from pathlib import Path

from ray import serve

from engine.engine import Engine, EngineOptions
from engine.files import FileStore
from engine.registry import ModelEntry, Registry, Version
from engine.remote import RemoteEngine, serve_job
from server.app import create_app, public_base
from server.settings import Settings

APP_NAME = "ember"
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                    "downscale_delay_s", "look_back_period_s")


def deployment_name(version: Version) -> str:
    return f"{version.model.replace('/', '--')}-{version.id[:12]}"


def default_gpus(placement, cluster_gpus: float) -> float:
    """GPUs a replica asks Ray for when `scale.num_gpus` is not set: as many as the placement
    names; `auto` takes one GPU when the cluster has any."""
    if placement == "cpu":
        return 0
    if isinstance(placement, str) and placement.startswith("cuda"):
        return 1
    if isinstance(placement, (list, tuple)):
        return len(placement)
    if isinstance(placement, dict):
        return len({d for d in placement.values() if str(d) not in ("cpu", "disk")})
    return 1 if cluster_gpus > 0 else 0


def deployment_options(version: Version, cluster_gpus: float) -> dict:
    """Serve options for one version's deployment, from its `scale:` block and placement."""
    scale = version.scale
    actor = {"num_cpus": scale.get("num_cpus", 1),
             "num_gpus": scale.get("num_gpus", default_gpus(version.placement, cluster_gpus))}
    if "memory" in scale:
        actor["memory"] = int(scale["memory"])
    options: dict = {"name": deployment_name(version), "ray_actor_options": actor,
                     "max_ongoing_requests": int(scale.get("max_ongoing_requests",
                                                           version.limits.get("max_num_seqs", 64)))}
    if version.kind == "text-generation":  # jobs sharing a prompt prefix go where its KV blocks are cached
        options["request_router_config"] = {"request_router_class": "server.prefix_router.PrefixAffinityRouter",
                                            "request_router_kwargs": {"imbalance": int(scale.get("prefix_imbalance", 8))}}
    if any(key in scale for key in AUTOSCALING_KEYS):
        low = int(scale.get("min_replicas", 1))
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": int(scale.get("max_replicas", max(low, 1))),
                                         **{k: scale[k] for k in AUTOSCALING_KEYS[2:] if k in scale}}
    else:
        options["num_replicas"] = int(scale.get("replicas", 1))
    return options


def replica_version(version: Version, num_gpus: float) -> Version:
    """The version as one replica serves it: Ray shows a replica only its own GPUs, numbered from
    0, so explicit GPU indices are renumbered; the model stays loaded for the replica's life (Serve
    scales replicas, not the pool)."""
    placement = version.placement
    if num_gpus and isinstance(placement, (list, tuple)):
        placement = list(range(len(placement)))
    elif num_gpus and isinstance(placement, str) and placement.startswith("cuda"):
        placement = "cuda:0"
    return dataclasses.replace(version, placement=placement, keep_alive=None, load="eager")


@serve.deployment
class ModelWorker:
    """Replicas of one model version: an Engine holding only that version, loaded at start."""

    def __init__(self, version: Version, files_dir: Path, base_url: str, allow_http_inputs: bool,
                 allow_private_urls: bool, stream_interval_s: float = 0.0):
        import ray

        self.stream_interval_s = stream_interval_s
        self.version = replica_version(version, len(ray.get_gpu_ids()))
        registry = Registry([ModelEntry(name=version.model, description="", versions=[self.version])])
        options = EngineOptions(allow_http_inputs=allow_http_inputs, allow_private_urls=allow_private_urls,
                                file_url=lambda file_id: f"{base_url}/v1/files/{file_id}/content")
        self.engine = Engine(registry, FileStore(files_dir), options)
        self.engine.pool.acquire(self.version)
        self.engine.pool.release(self.version)
        self.served = 0

    async def run_job(self, spec: dict):
        """One job's messages (engine.remote); cancelling this stream cancels the job here."""
        self.served += 1
        async for message in serve_job(self.engine, spec, self.stream_interval_s):
            yield message

    def stats(self) -> dict:
        """This replica's identity and load: which replica, its pid, jobs served and running, and
        its LLM's block counts (for text models)."""
        state = self.engine.pool.states.get(self.version.id)
        worker = state.loaded.worker if state is not None and state.loaded is not None else None
        llm = worker.stats() if hasattr(worker, "stats") else {}
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "served": self.served, "running": sum(not j.done for j in self.engine.jobs.values()),
                "llm": llm}


@serve.deployment
@serve.ingress()
class Ingress:
    """The FastAPI app, with an Engine that sends each version's jobs to its deployment."""

    def __init__(self, settings: Settings, handles: dict):
        self.settings = settings
        self.handles = handles

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, engine_factory=partial(RemoteEngine, handles=self.handles))


def build_app(settings: Settings, cluster_gpus: float = 0):
    """The Serve application: one ModelWorker deployment per available version, one Ingress."""
    from engine.engine import demo_registry

    check_ingress_replicas(settings)
    registry = demo_registry(settings.home, settings.models)
    base = public_base(settings)
    workers = {}
    for version in registry.versions():
        if version.available:
            workers[version.ref] = ModelWorker.options(**deployment_options(version, cluster_gpus)).bind(
                version, settings.files_dir, base, settings.allow_http_inputs, settings.allow_private_urls,
                settings.ray_stream_interval_ms / 1000)
    # The ingress waits on HTTP and handles, not on compute: it asks for no CPU so GPU nodes' CPUs
    # stay with the model replicas.
    return Ingress.options(num_replicas=settings.ingress_replicas, max_ongoing_requests=settings.max_queue,
                           ray_actor_options={"num_cpus": 0}).bind(settings, workers)


def check_ingress_replicas(settings: Settings) -> None:
    """Several ingress replicas share the store, so it must be PostgreSQL: a SQLite file belongs to
    one server, which fails whatever another left unfinished as interrupted when it starts."""
    if settings.ingress_replicas < 1:
        raise ValueError("EMBER_INGRESS_REPLICAS must be at least 1")
    if settings.ingress_replicas > 1 and not str(settings.database).startswith(("postgres://", "postgresql")):
        raise ValueError(f"EMBER_INGRESS_REPLICAS={settings.ingress_replicas} needs a shared PostgreSQL store: "
                         "set EMBER_DATABASE_URL=postgresql://... (and EMBER_STORAGE_DIR to a folder every "
                         "node sees)")


def app_from_env(args: dict | None = None):
    """An application builder for Serve config files and KubeRay (`import_path:
    server.ray_serve:app_from_env`): settings from the `EMBER_*` environment, as `ember serve`."""
    import ray

    return build_app(Settings(**(args or {})), ray.cluster_resources().get("GPU", 0))


def start(settings: Settings, address: str | None = None) -> None:
    """Deploy on the cluster at `address` (a new local one when None) and serve until Ctrl-C."""
    import ray

    ray.init(address=address or None, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, ray.cluster_resources().get("GPU", 0)), name=APP_NAME, route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
