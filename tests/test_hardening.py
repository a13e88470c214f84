"""Unit tests of the hardening (issue 19): pure functions, no network."""
import json
import time

import pytest

import bridge


def test_trimming_keeps_the_newest_blocks_that_fit():
    head, body = ["system"], [f"block {i}" for i in range(20)]
    text, dropped = bridge.keep_newest(head, body, 60)
    assert len(text) <= 60 and text == "\n\n".join(head + body[dropped:])
    assert len("\n\n".join(head + body[dropped - 1:])) > 60


def test_trimming_is_linear_in_the_history():
    body = [f"message {i}" for i in range(50_000)]
    started = time.perf_counter()
    text, dropped = bridge.keep_newest([], body, 100_000)
    assert time.perf_counter() - started < 1.0 and dropped > 40_000 and len(text) <= 100_000


PIECEWISE_JSON = ['{}', ' {\n} ', '{"a":1}', '{"a":[1,[2],{"b":[3]}],"c":"x"}', '{"a":[]}', '{ "a" : [ ] , "b" : [ 1 , 2 ] }',
                  '{"a":1,"a":2}', '{"m":[{"content":"\\ud83d\\ude00 \u00e9"}]}', '[1,2]', '"x"', '{"a":{"b":[1]}}']
BAD_JSON = ['{', '{"a"}', '{"a":1,}', '{"a":[1,]}', '{"a":[1 2]}', '{"a":1} x', '{1:2}', '{"a":[', '{"a":1 "b":2}', '']


@pytest.mark.parametrize("text", PIECEWISE_JSON)
def test_a_large_body_parsed_in_pieces_is_what_json_loads_gives(text):
    assert bridge.loads_in_pieces(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text", BAD_JSON)
def test_a_large_body_parsed_in_pieces_refuses_what_json_loads_refuses(text):
    with pytest.raises(ValueError):
        bridge.loads_in_pieces(text.encode())


def test_a_large_body_is_parsed_without_one_long_call_of_the_parser(monkeypatch):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 100}] * 20_000}).encode()
    sizes, decode = [], bridge.JSON_DECODER.raw_decode

    def measured(text, at):
        value, end = decode(text, at)
        sizes.append(end - at)
        return value, end
    monkeypatch.setattr(bridge.JSON_DECODER, "raw_decode", measured)
    assert bridge.parse_json_body(body) == json.loads(body) and max(sizes) < 1000


def test_a_surrogate_escape_across_two_search_pieces_is_found():
    body = b" " * (bridge.PIECE_BYTES - 3) + b'"\\ud800"'
    assert bridge.surrogate_hinted(body) and not bridge.surrogate_hinted(body.replace(b"d800", b"0041"))


def test_a_fingerprint_hashed_slice_by_slice_is_the_one_of_the_whole_history():
    history = [["user", f"message {i} \u00e9 \U0001f600"] for i in range(2 * bridge.FINGERPRINT_SLICE + 1)]
    for messages in ([], history[:1], history[:bridge.FINGERPRINT_SLICE], history):
        whole = json.dumps([7, "gpt-x", messages], ensure_ascii=False, separators=(",", ":"))
        assert bridge.fingerprint_of(7, "gpt-x", messages) == bridge.sha256_hex(whole)


def test_an_emoji_split_between_two_text_parts_is_joined():
    events = bridge.parse_stream(b'a0:"smile \\ud83d"\na0:"\\ude00 ok"\nad:{"finishReason":"stop"}\n')
    assert "".join(e.value for e in events if e.kind == "text") == "smile \U0001f600 ok"
    assert events[-1].kind == "finish"


def test_a_lone_surrogate_becomes_a_replacement_character():
    events = bridge.parse_stream(b'a0:"a\\udc00b"\na0:"c\\ud800"\na0:"d"\nad:{"finishReason":"stop"}\n')
    text = "".join(e.value for e in events if e.kind == "text")
    assert text == "a\ufffdbc\ufffdd" and text.encode("utf-8")


def test_a_high_surrogate_at_the_end_of_the_reply_is_not_lost():
    events = bridge.parse_stream(b'ag:"think \\ud83d"\n')
    assert [(e.kind, e.value) for e in events] == [("reasoning", "think "), ("reasoning", "\ufffd")]


def test_a_half_pair_before_the_finish_comes_before_it():
    events = bridge.parse_stream(b'a0:"x\\ud83d"\nad:{"finishReason":"stop"}\n')
    assert [(e.kind, e.value) for e in events][:2] == [("text", "x"), ("text", "\ufffd")]
    assert events[-1].kind == "finish"


def refusal(body: bytes) -> bridge.ApiError:
    try:
        bridge.parse_json_body(body)
    except bridge.ApiError as error:
        return error
    raise AssertionError("accepted")


def test_a_lone_surrogate_in_a_body_is_a_400_naming_the_field():
    error = refusal(b'{"model": "m", "messages": [{"role": "user", "content": "x\\udc00"}]}')
    assert error.status == 400 and error.param == "messages[0].content"
    assert refusal(b'{"model": "\\ud83d"}').param == "model"
    assert refusal(b'{"\\ud83d": {"a": "\\ud83d"}}').param == "body"


def test_a_surrogate_pair_in_a_body_is_text():
    assert bridge.parse_json_body(b'{"content": "\\ud83d\\ude00"}') == {"content": "\U0001f600"}


def test_one_bad_usage_row_does_not_lose_the_others(tmp_path):
    store = bridge.Store(str(tmp_path / "bridge.db"))
    row = {"ts": 1.0, "key_id": 1, "status": 200, "latency_ms": 1.0, "prompt_tokens": 1, "completion_tokens": 1,
           "error": None}
    store.record_usage([{**row, "model": f"m{i}"} for i in range(40)] + [{**row, "model": "bad \udc00"}])
    models = [r["model"] for r in store.rows("SELECT model FROM usage ORDER BY id")]
    assert models == [f"m{i}" for i in range(40)] + ["bad \ufffd"]
    store.close()


@pytest.mark.parametrize("address", [
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "2002:7f00:1::", "2002:c0a8:101::1", "::127.0.0.1", "::10.0.0.1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2001:0:4136:e378:8000:63bf:80ff:fffe",
])
def test_an_ipv6_address_embedding_a_private_ipv4_is_not_public(address):
    assert not bridge.is_public(address)


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "8.8.8.8", "2606:4700:4700::1111"])
def test_an_ipv6_address_embedding_a_public_ipv4_is_public(address):
    assert bridge.is_public(address)


@pytest.mark.parametrize("url", ["http://[::1", "http://example.com:99999/x.png", "http://exa mple.com/a.png",
                                 "https:///x.png", "ftp://example.com/x.png", "http://[zz::1]/x.png"])
def test_a_malformed_image_url_is_a_400(url):
    with pytest.raises(bridge.ApiError) as refused:
        bridge.checked_url(url, "messages[0] image 1")
    assert refused.value.status == 400 and refused.value.code == "invalid_image_url"


def test_generated_images_are_downloaded_only_from_lm_arenas_storage():
    origin = "https://arena.ai"
    assert bridge.is_storage_url("https://messages-prod.27c8.r2.cloudflarestorage.com/u/1.png?X-Amz-Signature=x",
                                 origin)
    assert bridge.is_storage_url("https://arena.ai/r2/k.png", origin)
    for url in ("http://127.0.0.1:8000/secret", "https://arena.ai.evil.com/x.png", "http://arena.ai/x.png",
                "https://r2.cloudflarestorage.com.evil.com/x", "http://x.r2.cloudflarestorage.com/y", "http://[::1"):
        assert not bridge.is_storage_url(url, origin), url
