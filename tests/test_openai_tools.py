"""Tool-call parsing (server/tool_calls.py): every format, fed whole and one character at a time."""

from __future__ import annotations

import json

import pytest

from server.tool_calls import ToolCallStream, json_value_end, merge_deltas, offered_tool_names, split_tool_calls

TOOLS = ["get_weather", "search"]


def run(text: str, step: int | None = None, tools=TOOLS) -> tuple[str, list[dict], list[dict]]:
    parser = ToolCallStream(tools)
    pieces = [text] if step is None else [text[i:i + step] for i in range(0, len(text), step)]
    content, deltas = "", []
    for piece in pieces:
        c, d = parser.feed(piece)
        content += c
        deltas += d
    c, d = parser.finish()
    return content + c, deltas + d, parser.calls


def merged(deltas: list[dict]) -> list[dict]:
    """What an OpenAI client builds from streamed deltas."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
        call["id"] = d.get("id") or call["id"]
        call["name"] += d.get("function", {}).get("name") or ""
        call["arguments"] += d.get("function", {}).get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def check(text: str, content: str, expected: list[tuple[str, dict]], tools=TOOLS):
    for step in (None, 1, 3, 7):
        got_content, deltas, calls = run(text, step, tools)
        assert got_content == content, (step, got_content)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
        assert [c["type"] for c in calls] == ["function"] * len(calls)
        assert merged(deltas) == [{"id": c["id"], "name": c["function"]["name"],
                                   "arguments": c["function"]["arguments"]} for c in calls]
        assert len({c["id"] for c in calls}) == len(calls)
        for marker in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"):
            assert marker not in got_content


def test_plain_text_passes_through_unchanged():
    check("Hello there, no tools < here [ok].  ", "Hello there, no tools < here [ok].  ", [])


def test_hermes_single_call():
    check('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
          "", [("get_weather", {"city": "Paris", "days": 3})])


def test_hermes_text_then_several_calls():
    text = ('Let me look.\n\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"arguments": {"q": "a \\"quoted\\" }"}, "name": "search"}</tool_call>')
    check(text, "Let me look.", [("get_weather", {"city": "Oslo"}), ("search", {"q": 'a "quoted" }'})])


def test_hermes_arguments_stream_in_pieces():
    parser = ToolCallStream(TOOLS)
    pieces = ['<tool_', 'call>{"name": "get_weather", ', '"arguments": {"city', '": "Rome"}', '}</tool_call>']
    per_feed = [parser.feed(p)[1] for p in pieces]
    assert per_feed[0] == [] and per_feed[1] == []
    assert per_feed[2][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert per_feed[2][1]["function"]["arguments"] == '{"city'
    assert per_feed[3][0]["function"]["arguments"] == '": "Rome"}'
    assert parser.calls[0]["function"]["arguments"] == '{"city": "Rome"}'


def test_hermes_string_encoded_arguments():
    check('<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>', "",
          [("search", {"q": "x"})])


def test_malformed_block_is_content_not_a_call():
    content, _, calls = run("<tool_call>not json</tool_call> after")
    assert calls == [] and content == "<tool_call>not json</tool_call> after"


def test_unterminated_call_at_the_end_still_counts():
    content, _, calls = run('<tool_call>{"name": "search", "arguments": {"q": "x"}}')
    assert content == "" and calls[0]["function"]["arguments"] == '{"q": "x"}'


def test_mistral_array_and_named_formats():
    check('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Nice"}}, '
          '{"name": "search", "arguments": {"q": "y"}}]',
          "", [("get_weather", {"city": "Nice"}), ("search", {"q": "y"})])
    check('[TOOL_CALLS]search[ARGS]{"q": "z"}[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Lyon"}',
          "", [("search", {"q": "z"}), ("get_weather", {"city": "Lyon"})])
    assert run('[TOOL_CALLS]search[CALL_ID]abc123XYZ[ARGS]{"q": "z"}')[2][0]["id"] == "abc123XYZ"


def test_llama_whole_output_json():
    check('{"name": "get_weather", "parameters": {"city": "Bern"}}', "", [("get_weather", {"city": "Bern"})])
    check('<|python_tag|>{"name": "search", "parameters": {"q": 1}}; {"name": "search", "parameters": {"q": 2}}',
          "", [("search", {"q": 1}), ("search", {"q": 2})])
    check('[{"name": "search", "arguments": {"q": 3}}]', "", [("search", {"q": 3})])


def test_json_that_is_not_a_call_stays_content():
    check('{"name": "unknown_tool", "parameters": {}}', '{"name": "unknown_tool", "parameters": {}}', [])
    check('{"answer": 42} and more', '{"answer": 42} and more', [])
    check('{"name": "search", "parameters": {"q"', '{"name": "search", "parameters": {"q"', [])


def test_json_is_only_a_call_when_tools_are_offered():
    assert run('{"name": "search", "parameters": {}}', tools=[])[0] == '{"name": "search", "parameters": {}}'


@pytest.mark.parametrize("tail", ["<", "<tool_c", "[TOOL", "[TOOL_CALLS"])
def test_possible_marker_prefix_is_held_back_then_released(tail):
    parser = ToolCallStream(TOOLS)
    content, _ = parser.feed("text " + tail)
    assert content == "text"
    rest, _ = parser.finish()
    assert content + rest == "text " + tail


def test_json_value_end():
    assert json_value_end('{"a": "}"} x', 0) == 10
    assert json_value_end('[1, {"b": [2]}', 0) is None


def test_a_long_argument_streamed_token_by_token_is_read_in_linear_work():
    """A 14 KB argument fed one character at a time: every format reads each character a bounded
    number of times (the parser runs on the event loop, so rescanning blocks other streams)."""
    value = "x" * 14_000
    texts = {
        "hermes": '<tool_call>{"name": "search", "arguments": {"q": "%s"}}</tool_call>' % value,
        "mistral": '[TOOL_CALLS] [{"name": "search", "arguments": {"q": "%s"}}]' % value,
        "named": '[TOOL_CALLS]search[ARGS]{"q": "%s"}' % value,
        "json": '{"name": "search", "parameters": {"q": "%s"}}' % value,
    }
    for fmt, text in texts.items():
        parser = ToolCallStream(TOOLS)
        for ch in text:
            parser.feed(ch)
        parser.finish()
        (call,) = parser.calls
        assert json.loads(call["function"]["arguments"]) == {"q": value}, fmt
        assert parser.scanned <= 2 * len(text), (fmt, parser.scanned)


def test_one_delta_per_call_index_per_feed():
    parser = ToolCallStream(TOOLS)
    _, deltas = parser.feed('<tool_call>{"name": "search", "arguments": {"q": "a')
    assert [d["index"] for d in deltas] == [0, 0]
    (merged_delta,) = merge_deltas(deltas)
    assert merged_delta["id"].startswith("call_") and merged_delta["function"] == {"name": "search",
                                                                                   "arguments": '{"q": "a'}
    _, more = parser.feed('"}}</tool_call><tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')
    assert [d["index"] for d in merge_deltas(more)] == [0, 1]


def test_split_tool_calls_and_offered_names():
    content, calls = split_tool_calls('Hi <tool_call>{"name": "search", "arguments": {"q": "z"}}</tool_call>',
                                      TOOLS)
    assert content == "Hi" and calls[0]["function"] == {"name": "search", "arguments": '{"q": "z"}'}
    tools = [{"type": "function", "function": {"name": n}} for n in TOOLS]
    assert offered_tool_names(tools, "auto") == TOOLS and offered_tool_names(tools, "none") == []
    assert offered_tool_names(tools, {"type": "function", "function": {"name": "search"}}) == ["search"]
