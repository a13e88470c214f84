"""The stream parser is a pure function over bytes: every framing and line variant of arena-protocol §7."""
import json
import random

import pytest

from bridge import Event, StreamParser, json_payload, parse_stream, parse_stream_line, utf16_len


def kinds(events):
    return [(e.kind, e.value) for e in events]


def test_text_parts_are_appended_in_order():
    events = parse_stream(b'a0:"Hello "\na0:"there!"\nad:{"finishReason":"stop"}\n')
    assert kinds(events) == [("text", "Hello "), ("text", "there!"), ("finish", "stop")]


def test_reasoning_is_kept_apart_from_text():
    events = parse_stream(b'ag:"think"\na0:"answer"\nad:{"finishReason":"stop","usage":{"promptTokens":9,"completionTokens":14}}\n')
    assert kinds(events)[:2] == [("reasoning", "think"), ("text", "answer")]
    assert events[-1].usage == {"prompt_tokens": 9, "completion_tokens": 14}


def test_snake_case_usage_is_accepted():
    events = parse_stream(b'ad:{"finishReason":"stop","usage":{"prompt_tokens":1,"completion_tokens":2}}')
    assert events[0].usage == {"prompt_tokens": 1, "completion_tokens": 2}


def test_data_prefix_and_crlf_are_stripped():
    events = parse_stream(b'data: a0:"x"\r\ndata:a0:"y"\r\n\r\nad:{"finishReason":"stop"}\r\n')
    assert kinds(events) == [("text", "x"), ("text", "y"), ("finish", "stop")]


def test_final_line_without_newline_is_parsed():
    assert kinds(parse_stream(b'a0:"x"\nad:{"finishReason":"length"}')) == [("text", "x"), ("finish", "length")]


def test_lines_split_at_every_byte_offset_give_the_same_events():
    body = 'a0:"héllo 世界 😀"\nag:"r"\na0:"\\ud83d\\ude00 \\"q\\"\\n"\nad:{"finishReason":"stop"}\n'.encode()
    whole = kinds(parse_stream(body))
    for cut in range(1, len(body)):
        assert kinds(parse_stream([body[:cut], body[cut:]])) == whole


def test_random_splits_inside_multibyte_characters_and_prefixes():
    body = ("".join(f'a0:"行{i} مرحبا"\n' for i in range(50)) + 'ad:{"finishReason":"stop"}\n').encode()
    rng = random.Random(7)
    pieces, at = [], 0
    while at < len(body):
        step = rng.randint(1, 7)
        pieces.append(body[at:at + step])
        at += step
    assert "".join(v for k, v in kinds(parse_stream(pieces)) if k == "text") == "".join(f"行{i} مرحبا" for i in range(50))


def test_b_participant_lines_are_ignored_and_ab_is_a_part_b_of_a():
    events = parse_stream(b'a0:"A"\nb0:"B"\nbd:{"finishReason":"stop"}\nab:{"toolCallId":"x","toolName":"y"}\nad:{"finishReason":"unknown"}\n')
    assert kinds(events) == [("text", "A"), ("finish", "unknown")]


def test_unused_codes_and_garbage_lines_are_skipped_and_counted():
    parser = StreamParser()
    events = parser.feed(b'a8:[]\nae:{"finishReason":"stop"}\naf:{"messageId":"m"}\nah:{"x":1}\na9:{}\nnot a line\na0:"ok"\n')
    assert kinds(events) == [("text", "ok")]
    assert parser.skipped == 1


def test_heartbeat_is_not_content():
    assert kinds(parse_stream(b'a2:[{"type":"heartbeat"}]\n')) == [("heartbeat", None)]


def test_image_url_data_and_file_parts_become_images():
    events = parse_stream(
        b'a2:[{"type":"image","image":"https://r2/x.png","mimeType":"image/png"},{"type":"image","data":"QUJD","mimeType":"image/webp"}]\n'
        b'ak:{"mimeType":"image/jpeg","data":"REVG"}\n')
    assert kinds(events) == [("image", ["https://r2/x.png", "data:image/webp;base64,QUJD"]),
                             ("image", ["data:image/jpeg;base64,REVG"])]


def test_citation_sources_are_decoded_from_the_args_string():
    source = {"source": {"id": "1", "url": "https://example.org/a", "title": "A"}}
    line = "ac:" + json.dumps({"toolCallId": "citation-source", "argsTextDelta": json.dumps(source)})
    assert kinds(parse_stream(line.encode())) == [("citation", [source["source"]])]


def test_other_tool_calls_are_ignored():
    assert parse_stream(b'ac:{"toolCallId":"other","argsTextDelta":"{}"}\n') == []


def test_error_part_and_arena_error_sentinel_are_errors():
    assert kinds(parse_stream(b'a3:"Resource exhausted."\n')) == [("error", "Resource exhausted.")]
    assert parse_stream(b'a0:"hasArenaError"\n')[0].kind == "error"


def test_bare_json_error_line_is_an_error():
    assert kinds(parse_stream(b'{"error":"boom"}\n')) == [("error", "boom")]


def test_parse_stream_line_returns_participant():
    assert parse_stream_line('b0:"x"') == ("b", Event("text", "x"))
    assert parse_stream_line("") is None


def test_a_payload_reads_as_json_loads_reads_it_with_or_without_whitespace_around():
    for raw in ['"plain"', ' "leading"', '"trailing" ', '{"finishReason": "stop"}', ' [1, 2] ', '"\\ud83d\\ude00"',
                '"lone \\ud83d"', "17", "null"]:
        assert json_payload(raw) == json.loads(raw)
    for bad in ['"unterminated', '"a" "b"', "{", "", '"tab\there"']:
        with pytest.raises(ValueError):
            json_payload(bad)


def test_utf16_length_counts_astral_characters_twice_and_lone_surrogates_once():
    assert [utf16_len(text) for text in ("", "ascii", "é", "😀", "a😀b", "\ud83d")] == [0, 5, 1, 2, 4, 1]
