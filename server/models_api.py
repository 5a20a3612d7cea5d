"""`/v1/models`: one listing that both the OpenAI and the Replicate clients read, and the
management API that moves a version through its lifecycle.

The two dialects share these paths (`/v1/models/owner/name` is an OpenAI model id with a slash and
a Replicate model), so each object carries the fields of both: OpenAI's `id/object/created/owned_by`
and Replicate's `owner/name/url/latest_version/...`. Every kind is listed; `kind` and
`capabilities` (the endpoints that serve it) tell clients which model does what, as vLLM's
`max_model_len` tells them a text model's context.

Management (all behind auth): `GET .../versions/{id}/status`, and `POST .../versions/{id}/load`
(`stream=true` for server-sent progress: making room, loading weights or waking, warming up),
`.../unload`, `.../sleep`, `.../wake`. A version serving requests cannot be unloaded or put to
sleep (409).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from sse_starlette import EventSourceResponse

from engine.errors import EmberError, InvalidInput
from engine.registry import ModelEntry, Version, parse_keep_alive
from engine.schemas import input_schema, output_schema
from server.auth import require_identity

router = APIRouter(dependencies=[Depends(require_identity)])

COG_VERSION = "0.9.0"
CAPABILITIES = {
    "text-generation": ["chat.completions", "completions", "responses", "tools", "json_schema", "logprobs",
                        "predictions"],
    "image-to-video": ["predictions"],
    "embedding": ["embeddings"],
}


def capabilities(version: Version) -> dict:
    """What a version can be asked for, by kind."""
    doc: dict = {"kind": version.kind, "capabilities": CAPABILITIES.get(version.kind, ["predictions"])}
    if version.kind == "text-generation" and "max_model_len" in version.limits:
        doc["max_model_len"] = int(version.limits["max_model_len"])
    return doc


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def version_status(request: Request, version: Version) -> dict:
    state = request.app.state.engine.pool.state(version)
    return {"status": state.status, "error": state.error, "devices": state.devices}


def lifecycle(pool, version: Version) -> dict:
    """Where a version is in its lifecycle, the bytes it holds on each device, and its last use."""
    state = pool.state(version)
    last_used = (datetime.fromtimestamp(state.last_used_at, timezone.utc).isoformat().replace("+00:00", "Z")
                 if state.last_used_at else None)
    expires_in = None if state.expires_at is None else max(0.0, round(state.expires_at - time.monotonic(), 3))
    return {"model": version.model, "version": version.id, "kind": version.kind, "status": state.status,
            "phase": state.phase, "error": state.error, "devices": state.devices,
            "memory": dict(state.memory), "bytes": state.bytes, "last_used_at": last_used,
            "in_use": state.in_use, "pin": version.pin, "keep_alive": version.keep_alive,
            "expires_in": expires_in}


def version_object(request: Request, version: Version) -> dict:
    """Replicate's version object, with an OpenAPI schema of the version's real inputs/outputs."""
    schema = {
        "openapi": "3.0.2",
        "info": {"title": version.model, "version": version.id},
        "paths": {},
        "components": {"schemas": {"Input": input_schema(version), "Output": output_schema(version)}},
    }
    return {"id": version.id, "created_at": version.created_at, "cog_version": COG_VERSION,
            "openapi_schema": schema, **capabilities(version), **version_status(request, version)}


def model_object(request: Request, entry: ModelEntry) -> dict:
    latest = entry.versions[0]
    base = str(request.base_url).rstrip("/")
    return {
        "id": entry.name, "object": "model", "created": _epoch(latest.created_at), "owned_by": entry.owner,
        "url": f"{base}/v1/models/{entry.name}", "owner": entry.owner, "name": entry.short_name,
        "description": entry.description, "visibility": "private", "github_url": None,
        "paper_url": None, "license_url": None, "run_count": 0, "cover_image_url": None,
        "default_example": None, **capabilities(latest), "latest_version": version_object(request, latest),
    }


def version_as_model(request: Request, version: Version) -> dict:
    """An OpenAI model object for `owner/name:<id>`."""
    return {"id": version.ref, "object": "model", "created": _epoch(version.created_at),
            "owned_by": version.model.split("/")[0], "root": version.model, **capabilities(version),
            **version_status(request, version)}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    registry = request.app.state.engine.registry
    models = [model_object(request, entry) for entry in registry.models.values()]
    return {"object": "list", "data": models, "results": models, "next": None, "previous": None}


@router.get("/v1/models/{owner}/{name}")
async def get_model(owner: str, name: str, request: Request) -> dict:
    registry = request.app.state.engine.registry
    if ":" in name:
        return version_as_model(request, registry.resolve(f"{owner}/{name}"))
    return model_object(request, registry.model(f"{owner}/{name}"))


@router.get("/v1/models/{owner}/{name}/versions")
async def list_versions(owner: str, name: str, request: Request) -> dict:
    entry = request.app.state.engine.registry.model(f"{owner}/{name}")
    versions = [version_object(request, v) for v in entry.versions]
    return {"results": versions, "next": None, "previous": None}


@router.get("/v1/models/{owner}/{name}/versions/{version_id}")
async def get_version(owner: str, name: str, version_id: str, request: Request) -> dict:
    version = request.app.state.engine.registry.resolve(f"{owner}/{name}:{version_id}")
    return version_object(request, version)


# ---------------------------------------------------------------- lifecycle management


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_alive: float | str | None = None  # idle time before unloading: 300, "5m", 0, -1 (never)
    stream: bool = False


def _version(request: Request, owner: str, name: str, version_id: str) -> Version:
    return request.app.state.engine.registry.resolve(f"{owner}/{name}:{version_id}")


async def _optional_body(request: Request) -> LoadBody:
    raw = await request.body()
    try:
        return LoadBody.model_validate_json(raw) if raw.strip() else LoadBody()
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ())) or "body"
        raise InvalidInput(f"Invalid body ({where}): {problem['msg']}", param=where) from None


@router.get("/v1/models/{owner}/{name}/versions/{version_id}/status")
async def version_lifecycle(owner: str, name: str, version_id: str, request: Request) -> dict:
    return lifecycle(request.app.state.engine.pool, _version(request, owner, name, version_id))


@router.post("/v1/models/{owner}/{name}/versions/{version_id}/load", response_model=None)
async def load_version(owner: str, name: str, version_id: str, request: Request,
                       stream: bool = Query(False, description="server-sent progress events")):
    version = _version(request, owner, name, version_id)
    body = await _optional_body(request)
    keep_alive = parse_keep_alive(body.keep_alive)
    engine = request.app.state.engine
    if not (stream or body.stream):
        await engine.load(version, keep_alive=keep_alive)
        return lifecycle(engine.pool, version)
    return EventSourceResponse(_load_progress(engine, version, keep_alive), sep="\n")


async def _load_progress(engine, version: Version, keep_alive: float | None):
    """`progress` events ({phase, seconds}) while loading, then `done` (the status) or `error`."""
    loop = asyncio.get_running_loop()
    phases: asyncio.Queue[str] = asyncio.Queue()
    start = time.perf_counter()

    def on_phase(phase: str) -> None:
        loop.call_soon_threadsafe(phases.put_nowait, phase)

    loading = asyncio.ensure_future(engine.load(version, on_phase, keep_alive))
    yield {"event": "progress", "data": json.dumps({"phase": "queued", "seconds": 0.0})}
    while not (loading.done() and phases.empty()):
        getter = asyncio.ensure_future(phases.get())
        await asyncio.wait({getter, loading}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            data = {"phase": getter.result(), "seconds": round(time.perf_counter() - start, 3)}
            yield {"event": "progress", "data": json.dumps(data)}
        else:
            getter.cancel()
    try:
        loading.result()
    except EmberError as exc:
        yield {"event": "error", "data": json.dumps({"detail": exc.message, "status": exc.status})}
        return
    yield {"event": "done", "data": json.dumps(lifecycle(engine.pool, version))}


@router.post("/v1/models/{owner}/{name}/versions/{version_id}/unload")
async def unload_version(owner: str, name: str, version_id: str, request: Request) -> dict:
    version = _version(request, owner, name, version_id)
    await request.app.state.engine.unload(version)
    return lifecycle(request.app.state.engine.pool, version)


@router.post("/v1/models/{owner}/{name}/versions/{version_id}/sleep")
async def sleep_version(owner: str, name: str, version_id: str, request: Request) -> dict:
    version = _version(request, owner, name, version_id)
    await request.app.state.engine.sleep(version)
    return lifecycle(request.app.state.engine.pool, version)


@router.post("/v1/models/{owner}/{name}/versions/{version_id}/wake")
async def wake_version(owner: str, name: str, version_id: str, request: Request) -> dict:
    version = _version(request, owner, name, version_id)
    body = await _optional_body(request)
    await request.app.state.engine.wake(version, parse_keep_alive(body.keep_alive))
    return lifecycle(request.app.state.engine.pool, version)
