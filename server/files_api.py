"""`/v1/files`: uploads usable as prediction inputs, and the files predictions produce (videos).

Metadata, listing and deletion are scoped to the caller's identity. A file's content URL is a
capability: its id is 26 random base36 characters, and the content is served to whoever holds the
URL (as Replicate's delivery URLs are), so output videos can be embedded and downloaded directly.

Because that content comes from clients and is served from the API's own origin, it is never
interpreted there: every answer carries `X-Content-Type-Options: nosniff` and a CSP that allows
nothing (`default-src 'none'; sandbox`), and only media types a browser merely displays (images
but SVG, audio, video, plain text) are inline; anything else (HTML, SVG, scripts...) is an
attachment. Each key has a quota of stored files and bytes; files expire (engine/files.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse

from engine.errors import EmberError, InvalidInput, NotFound, QuotaExceeded
from engine.files import StoredFile
from server.auth import require_identity
from server.guard import UnusableJSON, strict_loads
from server.jobs import request_base_url

router = APIRouter()

INLINE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/avif",
                "video/mp4", "video/webm", "video/ogg", "video/quicktime",
                "audio/mpeg", "audio/wav", "audio/ogg", "audio/webm", "audio/flac", "text/plain"}
CONTENT_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
                   "Cross-Origin-Resource-Policy": "cross-origin"}


class TooLarge(EmberError):
    status = 413
    code = "file_too_large"


def disposition(content_type: str) -> str:
    main = content_type.split(";")[0].strip().lower()
    return "inline" if main in INLINE_TYPES else "attachment"


def check_quota(request: Request, identity: str, size: int) -> None:
    settings = request.app.state.settings
    count, used = request.app.state.files.usage(identity)
    if count + 1 > settings.max_files_per_key:
        raise QuotaExceeded(f"this key already stores {count} files, the limit; delete some first", param="content")
    if used + size > settings.max_file_bytes_per_key:
        raise QuotaExceeded(f"this key stores {used} bytes; {size} more would pass its "
                            f"{settings.max_file_bytes_per_key} byte quota; delete some files first",
                            param="content")


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
        meta = strict_loads(metadata) if metadata else {}
    except (UnusableJSON, ValueError):
        raise InvalidInput("metadata must be a JSON object", param="metadata") from None
    if not isinstance(meta, dict):
        raise InvalidInput("metadata must be a JSON object", param="metadata")
    limit = request.app.state.settings.max_upload_bytes
    data = await content.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"file is larger than {limit} bytes", param="content")
    check_quota(request, identity, len(data))
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
                        content_disposition_type=disposition(stored.content_type), headers=CONTENT_HEADERS)


@router.delete("/v1/files/{file_id}", status_code=204)
async def delete_file(file_id: str, request: Request, identity: str = Depends(require_identity)) -> Response:
    owned_file(request, file_id, identity)
    request.app.state.files.delete(file_id)
    return Response(status_code=204)
