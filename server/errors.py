"""Errors rendered in each dialect's own shape, chosen by the request's path.

- OpenAI (`/v1/chat`, `/v1/completions`, `/v1/embeddings`, `/v1/sessions`, `/v1/responses`, `/api/v1/chat`): `{"error": {message, type, param, code}}`
- Flowise (other `/api/v1/...`): `{"statusCode", "success": false, "message"}`
- Replicate and everything else: problem+json `{"title", "detail", "status"}`
- `/v1/models` is shared by the OpenAI and Replicate clients, so it carries both shapes.
Stack traces are logged, never sent.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EmberError, QueueFull

log = logging.getLogger("ember.server")

OPENAI_PREFIXES = ("/v1/chat", "/v1/completions", "/v1/embeddings", "/v1/sessions", "/v1/responses", "/api/v1/chat/completions")
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable", 500: "server_error"}


def dialect_for(path: str) -> str:
    if path.startswith(OPENAI_PREFIXES):
        return "openai"
    if path.startswith("/v1/models"):
        return "shared"
    if path.startswith("/api/v1"):
        return "flowise"
    return "replicate"


def error_body(dialect: str, status: int, message: str, *, param: str | None = None,
               code: str | None = None, detail: list | None = None) -> dict:
    openai = {"error": {"message": message, "type": OPENAI_TYPES.get(status, "invalid_request_error"),
                        "param": param, "code": code}}
    problem = {"title": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error",
               "detail": message, "status": status}
    if dialect == "openai":
        return {**openai, "detail": detail} if detail is not None else openai
    if dialect == "flowise":
        return {"statusCode": status, "success": False, "message": message,
                "stack": {}}
    if dialect == "shared":
        return {**openai, **problem}
    if detail is not None:
        problem["errors"] = detail
    return problem


def error_response(request: Request, status: int, message: str, *, param: str | None = None,
                   code: str | None = None, detail: list | None = None, headers: dict | None = None,
                   with_openai: bool = False) -> JSONResponse:
    """The error in the path's dialect; `with_openai` adds OpenAI's `error` object to it."""
    dialect = dialect_for(request.url.path)
    media = "application/problem+json" if dialect == "replicate" else "application/json"
    body = error_body(dialect, status, message, param=param, code=code, detail=detail)
    if with_openai and "error" not in body:
        body.update(error_body("openai", status, message, param=param, code=code))
    return JSONResponse(body, status_code=status, headers=headers, media_type=media)


def _unrouted(request: Request, status: int) -> bool:
    """A 404/405 from routing itself (no such route or method) under an API prefix."""
    path = request.url.path
    routing = status == 405 or (status == 404 and request.scope.get("endpoint") is None)
    return routing and path.startswith(("/v1/", "/api/v1/"))


def _validation_message(errors: list) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    loc = [str(p) for p in first.get("loc", []) if p not in ("body",)]
    field = ".".join(loc) or None
    return (f"{field}: {first.get('msg', 'invalid')}" if field else first.get("msg", "invalid request")), field


def install(app: FastAPI) -> None:
    @app.exception_handler(EmberError)
    async def ember_error(request: Request, exc: EmberError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None
        return error_response(request, exc.status, exc.message, param=exc.param, code=exc.code,
                              headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = [{"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        message, field = _validation_message(detail)
        return error_response(request, 422, message, param=field, code="invalid_value", detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        unrouted = _unrouted(request, exc.status_code)
        if unrouted:
            message = f"{message}: {request.method} {request.url.path}"
        return error_response(request, exc.status_code, message, headers=getattr(exc, "headers", None),
                              code="not_found" if exc.status_code == 404 and unrouted else None,
                              with_openai=unrouted)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # Starlette re-raises after this answer and the server then drops the connection: say so,
        # or a pooled client sends its next request on a dead connection.
        return error_response(request, 500, "Internal server error; see the server log.",
                              code="internal_error", headers={"Connection": "close"})
