"""The OpenAI dialect: `/v1/chat/completions` (also `/api/v1/chat/completions`), `/v1/completions`
and `/v1/sessions`. It only translates: request bodies become a TextTask on a Job, job events
become completion objects or `data:` chunks. Sampling, prompts and JSON output live in
engine/text_task.py, tool-call formats in server/tool_calls.py, conversations in server/sessions.py,
and the bounds of every sampling setting in engine/sampling_bounds.py.

Fields the OpenAI API lacks but vLLM-style clients send as extra body (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos) are honoured; other unknown fields are ignored, as
OpenAI's own clients expect. Without `max_tokens`, a completion may run to the end of the context
unless the model version sets a default `max_new_tokens`.

The legacy `functions` / `function_call` fields are tools under another name: they are mapped to
`tools` / `tool_choice` and answered in the legacy shape (`message.function_call`,
`finish_reason: "function_call"`), streamed and not.

`/v1/completions` takes what evaluation harnesses send: a prompt string, a list of them, a list of
token ids or a list of such lists (one job per prompt; choice `i` of prompt `p` is index
`p * n + i`), and `echo` (the prompt before the completion; with `logprobs`, the prompt tokens'
logprobs first, the first one null). `max_tokens: 0` with `echo` scores a prompt without
generating (lm-evaluation-harness's loglikelihood requests).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette import EventSourceResponse, ServerSentEvent

from engine.errors import Forbidden, InvalidInput, JobFailed
from engine.jobs import Choice, Event, Job
from engine.llm.types import SamplingParams, TokenLogprob
from engine.registry import Version, parse_keep_alive
from engine.sampling_bounds import BOUNDS, engine_seed
from engine.text_task import TextTask
from server.sse import event_source
from server.auth import bearer_token, identity_of_key, require_identity
from server.sessions import Conversation, dropped_on_error, open_conversation, record_turn
from server.tool_calls import ToolCallStream, merge_deltas, offered_tool_names, split_tool_calls

router = APIRouter(dependencies=[Depends(require_identity)])

PING_S = 15
DISCONNECT_POLL_S = 0.5
MAX_N = 16
MAX_PRIORITY = 100
MAX_PROMPTS = 64  # prompts in one /v1/completions request
OPENAI_FINISH = {"stop", "length", "tool_calls"}
SAMPLING_DEFAULTS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
                     "repetition_penalty", "presence_penalty", "frequency_penalty", "seed")


# ---------------------------------------------------------------------------- request bodies


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    function_call: dict | None = None  # legacy assistant call


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
    """Fields shared by chat and text completions; bounds from engine/sampling_bounds.py."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float | None = BOUNDS["temperature"].field()
    top_p: float | None = BOUNDS["top_p"].field()
    n: int | None = BOUNDS["n"].field()
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = BOUNDS["max_new_tokens"].field()
    presence_penalty: float | None = BOUNDS["presence_penalty"].field()
    frequency_penalty: float | None = BOUNDS["frequency_penalty"].field()
    seed: int | None = BOUNDS["seed"].field()
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = BOUNDS["top_k"].field()
    min_p: float | None = BOUNDS["min_p"].field()
    repetition_penalty: float | None = BOUNDS["repetition_penalty"].field()
    min_tokens: int | None = BOUNDS["min_new_tokens"].field()
    ignore_eos: bool | None = None
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
    max_completion_tokens: int | None = BOUNDS["max_new_tokens"].field()
    logprobs: bool | None = None
    top_logprobs: int | None = BOUNDS["logprobs"].field()
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    session_id: str | None = None


TokenIds = list[int]


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing")
    logprobs: int | None = BOUNDS["logprobs"].field()
    echo: bool | None = None
    suffix: str | None = None


# ---------------------------------------------------------------------------- request -> job


def text_version(request: Request, model: str | None) -> Version:
    return request.app.state.engine.registry.resolve_kind(model, "text-generation", "chat and text completions")


def sampling_params(body: SamplingRequest, version: Version, max_tokens: int | None,
                    logprobs: int | None) -> tuple[SamplingParams, bool]:
    """The request's sampling settings over the version's defaults. Returns (params, clip):
    clip means no length was asked for, so the completion may fill the context."""
    given = {"temperature": body.temperature, "top_p": body.top_p, "presence_penalty": body.presence_penalty,
             "frequency_penalty": body.frequency_penalty, "min_p": body.min_p,
             "repetition_penalty": body.repetition_penalty, "min_new_tokens": body.min_tokens,
             "top_k": body.top_k, "max_new_tokens": max_tokens, "seed": body.seed}
    values: dict[str, Any] = {"temperature": 1.0}
    values.update({k: v for k, v in version.default_inputs.items() if k in SAMPLING_DEFAULTS and v is not None})
    values.update({k: v for k, v in given.items() if v is not None})
    values["top_k"] = max(0, int(values.get("top_k", 0)))
    values["min_new_tokens"] = max(0, int(values.get("min_new_tokens", 0)))
    if body.min_tokens is not None and max_tokens is not None and body.min_tokens > max_tokens:
        raise InvalidInput("min_tokens must not exceed max_tokens", param="min_tokens")
    values["seed"] = engine_seed(values.get("seed"))
    clip = "max_new_tokens" not in values
    if clip:
        values["max_new_tokens"] = int(version.limits.get("max_model_len", 1 << 20))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    return SamplingParams(**values, n=body.n or 1, stop=stop, logit_bias=bias, logprobs=logprobs,
                          ignore_eos=bool(body.ignore_eos)), clip


def _legacy_messages(messages: list[dict]) -> list[dict]:
    """Legacy `function_call` assistant messages and `function` results as tool calls and results."""
    out, last_call_id = [], None
    for number, doc in enumerate(messages):
        call = doc.pop("function_call", None)
        if doc["role"] == "assistant" and call and not doc.get("tool_calls"):
            last_call_id = f"call_{number}"
            doc["tool_calls"] = [{"id": last_call_id, "type": "function", "function": call}]
        if doc["role"] == "function":
            doc["role"] = "tool"
            doc.setdefault("tool_call_id", last_call_id or f"call_{number}")
        out.append(doc)
    return out


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
    return _legacy_messages(out)


def _tools_and_choice(body: ChatRequest) -> tuple[list[dict], Any]:
    """`tools`/`tool_choice`, or the legacy `functions`/`function_call` mapped onto them."""
    if body.functions is not None or body.function_call is not None:
        if body.tools is not None or body.tool_choice is not None:
            raise InvalidInput("send either tools/tool_choice or the legacy functions/function_call, not both",
                               param="functions")
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in body.functions or []]
        call = body.function_call
        choice = {"type": "function", "function": call.model_dump()} if isinstance(call, FunctionName) else call
        if isinstance(choice, dict) and not tools:
            raise InvalidInput("function_call names a function but no functions are given", param="function_call")
        return tools, choice
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    if (choice == "required" or isinstance(choice, dict)) and not tools:
        raise InvalidInput("tool_choice 'required' or a named function needs tools", param="tool_choice")
    return tools, choice


def chat_task(body: ChatRequest, version: Version, history: list[dict]) -> TextTask:
    tools, choice = _tools_and_choice(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInput("top_logprobs requires logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params, clip = sampling_params(body, version, body.max_completion_tokens or body.max_tokens, logprobs)
    response_format = body.response_format.model_dump(exclude_none=True) if body.response_format else None
    return TextTask(messages=history + _chat_messages(body.messages), tools=tools or None,
                    tool_choice=choice or ("auto" if tools else "none"), response_format=response_format,
                    params=params, max_tokens_clip=clip, priority=body.priority,
                    history_span=(0, len(history)) if history else None)


def completion_prompts(prompt: str | list) -> list[str | list[int]]:
    """The request's prompts: strings or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise InvalidInput("prompt must not be empty", param="prompt")
    if len(prompt) > MAX_PROMPTS:
        raise InvalidInput(f"at most {MAX_PROMPTS} prompts per request; got {len(prompt)}", param="prompt")
    return list(prompt)


def completion_tasks(body: CompletionRequest, version: Version) -> list[TextTask]:
    if body.suffix:
        raise InvalidInput("suffix is not supported", param="suffix")
    if body.max_tokens == 0 and not body.echo:
        raise InvalidInput("max_tokens 0 generates nothing; it is only useful with echo", param="max_tokens")
    tasks = []
    for prompt in completion_prompts(body.prompt):
        params, clip = sampling_params(body, version, body.max_tokens, body.logprobs)
        if body.echo and (body.logprobs is not None or body.max_tokens == 0):
            params.prompt_logprobs = body.logprobs or 0
        ids = prompt if isinstance(prompt, list) else None
        text = prompt if isinstance(prompt, str) else None
        tasks.append(TextTask(prompt=text, prompt_token_ids=ids, prompt_template="{prompt}", params=params,
                              max_tokens_clip=clip, priority=body.priority))
    return tasks


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


async def submit_all(request: Request, body: BaseModel, version: Version, tasks: list[TextTask],
                     identity: str) -> list[Job]:
    """One job per task; if one cannot start, those already queued are cancelled."""
    jobs: list[Job] = []
    try:
        for task in tasks:
            jobs.append(await submit(request, body, version, task, identity))
    except BaseException:
        for job in jobs:
            request.app.state.engine.cancel(job.id)
        raise
    return jobs


async def wait_or_cancel(request: Request, jobs: list[Job]) -> None:
    """Wait for the jobs; if the client goes away first, cancel them."""
    for job in jobs:
        while not await job.wait(DISCONNECT_POLL_S):
            if await request.is_disconnected():
                for other in jobs:
                    request.app.state.engine.cancel(other.id)
                await job.wait()


async def follow_all(jobs: list[Job]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several jobs as they come, each with its job's position."""
    if len(jobs) == 1:
        async for event in jobs[0].follow():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(position: int, job: Job) -> None:
        async for event in job.follow():
            await queue.put((position, event))
        await queue.put((position, None))

    pumps = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        running = len(jobs)
        while running:
            position, event = await queue.get()
            if event is None:
                running -= 1
            else:
                yield position, event
    finally:
        for task in pumps:
            task.cancel()


# ---------------------------------------------------------------------------- job -> response


def usage(jobs: list[Job]) -> dict:
    prompt = sum(job.prompt_tokens for job in jobs)
    completion = sum(c.completion_tokens for job in jobs for c in job.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in OPENAI_FINISH else "stop"


def _token_logprob(lp: TokenLogprob) -> dict:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
            "top_logprobs": [{"token": text, "logprob": value, "bytes": list(text.encode())}
                             for _, text, value in lp.top]}


def _legacy_logprobs(tokens: list[str], values: list[float | None], tops: list[dict | None],
                     offset: int = 0) -> dict:
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _generated_logprobs(items: list[TokenLogprob], offset: int = 0) -> dict:
    return _legacy_logprobs([lp.token for lp in items], [lp.logprob for lp in items],
                            [{text: value for _, text, value in lp.top} for lp in items], offset)


def _first_token_text(prompt_text: str, rest: list[TokenLogprob]) -> str:
    """The prompt's first token as text (the engine gives no logprob, so no text, for it)."""
    tail = "".join(lp.token for lp in rest)
    return prompt_text[:len(prompt_text) - len(tail)] if prompt_text.endswith(tail) else ""


def _prompt_logprobs(job: Job, items: list[TokenLogprob | None]) -> dict:
    """Legacy logprobs of the prompt tokens, the first one null (nothing comes before it)."""
    rest = [lp for lp in items[1:] if lp is not None]
    first = _first_token_text(job.prompt_text or "", rest) if items and items[0] is None else None
    entries = ([(first, None, None)] if first is not None else []) + \
        [(lp.token, lp.logprob, {text: value for _, text, value in lp.top}) for lp in rest]
    return _legacy_logprobs([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])


def _joined(first: dict, second: dict) -> dict:
    shift = sum(len(t) for t in first["tokens"])
    return {"tokens": first["tokens"] + second["tokens"],
            "token_logprobs": first["token_logprobs"] + second["token_logprobs"],
            "top_logprobs": first["top_logprobs"] + second["top_logprobs"],
            "text_offset": first["text_offset"] + [o + shift for o in second["text_offset"]]}


class Shape:
    """How one dialect endpoint renders its jobs: whole, or as stream chunks. Choice `i` of the
    job at position `p` is index `p * n + i`."""

    prefix = ""
    object_name = ""
    chunk_name = ""

    def __init__(self, jobs: list[Job], model: str, version: Version, logprobs: bool, include_usage: bool,
                 extra: dict | None = None):
        self.jobs = jobs
        self.n = jobs[0].task.params.n
        self.id = f"{self.prefix}-{jobs[0].id}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = f"fp_{version.id[:12]}"
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.extra = extra or {}

    def index(self, position: int, choice: int) -> int:
        return position * self.n + choice

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, **self.extra}

    def completion(self) -> dict:
        choices = [self.choice(position, c) for position, job in enumerate(self.jobs) for c in job.choices]
        body = self._envelope(self.object_name, choices)
        body["usage"] = usage(self.jobs)
        return body

    def chunk(self, choices: list[dict]) -> dict:
        body = self._envelope(self.chunk_name, choices)
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict:
        return {**self.chunk([]), "usage": usage(self.jobs)}

    def opening_chunks(self) -> list[dict]:
        return []

    def choice(self, position: int, choice: Choice) -> dict:
        raise NotImplementedError

    def event_chunks(self, position: int, event: Event) -> list[dict]:
        raise NotImplementedError


class ChatShape(Shape):
    """Chat completions; tool calls are read out of the model's text here (server/tool_calls.py).
    `legacy` answers calls in the shape of the old `functions` API."""

    prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def __init__(self, *args, tool_names: list[str], legacy: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_names = tool_names
        self.legacy = legacy
        self.parsers = {i: ToolCallStream(tool_names) for i in range(self.n)} if tool_names else {}

    def call_finish(self, reason: str | None, has_calls: bool) -> str | None:
        if has_calls and reason == "stop":
            return "function_call" if self.legacy else "tool_calls"
        return finish_reason(reason)

    def parsed(self, choice: Choice) -> tuple[str, list[dict]]:
        """A finished choice's content and tool calls."""
        return split_tool_calls(choice.text, self.tool_names) if self.tool_names else (choice.text, [])

    def message(self, choice: Choice) -> dict:
        content, calls = self.parsed(choice)
        message: dict = {"role": "assistant", "content": content or (None if calls else "")}
        if calls and self.legacy:
            message["function_call"] = calls[0]["function"]
        elif calls:
            message["tool_calls"] = calls
        return message

    def choice(self, position: int, choice: Choice) -> dict:
        message = self.message(choice)
        has_calls = bool(message.get("tool_calls") or message.get("function_call"))
        logprobs = {"content": [_token_logprob(lp) for lp in choice.logprobs]} if self.logprobs else None
        return {"index": self.index(position, choice.index), "message": message, "logprobs": logprobs,
                "finish_reason": self.call_finish(choice.finish_reason, has_calls)}

    def opening_chunks(self) -> list[dict]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(self.n)]

    def _call_delta(self, deltas: list[dict]) -> dict:
        if not self.legacy:
            return {"tool_calls": deltas}
        first = [d for d in deltas if d["index"] == 0]  # the legacy shape has one call
        return {"function_call": dict(first[0]["function"])} if first else {}

    def event_chunks(self, position: int, event: Event) -> list[dict]:
        content, deltas = event.data or "", []
        parser = self.parsers.get(event.choice)
        if parser is not None:
            content, deltas = parser.feed(content)
            if event.finish_reason:
                tail, more = parser.finish()
                content, deltas = content + tail, deltas + more
        delta: dict = {}
        if content:
            delta["content"] = content
        if deltas:
            delta.update(self._call_delta(merge_deltas(deltas)))
        chunks = []
        if delta or (event.logprobs and self.logprobs):
            logprobs = {"content": [_token_logprob(lp) for lp in event.logprobs or []]} if self.logprobs else None
            chunks.append(self.chunk([{"index": event.choice, "delta": delta or {"content": ""},
                                       "logprobs": logprobs, "finish_reason": None}]))
        if event.finish_reason:
            reason = self.call_finish(event.finish_reason, bool(parser and parser.calls))
            chunks.append(self.chunk([{"index": event.choice, "delta": {}, "logprobs": None,
                                       "finish_reason": reason}]))
        return chunks


class CompletionShape(Shape):
    """Text completions; with `echo` the prompt (and its logprobs) comes first."""

    prefix = "cmpl"
    object_name = "text_completion"
    chunk_name = "text_completion"

    def __init__(self, *args, echo: bool, prompts: list[str | list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.echo = echo
        self.prompts = prompts
        self.text_offsets: dict[int, int] = {}  # per choice index: characters streamed so far
        self.echoed: set[int] = set()

    def prompt_text(self, position: int) -> str:
        prompt = self.prompts[position]
        return prompt if isinstance(prompt, str) else (self.jobs[position].prompt_text or "")

    def choice(self, position: int, choice: Choice) -> dict:
        job = self.jobs[position]
        text = (self.prompt_text(position) if self.echo else "") + choice.text
        logprobs = None
        if self.logprobs:
            logprobs = _generated_logprobs(choice.logprobs)
            if self.echo:
                logprobs = _joined(_prompt_logprobs(job, choice.prompt_logprobs), logprobs)
        return {"index": self.index(position, choice.index), "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason(choice.finish_reason)}

    def event_chunks(self, position: int, event: Event) -> list[dict]:
        index = self.index(position, event.choice)
        text, logprobs = event.data or "", None
        echo_now = self.echo and index not in self.echoed
        if echo_now:
            self.echoed.add(index)
            text = self.prompt_text(position) + text
        if not (text or event.finish_reason or (event.logprobs and self.logprobs) or echo_now):
            return []
        if self.logprobs:
            offset = self.text_offsets.get(index, 0)
            logprobs = _generated_logprobs(event.logprobs or [])
            if echo_now:
                logprobs = _joined(_prompt_logprobs(self.jobs[position], event.prompt_logprobs or []), logprobs)
            logprobs["text_offset"] = [o + offset for o in logprobs["text_offset"]]
            self.text_offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
        return [self.chunk([{"index": index, "text": text, "logprobs": logprobs,
                             "finish_reason": finish_reason(event.finish_reason)}])]


def _data(payload: dict | str) -> ServerSentEvent:
    return ServerSentEvent(data=payload if isinstance(payload, str) else json.dumps(payload), sep="\n")


def _error_payload(job: Job) -> dict:
    return {"error": {"message": job.error or "generation failed", "type": "server_error", "param": None,
                      "code": JobFailed.code}}


def _release(request: Request, jobs: list[Job]) -> None:
    engine = request.app.state.engine
    for job in jobs:
        if not job.done:
            engine.cancel(job.id)
        else:
            engine.forget(job.id)


async def stream_events(request: Request, shape: Shape, on_success) -> AsyncIterator[ServerSentEvent]:
    """`data:` chunks for the jobs' events, ending with `data: [DONE]`. If the client leaves
    (the generator is closed early), the jobs are cancelled.

    The opening chunks (a chat choice's role) go out with the first output, as vLLM and OpenAI
    send them, not when the request is accepted: a client timing its first chunk (TTFT in every
    load generator) then times the first token, not the queue."""
    opening = shape.opening_chunks()
    try:
        async for position, event in follow_all(shape.jobs):
            if event.type == "output":
                for chunk in [*opening, *shape.event_chunks(position, event)]:
                    yield _data(chunk)
                opening = []
        failed = next((job for job in shape.jobs if job.status == "failed"), None)
        if failed is not None:
            yield _data(_error_payload(failed))
        else:
            for chunk in opening:  # no output at all: the choices still open before they end
                yield _data(chunk)
            if all(job.status == "succeeded" for job in shape.jobs):
                on_success()
            if shape.include_usage:
                yield _data(shape.usage_chunk())
        yield _data("[DONE]")
    finally:
        _release(request, shape.jobs)


def event_stream(request: Request, shape: Shape, on_success, headers: dict) -> EventSourceResponse:
    return event_source(stream_events(request, shape, on_success), headers=headers, sep="\n", ping_s=PING_S)


async def respond(request: Request, shape: Shape, stream: bool, on_success, headers: dict):
    if stream:
        return event_stream(request, shape, on_success, headers)
    try:
        await wait_or_cancel(request, shape.jobs)
    finally:
        _release(request, shape.jobs)
    failed = next((job for job in shape.jobs if job.status == "failed"), None)
    if failed is not None:
        raise JobFailed(failed.error or "generation failed")
    if all(job.status == "succeeded" for job in shape.jobs):
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
    shape = ChatShape([job], body.model or version.model, version, bool(body.logprobs), include_usage, extra,
                      tool_names=offered_tool_names(task.tools, task.tool_choice),
                      legacy=body.functions is not None or body.function_call is not None)

    def remember_turn() -> None:
        if conversation is not None and job.choices:
            content, calls = shape.parsed(job.choices[0])
            record_turn(store, conversation, _chat_messages(body.messages), {"content": content, "tool_calls": calls})

    return await respond(request, shape, wants_stream(body, request), remember_turn, headers)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, identity: str = Depends(require_identity)):
    version = text_version(request, body.model)
    jobs = await submit_all(request, body, version, completion_tasks(body, version), identity)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shape = CompletionShape(jobs, body.model or version.model, version, body.logprobs is not None, include_usage,
                            echo=bool(body.echo), prompts=completion_prompts(body.prompt))
    return await respond(request, shape, wants_stream(body, request), lambda: None, {})


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
