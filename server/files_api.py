"""`/v1/files`: uploads usable as prediction inputs, and the files predictions produce (videos).

Metadata, listing and deletion are scoped to the caller's identity. A file's content URL is a
capability: its id is 26 random base36 characters, and the content is served to whoever holds the
URL (as Replicate's delivery URLs are), so output videos can be embedded and downloaded directly.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse

from engine.errors import EmberError, InvalidInput, NotFound
from engine.files import StoredFile
from server.auth import require_identity
from server.jobs import request_base_url

router = APIRouter()

MAX_UPLOAD_BYTES = 100 * 1024 * 1024


class TooLarge(EmberError):
    status = 413
    code = "file_too_large"


def file_object(request: Request, stored: StoredFile) -> dict:
    url = f"{request_base_url(request)}/v1/files/{stored.id}"
    return {"id": stored.id, "name": stored.name, "content_type": stored.content_type, "size": stored.size,
            "etag": stored.etag, "checksums": stored.checksums, "metadata": stored.metadata,
            "created_at": stored.created_at, "expires_at": stored.expires_at,
            "urls": {"get": url, "content": f"{url}/content"}}


def owned_file(request: Request, file_id: str, identity: str) -> StoredFile:
    stored = request.app.state.files.get(file_id)
    if stored.owner not in (identity, None):
        raise NotFound(f"File {file_id} not found")
    return stored


@router.post("/v1/files", status_code=201)
async def upload(request: Request, content: UploadFile = File(...), metadata: str | None = Form(None),
                 identity: str = Depends(require_identity)) -> dict:
    try:
        meta = json.loads(metadata) if metadata else {}
    except ValueError:
        raise InvalidInput("metadata must be a JSON object", param="metadata") from None
    if not isinstance(meta, dict):
        raise InvalidInput("metadata must be a JSON object", param="metadata")
    data = await content.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise TooLarge(f"file is larger than {MAX_UPLOAD_BYTES} bytes", param="content")
    stored = request.app.state.files.put(data, content.filename or "file",
                                         content.content_type or "application/octet-stream",
                                         metadata=meta, owner=identity)
    return file_object(request, stored)


@router.get("/v1/files")
async def list_files(request: Request, identity: str = Depends(require_identity)) -> dict:
    files = [file_object(request, f) for f in request.app.state.files.list(owner=identity)]
    return {"results": files, "next": None, "previous": None}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request, identity: str = Depends(require_identity)) -> dict:
    return file_object(request, owned_file(request, file_id, identity))


@router.get("/v1/files/{file_id}/content")
@router.get("/v1/files/{file_id}/download")
async def file_content(file_id: str, request: Request) -> FileResponse:
    files = request.app.state.files
    stored = files.get(file_id)
    return FileResponse(files.path(file_id), media_type=stored.content_type, filename=stored.name,
                        content_disposition_type="inline")


@router.delete("/v1/files/{file_id}", status_code=204)
async def delete_file(file_id: str, request: Request, identity: str = Depends(require_identity)) -> Response:
    owned_file(request, file_id, identity)
    request.app.state.files.delete(file_id)
    return Response(status_code=204)
