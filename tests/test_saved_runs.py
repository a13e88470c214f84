"""The emulator replays a saved run (`bridge.py doctor --save DIR`): recorded answers come back as they were
recorded, while sessions and the anti-bot stand-ins stay live."""
import json
import os

import httpx
import pytest
from fake_arena import FakeArena

PAGE = b"<html><body>recorded page</body></html>"
STREAM = b'a0:"Recorded"\nad:{"finishReason":"stop"}\n'


def entry(method, path, status, body, headers):
    return {"method": method, "url": "https://arena.ai" + path, "status": status, "response_headers": headers}, body


RECORDED = [
    entry("GET", "/", 403, b"<title>Just a moment...</title>", [["Content-Type", "text/html"], ["cf-mitigated", "challenge"]]),
    entry("GET", "/?mode=direct", 200, PAGE, [["Content-Type", "text/html; charset=utf-8"],
                                               ["Set-Cookie", "arena-auth-prod-v1=REDACTED"]]),
    entry("GET", "/c/moved", 302, b'<a href="https://arena.ai/r2/x.png">upload</a>',
          [["Content-Type", "text/html"], ["Location", "https://arena.ai/?mode=direct"]]),
    entry("POST", "/nextjs-api/stream/create-evaluation", 429, b"Too many requests",
          [["Content-Type", "text/plain"], ["retry-after", "0"]]),
    entry("POST", "/nextjs-api/stream/create-evaluation", 200, STREAM, [["Content-Type", "text/event-stream"]]),
    # the real captures' form: headers as an object
    entry("POST", "/nextjs-api/stream/post-to-evaluation/019a41a7-b8bc-743a-8d7f-6a7d5d376977", 200, STREAM,
          {"content-type": "text/event-stream"}),
]


@pytest.fixture
def saved(tmp_path):
    """A folder in the layout `doctor --save` writes: NAME.body, NAME.meta.json and manifest.json."""
    entries = []
    for index, (meta, body) in enumerate(RECORDED):
        (tmp_path / f"{index:03d}.body").write_bytes(body)
        (tmp_path / f"{index:03d}.meta.json").write_text(json.dumps(meta))
        entries.append({"file": f"{index:03d}.body"})
    (tmp_path / "manifest.json").write_text(json.dumps({"origin": "https://arena.ai", "entries": entries}))
    return str(tmp_path)


@pytest.fixture
def arena(saved):
    emulator = FakeArena().start()
    emulator.replay(saved)
    yield emulator
    emulator.stop()


def test_a_recorded_page_answers_with_its_status_headers_and_body(arena):
    challenge = httpx.get(arena.url + "/")
    assert challenge.status_code == 403 and challenge.headers["cf-mitigated"] == "challenge"
    page = httpx.get(arena.url + "/?mode=direct")
    assert page.status_code == 200 and page.content == PAGE
    assert "set-cookie" not in page.headers


def test_links_to_the_recorded_origin_lead_back_to_the_replay(arena):
    answer = httpx.get(arena.url + "/c/moved")
    assert answer.headers["location"] == arena.url + "/?mode=direct"
    assert answer.text == f'<a href="{arena.url}/r2/x.png">upload</a>'


def test_recordings_of_one_kind_answer_in_order_and_the_last_one_repeats(arena):
    answers = [httpx.post(arena.url + "/nextjs-api/stream/create-evaluation", content=b"{}") for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 200, 200]
    assert answers[0].headers["retry-after"] == "0" and answers[2].content == STREAM


def test_ids_in_paths_do_not_matter(arena):
    answer = httpx.post(arena.url + "/nextjs-api/stream/post-to-evaluation/019b0000-0000-7000-8000-000000000001",
                        content=b"{}")
    assert answer.status_code == 200 and answer.content == STREAM


def test_what_was_not_recorded_is_answered_by_the_live_emulator(arena):
    session = arena.decode_session(arena.new_session())
    refreshed = httpx.post(arena.url + "/auth/v1/token?grant_type=refresh_token", headers={"apikey": arena.anon_key},
                           json={"refresh_token": session["refresh_token"]})
    assert refreshed.status_code == 200 and refreshed.json()["access_token"]
    assert httpx.get(arena.url + "/_next/static/chunks/none.js").status_code == 404


def test_replay_stops_when_asked(arena):
    arena.replay(None)
    assert httpx.get(arena.url + "/").status_code == 200


REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "real")


def test_the_real_captures_replay_in_their_own_layout():
    emulator = FakeArena().start()
    try:
        emulator.replay(REAL)
        first = httpx.post(emulator.url + "/nextjs-api/stream/create-evaluation", content=b"{}")
        second = httpx.post(emulator.url + "/nextjs-api/stream/create-evaluation", content=b"{}")
    finally:
        emulator.stop()
    with open(os.path.join(REAL, "errors", "dec-edit-22.body"), "rb") as f:
        assert first.status_code == 429 and first.content == f.read()
    assert first.headers["retry-after"] == "0" and first.headers["ratelimit-modality"] == "image"
    with open(os.path.join(REAL, "streams", "dec-image-00.body"), "rb") as f:
        assert second.status_code == 200 and second.content == f.read()
