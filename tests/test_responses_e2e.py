"""OpenAI Responses end to end (SPEC §7.3): the official openai SDK's responses client against the bridge and
the emulator; every body and event validated against OpenAI's schemas."""
import base64
import json

import httpx
import openai
import pytest
from fake_arena import make_png
from harness import validate

MODEL = "gemini-3-pro"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": False,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def reply(text: str) -> list[str]:
    return ["a0:" + json.dumps(text), 'ad:{"finishReason":"stop"}']


def call(name: str, arguments: dict) -> list[str]:
    return reply("<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>")


def post(proc, key: str, body: dict, path: str = "/v1/responses") -> httpx.Response:
    return httpx.post(proc.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def events(response: httpx.Response) -> list[dict]:
    """Each event's data, checked: the event line names its type, sequence numbers count up, the schema holds."""
    out: list[dict] = []
    for frame in (f for f in response.text.split("\n\n") if f.strip()):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"] and data["sequence_number"] == len(out)
        validate("ResponseStreamEvent", data)
        out.append(data)
    return out


def test_a_response_is_answered(client):
    response = client.responses.create(model=MODEL, input="hello")
    assert response.output_text == "turn 1: hello" and response.status == "completed"
    assert response.id.startswith("resp_") and response.usage.input_tokens > 0


def test_a_response_body_validates(fresh, api_key):
    response = post(fresh, api_key, {"model": MODEL, "input": "hello", "instructions": "Be brief."})
    assert response.status_code == 200
    validate("Response", response.json())


def test_a_stream_validates_and_ends_completed(fresh, api_key):
    data = events(post(fresh, api_key, {"model": MODEL, "input": "hello", "stream": True}))
    assert [d["type"] for d in data[:2]] == ["response.created", "response.in_progress"]
    assert data[-1]["type"] == "response.completed" and data[-1]["response"]["output_text"] == "turn 1: hello"
    deltas = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    assert deltas == "turn 1: hello"


def test_the_sdks_stream_helper_gets_the_final_response(client):
    with client.responses.stream(model=MODEL, input="hello") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "turn 1: hello"


def test_a_reasoning_model_gives_a_reasoning_item(client):
    response = client.responses.create(model="grok-4.1-thinking", input="hello")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == "thinking about: hello"


def test_an_input_image_is_uploaded_and_attached(client, arena):
    png = make_png(5, 3, (1, 2, 3))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    response = client.responses.create(model=MODEL, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": url, "detail": "auto"}]}])
    assert response.output_text == "turn 1: what is this?"
    [request] = arena.chat_requests()
    [attachment] = request["json"]["userMessage"]["experimental_attachments"]
    assert arena.r2[attachment["name"]]["bytes"] == png


def test_a_tool_call_and_its_result_over_two_turns(client, arena):
    arena.configure(script=[call("get_weather", {"city": "Paris"}), reply("It rains in Paris.")])
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    [function_call] = [item for item in first.output if item.type == "function_call"]
    assert function_call.name == "get_weather" and json.loads(function_call.arguments) == {"city": "Paris"}
    history = [{"role": "user", "content": "Weather in Paris?"}, *[item.model_dump() for item in first.output],
               {"type": "function_call_output", "call_id": function_call.call_id, "output": "rain"}]
    second = client.responses.create(model=MODEL, input=history, tools=[WEATHER])
    assert second.output_text == "It rains in Paris."
    followup = arena.chat_requests()[-1]
    assert "post-to-evaluation" in followup["path"] and "rain" in followup["json"]["userMessage"]["content"]


def test_a_streamed_call_has_its_arguments_as_deltas(fresh, api_key, arena):
    arena.configure(script=[call("get_weather", {"city": "Paris"})])
    data = events(post(fresh, api_key, {"model": MODEL, "input": "go", "tools": [WEATHER], "stream": True}))
    done = next(d for d in data if d["type"] == "response.function_call_arguments.done")
    assert json.loads(done["arguments"]) == {"city": "Paris"} and done["name"] == "get_weather"


def test_previous_response_id_continues_a_stored_response(client, arena):
    first = client.responses.create(model=MODEL, input="one")
    second = client.responses.create(model=MODEL, input="two", previous_response_id=first.id)
    assert second.output_text == "turn 2: two"
    assert "post-to-evaluation" in arena.chat_requests()[-1]["path"]


def test_an_unknown_previous_response_id_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="two", previous_response_id="resp_nope")
    assert caught.value.code == "previous_response_not_found"


def test_another_keys_response_cannot_be_continued(client, fresh):
    first = client.responses.create(model=MODEL, input="one")
    other = openai.OpenAI(base_url=fresh.base_url, api_key=fresh.create_key(name="other"), max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        other.responses.create(model=MODEL, input="two", previous_response_id=first.id)
    assert caught.value.code == "previous_response_not_found"


def test_a_response_not_stored_cannot_be_continued(client):
    first = client.responses.create(model=MODEL, input="one", store=False)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="two", previous_response_id=first.id)


def test_an_empty_input_probe_is_answered_without_lm_arena(fresh, api_key, arena):
    response = post(fresh, api_key, {"model": MODEL, "input": []})
    assert response.status_code == 200 and response.json()["output"] == []
    validate("Response", response.json())
    assert arena.chat_requests() == []


def test_a_json_schema_format_gives_the_json_alone(client, arena):
    arena.configure(script=[reply('Here it is:\n```json\n{"city": "Paris"}\n```')])
    response = client.responses.create(model=MODEL, input="a city", text={"format": {
        "type": "json_schema", "name": "city", "schema": WEATHER["parameters"], "strict": True}})
    assert json.loads(response.output_text) == {"city": "Paris"}


def test_the_api_prefix_works_too(fresh, api_key):
    assert post(fresh, api_key, {"model": MODEL, "input": "hello"}, "/api/v1/responses").status_code == 200


def test_a_wrong_key_is_an_authentication_error(fresh):
    bad = openai.OpenAI(base_url=fresh.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.responses.create(model=MODEL, input="hello")


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hello")


def test_an_upstream_failure_is_a_server_error(client, arena):
    arena.fault(times=2, status=502, body={"error": "boom"})
    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model=MODEL, input="hello")
    assert caught.value.status_code == 502


def test_a_failure_mid_stream_is_response_failed(fresh, api_key, arena):
    arena.configure(lines=20)
    arena.fault(times=1, disconnect_after=5)
    data = events(post(fresh, api_key, {"model": MODEL, "input": "hello", "stream": True}))
    assert data[-1]["type"] == "response.failed" and data[-1]["response"]["error"]["code"] == "server_error"
