"""Replay of a saved run: a folder written by ``python bridge.py doctor --save DIR`` (or one in the layout of
``shared/fixtures/real``) answers the requests it recorded, so that a user's report becomes a test.

What is replayed is what the site said about itself: pages, JS chunks, chat streams, server actions and
storage answers, each with its recorded status, headers and body. Sessions, refresh, sign-up and the
anti-bot stand-ins stay live (their secrets were redacted from the folder), so the accounts a test creates
keep working against a replayed site. Requests of one kind are answered by their recordings in order;
the last one answers any further request of its kind. The recorded origin (the manifest's `origin`) is
replaced by the emulator's own in bodies and headers, so that links into the site (script URLs, upload
URLs) lead back to the replay.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .http import Handler, Request, send

# Recorded headers the replay does not send again: framing is the emulator's own, and redacted cookies
# would overwrite the live ones in the client's jar.
DROPPED_HEADERS = {"content-length", "transfer-encoding", "content-encoding", "connection", "keep-alive",
                   "set-cookie", "date", "server"}
# Path segments that differ on every run (evaluation and message ids).
VOLATILE_SEGMENT = re.compile(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LIVE_PREFIXES = ("/auth/v1/", "/nextjs-api/sign-up", "/api/sign-up", "/recaptcha/", "/__recaptcha/",
                 "/turnstile/", "/__turnstile/", "/cdn-cgi/")


def request_key(method: str, url: str) -> str:
    """What identifies a request across runs: method and path without its ids; pages keep their query
    (`/` and `/?mode=direct` are different answers)."""
    split = urlsplit(url)
    path = VOLATILE_SEGMENT.sub("/*", split.path or "/")
    query = f"?{split.query}" if method == "GET" and split.query and not split.path.startswith("/r2/") else ""
    return f"{method} {path}{query}"


@dataclass
class Recorded:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def header_pairs(headers: Any) -> list[tuple[str, str]]:
    """Headers as the doctor saves them ([name, value] pairs) or as the real captures do (an object)."""
    items = headers.items() if isinstance(headers, dict) else headers or []
    return [(str(k), str(v)) for k, v in items if str(k).lower() not in DROPPED_HEADERS]


def load_folder(folder: str, origin: str) -> dict[str, list[Recorded]]:
    """Recordings by request key, in the order they were made, pointing at `origin`."""
    index_name = "manifest.json" if os.path.exists(os.path.join(folder, "manifest.json")) else "index.json"
    with open(os.path.join(folder, index_name), encoding="utf-8") as f:
        index = json.load(f)
    entries = index["entries"] if isinstance(index, dict) else index
    recorded_origin = index.get("origin") if isinstance(index, dict) else None

    def moved(text: str) -> str:
        return text.replace(recorded_origin, origin) if recorded_origin else text

    recordings: dict[str, list[Recorded]] = {}
    for entry in entries:
        base = os.path.join(folder, entry["file"][:-len(".body")])
        with open(base + ".meta.json", encoding="utf-8") as f:
            meta = json.load(f)
        with open(base + ".body", "rb") as raw:
            body = moved(raw.read().decode("latin-1")).encode("latin-1")
        headers = [(name, moved(value)) for name, value in header_pairs(meta.get("response_headers"))]
        key = request_key(meta["method"], meta["url"])
        # A browser's HAR export records 0 for an answer it was still streaming: it was a 200.
        recordings.setdefault(key, []).append(Recorded(int(meta["status"]) or 200, headers, body))
    return recordings


class Replay:
    """The recordings of one saved run, answering in place of the emulator's own handlers."""

    def __init__(self, folder: str, origin: str) -> None:
        self.folder = folder
        self.recordings = load_folder(folder, origin)
        self.served: dict[str, int] = {}

    def answer(self, h: Handler, req: Request) -> bool:
        """Answer `req` from the recording when there is one for it; False leaves it to the emulator."""
        if req.path.startswith(LIVE_PREFIXES):
            return False
        key = request_key(req.method, req.raw_path)
        recorded = self.recordings.get(key)
        if not recorded:
            return False
        turn = self.served.get(key, 0)
        self.served[key] = turn + 1
        answer = recorded[min(turn, len(recorded) - 1)]
        content_type = next((v for k, v in answer.headers if k.lower() == "content-type"), None)
        send(h, answer.status, answer.body, content_type,
             headers=[(k, v) for k, v in answer.headers if k.lower() != "content-type"])
        return True
