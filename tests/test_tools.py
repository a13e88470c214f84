"""The emulated tool engine and structured output (SPEC §7.1): pure functions, no network."""
import collections
import concurrent.futures
import json
import time

import pytest

import bridge
from bridge import (
    ApiError,
    InvalidModelOutput,
    Message,
    OutputFormat,
    ToolCall,
    ToolCallParser,
    ToolConfig,
    ToolLoopError,
    ToolSpec,
    agent_messages,
    agent_prompt_tokens,
    call_id,
    calls_tokens,
    check_tool_loop,
    checked_json,
    judge_reply,
    output_format,
    render_tool_history,
    render_transcript,
    tool_config,
    tool_instructions,
    tool_spec,
)

WEATHER = ToolSpec("get_weather", "The weather in a city.",
                   {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = ToolSpec("get_time", "The time in a city.", {"type": "object", "properties": {"city": {"type": "string"}}})
TOOLS = ToolConfig((WEATHER, TIME))
TEXT = OutputFormat()
PERSON = output_format("json_schema", "person", {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False})


def call_text(name="get_weather", arguments='{"city": "Paris"}'):
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


def read(reply, config=TOOLS, output=TEXT, step=None):
    """Feed `reply` in pieces of `step` characters (all at once when None); (events, parser)."""
    parser = ToolCallParser(config, output, seed="chatcmpl-1")
    pieces = [reply] if step is None else [reply[i:i + step] for i in range(0, len(reply), step)]
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.close(), parser


def texts(events):
    return "".join(e.text for e in events if e.kind == "text")


def calls(events):
    return [e.call for e in events if e.kind == "call"]


# --- request fields -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make,param", [
    (lambda: tool_spec("bad name!", None, None, "tools[0]"), "tools[0].name"),
    (lambda: tool_spec("f", 5, None, "tools[0]"), "tools[0].description"),
    (lambda: tool_spec("f", None, [], "tools[0]"), "tools[0].parameters"),
    (lambda: tool_config([WEATHER, WEATHER]), "tools"),
    (lambda: tool_config([WEATHER], "sometimes"), "tool_choice"),
    (lambda: tool_config([], "required"), "tool_choice"),
    (lambda: tool_config([WEATHER], "function", "get_time"), "tool_choice"),
    (lambda: output_format("xml"), "response_format.type"),
    (lambda: output_format("json_schema", "x", None), "response_format"),
    (lambda: output_format("json_schema", "x", {"type": "no-such-type"}), "response_format"),
])
def test_bad_tool_and_format_fields_are_400s_naming_the_field(make, param):
    with pytest.raises(ApiError) as caught:
        make()
    assert caught.value.status == 400 and caught.value.param == param


def test_a_tool_without_parameters_takes_an_empty_object():
    assert tool_spec("now", None, None, "tools[0]").parameters == {"type": "object", "properties": {}}


# --- rendering ------------------------------------------------------------------------------------------

def test_tools_are_taught_in_the_system_part_after_the_clients_own_system_prompt():
    history = [Message("system", "You are terse.", []), Message("user", "Weather in Paris?", [])]
    text, _ = render_transcript(agent_messages(history, TOOLS, TEXT), 100_000)
    system, user = text.split("[User]")
    assert system.index("You are terse.") < system.index("<tool_call>")
    assert json.dumps(WEATHER.parameters) in system and '"name": "get_time"' in system
    assert "Weather in Paris?" in user


@pytest.mark.parametrize("config,rule", [
    (ToolConfig((WEATHER,), "auto"), "when it helps"),
    (ToolConfig((WEATHER,), "required"), "must call at least one function"),
    (ToolConfig((WEATHER, TIME), "function", "get_time"), "must call the function `get_time`"),
    (ToolConfig((WEATHER,), parallel=True), "several blocks"),
    (ToolConfig((WEATHER,), parallel=False), "at most one function"),
])
def test_choice_and_parallel_calls_become_rules(config, rule):
    assert rule in tool_instructions(config)


def test_a_named_choice_lists_only_that_function():
    text = tool_instructions(ToolConfig((WEATHER, TIME), "function", "get_time"))
    assert '"name": "get_time"' in text and '"name": "get_weather"' not in text


def test_tool_choice_none_lists_no_functions_and_forbids_calls():
    text = tool_instructions(ToolConfig((WEATHER,), "none"))
    assert "get_weather" not in text and "Do not call any function" in text


def test_no_tools_and_no_format_add_no_instructions():
    history = [Message("user", "hi", [])]
    assert agent_messages(history, ToolConfig(), TEXT) == history


def test_earlier_calls_and_results_are_rendered_with_id_name_and_arguments():
    history = [Message("user", "Weather?", []),
               Message("assistant", "Checking.", [], tool_calls=[ToolCall("call_1", "get_weather", '{"city":"Oslo"}')]),
               Message("tool", "rain", [], tool_call_id="call_1"),
               Message("user", "And now?", [])]
    text, _ = render_transcript(agent_messages(history, TOOLS, TEXT), 100_000)
    assert ('Checking.\n<tool_call>{"id": "call_1", "name": "get_weather", "arguments": {"city": "Oslo"}}'
            "</tool_call>") in text
    assert '[Tool result]\n<tool_response id="call_1" name="get_weather">\nrain\n</tool_response>' in text


def test_a_call_without_text_is_the_block_alone():
    [rendered] = render_tool_history([Message("assistant", "", [], tool_calls=[ToolCall("c", "f", "{}")])])
    assert rendered.text == '<tool_call>{"id": "c", "name": "f", "arguments": {}}</tool_call>'


def test_a_very_long_tool_result_is_trimmed_with_a_visible_marker():
    result = "a" * 30_000 + "MIDDLE" + "z" * 30_000
    [_, rendered] = render_tool_history([Message("assistant", "", [], tool_calls=[ToolCall("c", "f", "{}")]),
                                         Message("tool", result, [], tool_call_id="c")])
    assert "characters of this result left out by the bridge" in rendered.text
    assert "MIDDLE" not in rendered.text and "aaaa" in rendered.text and rendered.text.rstrip().endswith(
        "z\n</tool_response>")


def test_a_very_long_description_is_trimmed_with_a_visible_marker():
    text = tool_instructions(ToolConfig((ToolSpec("f", "d" * 5000, {}),)))
    assert "characters of this description left out by the bridge" in text and "d" * 5000 not in text


def test_tools_past_the_list_budget_are_listed_without_parameters_visibly():
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                            for i in range(100)}}
    many = tuple(ToolSpec(f"tool_{i}", "", big) for i in range(10))
    text = tool_instructions(ToolConfig(many))
    assert all(f'"name": "tool_{i}"' in text for i in range(10))
    assert "left out by the bridge: the tool list is too long" in text and len(text) < 50_000


def test_a_trailing_assistant_message_is_a_prefill_the_model_is_asked_to_continue():
    history = [Message("user", "Write a haiku.", []), Message("assistant", "Autumn moon rises", [])]
    text, _ = render_transcript(agent_messages(history, ToolConfig(), TEXT), 100_000)
    assert text.endswith("[Assistant]\nAutumn moon rises") and "Continue it exactly where it ends" in text


@pytest.mark.parametrize("roles,start", [
    (["user"], 0), (["system", "user"], 1), (["user", "assistant", "user"], 2),
    (["user", "assistant", "tool", "tool"], 2), (["user", "assistant", "tool", "user"], 2),
    (["user", "assistant"], 2),
])
def test_the_new_turn_is_everything_after_the_last_assistant_message(roles, start):
    assert bridge.new_turn_start([Message(role, "x", []) for role in roles]) == start


def test_a_follow_up_carries_the_tool_results_as_blocks():
    history = [Message("user", "go", []),
               Message("assistant", "", [], tool_calls=[ToolCall("c1", "get_weather", "{}"),
                                                        ToolCall("c2", "get_time", "{}")]),
               Message("tool", "rain", [], tool_call_id="c1"), Message("tool", "10:00", [], tool_call_id="c2")]
    text = bridge.followup_text(history, 2, TOOLS, TEXT)
    assert text == ('<tool_response id="c1" name="get_weather">\nrain\n</tool_response>\n\n'
                    '<tool_response id="c2" name="get_time">\n10:00\n</tool_response>')


def test_a_plain_follow_up_is_the_users_words_alone():
    assert bridge.followup_text([Message("user", "hello", [])], 0, ToolConfig(), TEXT) == "hello"


def test_a_follow_up_repeats_a_required_call_and_the_format():
    text = bridge.followup_text([Message("user", "hello", [])], 0, ToolConfig((WEATHER,), "required"), PERSON)
    assert text.startswith("hello\n\nYou must call at least one function") and "JSON Schema" in text


def test_json_formats_become_instructions():
    assert "one JSON object" in agent_messages([Message("user", "x", [])], ToolConfig(),
                                               output_format("json_object"))[-1].text
    schema_rule = agent_messages([Message("user", "x", [])], ToolConfig(), PERSON)[-1].text
    assert "(named person)" in schema_rule and '"required": ["name", "age"]' in schema_rule


# --- parsing a streaming reply -----------------------------------------------------------------------------

def test_a_single_call_becomes_a_call_with_a_stable_call_id():
    events, parser = read(call_text())
    [call] = calls(events)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id == call_id("chatcmpl-1", 0) and call.id.startswith("call_") and texts(events) == ""
    assert events[-1].kind == "end" and parser.calls == [call]


def test_the_same_reply_gets_the_same_ids():
    assert [c.id for c in calls(read(call_text())[0])] == [c.id for c in calls(read(call_text())[0])]


def test_text_before_a_call_is_relayed_before_the_block_is_complete():
    parser = ToolCallParser(TOOLS, TEXT, seed="s")
    assert texts(parser.feed("Let me check. ")) == "Let me check."
    assert parser.feed('<tool_call>{"name": "get_weather", ') == []
    [event] = parser.feed('"arguments": {"city": "Paris"}}</tool_call>')
    assert event.kind == "call"


def test_plain_text_streams_at_once_and_only_a_possible_opener_waits():
    parser = ToolCallParser(TOOLS, TEXT, seed="s")
    assert texts(parser.feed("a < b and <tool")) == "a < b and"
    assert texts(parser.feed("box>")) == " <toolbox>"
    assert texts(parser.feed("see `x`")) == "see `x"
    assert texts(parser.close()) == "`"


@pytest.mark.parametrize("step", [1, 2, 3, 7, None])
def test_any_split_of_the_stream_reads_the_same(step):
    reply = "Sure.\n" + call_text() + "\n" + call_text("get_time") + "\nDone ```python\nx=1\n``` bye"
    events, _ = read(reply, step=step)
    assert texts(events) == "Sure.\n\n\nDone ```python\nx=1\n``` bye"
    assert [c.name for c in calls(events)] == ["get_weather", "get_time"]


def test_several_blocks_are_parallel_calls_with_distinct_ids():
    events, _ = read(call_text() + "\n" + call_text(arguments='{"city": "Rome"}'))
    first, second = calls(events)
    assert first.id != second.id and json.loads(second.arguments) == {"city": "Rome"}


def test_with_parallel_calls_off_only_the_first_block_is_a_call():
    events, _ = read(call_text() + call_text("get_time"), ToolConfig((WEATHER, TIME), parallel=False))
    assert [c.name for c in calls(events)] == ["get_weather"] and texts(events) == ""


def test_whitespace_between_and_after_calls_is_not_content():
    events, _ = read("\n" + call_text() + "\n\n" + call_text("get_time") + "\n")
    assert texts(events) == "" and len(calls(events)) == 2


@pytest.mark.parametrize("block", [
    call_text("delete_everything"),
    call_text(arguments='"Paris"'),
    call_text(arguments='["Paris"]'),
    "<tool_call>not json</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',
])
def test_a_block_that_is_not_a_valid_call_is_text(block):
    events, _ = read("x " + block)
    assert calls(events) == [] and texts(events) == "x " + block


def test_with_tool_choice_none_every_block_is_text():
    events, _ = read(call_text(), ToolConfig((WEATHER,), "none"))
    assert calls(events) == [] and texts(events) == call_text()


def test_with_a_named_choice_a_call_to_another_function_is_text():
    events, parser = read(call_text("get_time"), ToolConfig((WEATHER, TIME), "function", "get_weather"))
    assert calls(events) == [] and parser.held == call_text("get_time")     # held: the call is asked for again


def test_missing_arguments_are_an_empty_object():
    [call] = calls(read('<tool_call>{"name": "get_time"}</tool_call>')[0])
    assert call.arguments == "{}"


@pytest.mark.parametrize("reply", [
    '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
    '```\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
    '```json {"name": "get_weather", "arguments": {"city": "Paris"}}```',
    '<tool_call>\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris",},}</tool_call>',
])
def test_near_misses_fenced_json_and_trailing_commas_are_calls(reply):
    [call] = calls(read(reply, step=1)[0])
    assert json.loads(call.arguments) == {"city": "Paris"}


def test_an_ordinary_json_fence_is_text_once_it_closes():
    reply = 'Config:\n```json\n{"debug": true}\n```\nThat is all.'
    events, _ = read(reply, step=4)
    assert calls(events) == [] and texts(events) == reply


def test_a_code_fence_in_another_language_streams_without_waiting_for_its_end():
    parser = ToolCallParser(TOOLS, TEXT, seed="s")
    assert texts(parser.feed("```python\nprint(1)\n")) == "```python\nprint(1)"


@pytest.mark.parametrize("reply", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_',
    '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
])
def test_a_block_cut_by_the_end_of_the_reply_with_complete_json_is_a_call(reply):
    assert len(calls(read(reply)[0])) == 1


def test_a_block_cut_by_the_end_of_the_reply_with_incomplete_json_is_text():
    reply = 'Hm <tool_call>{"name": "get_weather", "arguments": {"ci'
    events, _ = read(reply)
    assert calls(events) == [] and texts(events) == reply


def test_with_a_required_call_text_waits_for_the_call_and_then_comes_before_it():
    parser = ToolCallParser(ToolConfig((WEATHER,), "required"), TEXT, seed="s")
    assert parser.feed("Let me look. ") == []
    events = parser.feed(call_text())
    assert [e.kind for e in events] == ["text", "call"] and events[0].text == "Let me look."


# --- after the reply ------------------------------------------------------------------------------------

def test_a_required_call_that_did_not_come_is_asked_for_once_then_the_text_is_the_answer():
    config = ToolConfig((WEATHER,), "required")
    _, parser = read("It is probably sunny.", config)
    first = judge_reply(parser, attempt=0)
    assert first.action == "ask_again" and "<tool_call>" in first.prompt
    assert judge_reply(parser, attempt=1) == judge_reply(parser, attempt=1).__class__(
        "answer", content="It is probably sunny.")


def test_a_named_call_that_did_not_come_names_the_function_in_the_retry():
    _, parser = read("no", ToolConfig((WEATHER, TIME), "function", "get_time"))
    assert "`get_time`" in judge_reply(parser, 0).prompt


def test_an_auto_reply_without_calls_is_the_answer():
    _, parser = read("Hello.")
    verdict = judge_reply(parser, 0)
    assert verdict.action == "answer" and verdict.content == ""     # already relayed as it streamed


@pytest.mark.parametrize("reply", [
    '{"name": "Ada", "age": 36}',
    'Here you go:\n```json\n{"name": "Ada", "age": 36}\n```',
    'The person is {"name": "Ada", "age": 36} as asked.',
    '{"name": "Ada", "age": 36,}',
])
def test_a_schema_answer_is_the_json_value_alone(reply):
    events, parser = read(reply, ToolConfig(), PERSON)
    assert texts(events) == ""                                       # held: the answer is the checked JSON
    verdict = judge_reply(parser, 0)
    assert verdict.action == "answer" and json.loads(verdict.content) == {"name": "Ada", "age": 36}


def test_prose_brackets_before_the_answer_are_not_taken_for_it():
    content, _ = checked_json('See [1]. {"name": "Ada", "age": 36}', PERSON)
    assert json.loads(content) == {"name": "Ada", "age": 36}


def test_an_invalid_schema_answer_is_repaired_once_then_fails_as_invalid_model_output():
    _, parser = read('{"name": "Ada", "age": "old"}', ToolConfig(), PERSON)
    first = judge_reply(parser, 0)
    assert first.action == "ask_again" and "`$.age`" in first.prompt and "'old' is not of type 'integer'" in first.prompt
    last = judge_reply(parser, 1)
    assert last.action == "fail"
    error = InvalidModelOutput(last.problem)
    assert error.status == 502 and error.code == "invalid_model_output" and "age" in error.message


def test_json_object_needs_an_object():
    content, problem = checked_json('["a"]', output_format("json_object"))
    assert content is None and "not an object" in problem
    assert checked_json("no json here", output_format("json_object"))[1] == "the reply contains no JSON value"


def test_a_call_under_a_json_format_is_answered_as_a_call():
    config = ToolConfig((WEATHER,))
    events, parser = read(call_text(), config, PERSON)
    assert len(calls(events)) == 1 and judge_reply(parser, 0).action == "answer"


def history_with(*calls_made):
    history = [Message("user", "go", [])]
    for i, (name, arguments) in enumerate(calls_made):
        history += [Message("assistant", "", [], tool_calls=[ToolCall(f"c{i}", name, arguments)]),
                    Message("tool", "same result", [], tool_call_id=f"c{i}")]
    return history


def test_the_same_call_three_times_in_a_row_is_allowed():
    check_tool_loop(history_with(*[("get_weather", '{"city": "Paris"}')] * 3))


def test_the_same_call_four_times_in_a_row_is_a_tool_loop_error():
    repeated = [("get_weather", '{"city": "Paris"}'), ("get_weather", '{ "city":"Paris" }')] * 2
    with pytest.raises(ToolLoopError) as caught:
        check_tool_loop(history_with(*repeated))
    assert caught.value.status == 400 and caught.value.code == "tool_loop_detected"
    assert "`get_weather`" in caught.value.message and "4 times" in caught.value.message


def test_a_different_call_in_between_breaks_the_run():
    same = ("get_weather", '{"city": "Paris"}')
    check_tool_loop(history_with(same, same, ("get_time", "{}"), same, same, same))


def test_usage_counts_calls_and_tool_definitions():
    assert calls_tokens([ToolCall("c", "get_weather", '{"city": "Paris"}')]) > 0
    history = [Message("user", "Weather in Paris?", [])]
    assert (agent_prompt_tokens(history, TOOLS, TEXT, 100_000)
            > agent_prompt_tokens(history, ToolConfig(), TEXT, 100_000) + 40)


# --- OpenAI chat: tools, formats and refusals in; calls out ----------------------------------------------

def chat_body(**fields):
    return {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}


def tool_memo() -> bridge.Memo:
    """A memo as each app has its own (BridgeState.chat_tools)."""
    return bridge.tool_memo()


def parse_chat_tools(body: dict) -> ToolConfig:
    return bridge.parse_chat_tools(body, tool_memo())


FUNCTION = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                             "parameters": WEATHER.parameters}}


def test_chat_tools_choice_and_parallel_calls_are_read():
    config = parse_chat_tools(chat_body(tools=[FUNCTION], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False))
    assert config == ToolConfig((WEATHER.__class__("get_weather", "weather", WEATHER.parameters),), "function",
                                "get_weather", False)


def test_no_tools_is_an_empty_config_even_with_tool_choice_none():
    assert parse_chat_tools(chat_body(tool_choice="none")) == ToolConfig()


@pytest.mark.parametrize("fields,param", [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [FUNCTION], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [FUNCTION], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [FUNCTION], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_chat_tool_fields_are_400s(fields, param):
    with pytest.raises(ApiError) as caught:
        parse_chat_tools(chat_body(**fields))
    assert caught.value.status == 400 and caught.value.param == param


def test_response_formats_are_read():
    assert bridge.parse_response_format(None) == OutputFormat()
    assert bridge.parse_response_format({"type": "json_object"}).kind == "json_object"
    schema = bridge.parse_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object"}, "strict": True}})
    assert (schema.kind, schema.name, schema.schema) == ("json_schema", "p", {"type": "object"})


@pytest.mark.parametrize("field,value", [("logprobs", True), ("top_logprobs", 3), ("audio", {"voice": "x"}),
                                         ("modalities", ["text", "audio"]), ("functions", [{"name": "f"}]),
                                         ("function_call", "auto")])
def test_what_lm_arena_cannot_do_is_a_clear_400(field, value):
    with pytest.raises(ApiError) as caught:
        bridge.refuse_unsupported(chat_body(**{field: value}))
    assert caught.value.status == 400 and caught.value.param == field and "cannot be served" in caught.value.message


def test_harmless_defaults_of_those_fields_are_accepted():
    bridge.refuse_unsupported(chat_body(logprobs=False, top_logprobs=0, modalities=["text"]))


def test_tool_calls_sent_back_by_a_client_are_read():
    [call] = bridge.parse_tool_calls([{"id": "call_1", "type": "function",
                                       "function": {"name": "f", "arguments": '{"a": 1}'}}], "messages[1]")
    assert call == ToolCall("call_1", "f", '{"a": 1}')


def test_malformed_tool_calls_are_a_400_naming_the_call():
    with pytest.raises(ApiError) as caught:
        bridge.parse_tool_calls([{"id": "c", "function": {"arguments": "{}"}}], "messages[1]")
    assert caught.value.param == "messages[1].tool_calls[0]"


def test_calls_go_out_in_openai_shape_with_an_index_when_streamed():
    call = ToolCall("call_1", "f", "{}")
    assert bridge.chat_tool_call(call) == {"id": "call_1", "type": "function",
                                           "function": {"name": "f", "arguments": "{}"}}
    assert bridge.chat_tool_call(call, 2)["index"] == 2


def test_ollama_probes_get_each_usable_model_once():
    models = [{"publicName": "a", "organization": "o", "capabilities": {"outputCapabilities": {"text": True}}},
              {"publicName": "a", "organization": "o", "capabilities": {"outputCapabilities": {"text": True}}}]
    tags = bridge.ollama_models(models, 0)
    assert [m["name"] for m in tags["models"]] == ["a"] and tags["models"][0]["modified_at"] == "1970-01-01T00:00:00Z"


def test_a_history_with_calls_sent_back_re_serialised_is_the_same_conversation():
    ours = [Message("user", "go", []), Message("assistant", "", [], tool_calls=[
        ToolCall("call_1", "get_weather", '{"city": "Paris", "days": 2}')])]
    echoed = [Message("user", "go", []), Message("assistant", "", [], tool_calls=[
        ToolCall("call_1", "get_weather", '{"days":2,"city":"Paris"}')])]
    assert bridge.conversation_fingerprint(1, "m", ours) == bridge.conversation_fingerprint(1, "m", echoed)


def test_histories_that_differ_only_in_a_calls_arguments_are_different_conversations():
    def history(city):
        return [Message("user", "go", []), Message("assistant", "", [], tool_calls=[
            ToolCall("call_1", "get_weather", json.dumps({"city": city}))])]
    assert bridge.conversation_fingerprint(1, "m", history("Paris")) != bridge.conversation_fingerprint(
        1, "m", history("Rome"))


def test_an_assistant_message_with_tool_calls_and_a_tool_result_are_read():
    chat = bridge.parse_chat_request({"model": "m", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"}]})
    assert chat.messages[1].tool_calls == [ToolCall("call_1", "f", "{}")]
    assert (chat.messages[2].role, chat.messages[2].tool_call_id, chat.messages[2].text) == ("tool", "call_1", "done")


def test_without_callable_tools_the_text_passes_delta_by_delta_as_it_came():
    parser = ToolCallParser(ToolConfig(), TEXT, seed="s")
    assert [texts(parser.feed(piece)) for piece in ("line 1\n", "line 2\n", "  ")] == ["line 1\n", "line 2\n", "  "]
    assert parser.text == "line 1\nline 2\n  "


def test_call_ids_take_the_apis_prefix():
    parser = ToolCallParser(TOOLS, TEXT, "msg_1", id_prefix="toolu_")
    [event] = [e for e in parser.feed(call_text()) if e.kind == "call"]
    assert event.call.id.startswith("toolu_") and event.call.id == call_id("msg_1", 0, "toolu_")


# The memo of a chat request's tools (an agent sends the same ones every turn).

def function_tool(name="get_weather", description="weather", parameters=None):
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": parameters or WEATHER.parameters}}


def test_the_same_tools_sent_again_are_read_and_rendered_once():
    memo = tool_memo()
    first = bridge.parse_chat_tools(chat_body(tools=[function_tool()]), memo)
    again = bridge.parse_chat_tools(json.loads(json.dumps(chat_body(tools=[function_tool()]))), memo)
    assert again is first and again.instructions is first.instructions and "get_weather" in first.instructions


@pytest.mark.parametrize("change", [
    {"tools": [function_tool(parameters={"type": "object", "properties": {"town": {"type": "string"}}})]},
    {"tools": [function_tool(description="the weather, in Celsius")]},
    {"tools": [function_tool(parameters={"required": ["city"], "type": "object",   # the same keys, reordered
                                         "properties": {"city": {"type": "string"}}})]},
    {"tools": [function_tool()], "tool_choice": "required"},
    {"tools": [function_tool()], "parallel_tool_calls": False},
])
def test_a_changed_tools_list_or_choice_is_never_served_a_stale_rendering(change):
    memo = tool_memo()
    bridge.parse_chat_tools(chat_body(tools=[function_tool()]), memo)
    changed = bridge.parse_chat_tools(chat_body(**change), memo)
    fresh = bridge.read_chat_tools(chat_body(**change))     # read and rendered without the memo
    assert changed == fresh and changed.instructions == tool_instructions(fresh)


def test_the_tool_memo_stays_bounded_and_keeps_no_huge_tools_list():
    memo = tool_memo()
    for i in range(3 * bridge.TOOL_MEMO_ENTRIES):
        bridge.parse_chat_tools(chat_body(tools=[function_tool(f"tool_{i}")]), memo)
    bridge.parse_chat_tools(chat_body(tools=[function_tool(description="d" * bridge.TOOL_MEMO_LONGEST)]), memo)
    assert len(memo.results) == bridge.TOOL_MEMO_ENTRIES
    assert max(map(len, memo.results)) <= bridge.TOOL_MEMO_LONGEST


def test_two_bridges_in_one_process_keep_their_own_tool_memos(tmp_path):
    first, second = (bridge.bridge_state(bridge.Settings.load(env={"BRIDGE_DB": str(tmp_path / f"{name}.db"),
                                                                   "BRIDGE_SIDECAR": "off"}),
                                         bridge.Store(str(tmp_path / f"{name}.db"))) for name in ("a", "b"))
    try:
        seen_by_first = bridge.parse_chat_tools(chat_body(tools=[function_tool()]), first.chat_tools)
        assert len(first.chat_tools.results) == 1 and len(second.chat_tools.results) == 0
        assert bridge.parse_chat_tools(chat_body(tools=[function_tool()]), second.chat_tools) is not seen_by_first
    finally:
        first.store.close()
        second.store.close()


def test_a_value_key_is_the_values_alone_and_tells_types_apart():
    shared = {"type": "string"}
    assert bridge.value_key({"a": shared, "b": shared}) == bridge.value_key(json.loads('{"a": {"type": "string"}, '
                                                                                       '"b": {"type": "string"}}'))
    keys = [bridge.value_key(v) for v in (1, 1.0, True, "1", None, [1], {"1": 1}, {"parallel_tool_calls": None}, {})]
    assert len(set(keys)) == len(keys)


def test_a_memo_drops_the_least_recently_used_result_and_keeps_no_failure():
    memo = bridge.Memo(entries=2, longest=10)
    for key in ("a", "b", "a", "c"):
        memo.get(key, lambda key=key: key.upper())
    assert list(memo.results) == ["a", "c"]
    with pytest.raises(ApiError):
        memo.get("bad", lambda: bridge.read_chat_tools(chat_body(tools={"a": 1})))
    assert "bad" not in memo.results and memo.get("x" * 11, lambda: 1) == 1 and "x" * 11 not in memo.results


def test_a_memo_used_from_two_threads_never_loses_a_key_between_lookup_and_use():
    class SlowLookup(collections.OrderedDict):      # a lookup that lets the other thread run meanwhile
        def __contains__(self, key):
            found = super().__contains__(key)
            time.sleep(0.05 if key == "a" else 0)
            return found
    memo = bridge.Memo(entries=1, longest=10)
    memo.results = SlowLookup(a="A")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reader = pool.submit(memo.get, "a", lambda: "A")
        time.sleep(0.01)
        evicter = pool.submit(memo.get, "b", lambda: "B")
        assert (reader.result(), evicter.result()) == ("A", "B")
