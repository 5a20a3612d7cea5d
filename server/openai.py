"""The OpenAI dialect: `/v1/chat/completions` (also `/api/v1/chat/completions`), `/v1/completions`
and `/v1/sessions`. It only translates: request bodies become a TextTask on a Job, job events
become completion objects or `data:` chunks. Sampling, prompts, tool-call parsing and JSON
output live in engine/text_task.py; conversations in server/sessions.py.

Fields the OpenAI API lacks but vLLM-style clients send as extra body (top_k, min_p,
repetition_penalty, min_tokens) are accepted; other unknown fields are ignored, as OpenAI's own
clients expect. Without `max_tokens`, a completion may run to the end of the context unless the
model version sets a default `max_new_tokens`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette import EventSourceResponse, ServerSentEvent

from engine.errors import BadRequest, Forbidden, InvalidInput, JobFailed
from engine.jobs import Choice, Event, Job
from engine.llm.types import SamplingParams, TokenLogprob
from engine.registry import Version, parse_keep_alive
from engine.text_task import TextTask
from server.auth import bearer_token, identity_of_key, require_identity
from server.sessions import Conversation, dropped_on_error, open_conversation, record_turn

router = APIRouter(dependencies=[Depends(require_identity)])

PING_S = 15
DISCONNECT_POLL_S = 0.5
MAX_N = 16
MAX_PRIORITY = 100
OPENAI_FINISH = {"stop", "length", "tool_calls"}
SAMPLING_DEFAULTS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
                     "repetition_penalty", "presence_penalty", "frequency_penalty", "seed")


# ---------------------------------------------------------------------------- request bodies


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)  # lower is served first (vLLM's convention)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None):
        for key, bias in (value or {}).items():
            if not re.fullmatch(r"-?[0-9]{1,10}", key):
                raise ValueError(f"keys are token ids as strings; got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be between -100 and 100")
        return value


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    session_id: str | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None


# ---------------------------------------------------------------------------- request -> job


def text_version(request: Request, model: str | None) -> Version:
    registry = request.app.state.engine.registry
    if not model:
        version = next((v for v in registry.versions() if v.kind == "text-generation"), None)
        if version is None:
            raise InvalidInput("model is required: no text-generation model is configured", param="model")
        return version
    version = registry.resolve(model)
    if version.kind != "text-generation":
        raise BadRequest(f"Model '{model}' is a {version.kind} model; chat and text completions need a "
                            "text-generation model.", param="model")
    return version


def sampling_params(body: SamplingRequest, version: Version, max_tokens: int | None,
                    logprobs: int | None) -> tuple[SamplingParams, bool]:
    """The request's sampling settings over the version's defaults. Returns (params, clip):
    clip means no length was asked for, so the completion may fill the context."""
    given = {"temperature": body.temperature, "top_p": body.top_p, "presence_penalty": body.presence_penalty,
             "frequency_penalty": body.frequency_penalty, "min_p": body.min_p,
             "repetition_penalty": body.repetition_penalty, "min_new_tokens": body.min_tokens,
             "top_k": body.top_k, "max_new_tokens": max_tokens,
             "seed": None if body.seed is None else body.seed % (1 << 63)}
    values: dict[str, Any] = {"temperature": 1.0}
    values.update({k: v for k, v in version.default_inputs.items() if k in SAMPLING_DEFAULTS and v is not None})
    values.update({k: v for k, v in given.items() if v is not None})
    values["top_k"] = max(0, int(values.get("top_k", 0)))
    values["min_new_tokens"] = max(0, int(values.get("min_new_tokens", 0)))
    if body.min_tokens is not None and max_tokens is not None and body.min_tokens > max_tokens:
        raise InvalidInput("min_tokens must not exceed max_tokens", param="min_tokens")
    clip = "max_new_tokens" not in values
    if clip:
        values["max_new_tokens"] = int(version.limits.get("max_model_len", 1 << 20))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    return SamplingParams(**values, n=body.n or 1, stop=stop, logit_bias=bias, logprobs=logprobs), clip


def _chat_messages(messages: list[Message]) -> list[dict]:
    out = []
    for message in messages:
        doc = message.model_dump(exclude_none=True)
        if doc["role"] == "developer":
            doc["role"] = "system"
        if isinstance(doc.get("content"), list):
            kinds = {part.get("type") for part in doc["content"]} - {"text"}
            if kinds:
                raise InvalidInput(f"content parts of type {sorted(map(str, kinds))} are not supported: "
                                   "this model takes text only", param="messages")
        out.append(doc)
    return out


def chat_task(body: ChatRequest, version: Version, history: list[dict]) -> TextTask:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    if (choice == "required" or isinstance(choice, dict)) and not tools:
        raise InvalidInput("tool_choice 'required' or a named function needs tools", param="tool_choice")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInput("top_logprobs requires logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params, clip = sampling_params(body, version, body.max_completion_tokens or body.max_tokens, logprobs)
    response_format = body.response_format.model_dump(exclude_none=True) if body.response_format else None
    return TextTask(messages=history + _chat_messages(body.messages), tools=tools or None,
                    tool_choice=choice or ("auto" if tools else "none"), response_format=response_format,
                    params=params, max_tokens_clip=clip, priority=body.priority,
                    history_span=(0, len(history)) if history else None)


def completion_task(body: CompletionRequest, version: Version) -> TextTask:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidInput("send one prompt per request (a list must hold exactly one string)", param="prompt")
    if body.echo:
        raise InvalidInput("echo is not supported", param="echo")
    params, clip = sampling_params(body, version, body.max_tokens, body.logprobs)
    return TextTask(prompt=prompts[0], prompt_template="{prompt}", params=params, max_tokens_clip=clip,
                    priority=body.priority)


def wants_stream(body: SamplingRequest, request: Request) -> bool:
    return bool(body.stream) or "text/event-stream" in request.headers.get("accept", "")


def check_priority(request: Request, priority: int) -> None:
    """Only keys listed in EMBER_PRIORITY_API_KEYS may jump (or yield) the queue."""
    if priority == 0:
        return
    allowed = {identity_of_key(k) for k in request.app.state.settings.priority_api_keys}
    token = bearer_token(request)
    if token is None or identity_of_key(token) not in allowed:
        raise Forbidden("priority is only accepted from API keys configured for it", param="priority")


async def submit(request: Request, body: BaseModel, version: Version, task: TextTask, identity: str) -> Job:
    check_priority(request, task.priority)
    job = Job(model=version.model, version=version.id, kind=version.kind,
              input=body.model_dump(exclude_none=True), task=task, owner=identity, source="openai",
              keep_alive=parse_keep_alive((body.model_extra or {}).get("keep_alive")))
    await request.app.state.jobs.submit(job)
    return job


async def wait_or_cancel(request: Request, job: Job) -> None:
    """Wait for the job; if the client goes away first, cancel it."""
    while not await job.wait(DISCONNECT_POLL_S):
        if await request.is_disconnected():
            request.app.state.engine.cancel(job.id)
            await job.wait()


# ---------------------------------------------------------------------------- job -> response


def usage(job: Job) -> dict:
    completion = sum(c.completion_tokens for c in job.choices)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion}


def finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in OPENAI_FINISH else "stop"


def _token_logprob(lp: TokenLogprob) -> dict:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
            "top_logprobs": [{"token": text, "logprob": value, "bytes": list(text.encode())}
                             for _, text, value in lp.top]}


def _legacy_logprobs(items: list[TokenLogprob], offset: int = 0) -> dict:
    offsets, position = [], offset
    for lp in items:
        offsets.append(position)
        position += len(lp.token)
    return {"tokens": [lp.token for lp in items], "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{text: value for _, text, value in lp.top} for lp in items],
            "text_offset": offsets}


class Shape:
    """How one dialect endpoint renders a job: whole, or as stream chunks."""

    prefix = ""
    object_name = ""
    chunk_name = ""

    def __init__(self, job: Job, model: str, version: Version, logprobs: bool, include_usage: bool,
                 extra: dict | None = None):
        self.job = job
        self.id = f"{self.prefix}-{job.id}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = f"fp_{version.id[:12]}"
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.extra = extra or {}

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, **self.extra}

    def completion(self) -> dict:
        body = self._envelope(self.object_name, [self.choice(c) for c in self.job.choices])
        body["usage"] = usage(self.job)
        return body

    def chunk(self, choices: list[dict]) -> dict:
        body = self._envelope(self.chunk_name, choices)
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict:
        return {**self.chunk([]), "usage": usage(self.job)}

    def opening_chunks(self) -> list[dict]:
        return []

    def choice(self, choice: Choice) -> dict:
        raise NotImplementedError

    def event_chunks(self, event: Event) -> list[dict]:
        raise NotImplementedError


class ChatShape(Shape):
    prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def choice(self, choice: Choice) -> dict:
        message: dict = {"role": "assistant", "content": choice.text or (None if choice.tool_calls else "")}
        if choice.tool_calls:
            message["tool_calls"] = choice.tool_calls
        logprobs = {"content": [_token_logprob(lp) for lp in choice.logprobs]} if self.logprobs else None
        return {"index": choice.index, "message": message, "logprobs": logprobs,
                "finish_reason": finish_reason(choice.finish_reason)}

    def opening_chunks(self) -> list[dict]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(self.job.task.params.n)]

    def event_chunks(self, event: Event) -> list[dict]:
        chunks = []
        delta: dict = {}
        if event.data:
            delta["content"] = event.data
        if event.tool_calls:
            delta["tool_calls"] = event.tool_calls
        if delta or (event.logprobs and self.logprobs):
            logprobs = {"content": [_token_logprob(lp) for lp in event.logprobs or []]} if self.logprobs else None
            chunks.append(self.chunk([{"index": event.choice, "delta": delta or {"content": ""},
                                       "logprobs": logprobs, "finish_reason": None}]))
        if event.finish_reason:
            chunks.append(self.chunk([{"index": event.choice, "delta": {}, "logprobs": None,
                                       "finish_reason": finish_reason(event.finish_reason)}]))
        return chunks


class CompletionShape(Shape):
    prefix = "cmpl"
    object_name = "text_completion"
    chunk_name = "text_completion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_offsets: dict[int, int] = {}  # per choice: characters streamed so far

    def choice(self, choice: Choice) -> dict:
        return {"index": choice.index, "text": choice.text,
                "logprobs": _legacy_logprobs(choice.logprobs) if self.logprobs else None,
                "finish_reason": finish_reason(choice.finish_reason)}

    def event_chunks(self, event: Event) -> list[dict]:
        if not (event.data or event.finish_reason or (event.logprobs and self.logprobs)):
            return []
        logprobs = None
        if self.logprobs:
            offset = self.text_offsets.get(event.choice, 0)
            logprobs = _legacy_logprobs(event.logprobs or [], offset)
            self.text_offsets[event.choice] = offset + sum(len(lp.token) for lp in event.logprobs or [])
        return [self.chunk([{"index": event.choice, "text": event.data or "", "logprobs": logprobs,
                             "finish_reason": finish_reason(event.finish_reason)}])]


def _data(payload: dict | str) -> ServerSentEvent:
    return ServerSentEvent(data=payload if isinstance(payload, str) else json.dumps(payload), sep="\n")


def _error_payload(job: Job) -> dict:
    return {"error": {"message": job.error or "generation failed", "type": "server_error", "param": None,
                      "code": JobFailed.code}}


async def stream_events(request: Request, job: Job, shape: Shape, on_success) -> AsyncIterator[ServerSentEvent]:
    """`data:` chunks for a job's events, ending with `data: [DONE]`. If the client leaves
    (the generator is closed early), the job is cancelled."""
    engine = request.app.state.engine
    try:
        for chunk in shape.opening_chunks():
            yield _data(chunk)
        async for event in job.follow():
            if event.type == "output":
                for chunk in shape.event_chunks(event):
                    yield _data(chunk)
        if job.status == "failed":
            yield _data(_error_payload(job))
        else:
            if job.status == "succeeded":
                on_success()
            if shape.include_usage:
                yield _data(shape.usage_chunk())
        yield _data("[DONE]")
    finally:
        if not job.done:
            engine.cancel(job.id)
        else:
            engine.forget(job.id)


def event_stream(request: Request, job: Job, shape: Shape, on_success, headers: dict) -> EventSourceResponse:
    return EventSourceResponse(stream_events(request, job, shape, on_success), headers=headers, sep="\n",
                               ping=PING_S,
                               ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"))


async def respond(request: Request, job: Job, shape: Shape, stream: bool, on_success, headers: dict):
    if stream:
        return event_stream(request, job, shape, on_success, headers)
    await wait_or_cancel(request, job)
    request.app.state.engine.forget(job.id)
    if job.status == "failed":
        raise JobFailed(job.error or "generation failed")
    if job.status == "succeeded":
        on_success()
    return JSONResponse(shape.completion(), headers=headers)


# ---------------------------------------------------------------------------- routes


def _conversation(request: Request, identity: str, body: ChatRequest, version: Version) -> Conversation | None:
    if not request.app.state.settings.sessions:
        return None
    return open_conversation(request.app.state.store, identity, body.session_id, model=version.model)


@router.post("/v1/chat/completions")
@router.post("/api/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, identity: str = Depends(require_identity)):
    version = text_version(request, body.model)
    store = request.app.state.store
    conversation = _conversation(request, identity, body, version)
    with dropped_on_error(store, conversation, identity):
        task = chat_task(body, version, conversation.history if conversation else [])
        job = await submit(request, body, version, task, identity)
    extra, headers = {}, {}
    if conversation is not None:
        extra["session_id"] = headers["X-Session-ID"] = conversation.session_id
        job.extra["session_id"] = conversation.session_id
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shape = ChatShape(job, body.model or version.model, version, bool(body.logprobs), include_usage, extra)

    def remember_turn() -> None:
        if conversation is not None and job.choices:
            first = job.choices[0]
            record_turn(store, conversation, _chat_messages(body.messages),
                        {"content": first.text, "tool_calls": first.tool_calls})

    return await respond(request, job, shape, wants_stream(body, request), remember_turn, headers)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, identity: str = Depends(require_identity)):
    version = text_version(request, body.model)
    job = await submit(request, body, version, completion_task(body, version), identity)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shape = CompletionShape(job, body.model or version.model, version, body.logprobs is not None, include_usage)
    return await respond(request, job, shape, wants_stream(body, request), lambda: None, {})


def session_object(session: dict, messages: list[dict] | None = None) -> dict:
    doc = {"id": session["id"], "object": "session", "model": session.get("model"),
           "flow_id": session.get("flow_id"), "created_at": session["created_at"],
           "updated_at": session["updated_at"]}
    if messages is not None:
        doc["messages"] = [{k: m[k] for k in ("id", "role", "content", "tool_calls", "tool_call_id", "name",
                                              "created_at") if m.get(k) is not None} for m in messages]
    return doc


@router.get("/v1/sessions")
async def list_sessions(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                        identity: str = Depends(require_identity)) -> dict:
    """Newest first, a page at a time: pass the last id of a page as `after` for the next."""
    sessions = request.app.state.store.list_sessions(identity, after=after, limit=limit + 1)
    page = sessions[:limit]
    return {"object": "list", "data": [session_object(s) for s in page], "has_more": len(sessions) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


@router.get("/v1/sessions/{session_id}")
async def get_session(session_id: str, request: Request, identity: str = Depends(require_identity)) -> dict:
    store = request.app.state.store
    return session_object(store.get_session(session_id, identity), store.messages(session_id=session_id))


@router.delete("/v1/sessions/{session_id}")
async def delete_session(session_id: str, request: Request, identity: str = Depends(require_identity)) -> dict:
    request.app.state.store.delete_session(session_id, identity)
    return {"id": session_id, "object": "session.deleted", "deleted": True}
