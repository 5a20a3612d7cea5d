"""Other clients of the Responses API, unmodified, against uvicorn on loopback: LangChain's
`ChatOpenAI(use_responses_api=True)` and litellm's `responses()` (each skipped where not installed)."""

from __future__ import annotations

from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import API_KEY

langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool

MODEL = "ember/tiny-chat"


class Forecast(BaseModel):
    unit: Literal["c", "f"]
    days: int = Field(ge=1, le=7)


@tool(args_schema=Forecast)
def get_weather(unit: str, days: int) -> str:
    """Weather forecast for the next days, in celsius (c) or fahrenheit (f)."""
    return f"sunny for {days} days"


def chat_model(live_server, **kwargs):
    return langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{live_server.url}/v1", api_key=API_KEY,
                                       use_responses_api=True, temperature=0, max_retries=0,
                                       **{"max_tokens": 8, **kwargs})


def test_langchain_invoke_and_stream(live_server):
    llm = chat_model(live_server)
    answer = llm.invoke("Say something.")
    assert answer.text and answer.response_metadata["id"].startswith("resp_")
    assert answer.usage_metadata["output_tokens"] == 8 and answer.usage_metadata["input_tokens"] > 0
    streamed = "".join(chunk.text for chunk in llm.stream("Say something."))
    assert streamed == answer.text


def test_langchain_tool_call_round_trip(live_server):
    llm = chat_model(live_server, max_tokens=60).bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("Weather in Paris?")
    called = llm.invoke([question])
    [call] = called.tool_calls
    assert call["name"] == "get_weather"
    schema = get_weather.tool_call_schema.model_json_schema()
    jsonschema.validate(call["args"], schema)
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = chat_model(live_server).invoke([question, called, result])
    assert answer.text and not answer.tool_calls


def test_langchain_previous_response_id(live_server):
    llm = chat_model(live_server, use_previous_response_id=True)
    first = llm.invoke("Hello there.")
    second = llm.invoke([HumanMessage("Hello there."), first, HumanMessage("And again.")])
    stored = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY).responses.retrieve(
        second.response_metadata["id"])
    assert stored.previous_response_id == first.response_metadata["id"]
    assert second.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]


def test_litellm_responses(live_server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    kwargs = {"model": f"openai/{MODEL}", "api_base": f"{live_server.url}/v1", "api_key": API_KEY,
              "temperature": 0, "max_output_tokens": 16}  # litellm raises lower limits to OpenAI's minimum, 16
    first = litellm.responses(input="Say something.", **kwargs)
    assert first.id.startswith("resp_") and first.output[0].content[0].text
    assert first.usage.output_tokens == 16
    second = litellm.responses(input="And again.", previous_response_id=first.id, **kwargs)
    assert second.usage.input_tokens > first.usage.input_tokens
    streamed = [event.type for event in litellm.responses(input="Say something.", stream=True, **kwargs)]
    assert streamed[0] == "response.created" and "response.output_text.delta" in streamed
