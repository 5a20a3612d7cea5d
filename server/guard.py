"""The request guard, an ASGI middleware in front of every route.

It decides what happens to a request body before any route reads it:

- Authentication first. A request that carries a body (POST, PUT, PATCH, DELETE) to a protected
  path is checked against the server's keys (and a Flowise flow's own key) and refused with 401
  before one byte of its body is read, so an anonymous caller cannot make the server buffer or
  spool anything.
- Size caps per kind of body, checked against `Content-Length` up front and counted again while
  the body streams in (a body without a length, or one longer than it said, is cut off at the
  cap): JSON bodies (`max_json_bytes`) and uploads (`max_upload_bytes`, for `/v1/files` and
  Flowise form posts). Over the cap answers 413 in the route's dialect.
- JSON bodies are read here (within the cap) and refused unless they are finite and shallow: NaN
  and ±Infinity are not JSON numbers (Python's parser accepts them; nothing downstream can use
  them), and nesting deeper than `max_json_depth` is refused with 400 instead of exhausting the
  parser's recursion. The route then reads the same bytes.
- A client that stops sending its body for `body_timeout_s` gets 408.

Responses the guard sends while a body is still unread carry `Connection: close`, so a pooled
client does not send its next request on a connection the server is about to drop.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import EmberError
from server import errors
from server.auth import bearer_token

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
PUBLIC_PATHS = {"/health", "/metrics", "/openapi.json", "/docs", "/redoc", "/api/v1/ping"}
PUBLIC_PREFIXES = ("/api/v1/chatflows-streaming/",)
FLOW_PATH = re.compile(r"^/api/v1/(?:prediction|chatmessage|feedback|chatflows)/([^/]+)$")
UPLOAD_PATHS = ("/v1/files",)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class UnusableJSON(ValueError):
    """Valid JSON syntax that ember refuses."""


class NonFinite(UnusableJSON):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class TooDeep(UnusableJSON):
    pass


def _refuse_constant(name: str):
    raise NonFinite(f"{name} is not a valid JSON number; send finite numbers only")


def _non_finite_path(value, path: str = "") -> str | None:
    """Dotted path of the first NaN/Infinity in a parsed JSON value (the innermost field name
    is what clients recognise, e.g. `input.top_p`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or None
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _non_finite_path(child, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def _named_non_finite(text: str | bytes, error: NonFinite) -> NonFinite:
    """The same refusal, naming the field that holds the non-finite number."""
    try:
        path = _non_finite_path(json.loads(text))
    except (ValueError, RecursionError):
        return error
    if path is None:
        return error
    return NonFinite(f"{path}: {error}", param=path.rsplit(".", 1)[-1])


def strict_loads(text: str | bytes, max_depth: int = 64):
    """json.loads that refuses NaN/Infinity and nesting deeper than `max_depth` (UnusableJSON);
    other syntax errors are plain ValueErrors."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except NonFinite as error:
        raise _named_non_finite(text, error) from None
    except RecursionError:
        raise TooDeep(f"the JSON body is nested too deeply (limit {max_depth} levels)") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise TooDeep(f"the JSON body is nested too deeply (limit {max_depth} levels)")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return value


@dataclass
class Limits:
    max_json_bytes: int
    max_upload_bytes: int
    max_json_depth: int
    body_timeout_s: float


class Refusal(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _is_json(content_type: str) -> bool:
    """application/json and its `+json` relatives (as FastAPI reads them)."""
    media = content_type.split(";")[0].strip()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def pre_authenticate(request: Request) -> None:
    """Raise Unauthorized unless the caller could be allowed on this path: a server key or JWT,
    or, on Flowise routes, the key of the flow named in the path (any flow's key for `/feedback`,
    whose flow is only known from its body, so on a server without keys its capped body is read
    first; the route checks again with the exact flow)."""
    state = request.app.state
    flows = state.engine.registry.flows
    extra: tuple[str, ...] = ()
    path = request.url.path
    match = FLOW_PATH.match(path)
    if match and match.group(1) in flows and flows[match.group(1)].api_key:
        extra = (flows[match.group(1)].api_key,)
    elif path == "/api/v1/feedback":
        if not state.auth.enabled:
            return  # an open server: the flow (and its key, if any) is only known from the body
        extra = tuple(f.api_key for f in flows.values() if f.api_key)
    state.auth.check(bearer_token(request), extra_keys=extra)


class RequestGuard:
    def __init__(self, app: ASGIApp, limits: Limits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS or _is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            pre_authenticate(request)
        except EmberError as exc:
            await self._refuse(scope, receive, send, exc.status, exc.message, exc.code)
            return
        content_type = (_header(scope, b"content-type") or "").lower()
        is_upload = scope["path"] in UPLOAD_PATHS or (
            scope["path"].startswith("/api/v1/") and content_type.startswith(FORM_TYPES))
        cap = self.limits.max_upload_bytes if is_upload else self.limits.max_json_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            await self._refuse(scope, receive, send, 413, self._too_large(cap), "body_too_large")
            return
        if _is_json(content_type) or (not content_type and not is_upload):
            await self._json(scope, receive, send, cap)
        else:
            await self._streamed(scope, receive, send, cap)

    @staticmethod
    def _too_large(cap: int) -> str:
        return f"The request body is larger than this server's {cap} byte limit for this route."

    async def _next(self, receive: Receive) -> Message:
        try:
            return await asyncio.wait_for(receive(), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refusal(408, "The request body did not arrive in time.", "request_timeout") from None

    async def _json(self, scope: Scope, receive: Receive, send: Send, cap: int) -> None:
        """Read the whole (capped) body, check it, and hand the same bytes to the route."""
        chunks, size = [], 0
        try:
            while True:
                message = await self._next(receive)
                if message["type"] != "http.request":
                    return  # the client left before sending its body
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > cap:
                    raise Refusal(413, self._too_large(cap), "body_too_large")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            if body.strip():
                try:
                    strict_loads(body, self.limits.max_json_depth)
                except UnusableJSON as exc:
                    validation = isinstance(exc, NonFinite)
                    raise Refusal(422 if validation else 400, str(exc), "invalid_json",
                                  param=getattr(exc, "param", None)) from None
                except ValueError:
                    pass  # not JSON at all: the route says so in its own words
        except Refusal as refusal:
            await self._refuse(scope, receive, send, refusal.status, refusal.message, refusal.code,
                               refusal.param)
            return
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, cap: int) -> None:
        """Pass the body through as it arrives, cutting it off at the cap (413) or on a stall (408)."""
        size = 0
        answered = False
        done = False

        async def counted() -> Message:
            nonlocal size, answered, done
            if done:
                return await receive()
            try:
                message = await self._next(receive)
                if message["type"] == "http.request":
                    size += len(message.get("body", b""))
                    if size > cap:
                        raise Refusal(413, self._too_large(cap), "body_too_large")
                    done = not message.get("more_body", False)
                return message
            except Refusal as refusal:
                if not answered:
                    answered = True
                    await self._refuse(scope, receive, send, refusal.status, refusal.message, refusal.code)
                return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counted, guarded_send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, code: str,
                      param: str | None = None) -> None:
        headers = {"Connection": "close"}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        response = errors.error_response(Request(scope), status, message, param=param, code=code, headers=headers)
        await response(scope, receive, send)
