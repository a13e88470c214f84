"""End to end: emulated tool calls, structured output and chat-app semantics on /v1/chat/completions,
driven by the official openai client against the real bridge and the emulator with scripted replies."""
import json

import httpx
import openai
import pytest
from harness import validate

MODEL = "gemini-3-pro"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}}


def block(name="get_weather", **arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments or {"city": "Paris"}}) + "</tool_call>"


def script(arena, *replies, size=9):
    """Each reply's text streamed by the emulator in parts of `size` characters, one reply per request."""
    arena.configure(script=[[f"a0:{json.dumps(text[i:i + size])}" for i in range(0, len(text), size)]
                            + ['ad:{"finishReason":"stop"}'] for text in replies])


def ask(client, messages, **kwargs):
    reply = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
    validate("CreateChatCompletionResponse", reply.model_dump(exclude_unset=True))
    return reply


def stream(fresh, api_key, body):
    """(response, chunks) of a streamed request: every chunk validated, [DONE] last."""
    with httpx.stream("POST", fresh.url + "/v1/chat/completions", json={"model": MODEL, "stream": True, **body},
                      headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    return response, chunks


def deltas(chunks, field):
    return [c["choices"][0]["delta"][field] for c in chunks if c["choices"] and c["choices"][0]["delta"].get(field)]


def kinds(arena):
    return ["follow-up" if "post-to-evaluation" in r["path"] else "new" for r in arena.chat_requests()]


def sent(arena, index=-1):
    return arena.chat_requests()[index]["json"]["userMessage"]["content"]


USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- calls ------------------------------------------------------------------------------------------------

def test_a_single_call_comes_back_as_tool_calls(client, arena):
    script(arena, block())
    reply = ask(client, USER, tools=[WEATHER])
    choice = reply.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "<tool_call>" in sent(arena) and '"name": "get_weather"' in sent(arena)


def test_a_streamed_call_is_tool_calls_deltas_and_finish_reason_tool_calls(fresh, api_key, arena):
    script(arena, block(), size=4)
    _, chunks = stream(fresh, api_key, {"messages": USER, "tools": [WEATHER]})
    [calls] = deltas(chunks, "tool_calls")
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas(chunks, "content") == []


def test_several_blocks_are_parallel_calls(client, arena):
    script(arena, block() + "\n" + block("get_time"))
    calls = ask(client, USER, tools=[WEATHER, TIME]).choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"] and calls[0].id != calls[1].id


def test_with_parallel_calls_off_only_the_first_call_is_made(client, arena):
    script(arena, block() + block("get_time"))
    calls = ask(client, USER, tools=[WEATHER, TIME], parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]


def test_text_before_a_call_streams_before_it(fresh, api_key, arena):
    script(arena, "Let me check that. " + block(), size=5)
    _, chunks = stream(fresh, api_key, {"messages": USER, "tools": [WEATHER]})
    order = ["content" if c["choices"][0]["delta"].get("content") else "call"
             for c in chunks if c["choices"] and (c["choices"][0]["delta"].get("content")
                                                  or c["choices"][0]["delta"].get("tool_calls"))]
    assert order[-1] == "call" and set(order[:-1]) == {"content"} and len(order) > 2
    assert "".join(deltas(chunks, "content")) == "Let me check that."


def test_a_call_to_an_unknown_function_is_text(client, arena):
    script(arena, block("delete_everything"))
    choice = ask(client, USER, tools=[WEATHER]).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == block("delete_everything")


def test_with_tool_choice_none_nothing_is_a_call(client, arena):
    script(arena, block())
    choice = ask(client, USER, tools=[WEATHER], tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.message.content == block()


def test_required_without_a_call_is_asked_once_more_in_the_same_conversation(client, arena):
    script(arena, "It is probably sunny.", block())
    choice = ask(client, USER, tools=[WEATHER], tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    assert kinds(arena) == ["new", "follow-up"] and "needs a function call" in sent(arena)


def test_required_streamed_shows_nothing_of_the_reply_that_was_asked_again(fresh, api_key, arena):
    script(arena, "It is probably sunny.", block())
    _, chunks = stream(fresh, api_key, {"messages": USER, "tools": [WEATHER], "tool_choice": "required"})
    assert deltas(chunks, "content") == [] and len(deltas(chunks, "tool_calls")) == 1


def test_a_named_function_without_a_call_twice_answers_with_what_the_model_wrote(client, arena):
    script(arena, "No.", "Still no.")
    choice = ask(client, USER, tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_time"}}).choices[0]
    assert choice.message.content == "Still no." and choice.finish_reason == "stop"
    assert "`get_time`" in sent(arena)


def run_loop(client, arena, fresh):
    """Call, result, call, result, answer: each request carries the whole history, as agents send it."""
    history = list(USER)
    script(arena, block(), block("get_time"), "Sunny, and it is 10:00.")
    for result in ("sunny, 21 C", "10:00"):
        message = ask(client, history, tools=[WEATHER, TIME]).choices[0].message
        history += [message.model_dump(exclude_unset=True, exclude_none=True),
                    {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": result}]
        if result == "sunny, 21 C":
            fresh.restart()
            fresh.wait_for_models()
    return ask(client, history, tools=[WEATHER, TIME]).choices[0].message.content


def test_a_three_step_tool_loop_stays_in_one_evaluation_across_a_restart(client, arena, fresh):
    assert run_loop(client, arena, fresh) == "Sunny, and it is 10:00."
    assert kinds(arena) == ["new", "follow-up", "follow-up"]
    assert len({r["json"]["id"] for r in arena.chat_requests()}) == 1
    assert sent(arena, 1).startswith("<tool_response id=") and "sunny, 21 C" in sent(arena, 1)
    assert 'name="get_weather"' in sent(arena, 1)


def test_a_repeated_call_is_stopped_by_the_loop_guard_without_an_upstream_request(client, arena):
    history = list(USER)
    for i in range(4):
        history += [{"role": "assistant", "content": None, "tool_calls": [{
                        "id": f"call_{i}", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    assert caught.value.code == "tool_loop_detected" and arena.chat_requests() == []
    validate("ErrorResponse", caught.value.response.json())


def test_a_history_with_calls_the_bridge_never_saw_is_rendered_for_the_model(client, arena):
    history = [*USER, {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_x", "content": "rain"}]
    script(arena, "It rains in Oslo.")
    assert ask(client, history, tools=[WEATHER]).choices[0].message.content == "It rains in Oslo."
    assert '"id": "call_x", "name": "get_weather", "arguments": {"city": "Oslo"}' in sent(arena)
    assert '<tool_response id="call_x" name="get_weather">\nrain\n</tool_response>' in sent(arena)


# --- structured output ------------------------------------------------------------------------------------

def test_json_schema_answer_is_the_json_alone_without_fences(client, arena):
    script(arena, 'Here it is:\n```json\n{"name": "Ada", "age": 36}\n```')
    content = ask(client, USER, response_format=PERSON).choices[0].message.content
    assert json.loads(content) == {"name": "Ada", "age": 36} and "```" not in content
    assert '"required": ["name", "age"]' in sent(arena)


def test_json_schema_streamed_is_the_validated_json_in_one_delta(fresh, api_key, arena):
    script(arena, '```json\n{"name": "Ada", "age": 36}\n```', size=3)
    _, chunks = stream(fresh, api_key, {"messages": USER, "response_format": PERSON})
    [content] = deltas(chunks, "content")
    assert json.loads(content) == {"name": "Ada", "age": 36}


def test_an_invalid_json_answer_is_repaired_once(client, arena):
    script(arena, '{"name": "Ada", "age": "old"}', '{"name": "Ada", "age": 36}')
    content = ask(client, USER, response_format=PERSON).choices[0].message.content
    assert json.loads(content) == {"name": "Ada", "age": 36}
    assert kinds(arena) == ["new", "follow-up"] and "`$.age`" in sent(arena)


def test_an_answer_invalid_twice_is_invalid_model_output(client, arena):
    script(arena, '{"name": "Ada"}', "no idea")
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER, response_format=PERSON)
    assert caught.value.status_code == 502 and caught.value.code == "invalid_model_output"


def test_json_object_answer_is_the_object(client, arena):
    script(arena, 'Sure! {"ok": true}')
    assert ask(client, USER, response_format={"type": "json_object"}).choices[0].message.content == '{"ok": true}'


# --- chat-app semantics -------------------------------------------------------------------------------------

def test_a_trailing_assistant_message_is_a_prefill_the_model_continues(client, arena):
    script(arena, " over the quiet pond")
    reply = ask(client, [{"role": "user", "content": "Write a haiku."},
                         {"role": "assistant", "content": "Autumn moon rises"}])
    assert reply.choices[0].message.content == " over the quiet pond"
    assert sent(arena).rstrip().endswith("[Assistant]\nAutumn moon rises") and "Continue" in sent(arena)


def test_a_trimmed_history_is_signalled_in_a_header(fresh, api_key, arena):
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question {i} " + "x" * 4000},
                    {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last"})
    response = httpx.post(fresh.url + "/v1/chat/completions", json={"model": MODEL, "messages": history},
                          headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    validate("CreateChatCompletionResponse", response.json())
    dropped = int(response.headers["x-bridge-history-trimmed"])
    assert dropped > 0 and f"the {dropped} earliest turns were left out" in fresh.log()
    assert "question 0 " not in sent(arena) and "[User]\nlast" in sent(arena)


@pytest.mark.parametrize("fields,param", [({"logprobs": True}, "logprobs"), ({"n": 2}, "n"),
                                          ({"top_logprobs": 2, "logprobs": True}, "logprobs"),
                                          ({"modalities": ["text", "audio"]}, "modalities")])
def test_what_lm_arena_cannot_do_is_a_clear_400(client, arena, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER, **fields)
    assert caught.value.param == param and arena.chat_requests() == []
    validate("ErrorResponse", caught.value.response.json())


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/audio/transcriptions", "/v1/audio/speech",
                                  "/v1/completions", "/api/v1/embeddings"])
def test_endpoints_lm_arena_cannot_serve_say_why(fresh, api_key, path):
    response = httpx.post(fresh.url + path, json={"model": MODEL, "input": "x", "prompt": "x"},
                          headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 400
    body = response.json()
    validate("ErrorResponse", body)
    assert body["error"]["code"] == "unsupported_endpoint" and "LM Arena" in body["error"]["message"]


def test_the_openai_client_gets_a_bad_request_for_embeddings(client):
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client.embeddings.create(model=MODEL, input="x")


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
def test_ollama_probes_answer_in_ollamas_shape(fresh, prefix):
    tags = httpx.get(fresh.url + prefix + "/api/tags").json()
    assert MODEL in [m["name"] for m in tags["models"]] and all("modified_at" in m for m in tags["models"])
    assert isinstance(httpx.get(fresh.url + prefix + "/api/version").json()["version"], str)
    assert "models" in httpx.get(fresh.url + prefix + "/api/ps").json()


def test_usage_counts_the_tool_definitions_and_the_calls(client, arena):
    script(arena, "Hello.", "Hello.", block())
    plain = ask(client, USER).usage
    with_tools = ask(client, USER, tools=[WEATHER, TIME]).usage
    called = ask(client, USER, tools=[WEATHER, TIME]).usage
    assert with_tools.prompt_tokens > plain.prompt_tokens + 50
    assert called.completion_tokens > with_tools.completion_tokens
