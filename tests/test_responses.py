"""OpenAI Responses (SPEC §7.3): requests in, events out, checked with OpenAI's schemas and the openai SDK's types."""
import json
import os

import openai.types.responses as types
import pytest
from harness import validate
from pydantic import TypeAdapter

import bridge
from bridge import (
    ApiError,
    Message,
    ResponsesEncoder,
    ToolCall,
    response_object,
    responses_body,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EVENT: TypeAdapter = TypeAdapter(types.ResponseStreamEvent)
RESPONSE: TypeAdapter = TypeAdapter(types.Response)
FUNCTION = {"type": "function", "name": "exec_command", "description": "run", "strict": False,
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}


def parse_responses_request(body) -> bridge.ResponsesRequest:
    """A body read with a tool memo of its own, as each app has one (BridgeState.responses_tools)."""
    return bridge.parse_responses_request(body, bridge.tool_memo())


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def request(**fields) -> dict:
    return {"model": "m", "input": "hi", **fields}


def checked_events(sse: str) -> list[dict]:
    """The data of each event: the event line names its type, sequence numbers count up from 0, and each
    validates against OpenAI's schema and the SDK's type."""
    out: list[dict] = []
    for frame in sse.strip("\n").split("\n\n"):
        name, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}" and event["sequence_number"] == len(out)
        validate("ResponseStreamEvent", event)
        EVENT.validate_python(event)
        out.append(event)
    return out


def checked_response(body: dict) -> types.Response:
    validate("Response", body)
    return RESPONSE.validate_python(body)


def test_a_string_input_is_one_user_message_after_the_instructions():
    turn = parse_responses_request(request(instructions="be brief")).turn
    assert [(m.role, m.text) for m in turn.messages] == [("system", "be brief"), ("user", "hi")]


def test_message_items_with_parts_and_roles():
    turn = parse_responses_request(request(input=[
        {"type": "message", "id": "msg_0", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"role": "system", "content": "more rules"},
        {"role": "user", "content": [{"type": "input_text", "text": "look"}, {
            "type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "auto"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok",
                                                              "annotations": []}]}])).turn
    assert [(m.role, m.text) for m in turn.messages] == [("system", "rules"), ("system", "more rules"),
                                                         ("user", "look"), ("assistant", "ok")]
    assert turn.messages[2].images == ["data:image/png;base64,AA"]


def test_function_calls_join_their_assistant_turn_and_outputs_become_tool_messages():
    turn = parse_responses_request(request(input=[
        {"role": "user", "content": "run ls"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Running."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
         "arguments": '{"cmd": "ls"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "exec_command", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "b"}]}])).turn
    _, assistant, first, second = turn.messages
    assert assistant.text == "Running." and [c.id for c in assistant.tool_calls] == ["call_1", "call_2"]
    assert [(m.role, m.tool_call_id, m.text) for m in (first, second)] == [("tool", "call_1", "a.txt"),
                                                                           ("tool", "call_2", "b")]


def test_a_call_without_a_message_before_it_is_an_assistant_turn_of_its_own():
    turn = parse_responses_request(request(input=[
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])).turn
    assert (turn.messages[1].role, turn.messages[1].text, len(turn.messages[1].tool_calls)) == ("assistant", "", 1)


def test_function_tools_are_kept_and_other_tool_types_ignored():
    parsed = parse_responses_request(request(tools=[
        FUNCTION, {"type": "web_search", "external_web_access": False},
        {"type": "namespace", "name": "multi_agent_v1", "tools": [FUNCTION]}, {"type": "file_search"}]))
    assert [t.name for t in parsed.turn.tools.tools] == ["exec_command"]
    assert parsed.echo["tools"] == [{"type": "function", "name": "exec_command", "description": "run",
                                     "parameters": FUNCTION["parameters"], "strict": None}]


@pytest.mark.parametrize("choice,parallel,expected", [
    ("auto", True, ("auto", None, True)), ("none", True, ("none", None, True)),
    ("required", False, ("required", None, False)),
    ({"type": "function", "name": "exec_command"}, True, ("function", "exec_command", True)),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "exec_command"}]}, True,
     ("required", None, True)),
])
def test_tool_choice_and_parallel_tool_calls(choice, parallel, expected):
    config = parse_responses_request(request(tools=[FUNCTION], tool_choice=choice,
                                             parallel_tool_calls=parallel)).turn.tools
    assert (config.choice, config.function, config.parallel) == expected


def test_text_format_json_schema_and_json_object():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    parsed = parse_responses_request(request(text={"format": {"type": "json_schema", "name": "thing", "schema": schema,
                                                              "strict": True}}))
    assert (parsed.turn.output.kind, parsed.turn.output.name, parsed.turn.output.schema) == ("json_schema", "thing",
                                                                                             schema)
    assert parsed.echo["text"] == {"format": {"type": "json_schema", "name": "thing", "schema": schema}}
    assert parse_responses_request(request(text={"format": {"type": "json_object"}})).turn.output.kind == "json_object"


def test_store_and_previous_response_id_are_carried():
    parsed = parse_responses_request(request(store=False, previous_response_id="resp_1"))
    assert (parsed.store, parsed.previous_response_id) == (False, "resp_1")
    assert parse_responses_request(request()).store


def test_a_continuation_carries_the_earlier_history_but_not_its_instructions():
    earlier = parse_responses_request(request(instructions="old rules", input="one"))
    later = parse_responses_request(request(instructions="new rules", input="two", previous_response_id="resp_1"))
    later.continuing([*earlier.history, Message("assistant", "turn 1: one", [])])
    assert [(m.role, m.text) for m in later.turn.messages] == [
        ("system", "new rules"), ("user", "one"), ("assistant", "turn 1: one"), ("user", "two")]
    assert [m.text for m in later.history] == ["one", "turn 1: one", "two"]


def test_an_empty_input_is_a_probe():
    for body in ({"model": "m"}, request(input=""), request(input=[]), request(input=[], instructions="x")):
        assert parse_responses_request(body).probe
    assert not parse_responses_request(request()).probe
    assert not parse_responses_request(request(input=[], previous_response_id="resp_1")).probe


def test_what_codex_sends_is_understood():
    with open(os.path.join(FIXTURES, "codex-request.json")) as file:
        captured = json.load(file)
    parsed = parse_responses_request(captured["body"])
    roles = [m.role for m in parsed.turn.messages]
    assert roles == ["system", "system", "user", "user", "assistant", "tool"]
    assert parsed.turn.messages[4].tool_calls[0].name == "exec_command"
    assert [t.name for t in parsed.turn.tools.tools] == ["exec_command", "view_image"]
    assert parsed.turn.stream and not parsed.store and parsed.turn.tools.parallel


@pytest.mark.parametrize("body,param", [
    ("x", None), ({"input": "x"}, "model"),
    (request(input=5), "input"), (request(input=["x"]), "input[0]"),
    (request(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0]"),
    (request(input=[{"role": "tool", "content": "x"}]), "input[0].role"),
    (request(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), "input[0].content[0]"),
    (request(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]), "input[0].content[0]"),
    (request(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]), "input[0].arguments"),
    (request(input=[{"type": "function_call_output", "output": "x"}]), "input[0].call_id"),
    (request(stream="yes"), "stream"), (request(store=1), "store"), (request(previous_response_id=3),
                                                                     "previous_response_id"),
    (request(tools=[{"type": "function", "name": "a b"}]), "tools[0].name"),
    (request(tool_choice="sometimes"), "tool_choice"), (request(tool_choice="required"), "tool_choice"),
    (request(parallel_tool_calls="no"), "parallel_tool_calls"),
    (request(text={"format": {"type": "yaml"}}), "text.format.type"),
])
def test_invalid_requests_are_400_with_the_param(body, param):
    with pytest.raises(ApiError) as caught:
        parse_responses_request(body)
    assert caught.value.status == 400 and caught.value.param == param


# The memo of a request's tools (Codex sends the same ones every turn).

def codex_body() -> dict:
    with open(os.path.join(FIXTURES, "codex-request.json")) as file:
        return json.load(file)["body"]


def test_the_same_tools_sent_again_are_read_and_rendered_once():
    memo = bridge.tool_memo()
    first = bridge.parse_responses_request(codex_body(), memo)
    next_turn = codex_body()
    next_turn["input"].append({"type": "function_call_output", "call_id": "c2", "output": "ok"})
    again = bridge.parse_responses_request(next_turn, memo)
    assert again.turn.tools is first.turn.tools and again.turn.tools.instructions is first.turn.tools.instructions
    assert again.echo["tools"] == first.echo["tools"] and "exec_command" in first.turn.tools.instructions


OTHER = {**FUNCTION, "name": "view_image", "description": "look"}


@pytest.mark.parametrize("change", [
    {"tools": [{**FUNCTION, "description": "run a command"}]},
    {"tools": [{**FUNCTION, "parameters": {"type": "object", "properties": {"cmd": {"type": "integer"}}}}]},
    {"tools": [FUNCTION, OTHER]},
    {"tools": [OTHER]},
    {"tools": [FUNCTION], "tool_choice": "required"},
    {"tools": [FUNCTION], "tool_choice": "none"},
    {"tools": [FUNCTION], "tool_choice": {"type": "function", "name": "exec_command"}},
    {"tools": [FUNCTION, OTHER], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [
        {"type": "function", "name": "view_image"}]}},
    {"tools": [FUNCTION], "parallel_tool_calls": False},
    {},
])
def test_changed_tools_or_tool_choice_are_never_served_a_stale_rendering(change):
    memo = bridge.tool_memo()
    bridge.parse_responses_request(request(tools=[FUNCTION]), memo)
    changed = bridge.parse_responses_request(request(**change), memo)
    fresh = parse_responses_request(request(**change))          # read and rendered with an empty memo
    assert changed.turn.tools == fresh.turn.tools and changed.echo == fresh.echo
    assert changed.turn.tools.instructions == fresh.turn.tools.instructions


@pytest.mark.parametrize("field,value", [("tool_choice", None), ("parallel_tool_calls", None),
                                         ("parallel_tool_calls", 1)])
def test_a_null_or_a_value_of_another_type_is_not_taken_for_the_kept_one(field, value):
    memo = bridge.tool_memo()
    bridge.parse_responses_request(request(tools=[FUNCTION], tool_choice="auto", parallel_tool_calls=True), memo)
    bridge.parse_responses_request(request(tools=[FUNCTION]), memo)
    with pytest.raises(ApiError) as caught:
        bridge.parse_responses_request(request(tools=[FUNCTION], **{field: value}), memo)
    assert caught.value.status == 400 and caught.value.param == field


def test_the_tool_memo_stays_bounded_and_keeps_no_huge_tools_list():
    memo = bridge.tool_memo()
    for i in range(3 * bridge.TOOL_MEMO_ENTRIES):
        bridge.parse_responses_request(request(tools=[{**FUNCTION, "name": f"tool_{i}"}]), memo)
    bridge.parse_responses_request(request(tools=[{**FUNCTION, "description": "d" * bridge.TOOL_MEMO_LONGEST}]), memo)
    assert len(memo.results) == bridge.TOOL_MEMO_ENTRIES
    assert max(map(len, memo.results)) <= bridge.TOOL_MEMO_LONGEST


def test_a_text_stream_has_the_responses_event_sequence():
    parsed = parse_responses_request(request(stream=True))
    encoder = ResponsesEncoder("resp_1", 1700000000, parsed)
    data = checked_events(encoder.start() + encoder.text("Hel") + encoder.text("lo")
                          + encoder.finish("stop", usage(5, 2)))
    assert [d["type"] for d in data] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    final = checked_response(data[-1]["response"])
    assert final.status == "completed" and final.output_text == "Hello" and final.usage.total_tokens == 7
    assert data[6]["text"] == "Hello" and data[4]["item_id"] == final.output[0].id


def test_reasoning_comes_first_as_a_reasoning_item_with_summary_text():
    encoder = ResponsesEncoder("resp_1", 1, parse_responses_request(request()))
    data = checked_events(encoder.start() + encoder.reasoning("thinking") + encoder.text("42")
                          + encoder.finish("stop", usage(5, 4)))
    kinds = [d["type"] for d in data[2:7]]
    assert kinds == ["response.output_item.added", "response.reasoning_summary_part.added",
                     "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
                     "response.reasoning_summary_part.done"]
    final = checked_response(data[-1]["response"])
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "thinking" and final.output[1].content[0].text == "42"
    assert final.usage.output_tokens_details.reasoning_tokens == 2


def test_function_calls_are_output_items_with_streamed_arguments():
    parsed = parse_responses_request(request(tools=[FUNCTION]))
    encoder = ResponsesEncoder("resp_1", 1, parsed)
    call = ToolCall("call_abc", "exec_command", '{"cmd": "ls"}')
    data = checked_events(encoder.start() + encoder.text("Running.") + encoder.call(call)
                          + encoder.finish("tool_calls", usage(5, 9)))
    added = next(d for d in data if d["type"] == "response.output_item.added" and d["output_index"] == 1)
    assert added["item"] == {"type": "function_call", "id": "fc_abc", "call_id": "call_abc", "name": "exec_command",
                             "arguments": "", "status": "in_progress"}
    done = next(d for d in data if d["type"] == "response.function_call_arguments.done")
    assert (done["arguments"], done["name"], done["item_id"]) == ('{"cmd": "ls"}', "exec_command", "fc_abc")
    final = checked_response(data[-1]["response"])
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.tools[0].name == "exec_command" and final.output_text == "Running."


def test_a_reply_cut_short_is_incomplete_and_a_failure_is_failed():
    encoder = ResponsesEncoder("resp_1", 1, parse_responses_request(request()))
    data = checked_events(encoder.start() + encoder.text("Hel") + encoder.finish("length", usage(5, 2)))
    assert data[-1]["type"] == "response.incomplete"
    assert checked_response(data[-1]["response"]).incomplete_details.reason == "max_output_tokens"
    encoder = ResponsesEncoder("resp_2", 1, parse_responses_request(request()))
    data = checked_events(encoder.start() + encoder.text("Hel")
                          + encoder.error(ApiError(429, "LM Arena rate-limited the account", "rate_limited")))
    failed = checked_response(data[-1]["response"])
    assert (failed.status, failed.error.code) == ("failed", "rate_limit_exceeded")


def test_a_whole_response_validates():
    parsed = parse_responses_request(request(instructions="x", metadata={"k": "v"}, tools=[FUNCTION]))
    body = responses_body("resp_1", 1, parsed, "why", "hi", [ToolCall("call_1", "exec_command", "{}")], "tool_calls",
                          usage(3, 4))
    response = checked_response(body)
    assert [i.type for i in response.output] == ["reasoning", "message", "function_call"]
    assert (response.instructions, response.metadata, response.output_text) == ("x", {"k": "v"}, "hi")
    assert response.status == "completed" and response.usage.total_tokens == 7


def test_a_whole_response_cut_short_is_incomplete():
    body = responses_body("resp_1", 1, parse_responses_request(request()), "", "Hel", [], "length", usage(3, 1))
    assert checked_response(body).incomplete_details.reason == "max_output_tokens"


def test_a_probe_answer_has_no_output():
    body = response_object("resp_1", 1, parse_responses_request({"model": "m"}), "completed", [])
    assert checked_response(body).output == []
