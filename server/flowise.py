"""Flowise-style API: the chatflows of models.yaml, answered by ember's engines.

A chatflow is a named, preconfigured conversation over one model (system prompt, generation
settings, which overrides a caller may send, streaming, sessions, optionally its own API key), or
an image-to-video model fed by the uploaded image and the question. This router only translates
Flowise's shapes: sessions and their messages live in server/sessions.py and the store (shared
with the OpenAI-style API), generation in the engine.

Streaming uses Flowise's own wire format, which its SDK reads line by line:
`message:\\ndata:{"event": "start"|"token"|"metadata"|"error"|"end", "data": ...}\\n\\n`.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import BadRequest, JobFailed, ModelNotFound, NotFound
from engine.jobs import Job
from engine.llm.types import SamplingParams
from engine.registry import Flow, Version
from engine.sampling_bounds import BOUNDS, engine_seed
from engine.schemas import input_schema, validate_input
from engine.text_task import TextTask
from engine.video_task import VideoTask
from server.sse import event_source
from server.auth import Unauthorized, bearer_token
from server.guard import FORM_TYPES, UnusableJSON, strict_loads
from server.openapi_docs import FLOWISE_FEEDBACK, FLOWISE_PREDICTION
from server.sessions import (FLOWISE_ROLES, OPENAI_ROLES, Conversation, dropped_on_error, open_conversation,
                             record_turn)
from server.store import Store

router = APIRouter(prefix="/api/v1")

HEARTBEAT_S = 15
DISCONNECT_POLL_S = 1.0
RATINGS = ("THUMBS_UP", "THUMBS_DOWN")
SYSTEM_OVERRIDES = ("systemMessage", "systemMessagePrompt")
FLOW_VARIABLE = re.compile(r"\{\{\s*\$vars\.([A-Za-z0-9_]+)\s*\}\}")
MAX_FORM_FILES = 8
MAX_FORM_FIELDS = 64


# ------------------------------------------------------------------ request bodies

class HistoryMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    type: str | None = None  # the legacy shape: {type, message}
    message: str | None = None


class FileUpload(BaseModel):
    data: str
    type: str = "file"
    name: str = "upload"
    mime: str = ""


class PredictionBody(BaseModel):
    question: str = ""
    overrideConfig: dict | None = None
    chatId: str | None = None
    history: list[HistoryMessage] | None = None
    uploads: list[FileUpload] | None = None
    streaming: bool | None = False


class FeedbackBody(BaseModel):
    chatflowid: str | None = None
    chatId: str | None = None
    messageId: str | None = None
    chatMessageId: str | None = None
    rating: str | None = None
    content: str | None = None


@dataclass
class Ask:
    """A prediction request, whichever encoding it came in."""

    question: str
    override: dict
    chat_id: str | None
    history: list[dict] | None  # OpenAI chat shape
    uploads: list[FileUpload]
    streaming: bool


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise BadRequest(f"{where}: {error['msg']}" if where else error["msg"], param=where or None) from None


def _history(items: list[HistoryMessage]) -> list[dict]:
    messages = []
    for index, item in enumerate(items):
        name = item.role or item.type
        role = OPENAI_ROLES.get(name) or (name if name in ("user", "assistant") else None)
        if role is None:
            raise BadRequest(f"history[{index}]: role must be 'userMessage' or 'apiMessage', got {name!r}",
                             param=f"history.{index}.role")
        content = item.content if item.content is not None else item.message
        if content is None:
            raise BadRequest(f"history[{index}]: 'content' (or 'message') is required",
                             param=f"history.{index}.content")
        messages.append({"role": role, "content": content})
    return messages


async def _json(request: Request, what: str) -> Any:
    try:
        return strict_loads(await request.body())
    except UnusableJSON as exc:
        raise BadRequest(str(exc)) from None
    except ValueError:
        raise BadRequest(f"The body must be {what}.") from None


async def _read_json(request: Request) -> Ask:
    body: PredictionBody = _parse(PredictionBody, await _json(request, "JSON or multipart form-data"))
    return Ask(question=body.question, override=body.overrideConfig or {}, chat_id=body.chatId,
               history=_history(body.history) if body.history else None, uploads=body.uploads or [],
               streaming=bool(body.streaming))


def _form_value(value: str) -> Any:
    """Form fields are text; numbers, booleans and objects arrive JSON-encoded (finite and
    shallow, as in JSON bodies)."""
    try:
        return strict_loads(value)
    except UnusableJSON as exc:
        raise BadRequest(str(exc)) from None
    except ValueError:
        return value


async def _read_form(request: Request) -> Ask:
    """multipart/form-data (with files) or application/x-www-form-urlencoded (without)."""
    settings = request.app.state.settings
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS,
                                  max_part_size=settings.max_form_part_bytes)
    except StarletteHTTPException as exc:  # the form parser's own limits
        raise BadRequest(str(exc.detail)) from None
    fields: dict[str, Any] = {}
    uploads = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            mime = value.content_type or "application/octet-stream"
            uploads.append(FileUpload(data=f"data:{mime};base64,{base64.b64encode(data).decode()}",
                                      name=value.filename or "upload", mime=mime))
        else:
            fields[key] = value
    question = fields.pop("question", "")
    chat_id = fields.pop("chatId", None)
    streaming = str(fields.pop("streaming", "")).lower() == "true"
    history = fields.pop("history", None)
    override = {k: _form_value(v) for k, v in fields.items()}
    if isinstance(override.get("overrideConfig"), dict):
        override.update(override.pop("overrideConfig"))
    if "sessionId" in override:
        override["sessionId"] = str(override["sessionId"])
    ask = Ask(question=question, override=override, chat_id=chat_id, history=None, uploads=uploads,
              streaming=streaming)
    if history:
        items = _parse(PredictionBody, {"history": _form_value(history)}).history
        ask.history = _history(items) if items else None
    return ask


async def _read_ask(request: Request) -> Ask:
    if request.headers.get("content-type", "").lower().startswith(FORM_TYPES):
        return await _read_form(request)
    return await _read_json(request)


# ------------------------------------------------------------------ auth and lookups

def _registry(request: Request):
    return request.app.state.engine.registry


def _identity(request: Request, flow: Flow | None) -> str:
    """The caller: a server key, or (for a flow with its own key) that key."""
    extra = (flow.api_key,) if flow is not None and flow.api_key else ()
    return request.app.state.auth.check(bearer_token(request), extra_keys=extra)


def _authorized_flow(request: Request, flow_id: str) -> tuple[Flow, str]:
    """The flow and the caller's identity; unknown flows answer 404 only to authorized callers."""
    flow = _registry(request).flows.get(flow_id)
    identity = _identity(request, flow)
    if flow is None:
        raise ModelNotFound(f"Chatflow {flow_id} not found", param="id")
    return flow, identity


def _streams(flow: Flow, version: Version) -> bool:
    return flow.streaming and version.kind == "text-generation"


def _chatflow(flow: Flow, registry) -> dict:
    version = registry.resolve(flow.model)
    return {"id": flow.id, "name": flow.name, "model": flow.model, "version": version.id,
            "kind": version.kind, "type": "CHATFLOW", "deployed": True, "isPublic": False,
            "isStreaming": _streams(flow, version), "sessions": flow.sessions,
            "systemPrompt": flow.system_prompt, "settings": flow.settings,
            "allowOverrides": list(flow.allow_overrides), "apikeyid": "flow" if flow.api_key else None,
            "createdDate": version.created_at, "updatedDate": version.created_at}


# ------------------------------------------------------------------ generation settings

def _bounded(field: str) -> Callable:
    """A converter that checks a setting against the one authority (engine/sampling_bounds.py)."""
    return lambda value, where: BOUNDS[field].check(value, where)


def _stops(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [s for s in value.split(",") if s]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise BadRequest(f"{where} must be a string or a list of strings", param=where)


# Flowise's override names and the snake_case names of models.yaml, onto SamplingParams fields.
SAMPLING_NAMES = {
    "temperature": "temperature", "maxTokens": "max_new_tokens", "max_tokens": "max_new_tokens",
    "maxNewTokens": "max_new_tokens", "max_new_tokens": "max_new_tokens", "topP": "top_p", "top_p": "top_p",
    "topK": "top_k", "top_k": "top_k", "minP": "min_p", "min_p": "min_p", "seed": "seed",
    "repetitionPenalty": "repetition_penalty", "repetition_penalty": "repetition_penalty",
    "presencePenalty": "presence_penalty", "presence_penalty": "presence_penalty",
    "frequencyPenalty": "frequency_penalty", "frequency_penalty": "frequency_penalty",
}
SAMPLING: dict[str, tuple[str, Callable]] = {
    **{name: (field, _bounded(field)) for name, field in SAMPLING_NAMES.items()},
    "stop": ("stop", _stops),
    "stopSequences": ("stop", _stops),
    "stop_sequences": ("stop", _stops),
}


def _allowed(flow: Flow, override: dict) -> dict:
    """The overrides this flow lets callers send; others are ignored, as Flowise does."""
    return {k: v for k, v in override.items() if k in flow.allow_overrides}


def _sampling(version: Version, flow: Flow, allowed: dict) -> SamplingParams:
    values: dict[str, Any] = {}
    for where, source in (("default_inputs", version.default_inputs), ("settings", flow.settings),
                          ("overrideConfig", allowed)):
        for key, value in source.items():
            if key in SAMPLING:
                field, convert = SAMPLING[key]
                values[field] = convert(value, f"{where}.{key}")
    values["top_k"] = max(values.get("top_k", 0), 0)
    values["seed"] = engine_seed(values.get("seed"))
    return SamplingParams(**values)


def _system_prompt(flow: Flow, allowed: dict) -> str:
    prompt = next((allowed[k] for k in SYSTEM_OVERRIDES if isinstance(allowed.get(k), str)), flow.system_prompt)
    variables = {**(flow.settings.get("vars") or {}), **(allowed.get("vars") or {})}
    return FLOW_VARIABLE.sub(lambda m: str(variables.get(m.group(1), m.group(0))), prompt or "")


# ------------------------------------------------------------------ tasks

def _text_task(flow: Flow, version: Version, ask: Ask, allowed: dict) -> TextTask:
    """The flow's system prompt and the question; the history goes in between once the session
    is open (see _with_history)."""
    if not ask.question:
        raise BadRequest("question is required", param="question")
    if not isinstance(allowed.get("vars") or {}, dict):
        raise BadRequest("overrideConfig.vars must be an object", param="overrideConfig.vars")
    system = _system_prompt(flow, allowed)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": ask.question})
    return TextTask(messages=messages, params=_sampling(version, flow, allowed))


def _with_history(task: TextTask, history: list[dict]) -> None:
    """Put the history before the question; its oldest turns may be left out to fit the context."""
    start = len(task.messages) - 1
    task.messages[-1:-1] = history
    task.history_span = (start, start + len(history)) if history else None


def _image(uploads: list[FileUpload]) -> str | None:
    """The first uploaded image, as a data URI (or the URL a `url` upload names)."""
    for upload in uploads:
        if upload.type == "url" or upload.data.startswith(("http://", "https://")):
            return upload.data
        is_image = upload.mime.startswith("image/") or upload.data.startswith("data:image/")
        if is_image:
            return upload.data if upload.data.startswith("data:") else f"data:{upload.mime};base64,{upload.data}"
    return None


def _video_task(flow: Flow, version: Version, ask: Ask, allowed: dict) -> VideoTask:
    image = _image(ask.uploads)
    if image is None:
        raise BadRequest("This chatflow turns an image into a video: upload one image (uploads[] or a "
                         "multipart file).", param="uploads")
    known = input_schema(version)["properties"]
    inputs = {k: v for k, v in {**flow.settings, **allowed}.items() if k in known}
    inputs.update(image=image, prompt=ask.question)
    return VideoTask(inputs=validate_input(version, inputs))


def _record_input(flow: Flow, ask: Ask, chat_id: str, session_id: str) -> dict:
    """The request as the predictions store keeps it (uploads by name, not their bytes)."""
    return {"chatflowId": flow.id, "question": ask.question, "chatId": chat_id, "sessionId": session_id,
            "overrideConfig": ask.override, "history": ask.history,
            "uploads": [{"name": u.name, "mime": u.mime, "type": u.type} for u in ask.uploads]}


# ------------------------------------------------------------------ predictions

@dataclass
class Turn:
    """One prediction in flight: what it answers to and where it is recorded."""

    flow: Flow
    ask: Ask
    job: Job
    conversation: Conversation
    chat_id: str

    def reply(self, store: Store, text: str) -> dict:
        row = record_turn(store, self.conversation, [{"role": "user", "content": self.ask.question}],
                          {"content": text}, flow_id=self.flow.id, chat_id=self.chat_id)
        return {"chatId": self.chat_id, "chatMessageId": row["id"], "question": self.ask.question,
                "sessionId": self.conversation.session_id}


def _answer_text(job: Job) -> str:
    if job.kind == "text-generation":
        return job.choices[0].text if job.choices else "".join(job.output or [])
    return job.output or ""


def _failure(job: Job) -> str:
    return job.error or ("The prediction was canceled." if job.status == "canceled" else "The prediction failed.")


@router.post("/prediction/{flow_id}", openapi_extra=FLOWISE_PREDICTION)
async def predict(flow_id: str, request: Request):
    flow, identity = _authorized_flow(request, flow_id)
    version = _registry(request).resolve(flow.model)
    ask = await _read_ask(request)
    allowed = _allowed(flow, ask.override)
    text = version.kind == "text-generation"
    task = _text_task(flow, version, ask, allowed) if text else _video_task(flow, version, ask, allowed)
    chat_id = str(ask.chat_id or allowed.get("sessionId") or uuid.uuid4())
    session_id = str(allowed.get("sessionId") or chat_id)
    store: Store = request.app.state.store
    conversation = open_conversation(store, identity, session_id, model=flow.model, flow_id=flow.id,
                                     create_with_id=True)
    if text:
        remembered = flow.sessions and request.app.state.settings.sessions
        stored = [m for m in conversation.history if m["role"] in ("user", "assistant")] if remembered else []
        _with_history(task, ask.history if ask.history is not None else stored)
    job = Job(model=version.model, version=version.id, kind=version.kind,
              input=_record_input(flow, ask, chat_id, session_id), task=task, owner=identity, source="flowise")
    job.extra.update(flow_id=flow.id, chat_id=chat_id, session_id=session_id)
    with dropped_on_error(store, conversation, identity):
        await request.app.state.jobs.submit(job, wait_ready=True)
    turn = Turn(flow=flow, ask=ask, job=job, conversation=conversation, chat_id=chat_id)
    if ask.streaming and _streams(flow, version):
        return event_source(_stream(request, turn), ping_s=HEARTBEAT_S, comment="heartbeat")
    await _wait(request, job)
    if job.status != "succeeded":
        raise JobFailed(_failure(job))
    answer = _answer_text(job)
    request.app.state.engine.forget(job.id)
    return {"text": answer, **turn.reply(store, answer), "isStreamValid": False}


async def _wait(request: Request, job: Job) -> None:
    """Wait for the job; a client that hangs up cancels it."""
    while not await job.wait(DISCONNECT_POLL_S):
        if await request.is_disconnected():
            request.app.state.engine.cancel(job.id)
            await job.wait()


def _frame(event: str, data: Any) -> bytes:
    payload = json.dumps({"event": event, "data": data}, ensure_ascii=False, separators=(",", ":"))
    return f"message:\ndata:{payload}\n\n".encode()


async def _stream(request: Request, turn: Turn) -> AsyncIterator[bytes]:
    """start (with the first token), token..., metadata, end; or error, end. A client that hangs
    up cancels the job."""
    job, engine = turn.job, request.app.state.engine
    started = False
    try:
        async for event in job.follow():
            if event.type == "output" and event.choice == 0 and event.data:
                if not started:
                    started = True
                    yield _frame("start", event.data)
                yield _frame("token", event.data)
        if job.status == "succeeded":
            if not started:
                yield _frame("start", "")
            yield _frame("metadata", turn.reply(request.app.state.store, _answer_text(job)))
        else:
            yield _frame("error", _failure(job))
        yield _frame("end", "[DONE]")
        engine.forget(job.id)
    finally:
        if not job.done:
            engine.cancel(job.id)


# ------------------------------------------------------------------ chatflows

@router.get("/ping", response_class=PlainTextResponse)
async def ping() -> str:
    return "pong"


def _may_see(request: Request, flow: Flow) -> bool:
    """Whether the caller holds the key a flow with its own key asks for (or a server key)."""
    if not flow.api_key:
        return True
    try:
        _identity(request, flow)
        return True
    except Unauthorized:
        return False


@router.get("/chatflows")
async def list_chatflows(request: Request) -> list[dict]:
    """The flows the caller may use: a flow with its own key is listed only to holders of it
    (or of a server key)."""
    _identity(request, None)
    registry = _registry(request)
    return [_chatflow(flow, registry) for flow in registry.flows.values() if _may_see(request, flow)]


@router.get("/chatflows/{flow_id}")
async def get_chatflow(flow_id: str, request: Request) -> dict:
    flow, _ = _authorized_flow(request, flow_id)
    return _chatflow(flow, _registry(request))


@router.get("/chatflows-streaming/{flow_id}")
async def chatflow_streaming(flow_id: str, request: Request) -> dict:
    """No auth: the SDK asks this before every prediction without sending its key. So that it
    tells nothing about which flows exist, an unknown flow and a flow with its own key (asked
    without that key) answer alike: not streaming."""
    registry = _registry(request)
    flow = registry.flows.get(flow_id)
    if flow is None or not _may_see(request, flow):
        return {"isStreaming": False}
    return {"isStreaming": _streams(flow, registry.resolve(flow.model))}


# ------------------------------------------------------------------ chat messages and feedback

def _date(value: str | None, where: str, end: bool = False) -> str | None:
    """A bound in the store's timestamp format; a bare end date covers that whole day."""
    if not value:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day, time.max if end else time.min, tzinfo=timezone.utc)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    except ValueError:
        raise BadRequest(f"{where} must be an ISO date, got {value!r}", param=where) from None
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _newest_first(order: str | None, where: str) -> bool:
    order = (order or "ASC").upper()
    if order not in ("ASC", "DESC"):
        raise BadRequest(f"{where} must be ASC or DESC", param=where)
    return order == "DESC"


def _owned_messages(request: Request, identity: str, flow: Flow, **filters: Any) -> list[dict]:
    """The flow's messages in sessions the caller owns."""
    store: Store = request.app.state.store
    return store.messages(flow_id=flow.id, owner=identity, **filters)


def _feedback_doc(row: dict) -> dict:
    return {"id": row["id"], "chatflowid": row["flow_id"], "chatId": row["chat_id"],
            "messageId": row["message_id"], "rating": row["rating"], "content": row["content"],
            "createdDate": row["created_at"]}


def _chat_message(row: dict) -> dict:
    return {"id": row["id"], "role": FLOWISE_ROLES.get(row["role"], row["role"]), "chatflowid": row["flow_id"],
               "content": row["content"] or "", "chatId": row["chat_id"], "sessionId": row["session_id"],
               "memoryType": None, "chatType": "EXTERNAL", "createdDate": row["created_at"]}


@router.get("/chatmessage/{flow_id}")
async def list_chat_messages(flow_id: str, request: Request, chatId: str | None = None,
                             sessionId: str | None = None, messageId: str | None = None,
                             order: str | None = None, sortOrder: str | None = None,
                             startDate: str | None = None, endDate: str | None = None,
                             feedback: bool = False) -> list[dict]:
    flow, identity = _authorized_flow(request, flow_id)
    rows = _owned_messages(request, identity, flow, chat_id=chatId, session_id=sessionId,
                           since=_date(startDate, "startDate"), until=_date(endDate, "endDate", end=True),
                           newest_first=_newest_first(order or sortOrder, "order"))
    if messageId:
        rows = [r for r in rows if r["id"] == messageId]
    messages = [_chat_message(r) for r in rows]
    if feedback:
        ratings = {f["message_id"]: _feedback_doc(f) for f in request.app.state.store.feedback(flow_id=flow.id)}
        for message in messages:
            message["feedback"] = ratings.get(message["id"])
    return messages


@router.delete("/chatmessage/{flow_id}")
async def delete_chat_messages(flow_id: str, request: Request, chatId: str | None = None,
                               sessionId: str | None = None, startDate: str | None = None,
                               endDate: str | None = None) -> dict:
    flow, identity = _authorized_flow(request, flow_id)
    bounds = {"since": _date(startDate, "startDate"), "until": _date(endDate, "endDate", end=True)}
    store: Store = request.app.state.store
    affected = store.delete_messages(flow_id=flow.id, owner=identity, chat_id=chatId, session_id=sessionId,
                                     **bounds)
    return {"raw": [], "affected": affected}


@router.post("/feedback", openapi_extra=FLOWISE_FEEDBACK)
async def create_feedback(request: Request) -> dict:
    body: FeedbackBody = _parse(FeedbackBody, await _json(request, "JSON"))
    message_id = body.messageId or body.chatMessageId
    store: Store = request.app.state.store
    try:
        message = store.get_message(message_id) if message_id else None
    except NotFound:
        message = None
    flow_id = body.chatflowid or (message or {}).get("flow_id")
    flow = _registry(request).flows.get(flow_id) if flow_id else None
    identity = _identity(request, flow)
    if not message_id:
        raise BadRequest("messageId (the chatMessageId of an answer) is required", param="messageId")
    if message is None or flow is None or message["flow_id"] != flow.id:
        raise NotFound(f"Chat message {message_id} not found in chatflow {flow_id}", param="messageId")
    store.get_session(message["session_id"], identity)
    rating = (body.rating or "").upper()
    if rating not in RATINGS:
        raise BadRequest(f"rating must be one of {', '.join(RATINGS)}", param="rating")
    row = store.add_feedback(message_id, flow.id, body.chatId or message["chat_id"], rating, body.content)
    return _feedback_doc(row)


@router.get("/feedback/{flow_id}")
async def list_feedback(flow_id: str, request: Request, chatId: str | None = None,
                        sortOrder: str | None = None, startDate: str | None = None,
                        endDate: str | None = None) -> list[dict]:
    flow, identity = _authorized_flow(request, flow_id)
    owned = {m["id"] for m in _owned_messages(request, identity, flow)}
    since, until = _date(startDate, "startDate"), _date(endDate, "endDate", end=True)
    rows = [r for r in request.app.state.store.feedback(flow_id=flow.id, chat_id=chatId)
            if r["message_id"] in owned and (not since or r["created_at"] >= since)
            and (not until or r["created_at"] <= until)]
    if _newest_first(sortOrder, "sortOrder"):
        rows.reverse()
    return [_feedback_doc(r) for r in rows]
