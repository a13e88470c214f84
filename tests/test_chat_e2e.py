"""End to end: the official openai client -> the real bridge (Hypercorn) -> the LM Arena emulator."""
import json

import httpx
import openai
import pytest
from harness import upstream_aborted, validate

MODEL = "gemini-3-pro"


def chat(client, content="hi", **kwargs):
    return client.chat.completions.create(model=kwargs.pop("model", MODEL),
                                          messages=[{"role": "user", "content": content}], **kwargs)


def raw_stream(fresh, api_key, body, prefix="/v1"):
    """(status, events) of a streamed request, events as parsed JSON or "[DONE]"."""
    with httpx.stream("POST", fresh.url + prefix + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {api_key}"}) as response:
        lines = [line for line in response.iter_lines()]
    events = [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    return response, events, lines


def test_non_streaming_reply_is_a_valid_chat_completion(client):
    reply = chat(client, "hello there")
    assert reply.choices[0].message.content == "turn 1: hello there"
    assert reply.choices[0].finish_reason == "stop"
    body = reply.model_dump(exclude_unset=True)
    validate("CreateChatCompletionResponse", body)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0


def test_streaming_chunks_are_valid_and_end_with_done(fresh, api_key):
    response, events, _ = raw_stream(fresh, api_key, {"model": MODEL, "stream": True,
                                                      "messages": [{"role": "user", "content": "stream me"}]})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "turn 1: stream me"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_with_openai_client_and_include_usage(client):
    stream = chat(client, "count", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "turn 1: count"


def test_api_v1_prefix_serves_the_same_routes(fresh, api_key):
    models = httpx.get(fresh.url + "/api/v1/models", headers={"Authorization": f"Bearer {api_key}"}).json()
    validate("ListModelsResponse", models)
    reply = openai.OpenAI(base_url=fresh.url + "/api/v1", api_key=api_key, max_retries=0)
    assert chat(reply, "x").choices[0].message.content == "turn 1: x"


def test_models_list_has_only_usable_models(client):
    ids = [m.id for m in client.models.list().data]
    assert "gemini-3-pro" in ids and "flux-2-flex" in ids and "gemini-3-pro-grounding" in ids
    assert len(ids) == len(set(ids)) and "stellarblade" not in ids


def test_reasoning_goes_to_reasoning_content(client):
    reply = chat(client, "why", model="grok-4.1-thinking")
    message = reply.model_dump()["choices"][0]["message"]
    assert message["reasoning_content"] == "thinking about: why"
    assert message["content"] == "turn 1: why"


def test_reasoning_streams_as_reasoning_content_deltas(client):
    chunks = list(chat(client, "why", model="grok-4.1-thinking", stream=True))
    reasoning = "".join(c.model_dump()["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c.choices)
    assert reasoning == "thinking about: why"


def test_search_citations_become_annotations_and_a_sources_footer(client):
    reply = chat(client, "eiffel tower", model="gemini-3-pro-grounding")
    message = reply.choices[0].message
    assert "[1]" in message.content and "<!--citation" not in message.content and "\n\nSources:\n1. [" in message.content
    annotation = message.annotations[0]
    assert annotation.type == "url_citation"
    assert message.content[annotation.url_citation.start_index:annotation.url_citation.end_index].startswith("[")
    validate("CreateChatCompletionResponse", reply.model_dump(exclude_unset=True))


def test_image_model_answers_with_markdown_image(client, arena):
    reply = chat(client, "a red square", model="flux-2-flex")
    content = reply.choices[0].message.content
    assert content.startswith("![image](" + arena.url + "/r2/")
    url = content[len("![image]("):-1]
    assert httpx.get(url).content.startswith(b"\x89PNG")


@pytest.mark.parametrize("knobs", [
    {"data_prefix": True}, {"crlf": True}, {"no_final_newline": True}, {"split": "random"},
    {"split": "coalesce"}, {"b_lines": True}, {"noise_codes": True}, {"heartbeat_every": 0.01, "line_delay": 0.02},
])
def test_every_stream_framing_gives_the_same_reply(client, arena, knobs):
    arena.configure(**knobs)
    assert chat(client, "same words here").choices[0].message.content == "turn 1: same words here"
    assert "".join(c.choices[0].delta.content or "" for c in chat(client, "streamed too", stream=True) if c.choices) \
        == "turn 1: streamed too"


def test_unicode_survives_the_relay(client, arena):
    arena.configure(unicode=True, split="random")
    text = chat(client, "ok").choices[0].message.content
    assert "😀" in text and "\ufffd" not in text


@pytest.mark.parametrize("reason,expected", [("length", "length"), ("content-filter", "content_filter"),
                                             ("unknown", "stop")])
def test_finish_reasons_are_mapped(client, arena, reason, expected):
    arena.configure(finish_reason=reason)
    assert chat(client).choices[0].finish_reason == expected


def test_upstream_error_part_after_content_is_an_sse_error_event(fresh, api_key, arena):
    arena.configure(finish_reason="error")
    _response, events, _ = raw_stream(fresh, api_key, {"model": MODEL, "stream": True,
                                                      "messages": [{"role": "user", "content": "x"}]})
    assert events[-1] == "[DONE]" and "error" in events[-2]
    validate("ErrorResponse", events[-2])


# --- bad input -------------------------------------------------------------------------------------------

def post(fresh, key, body, raw=None, headers=None):
    headers = {"Authorization": f"Bearer {key}", **(headers or {})} if key else dict(headers or {})
    return httpx.post(fresh.url + "/v1/chat/completions", json=body if raw is None else None,
                      content=raw, headers=headers, timeout=30)


def assert_error(response, status, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    validate("ErrorResponse", body)
    assert isinstance(body["error"]["code"], str)
    if code:
        assert body["error"]["code"] == code
    return body["error"]


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}


def test_invalid_json_is_400(fresh, api_key):
    assert_error(post(fresh, api_key, None, raw=b"{not json"), 400, "invalid_json")


def test_missing_messages_is_400(fresh, api_key):
    assert assert_error(post(fresh, api_key, {"model": MODEL}), 400)["param"] == "messages"


def test_unknown_model_is_404(fresh, api_key):
    assert_error(post(fresh, api_key, {**GOOD, "model": "nope"}), 404, "model_not_found")


def test_stealth_model_is_403(fresh, api_key):
    assert_error(post(fresh, api_key, {**GOOD, "model": "stellarblade"}), 403, "model_not_available")


def test_no_key_is_401(fresh):
    assert_error(post(fresh, None, GOOD), 401, "missing_api_key")


def test_wrong_key_is_401_and_never_falls_back(fresh, api_key):
    assert_error(post(fresh, "sk-arena-wrong", GOOD), 401, "invalid_api_key")


def test_models_route_needs_a_key(fresh):
    assert_error(httpx.get(fresh.url + "/v1/models"), 401)


def test_a_wrong_method_is_405_naming_the_allowed_ones_in_allow(fresh, api_key):
    response = httpx.get(fresh.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"})
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in [m.strip() for m in response.headers["allow"].split(",")]


@pytest.mark.parametrize("role", [{"name": "user"}, ["user"], 7])
def test_a_role_that_is_not_a_string_is_400(fresh, api_key, role):
    body = {"model": MODEL, "messages": [{"role": role, "content": "x"}]}
    assert assert_error(post(fresh, api_key, body), 400)["param"] == "messages[0].role"


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_json_nested_too_deeply_is_400(fresh, api_key, depth):
    raw = ('{"model": "m", "messages": ' + "[" * depth + "]" * depth + "}").encode()
    assert_error(post(fresh, api_key, None, raw=raw), 400, "invalid_json")


def test_a_slash_redirect_is_relative_whatever_the_host_header_says(fresh):
    response = httpx.get(fresh.url + "/dashboard/?x=1", headers={"Host": "evil.example"})
    assert response.status_code == 307 and response.headers["location"] == "/dashboard?x=1"


def test_rpm_over_the_limit_is_429_with_retry_after(fresh):
    key = fresh.create_key(rpm=2)
    assert post(fresh, key, GOOD).status_code == 200
    assert post(fresh, key, GOOD).status_code == 200
    response = post(fresh, key, GOOD)
    assert_error(response, 429, "rate_limit_exceeded")
    assert 1 <= int(response.headers["retry-after"]) <= 60


def test_oversized_body_is_413(fresh, api_key):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (21 * 1024 * 1024)}]}
    assert_error(post(fresh, api_key, big), 413, "request_too_large")


@pytest.mark.parametrize("status,expected", [(500, 502), (502, 502), (503, 502)])
def test_upstream_5xx_is_retried_once_then_502(fresh, api_key, arena, status, expected):
    arena.fault(times=2, status=status, body={"error": "boom"})
    assert_error(post(fresh, api_key, GOOD), expected)
    assert len(arena.chat_requests()) == 2


def test_one_upstream_5xx_is_healed_by_the_retry(fresh, api_key, arena):
    arena.fault(times=1, status=502, html=True)
    assert post(fresh, api_key, GOOD).json()["choices"][0]["message"]["content"] == "turn 1: x"


def test_upstream_400_is_a_400(fresh, api_key, arena):
    arena.fault(times=1, status=400, body={"error": "Invalid content"})
    assert "Invalid content" in assert_error(post(fresh, api_key, GOOD), 400)["message"]


def test_moderation_422_is_content_filter(fresh, api_key, arena):
    arena.fault(times=1, status=422, body={"error": "flagged"})
    assert_error(post(fresh, api_key, GOOD), 422, "content_filter")


def test_mid_stream_disconnect_becomes_an_error_event(fresh, api_key, arena):
    arena.configure(lines=20)
    arena.fault(times=1, disconnect_after=5)
    response, events, _ = raw_stream(fresh, api_key, {**GOOD, "stream": True})
    assert response.status_code == 200 and events[-1] == "[DONE]" and "error" in events[-2]


@pytest.mark.parametrize("variant", ["empty", "only_ad", "only_a3", "has_arena_error", "json_error"])
def test_content_less_reply_is_retried_once_with_new_ids(fresh, api_key, arena, variant):
    arena.fault(times=1, content_less=variant)
    assert post(fresh, api_key, GOOD).json()["choices"][0]["message"]["content"] == "turn 1: x"
    first, second = arena.chat_requests()
    assert first["json"]["id"] != second["json"]["id"]


def test_content_less_twice_is_a_502_before_any_byte(fresh, api_key, arena):
    arena.fault(times=2, content_less="empty")
    response, _, _ = raw_stream(fresh, api_key, {**GOOD, "stream": True})
    assert response.status_code == 502


def test_slow_first_byte_gets_keepalive_pings(fresh, api_key, arena):
    arena.configure(first_byte_delay=1.5)
    _response, events, lines = raw_stream(fresh, api_key, {**GOOD, "stream": True})
    assert ": ping" in lines and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == "turn 1: x"


def test_client_disconnect_cancels_the_upstream_request(fresh, api_key, arena):
    arena.configure(lines=400, line_delay=0.05)
    fresh.abandon_stream(api_key, GOOD, after="line 3")
    assert upstream_aborted(arena, timeout=5)


def test_the_server_keeps_serving_after_bad_input(fresh, api_key):
    post(fresh, api_key, None, raw=b"\xff\xfe")
    assert post(fresh, api_key, GOOD).status_code == 200


def test_no_secret_appears_in_the_log(fresh, api_key, arena):
    arena.configure(recaptcha="off")
    chat(openai.OpenAI(base_url=fresh.base_url, api_key=api_key, max_retries=0), "secret check")
    account = fresh.store.accounts()[0]
    log = fresh.log()
    assert api_key not in log and account["auth"] not in log and account["auth"][:40] not in log


def test_an_unreachable_arena_is_an_openai_shaped_502(tmp_path):
    import subprocess
    import sys

    from harness import ROOT, BridgeProcess, free_port
    port = free_port()
    emulator = subprocess.Popen([sys.executable, f"{ROOT}/tests/fake_arena.py", "--port", str(port), "--no-recaptcha"],
                                stdout=subprocess.PIPE, text=True)
    emulator.stdout.readline()
    session = emulator.stdout.readline().strip().split("arena-auth-prod-v1=", 1)[1]
    proc = BridgeProcess(f"http://127.0.0.1:{port}", str(tmp_path)).start()
    try:
        proc.wait_for_models()
        proc.set_accounts(session)
        key = proc.create_key()
        emulator.kill()
        emulator.wait()
        assert_error(post(proc, key, GOOD), 502, "upstream_unreachable")
        assert_error(post(proc, key, {**GOOD, "stream": True}), 502, "upstream_unreachable")
        pixel = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"
                 "CAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="}}
        vision = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, pixel]}]}
        assert_error(post(proc, key, vision), 502)
    finally:
        proc.stop()
        emulator.kill()
