"""`/v1/models`: one listing that both the OpenAI and the Replicate clients read.

The two dialects share these paths (`/v1/models/owner/name` is an OpenAI model id with a slash and
a Replicate model), so each object carries the fields of both: OpenAI's `id/object/created/owned_by`
and Replicate's `owner/name/url/latest_version/...`. Every kind is listed; `kind` and
`capabilities` (the endpoints that serve it) tell clients which model does what, as vLLM's
`max_model_len` tells them a text model's context.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request

from engine.registry import ModelEntry, Version
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
