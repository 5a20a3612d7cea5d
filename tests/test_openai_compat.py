"""What OpenAI-compatible clients send, through the official `openai` client (and the Replicate and
Flowise clients where a check spans dialects) against uvicorn on loopback: nested-schema forced
tools, the SDK's stream helper, strict JSON, legacy functions, vLLM's extension fields, completions
as evaluation harnesses use them, errors on unknown routes, one validation authority, and the
model listing."""

from __future__ import annotations

import dataclasses
import json
import math

import httpx
import openai
import pytest
import replicate
import requests
import torch
from pydantic import BaseModel, Field
from replicate.exceptions import ReplicateError

from engine.llm.types import SamplingParams
from tests.conftest import API_KEY
from tests.test_openai_api import HELLO, MODEL, chat, eos_ban, oai, tokenizer  # noqa: F401 - fixtures

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SEARCH = {"type": "function", "function": {"name": "search", "strict": True, "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 12}}, "required": ["q"],
    "additionalProperties": False}}}


class Point(BaseModel):
    x: int = Field(ge=0, le=99)


class Segment(BaseModel):
    """A nested model: pydantic puts Point under $defs and refers to it with $ref."""

    a: Point
    b: Point


@pytest.fixture(scope="module")
def long_oai(tmp_path_factory, demo_folders, models_file) -> openai.OpenAI:
    """A server whose tiny chat model has a 2048-token context: a pydantic tool's schema, listed in
    the prompt, takes ~450 of the shared test server's 512."""
    from tests.conftest import LiveServer, make_settings

    home = tmp_path_factory.mktemp("long-context")
    (home / "demo").mkdir()
    for name, folder in demo_folders.items():
        (home / "demo" / name).symlink_to(folder, target_is_directory=True)
    models = home / "models.yaml"
    models.write_text(models_file.read_text().replace("max_model_len: 512", "max_model_len: 2048"))
    server = LiveServer(lambda port: make_settings(home, models, port=port)).start()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    server.stop()


# ---------------------------------------------------------------------------- forced tools with $defs


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_with_nested_pydantic_model_parses(long_oai, choice):
    tool = openai.pydantic_function_tool(Segment)
    assert "$defs" in tool["function"]["parameters"]
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "Segment"}}
    reply = long_oai.chat.completions.parse(model=MODEL, messages=HELLO, tools=[tool, SEARCH], tool_choice=tool_choice,
                                       temperature=0, max_tokens=300)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    if choice == "named" or call.function.name == "Segment":
        assert call.function.name == "Segment" and isinstance(call.function.parsed_arguments, Segment)
    json.loads(call.function.arguments, strict=True)


def test_forced_tool_stream_helper_assembles_one_call(long_oai):
    """openai-python's `.stream()` helper builds calls by index: one entry per index per chunk."""
    tool = openai.pydantic_function_tool(Segment)
    with long_oai.chat.completions.stream(model=MODEL, messages=HELLO, tools=[tool], temperature=0, max_tokens=300,
                                     tool_choice={"type": "function", "function": {"name": "Segment"}}) as stream:
        for event in stream:
            if event.type == "chunk":
                for choice in event.chunk.choices:
                    indexes = [d.index for d in choice.delta.tool_calls or []]
                    assert len(indexes) == len(set(indexes))
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "Segment"
    assert isinstance(call.function.parsed_arguments, Segment)
    assert call.function.arguments.startswith("{")


def test_raw_stream_chunks_carry_one_entry_per_index(live_server):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 80, "stream": True,
            "tools": [SEARCH], "tool_choice": "required"}
    response = httpx.post(f"{live_server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    entries = []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                calls = choice["delta"].get("tool_calls") or []
                assert len({c["index"] for c in calls}) == len(calls)
                entries += calls
    assert entries[0]["id"].startswith("call_") and entries[0]["function"]["name"] == "search"
    assert entries[0]["function"]["arguments"]  # the name and the first argument piece share one entry
    arguments = "".join(e["function"].get("arguments", "") for e in entries)
    assert set(json.loads(arguments)) == {"q"}


# ---------------------------------------------------------------------------- strict JSON


def test_fifty_constrained_outputs_are_strict_json(oai):
    """Random weights at temperature 1: whatever is sampled, strings never hold raw control
    characters (json.loads(strict=True) rejects them, as JSON.parse and the SDKs' .parse do)."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 12},
                                               "b": {"type": "string", "pattern": "^.{0,8}$"},
                                               "c": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["a", "b", "c"], "additionalProperties": False}
    formats = [{"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}},
               {"type": "json_object"}]
    outputs = []
    for seed in range(40):
        reply = chat(oai, temperature=1.0, seed=seed, max_tokens=120, response_format=formats[seed % 2])
        if reply.choices[0].finish_reason == "stop":
            outputs.append(reply.choices[0].message.content)
        call = chat(oai, temperature=1.0, seed=seed, max_tokens=60, tools=[SEARCH], tool_choice="required")
        if call.choices[0].finish_reason == "tool_calls":
            outputs.append(call.choices[0].message.tool_calls[0].function.arguments)
        if len(outputs) >= 50:
            break
    assert len(outputs) >= 50  # an answer cut by max_tokens is not counted
    for text in outputs:
        json.loads(text, strict=True)


# ---------------------------------------------------------------------------- legacy functions


LEGACY = {"name": "search", "description": "Search", "parameters": SEARCH["function"]["parameters"]}


def test_legacy_functions_answer_in_the_function_call_shape(oai):
    reply = chat(oai, functions=[LEGACY], function_call={"name": "search"}, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "search"
    assert set(json.loads(choice.message.function_call.arguments)) == {"q"}
    stream = chat(oai, functions=[LEGACY], function_call={"name": "search"}, max_tokens=60, stream=True)
    name, arguments, finish = "", "", None
    for chunk in stream:
        for c in chunk.choices:
            assert not c.delta.tool_calls
            if c.delta.function_call:
                name += c.delta.function_call.name or ""
                arguments += c.delta.function_call.arguments or ""
            finish = c.finish_reason or finish
    assert (name, arguments, finish) == ("search", choice.message.function_call.arguments, "function_call")


def test_legacy_function_results_go_back_into_the_conversation(oai):
    messages = HELLO + [{"role": "assistant", "content": None,
                         "function_call": {"name": "search", "arguments": '{"q": "x"}'}},
                        {"role": "function", "name": "search", "content": "found"}]
    reply = chat(oai, messages=messages, functions=[LEGACY], function_call="none", max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.function_call is None
    with pytest.raises(openai.UnprocessableEntityError, match="functions"):
        chat(oai, functions=[LEGACY], tools=[SEARCH])


# ---------------------------------------------------------------------------- vLLM extension fields


def test_ignore_eos_generates_exactly_max_tokens(oai, tokenizer):
    eos_first = {str(tokenizer.eos_token_id): 100}
    stops = chat(oai, logit_bias=eos_first, max_tokens=8)
    assert stops.usage.completion_tokens <= 1 and stops.choices[0].finish_reason == "stop"
    for create in (lambda **k: chat(oai, **k),
                   lambda **k: oai.completions.create(model=MODEL, prompt="Once", temperature=0, **k)):
        reply = create(logit_bias=eos_first, max_tokens=8, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"


def test_min_tokens_top_k_min_p_and_repetition_penalty_are_honoured(oai, tokenizer, eos_ban):
    eos_first = {str(tokenizer.eos_token_id): 100}
    reply = chat(oai, logit_bias=eos_first, max_tokens=8, extra_body={"min_tokens": 5})
    assert reply.usage.completion_tokens >= 5
    greedy = chat(oai, max_tokens=12, logit_bias=eos_ban).choices[0].message.content
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = chat(oai, temperature=1.0, seed=3, max_tokens=12, logit_bias=eos_ban, extra_body=extra)
        assert sampled.choices[0].message.content == greedy
    # greedy decoding is deterministic: a penalty on every token already seen changes the text
    long_greedy = chat(oai, max_tokens=60, logit_bias=eos_ban).choices[0].message.content
    penalised = chat(oai, max_tokens=60, logit_bias=eos_ban, extra_body={"repetition_penalty": 5.0})
    assert penalised.choices[0].message.content != long_greedy


# ---------------------------------------------------------------------------- completions as harnesses send them


def test_prompt_lists_and_token_ids(oai, tokenizer):
    one = oai.completions.create(model=MODEL, prompt="The river", max_tokens=5, temperature=0)
    ids = tokenizer("The river")["input_ids"]
    other = tokenizer("A cat")["input_ids"]
    for prompt in (ids, [ids]):
        reply = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
        assert [c.text for c in reply.choices] == [one.choices[0].text]
    batch = oai.completions.create(model=MODEL, prompt=[ids, other, ids], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in batch.choices] == list(range(6))
    assert batch.choices[0].text == batch.choices[4].text == one.choices[0].text
    alone = oai.completions.create(model=MODEL, prompt=other, max_tokens=5, temperature=0)
    assert batch.choices[2].text == alone.choices[0].text
    assert batch.usage.prompt_tokens == 2 * len(ids) + len(other)
    strings = oai.completions.create(model=MODEL, prompt=["The river", "A cat"], max_tokens=5, temperature=0)
    assert [c.text for c in strings.choices] == [one.choices[0].text, alone.choices[0].text]
    streamed: dict[int, str] = {}
    for chunk in oai.completions.create(model=MODEL, prompt=[ids, other], max_tokens=5, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: one.choices[0].text, 1: alone.choices[0].text}


def test_echo_prepends_the_prompt(oai):
    plain = oai.completions.create(model=MODEL, prompt="The river", max_tokens=5, temperature=0)
    echoed = oai.completions.create(model=MODEL, prompt="The river", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "The river" + plain.choices[0].text
    chunks = list(oai.completions.create(model=MODEL, prompt="The river", max_tokens=5, temperature=0, echo=True,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def test_bad_prompts_are_refused(oai):
    for prompt, match in (([], "empty"), ([[]], "empty"), ([10 ** 9], "token ids"), (["x"] * 65, "at most")):
        with pytest.raises(openai.UnprocessableEntityError, match=match):
            oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="echo"):
        oai.completions.create(model=MODEL, prompt="x", max_tokens=0)


PROMPT_LOGPROBS = "prompt_logprobs" in {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.mark.skipif(not PROMPT_LOGPROBS, reason="the engine does not compute prompt logprobs yet")
def test_loglikelihood_request_matches_the_model(live_server, tokenizer, demo_folders):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs, max_tokens 0."""
    from transformers import AutoModelForCausalLM

    context = tokenizer("The river runs")["input_ids"]
    continuation = tokenizer(" to the sea", add_special_tokens=False)["input_ids"]
    ids = context + continuation
    body = {"model": MODEL, "prompt": [ids], "max_tokens": 0, "temperature": 0, "logprobs": 1, "echo": True,
            "seed": 1234}
    reply = httpx.post(f"{live_server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) and logprobs["token_logprobs"][0] is None
    model = AutoModelForCausalLM.from_pretrained(demo_folders["tiny-chat"], dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits.log_softmax(-1)[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected[:, 0].tolist(), abs=1e-4)
    continuation_logprob = sum(logprobs["token_logprobs"][len(context):])
    assert math.isfinite(continuation_logprob) and continuation_logprob < 0
    assert "".join(logprobs["tokens"][1:]) == tokenizer.decode(ids)[len(logprobs["tokens"][0]):]
    assert reply["choices"][0]["text"] == tokenizer.decode(ids) and reply["usage"]["completion_tokens"] == 0


def test_echo_logprobs_rendering_puts_the_prompt_first():
    """How prompt logprobs (engine interface: the first delta's `prompt_logprobs`, None for the
    first prompt token) become legacy logprobs, whole and streamed."""
    from types import SimpleNamespace

    from engine.jobs import Choice, Event, Job
    from engine.llm.types import TokenLogprob
    from server.openai import CompletionShape

    prompt = [TokenLogprob(5, " river", -2.0, [(5, " river", -2.0)]), TokenLogprob(6, " runs", -1.5)]
    job = Job(model=MODEL, version="0" * 64, kind="text-generation", input={},
              task=SimpleNamespace(params=SimpleNamespace(n=1)), prompt_text="The river runs")
    job.choices = [Choice(index=0, text=" on", finish_reason="length", prompt_logprobs=[None, *prompt],
                          logprobs=[TokenLogprob(7, " on", -0.5)], completion_tokens=1)]
    version = SimpleNamespace(id="0" * 64)
    shape = CompletionShape([job], MODEL, version, True, False, echo=True, prompts=[[1, 5, 6]])
    (choice,) = shape.completion()["choices"]
    assert choice["text"] == "The river runs on"
    assert choice["logprobs"]["tokens"] == ["The", " river", " runs", " on"]
    assert choice["logprobs"]["token_logprobs"] == [None, -2.0, -1.5, -0.5]
    assert choice["logprobs"]["text_offset"] == [0, 3, 9, 14]
    assert choice["logprobs"]["top_logprobs"][:2] == [None, {" river": -2.0}]
    streamed = CompletionShape([job], MODEL, version, True, False, echo=True, prompts=[[1, 5, 6]])
    first = streamed.event_chunks(0, Event(1, "output", " on", logprobs=job.choices[0].logprobs,
                                           prompt_logprobs=[None, *prompt], finish_reason="length"))
    (chunk,) = first
    assert chunk["choices"][0]["text"] == "The river runs on"
    assert chunk["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0, -1.5, -0.5]


# ---------------------------------------------------------------------------- errors on unknown routes


def test_unknown_routes_answer_every_client(live_server, oai):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.get("/nothing-here", cast_to=dict)
    assert "/v1/nothing-here" in str(missing.value) and missing.value.body["message"]
    with pytest.raises(openai.APIStatusError) as method:
        oai.delete("/chat/completions", cast_to=dict)
    assert method.value.status_code == 405 and "Method Not Allowed" in str(method.value)
    client = replicate.Client(api_token=API_KEY, base_url=live_server.url)
    with pytest.raises(ReplicateError) as error:
        client._request("GET", "/v1/nothing-here")
    assert error.value.status == 404 and "/v1/nothing-here" in error.value.detail
    flowise = requests.get(f"{live_server.url}/api/v1/nothing-here", headers=AUTH).json()
    assert flowise["success"] is False and flowise["message"] == flowise["error"]["message"]


# ---------------------------------------------------------------------------- one validation authority


@pytest.mark.parametrize("field, value", [("top_p", 0), ("temperature", 9), ("repetition_penalty", 0),
                                          ("top_p", float("nan")), ("temperature", float("inf"))])
def test_a_bad_setting_is_422_in_every_dialect(live_server, field, value):
    """The same bad value is refused at creation by the OpenAI, Replicate and Flowise dialects."""
    def post(path: str, body: dict) -> requests.Response:
        # json.dumps writes NaN/Infinity literals, which is what a careless client sends
        return requests.post(f"{live_server.url}{path}", data=json.dumps(body),
                             headers={**AUTH, "Content-Type": "application/json"})

    openai_chat = post("/v1/chat/completions", {"model": MODEL, "messages": HELLO, field: value})
    openai_text = post("/v1/completions", {"model": MODEL, "prompt": "x", field: value})
    before = requests.get(f"{live_server.url}/v1/predictions", headers=AUTH).json()["results"]
    replicate_made = post("/v1/predictions", {"version": MODEL, "input": {"prompt": "x", field: value}})
    after = requests.get(f"{live_server.url}/v1/predictions", headers=AUTH).json()["results"]
    responses = [openai_chat, openai_text, replicate_made]
    flowise_name = {"top_p": "topP", "temperature": "temperature"}.get(field)  # overrides the flow allows
    if flowise_name:
        responses.append(post("/api/v1/prediction/tiny-chat-flow",
                              {"question": "hi", "overrideConfig": {flowise_name: value}}))
    for response in responses:
        assert response.status_code == 422, response.text
        assert field in response.text or flowise_name in response.text
    assert [p["id"] for p in after] == [p["id"] for p in before]
    assert openai_chat.json()["error"]["param"] == field


def test_published_schema_derives_from_the_authority(live_server):
    from engine.sampling_bounds import BOUNDS

    client = replicate.Client(api_token=API_KEY, base_url=live_server.url)
    schema = client.models.get(MODEL).latest_version.openapi_schema["components"]["schemas"]["Input"]
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty"):
        published = {k: v for k, v in schema["properties"][name].items() if k in ("minimum", "maximum",
                                                                                   "exclusiveMinimum", "type")}
        assert published == {k: v for k, v in BOUNDS[name].json_schema().items() if k != "description"}
    with pytest.raises(ReplicateError) as error:
        client.predictions.create(version=client.models.get(MODEL).latest_version.id,
                                  input={"prompt": "x", "top_p": 0})
    assert error.value.status == 422 and "top_p" in error.value.detail


# ---------------------------------------------------------------------------- the model listing


def test_models_list_every_kind_with_capabilities(oai, live_server):
    listed = {m.id: m for m in oai.models.list()}
    assert listed[MODEL].model_extra["kind"] == "text-generation"
    assert {"chat.completions", "completions", "tools"} <= set(listed[MODEL].model_extra["capabilities"])
    assert listed[MODEL].model_extra["max_model_len"] == 512
    assert listed["ember/tiny-i2v"].model_extra["kind"] == "image-to-video"
    assert listed["ember/tiny-i2v"].model_extra["capabilities"] == ["predictions"]
    client = replicate.Client(api_token=API_KEY, base_url=live_server.url)
    assert {m.id for m in client.models.list().results} == set(listed)


# ---------------------------------------------------------------------------- other OpenAI clients


def test_langchain_structured_output_with_a_nested_model(long_oai):
    """LangChain's ChatOpenAI: `with_structured_output` forces a tool whose schema has $defs, and
    streamed tool-call chunks merge into one call."""
    import langchain_openai

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=str(long_oai.base_url), api_key=API_KEY,
                                      temperature=0, max_tokens=300, max_retries=0)
    result = llm.with_structured_output(Segment, method="function_calling").invoke("Draw a segment.")
    assert isinstance(result, Segment)
    bound = llm.bind_tools([Segment], tool_choice="Segment")
    merged = None
    for chunk in bound.stream("Draw a segment."):
        merged = chunk if merged is None else merged + chunk
    (call,) = merged.tool_calls
    assert call["name"] == "Segment" and Segment.model_validate(call["args"])
    plain = llm.invoke("Say something.")
    assert isinstance(plain.content, str) and plain.response_metadata["finish_reason"] in ("stop", "length")

