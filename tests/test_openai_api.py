"""The OpenAI dialect through the official `openai` client against uvicorn on loopback."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from engine.errors import NotFound
from tests.conftest import API_KEY, OTHER_KEY

MODEL = "ember/tiny-chat"
HELLO = [{"role": "user", "content": "Say something."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["unit", "days"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


@pytest.fixture(scope="module")
def oai(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(demo_folders):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_folders["tiny-chat"])


@pytest.fixture(scope="module")
def eos_ban(tokenizer) -> dict:
    return {str(tokenizer.eos_token_id): -100}


@pytest.fixture()
def forced_output(monkeypatch):
    """Make the model say exactly `text` (a test-only deterministic model): every request's
    tokens are forced through the constraint hook, so detokenizing, streaming and tool-call
    parsing all run for real."""
    from engine import text_task
    from engine.llm.constraints import ForcedTokensFactory

    original = text_task.prepare

    def force(text: str) -> None:
        def prepare(task, job, version, tokenizer, max_model_len):
            prepared = original(task, job, version, tokenizer, max_model_len)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            prepared.request.constraint_factory = ForcedTokensFactory(tuple(ids))
            return prepared

        monkeypatch.setattr(text_task, "prepare", prepare)

    return force


def chat(oai, **kwargs):
    return oai.chat.completions.create(**{"model": MODEL, "messages": HELLO, "temperature": 0, **kwargs})


def collect(stream) -> tuple[dict[int, str], dict[int, str], dict[int, dict], list]:
    """Per choice: text, finish reason, merged tool calls; and every chunk."""
    texts, finishes, calls, chunks = {}, {}, {}, []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
            for delta in choice.delta.tool_calls or []:
                calls_of_choice = calls.setdefault(choice.index, {})
                call = calls_of_choice.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    return texts, finishes, calls, chunks


# ---------------------------------------------------------------------------- plain generation


def test_plain_chat_completion(oai):
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8)
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert raw.headers["x-session-id"] == reply.model_extra["session_id"]


def test_streaming_matches_plain_and_reports_usage(oai):
    reply = chat(oai, max_tokens=10)
    plain = reply.choices[0]
    stream = chat(oai, max_tokens=10, stream=True, stream_options={"include_usage": True})
    texts, finishes, _, chunks = collect(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert texts[0] == plain.message.content and finishes[0] == plain.finish_reason
    assert len(chunks) > 4
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_the_role_chunk_goes_out_with_the_first_token_not_before():
    """A load generator's TTFT is the time to the first chunk: the role chunk must wait for the
    first output (as vLLM and OpenAI send it), or TTFT would time the HTTP round trip only."""
    import asyncio
    from types import SimpleNamespace

    from engine.jobs import Job
    from server.openai import ChatShape, stream_events

    async def main():
        job = Job("ember/tiny-chat", "0" * 64, "text-generation", {},
                  task=SimpleNamespace(params=SimpleNamespace(n=1)))
        shape = ChatShape([job], MODEL, SimpleNamespace(id="0" * 64), False, False, tool_names=[])
        engine = SimpleNamespace(cancel=lambda job_id: None, forget=lambda job_id: None)
        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(engine=engine)))
        stream = stream_events(request, shape, on_success=lambda: None)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not first.done()  # accepted, queued, nothing generated: nothing sent
        job.emit("output", "Hi")
        opening, content = json.loads((await first).data), json.loads((await anext(stream)).data)
        assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert content["choices"][0]["delta"] == {"content": "Hi"}
        await stream.aclose()

    asyncio.run(main())


def test_accept_header_chooses_streaming_and_seed_path_is_served(live_server):
    response = httpx.post(f"{live_server.url}/api/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", "Accept": "text/event-stream"},
                          json={"model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": 0})
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_n_choices_streamed_and_not(oai):
    reply = chat(oai, n=3, temperature=1.0, seed=5, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1
    texts, finishes, _, _ = collect(chat(oai, n=2, temperature=1.0, seed=5, max_tokens=6, stream=True))
    assert set(texts) == set(finishes) == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in reply.choices[:2]]


def test_seed_makes_sampling_reproducible(oai):
    runs = [chat(oai, temperature=1.0, seed=seed, max_tokens=12).choices[0].message.content for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_strings_cut_the_output(oai, eos_ban):
    full = chat(oai, max_tokens=20, logit_bias=eos_ban).choices[0].message.content
    stop = full[6:9]
    cut = full[:full.index(stop)]
    for stops in (stop, [stop, "never-appears"]):
        reply = chat(oai, max_tokens=20, logit_bias=eos_ban, stop=stops).choices[0]
        assert reply.message.content == cut and reply.finish_reason == "stop"
    streamed, finishes, _, _ = collect(chat(oai, max_tokens=20, logit_bias=eos_ban, stop=stop, stream=True))
    assert streamed[0] == cut and finishes[0] == "stop"


def test_max_tokens_limits_the_completion(oai, eos_ban):
    for field in ("max_tokens", "max_completion_tokens"):
        reply = chat(oai, logit_bias=eos_ban, **{field: 5})
        assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"


def test_logprobs(oai):
    reply = chat(oai, max_tokens=5, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
    _, _, _, chunks = collect(chat(oai, max_tokens=5, logprobs=True, top_logprobs=1, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_extra_sampling_fields_are_accepted(oai):
    reply = chat(oai, temperature=0.8, seed=1, max_tokens=4,
                 extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 4})
    assert reply.usage.completion_tokens == 4


def test_text_completions(oai):
    reply = oai.completions.create(model=MODEL, prompt="The river", max_tokens=6, temperature=0, logprobs=2)
    (choice,) = reply.choices
    assert reply.object == "text_completion" and choice.text
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    chunks = list(oai.completions.create(model=MODEL, prompt="The river", max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


# ---------------------------------------------------------------------------- tools and JSON


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_is_a_valid_call(oai, stream):
    kwargs = dict(tools=[WEATHER, SEARCH], tool_choice="required", max_tokens=80)
    if stream:
        texts, finishes, calls, _ = collect(chat(oai, stream=True, **kwargs))
        content, finish, made = texts[0], finishes[0], list(calls[0].values())
    else:
        choice = chat(oai, **kwargs).choices[0]
        content, finish = choice.message.content, choice.finish_reason
        made = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in choice.message.tool_calls]
    assert finish == "tool_calls" and not content
    (call,) = made
    assert call["id"].startswith("call_")
    tool = {"get_weather": WEATHER, "search": SEARCH}[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])


def test_named_tool_choice(oai):
    choice = chat(oai, tools=[SEARCH, WEATHER], max_tokens=80,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and choice.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


FORMATS = {
    "hermes": 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", "days": 2}}\n</tool_call>',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"unit": "c", "days": 2}}]',
    "llama": '{"name": "get_weather", "parameters": {"unit": "c", "days": 2}}',
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_calls_are_parsed_never_leaked(oai, forced_output, fmt, stream):
    forced_output(FORMATS[fmt])
    content_expected = "Checking." if fmt == "hermes" else ""
    kwargs = dict(tools=[WEATHER, SEARCH], max_tokens=100)
    if stream:
        texts, finishes, calls, chunks = collect(chat(oai, stream=True, **kwargs))
        pieces = sum(1 for c in chunks for ch in c.choices if ch.delta.tool_calls)
        assert pieces >= (2 if fmt == "hermes" else 1)
        content, finish, made = texts[0], finishes[0], list(calls[0].values())
    else:
        choice = chat(oai, **kwargs).choices[0]
        content, finish = choice.message.content or "", choice.finish_reason
        made = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
    assert content == content_expected and finish == "tool_calls"
    assert [(m["name"], json.loads(m["arguments"])) for m in made] == [("get_weather", {"unit": "c", "days": 2})]


def test_tool_choice_none_hides_tools(oai, forced_output):
    forced_output(FORMATS["hermes"])
    choice = chat(oai, tools=[WEATHER], tool_choice="none", max_tokens=100).choices[0]
    assert choice.message.tool_calls is None and choice.message.content == FORMATS["hermes"]


def test_tool_results_go_back_into_the_conversation(oai):
    messages = HELLO + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"unit": "c", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = chat(oai, messages=messages, tools=[WEATHER], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_json_object_output_parses(oai, tokenizer):
    braces = {str(tokenizer.convert_tokens_to_ids(b)): 50 for b in "{}"}
    free = chat(oai, max_tokens=8, logit_bias=braces).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)
    reply = chat(oai, max_tokens=8, logit_bias=braces, response_format={"type": "json_object"}).choices[0]
    assert json.loads(reply.message.content) == {} and reply.finish_reason == "stop"


def test_json_schema_output_matches(oai):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}}
    for stream in (False, True):
        kwargs = dict(max_tokens=40, temperature=1.0, seed=3, response_format=response_format)
        if stream:
            text = collect(chat(oai, stream=True, **kwargs))[0][0]
        else:
            text = chat(oai, **kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


def test_structured_outputs_parse_into_a_pydantic_model(oai):
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        ok: bool
        n: int = Field(ge=0, le=9)

    reply = oai.chat.completions.parse(model=MODEL, messages=HELLO, response_format=Answer, max_tokens=60,
                                       temperature=0)
    assert isinstance(reply.choices[0].message.parsed, Answer)


# ---------------------------------------------------------------------------- sessions


def test_session_continues_the_conversation(oai):
    first = chat(oai, max_tokens=4)
    session = first.model_extra["session_id"]
    second = chat(oai, max_tokens=4, messages=[{"role": "user", "content": "More."}],
                  extra_body={"session_id": session})
    assert second.model_extra["session_id"] == session
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    stored = httpx.get(f"{oai.base_url}sessions/{session}", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]
    assert stored["messages"][1]["content"] == first.choices[0].message.content
    listed = httpx.get(f"{oai.base_url}sessions", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert session in [s["id"] for s in listed["data"]]


def test_sessions_are_scoped_to_their_api_key(oai, live_server):
    session = chat(oai, max_tokens=2).model_extra["session_id"]
    other = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        chat(other, max_tokens=2, extra_body={"session_id": session})
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert httpx.get(f"{live_server.url}/v1/sessions/{session}", headers=headers).status_code == 403
    assert httpx.delete(f"{live_server.url}/v1/sessions/{session}", headers=headers).status_code == 403
    assert session not in [s["id"] for s in httpx.get(f"{live_server.url}/v1/sessions", headers=headers).json()["data"]]
    own = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.delete(f"{live_server.url}/v1/sessions/{session}", headers=own).json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        chat(oai, max_tokens=2, extra_body={"session_id": session})


def test_sessions_survive_a_restart(fresh_server):
    client = openai.OpenAI(base_url=f"{fresh_server.url}/v1", api_key=API_KEY, max_retries=0)
    first = chat(client, max_tokens=3)
    session = first.model_extra["session_id"]
    fresh_server.restart()
    client = openai.OpenAI(base_url=f"{fresh_server.url}/v1", api_key=API_KEY, max_retries=0)
    second = chat(client, max_tokens=3, messages=[{"role": "user", "content": "Again."}],
                  extra_body={"session_id": session})
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    stored = httpx.get(f"{fresh_server.url}/v1/sessions/{session}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert len(stored.json()["messages"]) == 4


# ---------------------------------------------------------------------------- errors and aborts


def test_client_disconnect_cancels_generation(oai, live_server, eos_ban):
    stream = chat(oai, max_tokens=400, logit_bias=eos_ban, stream=True)
    job_id = next(iter(stream)).id.removeprefix("chatcmpl-")
    stream.close()
    store = live_server.server.config.app.state.store

    def status() -> str | None:  # an OpenAI job's record is written off the event loop: it may lag
        try:
            return store.get_prediction(job_id, None)["status"]
        except NotFound:
            return None

    deadline = time.monotonic() + 30
    while status() not in ("canceled", "succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status() == "canceled"


def test_errors_are_openai_error_objects(oai, live_server):
    with pytest.raises(openai.AuthenticationError):
        chat(openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="sk-wrong", max_retries=0))
    with pytest.raises(openai.NotFoundError) as missing:
        chat(oai, model="acme/nope")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(oai, messages=[{"role": "user", "content": "word " * 600}], max_tokens=10)
    assert "512" in too_long.value.message and too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="image-to-video"):
        chat(oai, model="ember/tiny-i2v")
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        chat(oai, temperature=7)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.UnprocessableEntityError, match="tool"):
        chat(oai, tool_choice="required")
    with pytest.raises(openai.UnprocessableEntityError, match="logit_bias"):
        chat(oai, logit_bias={"99999": 5})
    with pytest.raises(openai.InternalServerError) as unavailable:
        chat(oai, model="acme/missing")
    assert unavailable.value.status_code == 503


def test_full_queue_answers_503_with_retry_after(settings):
    from fastapi.testclient import TestClient

    from server.app import create_app

    app = create_app(settings.model_copy(update={"max_queue": 0}))
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["code"] == "queue_full"
