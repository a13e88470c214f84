"""Anthropic Messages (SPEC §7.2): requests in, events and errors out, checked with the anthropic SDK's own types."""
import json
import os

import anthropic.types
import pytest
from pydantic import TypeAdapter

import bridge
from bridge import (
    AnthropicEncoder,
    ApiError,
    ToolCall,
    anthropic_error_body,
    anthropic_message_body,
    anthropic_stop_reason,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EVENT: TypeAdapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
MESSAGE: TypeAdapter = TypeAdapter(anthropic.types.Message)
ERROR: TypeAdapter = TypeAdapter(anthropic.types.ErrorResponse)


def request(*messages: dict, **fields) -> dict:
    return {"model": "m", "max_tokens": 100, "messages": list(messages) or [{"role": "user", "content": "hi"}],
            **fields}


def parse_anthropic_request(body) -> bridge.AgentRequest:
    """A body read with a tool memo of its own, as each app has one (BridgeState.anthropic_tools)."""
    return bridge.parse_anthropic_request(body, bridge.tool_memo())


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def events(sse: str) -> list[tuple[str, dict]]:
    """(event name, data) pairs of an SSE text; every frame must have both lines."""
    pairs = []
    for frame in sse.strip("\n").split("\n\n"):
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        pairs.append((name[7:], json.loads(data[6:])))
    return pairs


def checked(sse: str) -> list[dict]:
    """The data of each event, each validated by the SDK, the event line naming its type."""
    out = []
    for name, data in events(sse):
        assert name == data["type"]
        EVENT.validate_python(data)
        out.append(data)
    return out


def test_system_as_string_or_blocks_becomes_the_first_system_message():
    for system in ("be brief", [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}]):
        turn = parse_anthropic_request(request(system=system))
        assert [(m.role, m.text) for m in turn.messages] == [("system", "be brief"), ("user", "hi")]


def test_claude_codes_billing_line_is_left_out_of_the_system_prompt():
    turn = parse_anthropic_request(request(system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.68e; cc_entrypoint=sdk-cli;"},
        {"type": "text", "text": "You are Claude Code."}]))
    assert turn.messages[0].text == "You are Claude Code."


def test_a_system_message_inside_messages_is_kept_in_place():
    turn = parse_anthropic_request(request({"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                           {"role": "user", "content": "c"}))
    assert [m.role for m in turn.messages] == ["user", "system", "user"]


def test_text_blocks_and_base64_and_url_images():
    turn = parse_anthropic_request(request({"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        {"type": "text", "text": "closely", "cache_control": {"type": "ephemeral"}}]}))
    message = turn.messages[0]
    assert message.text == "look\nclosely"
    assert message.images == ["data:image/png;base64,AAAA", "https://example.com/a.jpg"]


def test_tool_use_and_tool_results_become_calls_and_tool_messages():
    turn = parse_anthropic_request(request(
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "denied"}]},
            {"type": "text", "text": "and now?"}]}))
    _, assistant, first, second, follow = turn.messages
    assert (assistant.text, assistant.tool_calls) == ("Sure.", [ToolCall("toolu_1", "Bash", '{"command": "ls"}')])
    assert (first.role, first.tool_call_id, first.text) == ("tool", "toolu_1", "a.txt")
    assert (second.tool_call_id, second.text) == ("toolu_2", "Error: denied")
    assert (follow.role, follow.text) == ("user", "and now?")


def test_a_tool_result_with_an_image_keeps_it():
    turn = parse_anthropic_request(request({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
        "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}]}]}))
    assert turn.messages[0].images == ["data:image/png;base64,AA"]


def test_thinking_blocks_sent_back_are_ignored():
    turn = parse_anthropic_request(request(
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "abc"},
                                          {"type": "redacted_thinking", "data": "x"},
                                          {"type": "text", "text": "answer"}]},
        {"role": "user", "content": "more"}))
    assert turn.messages[1].text == "answer"


def test_custom_tools_are_kept_and_anthropic_server_tools_dropped():
    turn = parse_anthropic_request(request(tools=[
        {"name": "Bash", "description": "run", "input_schema": {"type": "object", "properties": {}},
         "cache_control": {"type": "ephemeral"}},
        {"type": "custom", "name": "Read", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "code_execution_20250825", "name": "code_execution"},
        {"type": "bash_20250124", "name": "bash"}]))
    assert [t.name for t in turn.tools.tools] == ["Bash", "Read"]
    assert turn.tools.tools[0].parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize("choice,expected", [
    (None, ("auto", None, True)),
    ({"type": "auto"}, ("auto", None, True)),
    ({"type": "any", "disable_parallel_tool_use": True}, ("required", None, False)),
    ({"type": "tool", "name": "Bash"}, ("function", "Bash", True)),
    ({"type": "none"}, ("none", None, True)),
])
def test_tool_choice_maps_to_the_engines_choice(choice, expected):
    body = request(tools=[{"name": "Bash", "input_schema": {"type": "object"}}])
    if choice is not None:
        body["tool_choice"] = choice
    config = parse_anthropic_request(body).tools
    assert (config.choice, config.function, config.parallel) == expected


def test_output_config_format_asks_for_a_json_schema_answer():
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    for fields in ({"output_config": {"effort": "high", "format": {"type": "json_schema", "schema": schema}}},
                   {"output_format": {"type": "json_schema", "schema": schema}}):
        output = parse_anthropic_request(request(**fields)).output
        assert (output.kind, output.schema) == ("json_schema", schema)
    assert parse_anthropic_request(request(output_config={"effort": "high"})).output.kind == "text"


def test_fields_lm_arena_cannot_honour_are_accepted():
    turn = parse_anthropic_request(request(
        stream=True, thinking={"type": "adaptive"}, context_management={"edits": []}, metadata={"user_id": "u"},
        temperature=0.1, top_k=3, stop_sequences=["x"], service_tier="auto", container=None, something_new=1))
    assert turn.stream and turn.model == "m"


def test_what_claude_code_sends_is_understood():
    with open(os.path.join(FIXTURES, "claude-code-request.json")) as file:
        captured = json.load(file)
    turn = parse_anthropic_request(captured["body"])
    roles = [m.role for m in turn.messages]
    assert roles == ["system", "user", "system", "assistant", "tool"]
    assert not turn.messages[0].text.startswith("x-anthropic-billing-header")
    assert turn.messages[3].tool_calls[0].name == "Bash" and turn.messages[4].tool_call_id.startswith("toolu_")
    assert [t.name for t in turn.tools.tools] == ["Bash", "Read", "WebSearch"] and turn.stream


@pytest.mark.parametrize("body,param", [
    ([], None),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    (request(messages=[]), "messages"),
    (request({"role": "tool", "content": "x"}), "messages[0].role"),
    (request({"role": "user", "content": 3}), "messages[0].content"),
    (request({"role": "user", "content": [{"type": "audio"}]}), "messages[0].content[0]"),
    (request({"role": "user", "content": [{"type": "text", "text": 1}]}), "messages[0].content[0].text"),
    (request({"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}),
     "messages[0].content[0].source"),
    (request({"role": "user", "content": [{"type": "document", "source": {"type": "base64", "data": "JVBE"}}]}),
     "messages[0].content[0]"),
    (request({"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]}),
     "messages[0].content"),
    (request({"role": "assistant", "content": "only me"}), "messages"),
    (request(system=5), "system"),
    (request(stream="yes"), "stream"),
    (request(tools={"name": "x"}), "tools"),
    (request(tools=[{"name": "bad name!", "input_schema": {}}]), "tools[0].name"),
    (request(tool_choice={"type": "sometimes"}), "tool_choice"),
    (request(tool_choice={"type": "any"}), "tool_choice"),
    (request(output_config={"format": {"type": "xml"}}), "output_config.format"),
])
def test_invalid_requests_are_400_with_the_param(body, param):
    with pytest.raises(ApiError) as caught:
        parse_anthropic_request(body)
    assert caught.value.status == 400 and caught.value.param == param


# The memo of a request's tools (Claude Code sends the same 60 kB of them every turn).

def tool(name="Bash", description="run", schema=None) -> dict:
    return {"name": name, "description": description, "input_schema": schema or {"type": "object", "properties": {
        "command": {"type": "string"}}}, "cache_control": {"type": "ephemeral"}}


def test_the_same_tools_sent_again_are_read_and_rendered_once():
    memo = bridge.tool_memo()
    first = bridge.parse_anthropic_request(request(tools=[tool()], tool_choice={"type": "auto"}), memo).tools
    next_turn = request({"role": "user", "content": "hi"}, {"role": "assistant", "content": "done"},
                        {"role": "user", "content": "again"}, tools=[tool()], tool_choice={"type": "auto"})
    again = bridge.parse_anthropic_request(json.loads(json.dumps(next_turn)), memo).tools
    assert again is first and again.instructions is first.instructions and "Bash" in first.instructions


@pytest.mark.parametrize("change", [
    {"tools": [tool(description="run a command")]},
    {"tools": [tool(schema={"type": "object", "properties": {"cmd": {"type": "integer"}}})]},
    {"tools": [tool(), tool("Read")]},
    {"tools": [tool("Read")]},
    {"tools": [tool()], "tool_choice": {"type": "any"}},
    {"tools": [tool()], "tool_choice": {"type": "tool", "name": "Bash"}},
    {"tools": [tool()], "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
    {"tools": [tool()], "tool_choice": {"type": "none"}},
    {},
])
def test_changed_tools_or_tool_choice_are_never_served_a_stale_rendering(change):
    memo = bridge.tool_memo()
    bridge.parse_anthropic_request(request(tools=[tool()]), memo)
    changed = bridge.parse_anthropic_request(request(**change), memo).tools
    fresh = bridge.read_anthropic_tools(request(**change))       # read and rendered without the memo
    assert changed == fresh and changed.instructions == fresh.instructions


def test_a_refused_tool_choice_is_refused_again_after_a_good_one():
    memo = bridge.tool_memo()
    bridge.parse_anthropic_request(request(tools=[tool()], tool_choice={"type": "tool", "name": "Bash"}), memo)
    for _ in range(2):
        with pytest.raises(ApiError) as caught:
            bridge.parse_anthropic_request(request(tools=[tool()], tool_choice={"type": "tool", "name": "Read"}),
                                           memo)
        assert caught.value.param == "tool_choice"


def test_the_tool_memo_stays_bounded_and_keeps_no_huge_tools_list():
    memo = bridge.tool_memo()
    for i in range(3 * bridge.TOOL_MEMO_ENTRIES):
        bridge.parse_anthropic_request(request(tools=[tool(f"tool_{i}")]), memo)
    bridge.parse_anthropic_request(request(tools=[tool(description="d" * bridge.TOOL_MEMO_LONGEST)]), memo)
    assert len(memo.results) == bridge.TOOL_MEMO_ENTRIES
    assert max(map(len, memo.results)) <= bridge.TOOL_MEMO_LONGEST


def test_tools_nested_deeper_than_a_memo_key_goes_are_read_and_not_kept():
    deep = "[" * 700 + "]" * 700        # json.loads takes it, pickle (two frames a level) does not
    body = bridge.parse_json_body(json.dumps(request(tools=[tool()])).replace('"properties"', f'"x": {deep}, '
                                                                                            '"properties"').encode())
    memo = bridge.tool_memo()
    assert bridge.parse_anthropic_request(body, memo).tools.tools[0].name == "Bash" and not memo.results


def test_a_text_stream_has_anthropics_event_order():
    encoder = AnthropicEncoder("msg_1", "m", 12)
    sse = encoder.start() + encoder.text("Hel") + encoder.text("lo") + encoder.finish("stop", usage(12, 2))
    data = checked(sse)
    assert [d["type"] for d in data] == ["message_start", "content_block_start", "content_block_delta",
                                         "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert data[0]["message"]["usage"] == {"input_tokens": 12, "output_tokens": 0}
    assert "".join(d["delta"]["text"] for d in data[2:4]) == "Hello"
    assert data[5]["delta"]["stop_reason"] == "end_turn" and data[5]["usage"]["output_tokens"] == 2
    assert "[DONE]" not in sse


def test_thinking_comes_as_a_thinking_block_closed_with_a_signature():
    encoder = AnthropicEncoder("msg_1", "m", 1)
    data = checked(encoder.start() + encoder.reasoning("let me ") + encoder.reasoning("see") + encoder.text("42")
                   + encoder.finish("stop", usage(1, 3)))
    kinds = [(d["type"], d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type"))
             for d in data[1:-2]]
    assert kinds == [("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
                     ("content_block_delta", 0, "thinking_delta"), ("content_block_delta", 0, "signature_delta"),
                     ("content_block_stop", 0, None), ("content_block_start", 1, "text"),
                     ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None)]
    assert data[4]["delta"]["signature"]


def test_a_tool_call_is_a_tool_use_block_with_input_json_delta():
    encoder = AnthropicEncoder("msg_1", "m", 1)
    calls = [ToolCall("toolu_a", "Bash", '{"command": "ls"}'), ToolCall("toolu_b", "Read", '{"path": "x"}')]
    data = checked(encoder.start() + encoder.text("Running.") + encoder.call(calls[0]) + encoder.call(calls[1])
                   + encoder.finish("tool_calls", usage(1, 9)))
    starts = [d["content_block"] for d in data if d["type"] == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "toolu_a", "name": "Bash", "input": {}}
    deltas = [d["delta"] for d in data if d["type"] == "content_block_delta" and d["index"] == 2]
    assert deltas == [{"type": "input_json_delta", "partial_json": '{"path": "x"}'}]
    assert [d["index"] for d in data if d["type"] == "content_block_stop"] == [0, 1, 2]
    assert data[-2]["delta"]["stop_reason"] == "tool_use"


def test_ping_and_error_events():
    assert events(AnthropicEncoder.KEEPALIVE) == [("ping", {"type": "ping"})]
    [(name, body)] = events(AnthropicEncoder.error(ApiError(503, "LM Arena is cooling down", "cooldown")))
    assert name == "error" and body == {"type": "error", "error": {"type": "overloaded_error",
                                                                   "message": "LM Arena is cooling down"}}
    ERROR.validate_python(body)


def test_a_whole_message_validates_with_thinking_text_and_tool_use():
    calls = [ToolCall("toolu_a", "Bash", '{"command": "ls"}')]
    body = anthropic_message_body("msg_1", "m", "thought", "Running.", calls, "tool_calls", usage(10, 5))
    message = MESSAGE.validate_python(body)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[2].input == {"command": "ls"} and message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 5)


def test_a_message_without_text_or_calls_still_has_a_text_block():
    def kinds(*calls):
        body = anthropic_message_body("msg_1", "m", "", "", list(calls), "stop", usage(1, 1))
        return [block["type"] for block in body["content"]]
    assert kinds() == ["text"] and kinds(ToolCall("t", "n", "{}")) == ["tool_use"]


@pytest.mark.parametrize("finish,stop", [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
                                         ("content_filter", "refusal"), ("anything", "end_turn")])
def test_finish_reasons_map_to_stop_reasons(finish, stop):
    assert anthropic_stop_reason(finish) == stop


@pytest.mark.parametrize("status,kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"), (529, "overloaded_error"),
])
def test_errors_have_anthropics_shape_and_type(status, kind):
    body = anthropic_error_body(ApiError(status, "why", "code"))
    assert body == {"type": "error", "error": {"type": kind, "message": "why"}}
    if kind != "request_too_large":      # documented by Anthropic, but missing from the SDK's union of types
        ERROR.validate_python(body)
