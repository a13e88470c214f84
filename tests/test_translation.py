"""OpenAI requests in, LM Arena turns out, and events back to OpenAI shapes: pure functions."""
import json
import os

import pytest

import bridge
from bridge import ApiError, Message, ReplyBuilder, parse_chat_request, render_transcript

with open(os.path.join(os.path.dirname(__file__), "fixtures", "models.json"), encoding="utf-8") as _models:
    MODELS = json.load(_models)


def test_string_and_part_contents_are_accepted():
    chat = parse_chat_request({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]})
    assert chat.messages[1].text == "hi" and chat.messages[1].images == ["data:image/png;base64,AA=="]


@pytest.mark.parametrize("body,param", [
    ([], None), ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m"}, "messages"), ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
])
def test_invalid_requests_are_400_with_the_param(body, param):
    with pytest.raises(ApiError) as caught:
        parse_chat_request(body)
    assert caught.value.status == 400 and caught.value.param == param and isinstance(caught.value.code, str)


def test_unknown_fields_are_ignored():
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.2,
                               "tools": [], "user": "u", "stream_options": {"include_usage": True}, "stream": True})
    assert chat.include_usage and chat.stream


def test_model_lookup_prefers_the_text_entry_of_a_duplicate_name():
    model = bridge.resolve_model(MODELS, "gpt-5.2")
    assert bridge.choose_modality(model) == "chat"


def test_stealth_model_is_refused_with_403():
    stealth = next(m for m in MODELS if not m.get("organization") and bridge.choose_modality(m))
    with pytest.raises(ApiError) as caught:
        bridge.resolve_model(MODELS, stealth["publicName"])
    assert caught.value.status == 403


def test_unknown_model_is_404():
    with pytest.raises(ApiError) as caught:
        bridge.resolve_model(MODELS, "no-such-model")
    assert caught.value.status == 404 and caught.value.code == "model_not_found"


def test_modality_follows_capabilities():
    assert bridge.choose_modality(bridge.resolve_model(MODELS, "gemini-3-pro-grounding")) == "search"
    assert bridge.choose_modality(bridge.resolve_model(MODELS, "flux-2-flex")) == "image"
    assert bridge.choose_modality(bridge.resolve_model(MODELS, "gemini-3-pro")) == "chat"


def test_usable_models_match_the_snapshot_counts():
    assert len(bridge.usable_models(MODELS)) == 156


def test_single_user_message_is_sent_as_is():
    assert render_transcript([Message("user", "hello", [])], 1000) == ("hello", 0)


def test_history_becomes_a_role_labelled_transcript_with_system_first():
    text, dropped = render_transcript([Message("user", "one", []), Message("assistant", "two", []),
                                       Message("system", "rules", []), Message("user", "three", [])], 1000)
    assert text == "[System]\nrules\n\n[User]\none\n\n[Assistant]\ntwo\n\n[User]\nthree" and dropped == 0


def test_long_history_keeps_the_newest_turns():
    messages = [Message("user" if i % 2 == 0 else "assistant", f"turn {i} " + "x" * 100, []) for i in range(21)]
    text, dropped = render_transcript(messages, 500)
    assert dropped > 0 and text.endswith("turn 20 " + "x" * 100) and "turn 0 " not in text


def test_earlier_images_are_described_in_the_transcript():
    text, _ = render_transcript([Message("user", "look", ["data:x"]), Message("assistant", "a cat", []),
                                 Message("user", "again", [])], 1000)
    assert "look\n[image]" in text


def test_uuid7_has_version_and_variant_bits():
    value = bridge.uuid7()
    assert value[14] == "7" and value[19] in "89ab" and len(value) == 36


def test_citation_markers_split_across_parts_become_numbers_and_a_footer():
    builder = ReplyBuilder()
    builder.add_sources([{"id": "1", "url": "https://a.org", "title": "A"}, {"id": "2", "url": "https://b.org", "title": "B"}])
    out = builder.text("Tall<!--citation:1--> and old<!--cita") + builder.text("tion:2-->.")
    out += builder.finish()
    assert out.startswith("Tall[1] and old[2].\n\nSources:\n1. [A](https://a.org)\n2. [B](https://b.org)")
    first = builder.annotations[0]["url_citation"]
    assert out[first["start_index"]:first["end_index"]] == "[A](https://a.org)"


def test_a_lone_angle_bracket_is_not_held_forever():
    builder = ReplyBuilder()
    assert builder.text("a < b") == "a < b"
    assert builder.text("x <") == "x " and builder.text("y") == "<y"


def test_images_come_after_the_text_as_markdown():
    builder = ReplyBuilder()
    builder.images.extend(["https://i/1.png", "https://i/2.png"])
    builder.text("Here:")
    builder.finish()
    assert builder.full_content == "Here:\n\n![image](https://i/1.png)\n\n![image](https://i/2.png)"


def test_finish_reasons_map_to_openai_values():
    assert [bridge.openai_finish_reason(r) for r in ("stop", "unknown", "length", "content-filter", "other")] == \
        ["stop", "stop", "length", "content_filter", "stop"]


def test_fingerprint_ignores_whitespace_and_the_sources_footer():
    a = [Message("user", "hi", []), Message("assistant", "Answer[1].\n\nSources:\n1. [A](https://a)", [])]
    b = [Message("user", " hi ", []), Message("assistant", "Answer[1].  ", [])]
    assert bridge.conversation_fingerprint(1, "m", a) == bridge.conversation_fingerprint(1, "m", b)
    assert bridge.conversation_fingerprint(1, "m", a) != bridge.conversation_fingerprint(2, "m", a)


@pytest.mark.parametrize("role", [{"name": "user"}, ["user"]])
@pytest.mark.parametrize("parse", [bridge.parse_chat_request,
                                   lambda body: bridge.parse_anthropic_request(body, bridge.tool_memo()),
                                   lambda body: bridge.parse_responses_request(body, bridge.tool_memo())])
def test_a_role_that_is_an_object_or_an_array_is_a_400_in_every_api(parse, role):
    message = {"role": role, "content": "x"}
    body = {"model": "m", "max_tokens": 5, "messages": [message], "input": [{**message, "type": "message"}]}
    with pytest.raises(ApiError) as refused:
        parse(body)
    assert refused.value.status == 400 and refused.value.param.endswith(".role")
