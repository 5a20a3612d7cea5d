"""The Replicate-style API: predictions (create, get, list, cancel, stream), the seed's synchronous
`run` and `run_sse`, webhooks (server/webhooks.py) and files (server/files_api.py).

It only translates: the version comes from the registry, inputs are checked against the version's
schema, the job runs on the engine, and every answer is the one prediction object of
server/jobs.prediction_doc, whether the job is live or only in the store.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse

from engine.errors import BadRequest, EmberError, InvalidInput, NotFound
from engine.jobs import Event, Job
from engine.llm.types import SamplingParams
from engine.registry import Version, parse_keep_alive
from engine.sampling_bounds import engine_seed
from engine.schemas import validate_input
from engine.text_task import TextTask
from engine.video_task import VideoTask, load_image
from server import files_api
from server.sse import event_source
from server.auth import require_identity
from server.jobs import prediction_doc, prediction_urls, request_base_url
from server.store import UNFINISHED, Store
from server.webhooks import EVENTS, WebhookSender, check_target

log = logging.getLogger("ember.replicate")

router = APIRouter()
router.include_router(files_api.router)

WAIT_MAX_S = 60
CANCEL_WAIT_S = 2.0
FOLLOW_POLL_S = 0.2  # how often a record another replica writes is re-read (stream, cancel)
PING_S = 10
PAGE_SIZE = 100

WebhookEvent = Literal["start", "output", "logs", "completed"]


class ModelPredictionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: dict = Field(default_factory=dict)
    webhook: str | None = None
    webhook_completed: str | None = None
    webhook_events_filter: list[WebhookEvent] | None = None
    stream: bool = False  # every prediction can be streamed; accepted for the client's sake
    keep_alive: float | str | None = None  # how long the version stays loaded once idle ("5m", 0, -1)


class PredictionBody(ModelPredictionBody):
    version: str


class RunBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: dict = Field(default_factory=dict)


# ---------------------------------------------------------------- inputs to jobs

def text_task(inputs: dict) -> TextTask:
    """The seed's LLM inputs (validated, defaults filled) as a dialect-neutral text task."""
    min_new = max(inputs["min_new_tokens"], 0)
    if min_new > inputs["max_new_tokens"]:
        raise InvalidInput("min_new_tokens must not exceed max_new_tokens", param="input.min_new_tokens")
    stops = [s for s in (inputs.get("stop_sequences") or "").split(",") if s]
    params = SamplingParams(
        max_new_tokens=inputs["max_new_tokens"], min_new_tokens=min_new, temperature=inputs["temperature"],
        top_p=inputs["top_p"], top_k=max(inputs["top_k"], 0), min_p=inputs["min_p"],
        repetition_penalty=inputs["repetition_penalty"], presence_penalty=inputs["presence_penalty"],
        frequency_penalty=inputs["frequency_penalty"], seed=engine_seed(inputs.get("seed")), stop=stops)
    return TextTask(prompt=inputs["prompt"], system_prompt=inputs["system_prompt"] or None,
                    prompt_template=inputs["prompt_template"] or None, params=params)


def new_job(version: Version, inputs: dict, owner: str | None, webhook: str | None = None,
            events: list[str] | None = None) -> Job:
    filled = validate_input(version, inputs)
    task = text_task(filled) if version.kind == "text-generation" else VideoTask(inputs=filled)
    return Job(model=version.model, version=version.id, kind=version.kind, input=inputs, task=task,
               owner=owner, source="replicate", webhook=webhook,
               webhook_events_filter=tuple(events or EVENTS))


async def checked_webhook(request: Request, body: ModelPredictionBody) -> tuple[str | None, list | None]:
    webhook, events = body.webhook, body.webhook_events_filter
    if webhook is None and body.webhook_completed:
        webhook, events = body.webhook_completed, ["completed"]
    if webhook:
        await asyncio.to_thread(check_target, webhook, request.app.state.settings.webhooks_may_reach_private)
    return webhook, events


def wait_seconds(prefer: str | None) -> int | None:
    """`Prefer: wait` (60 s) or `wait=N` (1..60); None when the caller does not ask to wait."""
    for token in (prefer or "").split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "wait":
            value = value.strip().strip('"')
            if not value:
                return WAIT_MAX_S
            if not re.fullmatch(r"[0-9]+", value):
                return None  # RFC 7240: a preference the server cannot read is ignored
            return min(max(int(value), 1), WAIT_MAX_S)
    return None


DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration_seconds(value: str) -> float:
    """`Cancel-After` durations: `90`, `30s`, `5m`, `1h30m`, `500ms`."""
    value = value.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    if not value or not re.fullmatch(f"(?:{DURATION.pattern})+", value):
        raise InvalidInput("Cancel-After must be a duration such as 30s, 5m or 1h30m", param="Cancel-After")
    return sum(float(n) * UNITS[unit] for n, unit in DURATION.findall(value))


def cancel_later(request: Request, job: Job, seconds: float) -> None:
    engine = request.app.state.engine

    def cancel() -> None:
        if not job.done:
            engine.cancel(job.id)

    asyncio.get_running_loop().call_later(seconds, cancel)


# ---------------------------------------------------------------- rendering

def public(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def render(request: Request, item: Job | dict) -> dict:
    base = request_base_url(request)
    if isinstance(item, Job):
        return public(prediction_doc(item, base))
    return public({**item, "urls": prediction_urls(item["id"], base)})


async def find(request: Request, prediction_id: str, identity: str) -> Job | dict:
    """The live job if this replica's engine holds it, else the stored record (owner-scoped):
    a finished prediction, or one another replica runs. The store is read off the event loop
    (a PostgreSQL store is a network round trip away)."""
    job = request.app.state.engine.jobs.get(prediction_id)
    if job is not None:
        if job.owner not in (identity, None):
            raise NotFound(f"Prediction {prediction_id} not found")
        return job
    return await asyncio.to_thread(request.app.state.store.get_prediction, prediction_id, identity)


def sse_items(event: Event) -> list[dict]:
    """A job event as Replicate SSE events: output, logs, error, done (each with an id)."""
    event_id = str(event.id)
    if event.type == "output":
        if event.choice == 0 and isinstance(event.data, str) and event.data:
            return [{"event": "output", "id": event_id, "data": event.data}]
        return []
    if event.type == "logs":
        return [{"event": "logs", "id": event_id, "data": event.data.rstrip("\n")}]
    status = event.data["status"]
    items = []
    if status == "failed":
        items.append({"event": "error", "id": event_id,
                      "data": json.dumps({"detail": event.data.get("error") or "prediction failed"})})
    reason = {"canceled": "canceled", "failed": "error"}.get(status)
    items.append({"event": "done", "id": event_id, "data": json.dumps({"reason": reason} if reason else {})})
    return items


async def followed_record(store: Store, doc: dict) -> AsyncIterator[Event]:
    """The events of a prediction only in the store, as they come: a running one (on another
    replica) is re-read every FOLLOW_POLL_S until it ends. A log line is sent once complete; output
    chunks as they are recorded (a record grows at most every SAVE_INTERVAL_S)."""
    sent_lines = sent_chunks = 0
    next_id = 0
    while True:
        ended = doc.get("status") not in UNFINISHED
        lines = (doc.get("logs") or "").splitlines(keepends=True)
        if not ended and lines and not lines[-1].endswith("\n"):
            lines.pop()
        output = doc.get("output")
        chunks = output if isinstance(output, list) else ([] if output is None else [output])
        fresh = [("logs", line.rstrip("\n")) for line in lines[sent_lines:]]
        fresh += [("output", c if isinstance(c, str) else json.dumps(c)) for c in chunks[sent_chunks:]]
        if ended:
            fresh.append(("done", {"status": doc["status"], "error": doc.get("error")}))
        sent_lines, sent_chunks = len(lines), len(chunks)
        for kind, data in fresh:
            yield Event(next_id, kind, data)
            next_id += 1
        if ended:
            return
        await asyncio.sleep(FOLLOW_POLL_S)
        doc = await asyncio.to_thread(store.get_prediction, doc["id"], None)


async def sse_stream(request: Request, item: Job | dict, cancel_on_disconnect: bool) -> AsyncIterator[dict]:
    if not isinstance(item, Job):
        async for event in followed_record(request.app.state.store, item):
            for sse in sse_items(event):
                yield sse
        return
    try:
        async for event in item.follow(0):
            for sse in sse_items(event):
                yield sse
    finally:
        if cancel_on_disconnect and not item.done:
            request.app.state.engine.cancel(item.id)


def event_stream(request: Request, item: Job | dict, cancel_on_disconnect: bool = False) -> EventSourceResponse:
    return event_source(sse_stream(request, item, cancel_on_disconnect), ping_s=PING_S,
                        headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------- predictions

async def create_prediction(request: Request, ref: str, body: ModelPredictionBody, identity: str,
                            prefer: str | None, cancel_after: str | None) -> JSONResponse:
    wait = wait_seconds(prefer)
    deadline = duration_seconds(cancel_after) if cancel_after else None
    webhook, events = await checked_webhook(request, body)
    version = request.app.state.engine.registry.resolve(ref)
    job = new_job(version, body.input, identity, webhook, events)
    job.keep_alive = parse_keep_alive(body.keep_alive)
    if isinstance(job.task, VideoTask):
        engine = request.app.state.engine
        await asyncio.to_thread(load_image, job.task, engine.files, engine.options.allow_http_inputs,
                                engine.options.allow_private_urls)
    await request.app.state.jobs.submit(job, wait_ready=False)
    if deadline is not None:
        cancel_later(request, job, deadline)
    headers = {}
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait}"
        await job.wait(wait)
    doc = render(request, job)
    if wait is not None and not job.done:
        doc["status"] = "starting"  # the client treats anything but `starting` as final here
    try:
        await request.app.state.jobs.committed()
    except Exception:
        request.app.state.engine.cancel(job.id)  # not accepted: nothing would find or re-run it
        raise
    return JSONResponse(doc, status_code=201, headers=headers)


@router.post("/v1/predictions", status_code=201)
async def create(body: PredictionBody, request: Request, identity: str = Depends(require_identity),
                 prefer: str | None = Header(None), cancel_after: str | None = Header(None)) -> JSONResponse:
    return await create_prediction(request, body.version, body, identity, prefer, cancel_after)


@router.post("/v1/models/{owner}/{name}/predictions", status_code=201)
async def create_for_model(owner: str, name: str, body: ModelPredictionBody, request: Request,
                           identity: str = Depends(require_identity), prefer: str | None = Header(None),
                           cancel_after: str | None = Header(None)) -> JSONResponse:
    return await create_prediction(request, f"{owner}/{name}", body, identity, prefer, cancel_after)


def _cursor(doc: dict) -> str:
    return base64.urlsafe_b64encode(f"{doc['created_at']}|{doc['id']}".encode()).decode()


def _decode_cursor(cursor: str) -> str:
    try:
        decoded = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    if not re.fullmatch(r"[0-9T:.\-+Z]+\|[a-z0-9]+", decoded):
        raise BadRequest("invalid cursor: use the `next` URL of a previous page", param="cursor")
    return decoded


@router.get("/v1/predictions")
async def list_predictions(request: Request, cursor: str | None = None,
                           identity: str = Depends(require_identity)) -> dict:
    before = _decode_cursor(cursor) if cursor else None
    docs = await asyncio.to_thread(request.app.state.store.list_predictions, identity, before, PAGE_SIZE + 1)
    page, more = docs[:PAGE_SIZE], len(docs) > PAGE_SIZE
    live = request.app.state.engine.jobs
    results = [render(request, live.get(doc["id"]) or doc) for doc in page]
    following = f"{request_base_url(request)}/v1/predictions?cursor={_cursor(page[-1])}" if more else None
    return {"previous": None, "next": following, "results": results}


@router.get("/v1/predictions/{prediction_id}")
async def get_prediction(prediction_id: str, request: Request, identity: str = Depends(require_identity)) -> dict:
    return render(request, await find(request, prediction_id, identity))


@router.post("/v1/predictions/{prediction_id}/cancel")
async def cancel_prediction(prediction_id: str, request: Request, identity: str = Depends(require_identity)) -> dict:
    item = await find(request, prediction_id, identity)
    if isinstance(item, Job) and not item.done:
        request.app.state.engine.cancel(item.id)
        await item.wait(CANCEL_WAIT_S)
    elif isinstance(item, dict) and item["status"] in UNFINISHED:
        item = await cancel_elsewhere(request.app.state.store, item)
    return render(request, item)


async def cancel_elsewhere(store: Store, doc: dict) -> dict:
    """Cancel a prediction another replica runs: flag it in the store (that replica cancels it
    within a heartbeat; if it has died, the replica adopting it does), then wait up to
    CANCEL_WAIT_S for the record to say so. Returns the newest record."""
    if not await asyncio.to_thread(store.request_cancel, doc["id"]):
        return await asyncio.to_thread(store.get_prediction, doc["id"], None)
    deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_S
    while doc["status"] in UNFINISHED and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(FOLLOW_POLL_S)
        doc = await asyncio.to_thread(store.get_prediction, doc["id"], None)
    return doc


@router.get("/v1/predictions/{prediction_id}/stream")
async def stream_prediction(prediction_id: str, request: Request,
                            identity: str = Depends(require_identity)) -> EventSourceResponse:
    return event_stream(request, await find(request, prediction_id, identity))


# ---------------------------------------------------------------- the seed's run / run_sse

async def started_job(request: Request, body: RunBody, identity: str) -> Job:
    version = request.app.state.engine.registry.resolve(body.model)
    job = new_job(version, body.input, identity)
    await request.app.state.jobs.submit(job, wait_ready=True)
    return job


@router.post("/v1/run")
async def run(body: RunBody, request: Request, identity: str = Depends(require_identity)) -> dict:
    """Run a model and answer the finished prediction; a caller that goes away cancels it."""
    job = await started_job(request, body, identity)
    ended = asyncio.create_task(job.wait())
    gone = asyncio.create_task(disconnected(request))
    await asyncio.wait((ended, gone), return_when=asyncio.FIRST_COMPLETED)
    ended.cancel()
    gone.cancel()
    if not job.done:
        request.app.state.engine.cancel(job.id)
    return render(request, job)


async def disconnected(request: Request) -> None:
    """Returns when the caller hangs up (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/run_sse")
async def run_sse(body: RunBody, request: Request, identity: str = Depends(require_identity)) -> EventSourceResponse:
    """The same job streamed as it runs: output chunks, log lines, then done."""
    return event_stream(request, await started_job(request, body, identity), cancel_on_disconnect=True)


# ---------------------------------------------------------------- startup

async def on_startup(app) -> None:
    """Deliver webhooks for every job, and re-run the predictions a restart interrupted (when
    configured; app.state.requeue holds them)."""
    jobs = app.state.jobs
    sender = WebhookSender(lambda job: public(prediction_doc(job, jobs.base_url)), app.state.settings.webhook_secret,
                           app.state.settings.webhooks_may_reach_private, asyncio.get_running_loop())
    app.state.webhooks = sender
    jobs.hooks.append(sender.on_change)
    await resubmit(app, app.state.requeue)


async def resubmit(app, docs: list[dict]) -> None:
    """Run again the adopted predictions of a restart or of a replica that died (their records
    keep id and creation time). Jobs of other dialects have no one left waiting for them, so they
    are failed as interrupted."""
    jobs = app.state.jobs
    for doc in docs:
        if doc["id"] in app.state.engine.jobs:
            continue
        if doc.get("source") != "replicate":
            jobs.fail_interrupted(doc)
            continue
        try:
            version = app.state.engine.registry.resolve(f"{doc['model']}:{doc['version']}")
            job = new_job(version, doc.get("input") or {}, doc.get("_owner"), doc.get("webhook"),
                          doc.get("webhook_events_filter"))
        except EmberError as exc:
            log.warning("prediction %s cannot be re-queued: %s", doc["id"], exc.message)
            jobs.fail_interrupted(doc)
            continue
        job.id, job.created_at = doc["id"], doc["created_at"]
        await jobs.submit(job, wait_ready=False)
