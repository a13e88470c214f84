"""Anthropic Messages end to end (SPEC §7.2): the official anthropic SDK against the bridge and the emulator."""
import base64
import json

import anthropic
import anthropic.types
import httpx
import pytest
from fake_arena import make_png
from pydantic import TypeAdapter

MODEL = "gemini-3-pro"
EVENT: TypeAdapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
MESSAGE: TypeAdapter = TypeAdapter(anthropic.types.Message)
ERROR: TypeAdapter = TypeAdapter(anthropic.types.ErrorResponse)
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def claude(fresh, api_key):
    return anthropic.Anthropic(base_url=fresh.url, api_key=api_key, max_retries=0, timeout=30)


def reply(text: str) -> list[str]:
    """A scripted LM Arena reply carrying `text`."""
    return ["a0:" + json.dumps(text), 'ad:{"finishReason":"stop"}']


def call(name: str, arguments: dict) -> list[str]:
    return reply("<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>")


def post(proc, key: str, body: dict, path: str = "/v1/messages", **headers: str) -> httpx.Response:
    return httpx.post(proc.url + path, json=body, headers={"x-api-key": key, "anthropic-version": "2023-06-01",
                                                           **headers}, timeout=30)


def sse(response: httpx.Response) -> list[tuple[str, dict]]:
    frames = [f for f in response.text.split("\n\n") if f.strip()]
    out = []
    for frame in frames:
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def hello(**fields) -> dict:
    return {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}], **fields}


def test_a_message_is_answered(claude):
    message = claude.messages.create(**hello())
    assert message.content[0].type == "text" and message.content[0].text == "turn 1: hello"
    assert message.stop_reason == "end_turn" and message.id.startswith("msg_") and message.model == MODEL
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_a_message_body_validates_as_the_sdks_message(fresh, api_key):
    response = post(fresh, api_key, hello(system=[{"type": "text", "text": "Be brief."}]))
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    MESSAGE.validate_python(response.json())


def test_a_stream_ends_in_the_whole_message(claude):
    with claude.messages.stream(**hello()) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "turn 1: hello" and final.content[0].text == text and final.stop_reason == "end_turn"


def test_every_streamed_event_validates_and_comes_in_anthropics_order(fresh, api_key):
    response = post(fresh, api_key, hello(stream=True))
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [(name, data) for name, data in sse(response) if name != "ping"]
    for name, data in events:
        assert name == data["type"]
        EVENT.validate_python(data)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1:-2] == ["content_block_start", *["content_block_delta"] * (len(names) - 5), "content_block_stop"]
    assert "[DONE]" not in response.text


def test_a_slow_reply_gets_ping_events_while_waiting(fresh, api_key, arena):
    arena.configure(first_byte_delay=1.5)
    events = sse(post(fresh, api_key, hello(stream=True)))
    assert ("ping", {"type": "ping"}) in events and events[-1][0] == "message_stop"


def test_thinking_from_a_reasoning_model_is_a_thinking_block(claude):
    message = claude.messages.create(**hello(model="grok-4.1-thinking"))
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "thinking about: hello" and message.content[0].signature
    with claude.messages.stream(**hello(model="grok-4.1-thinking")) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == "thinking about: hello"


def test_a_base64_image_is_uploaded_and_attached(claude, arena):
    png = make_png(5, 3, (1, 2, 3))
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()}
    message = claude.messages.create(**hello(messages=[{"role": "user", "content": [
        {"type": "image", "source": source}, {"type": "text", "text": "what is this?"}]}]))
    assert message.content[0].text == "turn 1: what is this?"
    [request] = arena.chat_requests()
    [attachment] = request["json"]["userMessage"]["experimental_attachments"]
    assert arena.r2[attachment["name"]]["bytes"] == png


def test_a_tool_call_and_its_result_over_two_turns(claude, arena):
    arena.configure(script=[call("get_weather", {"city": "Paris"}), reply("It rains in Paris.")])
    history: list = [{"role": "user", "content": "Weather in Paris?"}]
    first = claude.messages.create(**hello(messages=history, tools=[WEATHER]))
    assert first.stop_reason == "tool_use"
    [use] = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    history += [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "rain"}]}]
    second = claude.messages.create(**hello(messages=history, tools=[WEATHER]))
    assert second.content[0].text == "It rains in Paris." and second.stop_reason == "end_turn"
    followup = arena.chat_requests()[-1]
    assert "post-to-evaluation" in followup["path"] and "rain" in followup["json"]["userMessage"]["content"]


def test_a_streamed_tool_call_is_a_tool_use_block(claude, arena):
    arena.configure(script=[call("get_weather", {"city": "Paris"})])
    with claude.messages.stream(**hello(tools=[WEATHER])) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris"}


def test_count_tokens_needs_no_upstream_request(claude, arena):
    counted = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hello " * 400}],
                                           tools=[WEATHER])
    assert counted.input_tokens > 400
    assert arena.chat_requests() == []


def test_claude_codes_request_path_and_headers_are_accepted(fresh, api_key):
    response = post(fresh, api_key, hello(), "/v1/messages?beta=true",
                    **{"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"})
    assert response.status_code == 200
    assert post(fresh, api_key, hello(), "/api/v1/messages").status_code == 200


def test_a_bearer_key_works_too(fresh, api_key):
    response = httpx.post(fresh.url + "/v1/messages", json=hello(), timeout=30,
                          headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 200


def test_head_on_the_root_is_answered(fresh):
    assert httpx.head(fresh.url + "/").status_code == 200


def test_a_wrong_key_is_an_authentication_error(fresh):
    bad = anthropic.Anthropic(base_url=fresh.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad.messages.create(**hello())
    ERROR.validate_python(caught.value.body)


def test_an_unknown_model_is_not_found(claude):
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(**hello(model="no-such-model"))
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_a_bad_request_is_an_invalid_request_error(claude):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": [{"type": "audio"}]}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"


def test_an_upstream_failure_is_an_api_error(claude, arena):
    arena.fault(times=2, status=502, body={"error": "boom"})
    with pytest.raises(anthropic.InternalServerError) as caught:
        claude.messages.create(**hello())
    assert caught.value.status_code == 502 and caught.value.body["error"]["type"] == "api_error"


def test_a_failure_mid_stream_is_an_error_event(fresh, api_key, arena):
    arena.configure(lines=20)
    arena.fault(times=1, disconnect_after=5)
    events = sse(post(fresh, api_key, hello(stream=True)))
    assert events[-1][0] == "error" and events[-1][1]["type"] == "error"
    ERROR.validate_python(events[-1][1])
