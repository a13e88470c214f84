"""The bridge's stream parser and site discovery over every real capture in tests/fixtures/real (a copy of
shared/fixtures/real): what an independent reading of the raw bytes gives is what the bridge gives.

Tests marked ``xfail(strict=True, reason="issue 14: …")`` show what today's bridge misses of the late-2026 site;
the bridge-side work of issue 14 turns them green (and must then drop the mark)."""

import json
import os
import random
import re
from typing import Any

import httpx
import pytest
from emulator.common import REAL_FIXTURES
from emulator_client import cookie_header
from fake_arena import FakeArena

import bridge

# bridge.py is being restructured: every bridge name these tests use is looked up here, and only here.
parse_stream = bridge.parse_stream
StreamParser = bridge.StreamParser
ReplyBuilder = bridge.ReplyBuilder
discover_site = bridge.discover_site
extract_models = bridge.extract_models
parse_action_response = bridge.parse_action_response

LINE = re.compile(r"([ab])([0-9a-z]):(.*)", re.DOTALL)
REAL_V3_SITEKEY = "6Led_uYrAAAAAKjxDIF58fgFtX3t8loNAK85bW9I"


def real(folder, suffix):
    path = os.path.join(REAL_FIXTURES, folder)
    return sorted(f for f in os.listdir(path) if f.endswith(suffix))


def read_bytes(folder, name):
    with open(os.path.join(REAL_FIXTURES, folder, name), "rb") as fh:
        return fh.read()


STREAMS = [f[:-len(".body")] for f in real("streams", ".body")]
ACTIONS = [f[:-len(".body")] for f in real("server-actions", ".body")]
CHUNKS = real("js", ".js")


# --- an independent reading of the raw lines -----------------------------------------------------------------------


def merge_sources(merged, sources):
    """Sources by id, later fields winning (the web client's rule)."""
    for source in sources if isinstance(sources, list) else [sources]:
        merged.setdefault(str(source["id"]), {}).update(source)


def read_raw(body: bytes, lane: str = "a") -> dict:
    """One lane of a stream as its raw lines say: text, reasoning, finish, images, citations by id."""
    out: dict[str, Any] = {"text": "", "reasoning": "", "finish": None, "images": [], "citations": {}}
    for raw in body.decode("utf-8").split("\n"):
        match = LINE.fullmatch(raw.strip())
        if not match or match.group(1) != lane:
            continue
        code, value = match.group(2), json.loads(match.group(3))
        if code == "0":
            out["text"] += value
        elif code == "g":
            out["reasoning"] += value
        elif code == "d":
            out["finish"] = value["finishReason"]
        elif code == "2":
            out["images"] += [item.get("image") or f"data:{item['mimeType']};base64,{item['data']}"
                              for item in value if item.get("type") == "image"]
        elif code == "c" and value.get("toolCallId") == "citation-source":
            merge_sources(out["citations"], json.loads(value["argsTextDelta"])["source"])
    return out


def read_bridge(events) -> dict:
    """The same facts from the bridge's events (model A only)."""
    out: dict[str, Any] = {"text": "", "reasoning": "", "finish": None, "images": [], "citations": {}}
    for event in events:
        if event.kind in ("text", "reasoning"):
            out[event.kind] += event.value
        elif event.kind == "finish":
            out["finish"] = event.value
        elif event.kind == "image":
            out["images"] += event.value
        elif event.kind == "citation":
            merge_sources(out["citations"], event.value)
    return out


def random_pieces(body: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, max(1, len(body) // 7))))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


# --- streams ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_the_bridge_reads_each_real_stream_as_its_raw_lines_say(name):
    body = read_bytes("streams", name + ".body")
    assert read_bridge(parse_stream(body)) == read_raw(body)


@pytest.mark.parametrize("name", STREAMS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_bridge_reads_each_real_stream_the_same_in_random_pieces(name, seed):
    body = read_bytes("streams", name + ".body")
    parser = StreamParser()
    events = [event for piece in random_pieces(body, seed) for event in parser.feed(piece)] + parser.close()
    assert read_bridge(events) == read_raw(body)


def test_the_real_search_stream_has_three_titled_sources_at_growing_offsets():
    """What the independent reader itself must see (so the comparisons above are not vacuous)."""
    citations = read_raw(read_bytes("streams", "dec-search-00.body"))["citations"]
    assert sorted(citations) == ["1", "2", "3"]
    assert citations["1"]["charLocation"] == [73, 414, 604, 781, 878]
    assert citations["1"]["title"] == "A new era of intelligence with Gemini 3"


def answer_text(body: bytes) -> str:
    """The bridge's answer text for a stream, as its reply builder renders text and sources."""
    builder = ReplyBuilder()
    for event in parse_stream(body):
        if event.kind == "text":
            builder.text(event.value)
        elif event.kind == "citation":
            builder.add_sources(event.value)
    builder.finish()
    return builder.full_content


def test_a_real_search_answer_gets_its_numbers_at_the_cited_offsets():
    body = read_bytes("streams", "dec-search-00.body")
    raw = read_raw(body)
    content = answer_text(body)
    for number, sid in enumerate(sorted(raw["citations"]), 1):
        for offset in raw["citations"][sid]["charLocation"]:
            before = re.escape(raw["text"][max(0, offset - 25):offset])
            assert re.search(before + r"\s?(\[\d+\])*\[" + str(number) + r"\]", content), (sid, offset)


def test_a_real_search_answer_titles_its_sources():
    content = answer_text(read_bytes("streams", "dec-search-00.body"))
    titles = ("A new era of intelligence with Gemini 3",
              "Google Search with Gemini 3: Our most intelligent search yet", "Models")
    for title in titles:
        assert f"[{title}](" in content


def test_the_real_battle_stream_keeps_lane_b_out_of_the_reply():
    body = read_bytes("streams", "nov-battle-hello-00.body")
    assert read_raw(body, "b")["finish"] == "stop" and read_bridge(parse_stream(body))["finish"] == "unknown"


# --- server actions ------------------------------------------------------------------------------------------------


def read_action(text: str):
    """The data of the line whose id is 1, if it says success (wherever that line is)."""
    line = next(ln for ln in text.split("\n") if ln.startswith("1:"))
    value = json.loads(line[2:])
    return value["data"] if value.get("success") is True else None


@pytest.mark.parametrize("name", ACTIONS)
def test_the_bridge_reads_each_real_server_action_answer(name):
    text = read_bytes("server-actions", name + ".body").decode("utf-8")
    assert parse_action_response(text) == read_action(text) is not None


# --- JS chunks ------------------------------------------------------------------------------------------------------


def read_actions(js: str) -> dict:
    calls = re.findall(r'createServerReference\)\("([0-9a-f]{42})",\w+\.callServer,void 0,\w+\.findSourceMapURL,'
                       r'"(\w+)"\)', js)
    return {name: action_id for action_id, name in calls}


@pytest.mark.parametrize("name", CHUNKS)
def test_the_bridge_finds_every_server_action_id_in_each_real_chunk(name):
    js = read_bytes("js", name).decode("utf-8")
    assert read_actions(js) and discover_site("", [js]).get("server_actions") == read_actions(js)


def test_the_real_chunks_name_upload_and_signed_url_actions():
    found = discover_site("", [read_bytes("js", n).decode("utf-8") for n in CHUNKS])["server_actions"]
    assert found["generateUploadUrl"] == "70cb393626e05a5f0ce7dcb46977c36c139fa85f91"
    assert found["getSignedUrl"] == "6064c365792a3eaf40a60a874b327fe031ea6f22d7"


def test_the_real_chunks_carry_no_anon_key():
    assert "anon_key" not in discover_site("", [read_bytes("js", n).decode("utf-8") for n in CHUNKS])


def test_the_bridge_finds_the_v3_sitekey_at_the_real_call_site():
    found = discover_site("", [read_bytes("js", n).decode("utf-8") for n in CHUNKS])
    assert found.get("sitekey") == REAL_V3_SITEKEY


# --- model lists -----------------------------------------------------------------------------------------------------


def real_model_lists():
    with open(os.path.join(REAL_FIXTURES, "models-2025-12-01.json"), encoding="utf-8") as fh:
        december = json.load(fh)
    with open(os.path.join(REAL_FIXTURES, "js", "models-2025-11.txt"), encoding="utf-8") as fh:
        november = json.load(fh)["models"]
    return {"models-2025-12-01": december, "models-2025-11": november}


@pytest.mark.parametrize("name", sorted(real_model_lists()))
@pytest.mark.parametrize("split", [False, True])
def test_the_bridge_reads_each_real_model_list_from_a_page(tmp_path, name, split):
    models = real_model_lists()[name]
    path = tmp_path / "models.json"
    path.write_text(json.dumps(models), encoding="utf-8")
    emulator = FakeArena(models_path=str(path))
    try:
        emulator.configure(flight_split=split)
        assert extract_models(emulator.site.page_html()) == models
    finally:
        emulator.stop()


# --- the emulator's 2026 pages (U8): where the bridge must find the sitekey ------------------------------------------


@pytest.fixture(scope="module")
def arena():
    emulator = FakeArena(seed=3).start()
    yield emulator
    emulator.stop()


def site_texts(arena, **knobs) -> tuple[str, list[str]]:
    """The emulator's page and its JS chunks under these knobs."""
    arena.reset()
    arena.configure(**knobs)
    with httpx.Client(timeout=10, headers={"Cookie": cookie_header(arena.new_session())}) as client:
        page = client.get(arena.url + "/?mode=direct").text
        return page, [client.get(arena.url + u).text for u in bridge.extract_chunk_urls(page)]


def test_the_bridge_finds_the_sitekey_on_the_early_2026_page(arena):
    assert discover_site(*site_texts(arena))["sitekey"] == arena.sitekey


def test_the_bridge_finds_the_sitekey_in_chunks_whose_call_site_has_a_variable_action(arena):
    _, scripts = site_texts(arena, sitekey_call_site="variable")
    assert discover_site("", scripts).get("sitekey") == arena.sitekey


def test_the_bridge_finds_the_sitekey_as_k_in_a_page_url(arena):
    page, _ = site_texts(arena, sitekey_in_page="k")
    assert discover_site(page, []).get("sitekey") == arena.sitekey


def test_a_page_naming_its_sitekey_nowhere_leaves_the_chunks_to_say_it(arena):
    page, scripts = site_texts(arena, sitekey_in_page="none")
    assert "sitekey" not in discover_site(page, []) and discover_site(page, scripts)["sitekey"] == arena.sitekey
