"""The Responses API (`/v1/responses`) through the official `openai` client against uvicorn on loopback."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server.auth import identity_of_key
from tests.conftest import API_KEY, OTHER_KEY
from tests.test_openai_api import eos_ban, forced_output, oai, tokenizer  # noqa: F401 - fixtures, used by name

MODEL = "ember/tiny-chat"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather forecast",
           "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["unit", "days"]}}


@pytest.fixture(scope="module")
def other(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=OTHER_KEY, max_retries=0)


def create(client, **kwargs):
    return client.responses.create(**{"model": MODEL, "input": "Say something.", "temperature": 0,
                                      "max_output_tokens": 8, **kwargs})


def wait_for(client, response_id: str, statuses: tuple[str, ...], timeout: float = 60):
    deadline = time.monotonic() + timeout
    while (response := client.responses.retrieve(response_id)).status not in statuses:
        assert time.monotonic() < deadline, response.status
        time.sleep(0.05)
    return response


# ---------------------------------------------------------------------------- stateless answers


def test_create_answers_with_a_message_and_usage(oai):
    response = create(oai)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.model == MODEL and response.store is True and response.previous_response_id is None


def test_same_answer_as_chat_completions(oai):
    """The Responses endpoint runs the same job as chat: greedy answers agree token for token."""
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Say something."}],
                                       temperature=0, max_tokens=8)
    response = create(oai, instructions="Be brief.")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_input_items_and_instructions_reach_the_prompt(oai):
    plain = create(oai, input=[{"role": "user", "content": [{"type": "input_text", "text": "Say something."}]}])
    instructed = create(oai, instructions="Answer like a pirate.")
    assert instructed.usage.input_tokens > plain.usage.input_tokens
    assert plain.usage.input_tokens == create(oai).usage.input_tokens


def test_max_output_tokens_makes_the_response_incomplete(oai, eos_ban):
    response = create(oai, max_output_tokens=4, extra_body={"logit_bias": eos_ban})
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 4 and response.output[0].status == "incomplete"


class Answer(BaseModel):
    ok: bool
    n: int = Field(ge=0, le=9)


def test_json_schema_format_parses_into_a_model(oai):
    parsed = oai.responses.parse(model=MODEL, input="Answer?", text_format=Answer, temperature=0,
                                 max_output_tokens=60)
    assert isinstance(parsed.output_parsed, Answer), parsed.output_text
    assert parsed.text.format.type == "json_schema"


def test_json_object_format(oai, tokenizer):
    braces = {str(tokenizer.convert_tokens_to_ids(b)): 50 for b in "{}"}
    free = create(oai, extra_body={"logit_bias": braces}).output_text
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)
    constrained = create(oai, text={"format": {"type": "json_object"}}, extra_body={"logit_bias": braces})
    assert json.loads(constrained.output_text) == {} and constrained.status == "completed"


# ---------------------------------------------------------------------------- streaming


def test_stream_sends_the_responses_events_in_order(oai):
    with oai.responses.stream(model=MODEL, input="Say something.", temperature=0, max_output_tokens=8) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # 8 tokens of a random model end at the limit
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == create(oai).output_text
    assert events[0].response.id == final.id and final.usage.output_tokens == 8
    assert final.incomplete_details.reason == "max_output_tokens"
    assert oai.responses.retrieve(final.id).output_text == final.output_text


def test_stream_of_a_finished_answer_ends_completed(oai, forced_output):
    forced_output("Hello there.")
    with oai.responses.stream(model=MODEL, input="Hi.", max_output_tokens=30) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == deltas == "Hello there."
    assert final.incomplete_details is None


def test_streamed_text_then_tool_call_are_two_items(oai, forced_output):
    forced_output('Let me look. <tool_call>{"name": "get_weather", "arguments": {"unit": "c", "days": 2}}'
                  '</tool_call>')
    with oai.responses.stream(model=MODEL, input="Weather?", tools=[WEATHER], max_output_tokens=60) as stream:
        events = list(stream)
        final = stream.get_final_response()
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]
    message, call = final.output
    assert message.content[0].text == "Let me look."
    assert call.name == "get_weather" and json.loads(call.arguments) == {"unit": "c", "days": 2}
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert pieces == done.arguments == call.arguments
    stored = oai.responses.retrieve(final.id)
    assert [(i.id, i.type) for i in stored.output] == [(i.id, i.type) for i in final.output]
    assert stored.output[1].call_id == call.call_id


def test_client_disconnect_cancels_the_job(oai, live_server, eos_ban):
    stream = create(oai, max_output_tokens=400, extra_body={"logit_bias": eos_ban}, stream=True)
    response_id = next(iter(stream)).response.id
    stream.close()
    store = live_server.server.config.app.state.store
    job_id = response_id.removeprefix("resp_")
    deadline = time.monotonic() + 30
    while store.get_prediction(job_id, None)["status"] not in ("canceled", "succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert store.get_prediction(job_id, None)["status"] == "canceled"
    assert wait_for(oai, response_id, ("cancelled",)).status == "cancelled"


# ---------------------------------------------------------------------------- function tools


@pytest.mark.parametrize("stream", [False, True])
def test_forced_function_call_round_trip(oai, stream):
    kwargs = {"model": MODEL, "input": "Weather in Paris?", "tools": [WEATHER], "temperature": 0,
              "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 60}
    if stream:
        with oai.responses.stream(**kwargs) as events:
            first = events.get_final_response()
    else:
        first = oai.responses.create(**kwargs)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    second = oai.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], temperature=0,
                                  max_output_tokens=8, tool_choice="none",
                                  input=[{"type": "function_call_output", "call_id": call.call_id,
                                          "output": json.dumps({"forecast": "sunny"})}])
    assert [item.type for item in second.output] == ["message"]
    alone = create(oai, input="Weather in Paris?", tools=[WEATHER], tool_choice="none")
    assert second.usage.input_tokens > alone.usage.input_tokens + 10  # the call and its output were in the prompt
    items = oai.responses.input_items.list(second.id, order="asc").data
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].call_id == items[2].call_id == call.call_id


def test_function_call_items_in_the_input(oai):
    """A client keeping its own history sends the call and its output back as items."""
    response = create(oai, tools=[WEATHER], tool_choice="none", input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"unit": "c", "days": 1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    assert response.output[0].type == "message"


def test_required_tool_choice_calls_a_tool(oai):
    response = create(oai, tools=[WEATHER], tool_choice="required", max_output_tokens=60)
    assert [item.type for item in response.output] == ["function_call"]


# ---------------------------------------------------------------------------- stored responses


def test_previous_response_continues_the_conversation(oai):
    first = create(oai, input="Hello there.")
    second = create(oai, input="And again.", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = oai.responses.input_items.list(second.id).data  # newest first
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"),
                                                 ("message", "user")]
    assert items[0].content[0].text == "And again." and items[2].content[0].text == "Hello there."
    assert items[1].id == first.output[0].id and items[1].content[0].text == first.output_text


def test_input_items_are_paginated(oai):
    first = create(oai, input="One.")
    second = create(oai, input="Two.", previous_response_id=first.id)
    all_items = oai.responses.input_items.list(second.id, order="asc").data
    assert len(all_items) == 3
    page = oai.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.id for i in page.data] == [i.id for i in all_items[:2]] and page.has_more
    assert page.first_id == all_items[0].id and page.last_id == all_items[1].id
    rest = oai.responses.input_items.list(second.id, order="asc", limit=2, after=page.last_id)
    assert [i.id for i in rest.data] == [all_items[2].id] and not rest.has_more
    with pytest.raises(openai.UnprocessableEntityError):
        oai.responses.input_items.list(second.id, limit=0)


def test_store_false_is_not_kept(oai):
    response = create(oai, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        create(oai, previous_response_id=response.id)


def test_delete(oai):
    response = create(oai)
    deleted = oai.responses.delete(response.id)
    assert deleted is None or deleted.deleted  # the SDK returns None for this endpoint
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.delete(response.id)


def test_another_key_cannot_see_a_response(oai, other):
    response = create(oai)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError):
        create(other, previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(response.id)
    assert oai.responses.retrieve(response.id).id == response.id


def test_stored_response_survives_a_restart(fresh_server):
    client = openai.OpenAI(base_url=f"{fresh_server.url}/v1", api_key=API_KEY, max_retries=0)
    first = create(client, input="Remember this.")
    fresh_server.restart()
    client = openai.OpenAI(base_url=f"{fresh_server.url}/v1", api_key=API_KEY, max_retries=0)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = create(client, input="What was it?", previous_response_id=first.id)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert len(client.responses.input_items.list(second.id).data) == 3


def test_response_left_running_by_a_dead_server_reads_as_failed(fresh_server):
    client = openai.OpenAI(base_url=f"{fresh_server.url}/v1", api_key=API_KEY, max_retries=0)
    finished = create(client)
    store = fresh_server.server.config.app.state.store
    doc = store.get_response(finished.id, identity_of_key(API_KEY))
    doc["response"]["status"] = "in_progress"  # what a process killed mid-answer leaves behind
    store.save_response(finished.id, identity_of_key(API_KEY), "in_progress", doc)
    fresh_server.restart()
    client = openai.OpenAI(base_url=f"{fresh_server.url}/v1", api_key=API_KEY, max_retries=0)
    response = client.responses.retrieve(finished.id)
    assert response.status == "failed" and "interrupted" in response.error.message
    assert client.responses.retrieve(finished.id).status == "failed"


# ---------------------------------------------------------------------------- background


def test_background_response_is_polled_to_completion(oai):
    started = create(oai, background=True)
    assert started.status in ("queued", "in_progress") and started.background is True
    done = wait_for(oai, started.id, ("completed", "incomplete"))
    assert done.output_text == create(oai).output_text and done.usage.output_tokens > 0


def test_background_response_can_be_cancelled(oai, eos_ban):
    started = create(oai, background=True, max_output_tokens=400, extra_body={"logit_bias": eos_ban})
    wait_for(oai, started.id, ("in_progress",))
    cancelled = oai.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    assert oai.responses.retrieve(started.id).status == "cancelled"
    assert oai.responses.cancel(started.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        oai.responses.cancel(create(oai).id)


def test_background_stream_outlives_its_client(oai):
    stream = create(oai, background=True, stream=True, max_output_tokens=30)
    created = next(iter(stream))
    assert created.type == "response.created" and created.response.status == "queued"
    stream.close()
    done = wait_for(oai, created.response.id, ("completed", "incomplete", "cancelled"))
    assert done.status != "cancelled" and done.usage.output_tokens > 0


def test_background_needs_store(oai):
    with pytest.raises(openai.UnprocessableEntityError) as error:
        create(oai, background=True, store=False)
    assert error.value.body["param"] == "background"


# ---------------------------------------------------------------------------- errors


def test_bad_requests_are_openai_error_objects(oai, live_server):
    with pytest.raises(openai.UnprocessableEntityError) as image:
        create(oai, input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}])
    assert image.value.body["param"] == "input[0].content[0]" and "text only" in image.value.message
    with pytest.raises(openai.UnprocessableEntityError) as item:
        create(oai, input=[{"type": "web_search_call", "id": "ws_1"}])
    assert item.value.body["param"] == "input[0].type"
    with pytest.raises(openai.UnprocessableEntityError):
        create(oai, tools=[{"type": "web_search"}])
    with pytest.raises(openai.UnprocessableEntityError, match="tool"):
        create(oai, tool_choice="required")
    with pytest.raises(openai.UnprocessableEntityError) as schema:
        create(oai, text={"format": {"type": "json_schema", "name": "x"}})
    assert schema.value.body["param"] == "text.format.schema"
    with pytest.raises(openai.NotFoundError):
        create(oai, previous_response_id="resp_nope")
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_nope")
    with pytest.raises(openai.BadRequestError) as too_long:
        create(oai, input="word " * 600)
    assert too_long.value.body["code"] == "context_length_exceeded"
    raw = httpx.post(f"{live_server.url}/v1/responses", content=b"{", headers={"Authorization": f"Bearer {API_KEY}"})
    assert raw.status_code == 422 and "error" in raw.json()


# ---------------------------------------------------------------------------- items to chat messages


def test_items_become_chat_messages():
    from server.responses_items import chat_messages, input_items

    items = input_items([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "sun"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []}])
    assert [i["type"] for i in items] == ["message"] * 3 + ["function_call"] * 2 + ["function_call_output"]
    assert all(i["id"] for i in items) and items[2]["content"][0]["type"] == "output_text"
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert chat_messages(items) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather ?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "call_1", **call}, {"id": "call_2", **call}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sun"}]


@pytest.fixture()
def failing_generation(monkeypatch):
    """Every text job fails while running, as a model error would."""
    from engine import text_task

    async def run(job, prepared, llm):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(text_task, "run", run)


def test_a_failed_generation_is_a_failed_response(oai, failing_generation):
    with pytest.raises(openai.InternalServerError, match="the model broke"):
        create(oai)
    with oai.responses.stream(model=MODEL, input="Hi.") as stream:
        events = list(stream)
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and "the model broke" in failed.error.message
    assert oai.responses.retrieve(failed.id).status == "failed"
