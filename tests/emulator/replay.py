"""Replay of real captures (``tests/fixtures/real``): a response body byte for byte with its recorded status and
headers, whole, cut at an offset, or in random writes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .common import REAL_FIXTURES

# Response headers that describe the recorded transfer, not the answer: the emulator frames its own.
TRANSFER_HEADERS = {"content-length", "content-encoding", "transfer-encoding", "connection"}
FOLDERS = ("streams", "errors")


@dataclass
class Capture:
    name: str
    body: bytes
    status: int
    headers: list[tuple[str, str]]
    cut: int | str | None = None    # hang up after this many bytes ("random": a seeded offset)


def capture_names(folder: str = REAL_FIXTURES) -> list[str]:
    """Every replayable capture: the ``*.body`` files under ``streams/`` and ``errors/``, by base name."""
    return sorted(f[:-len(".body")] for sub in FOLDERS if os.path.isdir(os.path.join(folder, sub))
                  for f in os.listdir(os.path.join(folder, sub)) if f.endswith(".body"))


def load_capture(name: str, folder: str = REAL_FIXTURES) -> Capture:
    for sub in FOLDERS:
        path = os.path.join(folder, sub, name)
        if os.path.exists(path + ".body"):
            with open(path + ".body", "rb") as fh:
                body = fh.read()
            with open(path + ".meta.json", encoding="utf-8") as fh:
                meta = json.load(fh)
            headers = [(k, v) for k, v in (meta.get("response_headers") or {}).items()
                       if k.lower() not in TRANSFER_HEADERS]
            # One HAR entry records status 0 for a stream it saw whole: it was a 200.
            return Capture(name, body, int(meta.get("status") or 200), headers)
    raise ValueError(f"unknown capture {name!r} (known: {', '.join(capture_names(folder))})")


def lane_text(body: bytes, lane: str = "a") -> str:
    """The text a reader of the raw lines gets for one lane (for the evaluation's history)."""
    text = ""
    for line in body.decode("utf-8", "replace").split("\n"):
        if line.startswith(lane + "0:"):
            try:
                part = json.loads(line[3:])
            except ValueError:
                continue
            text += part if isinstance(part, str) else ""
    return text
