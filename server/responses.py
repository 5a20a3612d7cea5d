"""The OpenAI Responses API: `/v1/responses` and its stored-response routes.

A request's `input` items (after the stored context of `previous_response_id`) become chat
messages on a TextTask, submitted through the same job path as chat completions. Its answer is
rendered as Responses output items (server/responses_output.py), whole or as the Responses
stream events. With `store` (the default) the response, the context it saw and its output are
kept in the store under the caller's identity, so a later request can continue from it, also
after a restart. `background` answers at once with a queued response to poll, cancel or delete.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import ServerSentEvent

from engine.errors import BadRequest, InvalidInput, JobFailed
from engine.jobs import Job
from engine.registry import Version
from engine.text_task import TextTask
from server.sse import event_source
from server.auth import require_identity
from server.openai import PING_S, SamplingRequest, sampling_params, submit, text_version, wait_or_cancel
from server.responses_items import chat_messages, input_items
from server.responses_output import TERMINAL, builder_for, output_of, status_of, usage_of

log = logging.getLogger("ember.server")

router = APIRouter(dependencies=[Depends(require_identity)])

INTERRUPTED = "interrupted: the server stopped before this response finished"
STREAM_END = {"completed": "response.completed", "incomplete": "response.incomplete",
              "failed": "response.failed", "cancelled": "response.failed"}


# ---------------------------------------------------------------------------- request body


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`{type: text}`, `{type: json_object}` or `{type: json_schema, name, schema, strict}`."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None


class ResponsesRequest(SamplingRequest):
    input: str | list[Any]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None


# ---------------------------------------------------------------------------- request -> task


def chat_format(text: TextConfig | None) -> dict | None:
    """The chat-completions `response_format` for a Responses `text.format`."""
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    spec = fmt.model_extra or {}
    if not isinstance(spec.get("schema"), dict):
        raise InvalidInput("text.format.schema must be a JSON schema object", param="text.format.schema")
    return {"type": "json_schema", "json_schema": {k: spec[k] for k in ("name", "schema", "strict", "description")
                                                    if spec.get(k) is not None}}


def response_task(body: ResponsesRequest, version: Version, context: list[dict]) -> TextTask:
    if (body.n or 1) != 1:
        raise InvalidInput("a response has one answer: n must be 1", param="n")
    tools = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
             for t in body.tools or []]
    choice: Any = body.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = {"type": "function", "function": {"name": choice.name}}
    if (choice == "required" or isinstance(choice, dict)) and not tools:
        raise InvalidInput("tool_choice 'required' or a named function needs tools", param="tool_choice")
    params, clip = sampling_params(body, version, body.max_output_tokens, None)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    return TextTask(messages=system + chat_messages(context), tools=tools or None,
                    tool_choice=choice or ("auto" if tools else "none"), response_format=chat_format(body.text),
                    params=params, max_tokens_clip=clip, priority=body.priority)


def previous_context(request: Request, response_id: str | None, identity: str) -> list[dict]:
    """The items a follow-up continues from: the previous response's context and output."""
    if not response_id:
        return []
    doc = request.app.state.store.get_response(response_id, identity)
    status = doc["response"]["status"]
    if status not in TERMINAL:
        raise InvalidInput(f"previous response {response_id} is still {status}; wait until it ends",
                           param="previous_response_id")
    return doc["context"] + doc["response"]["output"]


def response_object(response_id: str, body: ResponsesRequest, version: Version, task: TextTask) -> dict:
    """The response as OpenAI shows it, before any output."""
    text_format = body.text.format.model_dump(exclude_none=True) if body.text and body.text.format else None
    tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, FunctionChoice) else task.tool_choice
    return {"id": response_id, "object": "response", "created_at": int(time.time()),
            "status": "queued" if body.background else "in_progress", "background": body.background,
            "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": body.model or version.model, "output": [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": body.store, "temperature": task.params.temperature,
            "text": {"format": text_format or {"type": "text"}}, "tool_choice": tool_choice,
            "tools": [t.model_dump() for t in body.tools or []], "top_p": task.params.top_p,
            "truncation": "disabled", "usage": None, "user": body.user, "metadata": body.metadata or {},
            "completed_at": None}


def settle(response: dict, job: Job) -> None:
    """Fill a response object from its job (as far as the job has come)."""
    response["status"] = status_of(job)
    response["output"] = output_of(job, response["id"])
    response["usage"] = usage_of(job)
    if response["status"] == "incomplete":
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    if response["status"] == "failed":
        response["error"] = {"code": "server_error", "message": job.error or "generation failed"}
    if job.done:
        response["completed_at"] = int(time.time())


# ---------------------------------------------------------------------------- running responses


@dataclass
class Pending:
    """A response whose job has not been settled yet (in this process)."""

    doc: dict  # {"response": the response object, "context": the input items it answers}
    owner: str
    job: Job
    persist: bool
    task: asyncio.Task | None = None
    deleted: bool = False


def _pending(app: FastAPI) -> dict[str, Pending]:
    if not hasattr(app.state, "pending_responses"):
        app.state.pending_responses = {}
    return app.state.pending_responses


def save(app: FastAPI, doc: dict, owner: str) -> None:
    app.state.store.save_response(doc["response"]["id"], owner, doc["response"]["status"], doc)


async def _settle_when_done(app: FastAPI, pending: Pending) -> None:
    await pending.job.wait()
    settle(pending.doc["response"], pending.job)
    try:
        if pending.persist and not pending.deleted:
            save(app, pending.doc, pending.owner)
    except Exception:  # noqa: BLE001 - e.g. the store closed at shutdown; the job is over either way
        log.exception("could not store response %s", pending.doc["response"]["id"])
    finally:
        _pending(app).pop(pending.doc["response"]["id"], None)
        app.state.engine.forget(pending.job.id)


def track(app: FastAPI, doc: dict, owner: str, job: Job, persist: bool) -> Pending:
    """Settle (and store) the response once its job ends, whoever is still listening."""
    pending = Pending(doc, owner, job, persist)
    _pending(app)[doc["response"]["id"]] = pending
    if persist:
        save(app, doc, owner)
    pending.task = asyncio.create_task(_settle_when_done(app, pending))
    return pending


def current(app: FastAPI, response_id: str, identity: str) -> dict:
    """The stored document, brought up to date with a job still running here; a response left
    unfinished by an earlier server process is failed as interrupted."""
    doc = app.state.store.get_response(response_id, identity)
    response = doc["response"]
    if response["status"] in TERMINAL:
        return doc
    pending = _pending(app).get(response_id)
    if pending is not None:
        view = copy.deepcopy(pending.doc)
        settle(view["response"], pending.job)
        return view
    response.update(status="failed", error={"code": "server_error", "message": INTERRUPTED},
                    completed_at=int(time.time()))
    save(app, doc, identity)
    return doc


# ---------------------------------------------------------------------------- streaming


def _sse(payload: dict, sequence: itertools.count) -> ServerSentEvent:
    payload["sequence_number"] = next(sequence)
    return ServerSentEvent(event=payload["type"], data=json.dumps(payload), sep="\n")


async def stream_response(request: Request, pending: Pending) -> AsyncIterator[ServerSentEvent]:
    """The Responses event sequence for one job; if the client leaves, a foreground job is
    cancelled (a background one keeps running)."""
    job, response = pending.job, pending.doc["response"]
    sequence = itertools.count()
    try:
        opening = copy.deepcopy(response)
        yield _sse({"type": "response.created", "response": opening}, sequence)
        yield _sse({"type": "response.in_progress", "response": {**opening, "status": "in_progress"}}, sequence)
        builder = builder_for(job, response["id"])
        async for event in job.follow():
            for payload in builder.feed(event):
                yield _sse(payload, sequence)
        await asyncio.shield(pending.task)
        if response["status"] == "failed":
            yield _sse({"type": "error", "code": "server_error", "message": response["error"]["message"],
                        "param": None}, sequence)
        yield _sse({"type": STREAM_END[response["status"]], "response": copy.deepcopy(response)}, sequence)
    finally:
        if not job.done and not response["background"]:
            request.app.state.engine.cancel(job.id)


# ---------------------------------------------------------------------------- routes


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, identity: str = Depends(require_identity)):
    version = text_version(request, body.model)
    if body.background and not body.store:
        raise InvalidInput("background responses are stored: store must be true", param="background")
    context = previous_context(request, body.previous_response_id, identity) + input_items(body.input)
    task = response_task(body, version, context)
    job = await submit(request, body, version, task, identity)
    doc = {"response": response_object(f"resp_{job.id}", body, version, task), "context": context}
    pending = track(request.app, doc, identity, job, body.store)
    if body.stream:
        return event_source(stream_response(request, pending), sep="\n", ping_s=PING_S)
    if body.background:
        return JSONResponse(copy.deepcopy(doc["response"]))
    await wait_or_cancel(request, [job])
    await asyncio.shield(pending.task)
    if job.status == "failed":
        raise JobFailed(job.error or "generation failed")
    return JSONResponse(doc["response"])


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request, identity: str = Depends(require_identity)) -> dict:
    return current(request.app, response_id, identity)["response"]


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request, identity: str = Depends(require_identity)) -> dict:
    doc = current(request.app, response_id, identity)
    response = doc["response"]
    if not response["background"]:
        raise BadRequest("only responses created with background: true can be cancelled")
    if response["status"] in ("completed", "incomplete", "failed"):
        raise BadRequest(f"cannot cancel a response that is {response['status']}")
    pending = _pending(request.app).get(response_id)
    if pending is not None:
        request.app.state.engine.cancel(pending.job.id)
        await asyncio.shield(pending.task)
        return pending.doc["response"]
    return response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request, identity: str = Depends(require_identity)) -> dict:
    request.app.state.store.delete_response(response_id, identity)
    pending = _pending(request.app).get(response_id)
    if pending is not None:
        pending.deleted = True
        request.app.state.engine.cancel(pending.job.id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _position(items: list[dict], item_id: str, param: str) -> int:
    for index, item in enumerate(items):
        if item["id"] == item_id:
            return index
    raise InvalidInput(f"{param}: no input item with id '{item_id}' in this response", param=param)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, identity: str = Depends(require_identity),
                           after: str | None = None, before: str | None = None,
                           limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc") -> dict:
    """Every item the response's answer was conditioned on (earlier turns included), paged."""
    items = request.app.state.store.get_response(response_id, identity)["context"]
    if order == "desc":
        items = items[::-1]
    if after:
        items = items[_position(items, after, "after") + 1:]
    if before:
        items = items[:_position(items, before, "before")]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
