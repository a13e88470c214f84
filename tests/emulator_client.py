"""Raw-HTTP helpers for the emulator's own tests: the bodies and headers a web client sends, and a reading of
the reply lines."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fake_arena import AUTH_COOKIE, FakeArena, make_uuid7

UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
TEXT_MODEL = "019a98f7-afcd-779f-8dcb-856cc3b3f078"      # gemini-3-pro
SEARCH_MODEL = "019abdb7-6957-71c1-96a2-bfa79e8a094f"    # gemini-3-pro-grounding
IMAGE_MODEL = "019abc10-e78d-7932-b725-7f1563ed8a12"     # nano-banana-pro 2k
STEALTH_MODEL = "019b094b-ff6f-728b-8517-a735d43ab2ac"   # stellarblade
CREATE = "/nextjs-api/stream/create-evaluation"


def cookie_header(value: str | None = None, chunks: list[str] | None = None, **extra: str) -> str:
    parts = []
    if value:
        parts.append(f"{AUTH_COOKIE}={value}")
    for i, c in enumerate(chunks or []):
        parts.append(f"{AUTH_COOKIE}.{i}={c}")
    parts += [f"{k}={v}" for k, v in extra.items()]
    return "; ".join(parts)


def create_body(arena: FakeArena, content: str = "hi", model: str = TEXT_MODEL, mode: str = "direct-battle",
                modality: str = "chat", token: str | None = None, **kw: Any) -> dict:
    body: dict[str, Any] = {"id": make_uuid7(), "mode": mode, "modelAId": model, "userMessageId": make_uuid7(),
            "modelAMessageId": make_uuid7(),
            "userMessage": {"content": content, "experimental_attachments": [], "metadata": {}},
            "modality": modality, "recaptchaV3Token": token or arena.mint_token("chat_submit")}
    body.update(kw)
    return body


def follow_up_body(arena: FakeArena, eid: str, content: str, **kw: Any) -> dict:
    body = create_body(arena, content, id=eid, **kw)
    del body["mode"]
    return body


def post_chat(client: httpx.Client, arena: FakeArena, path: str, body: dict, session: str | None,
              method: str = "POST", headers: dict | None = None) -> httpx.Response:
    h = {"Content-Type": "text/plain;charset=UTF-8", "Origin": arena.url, "User-Agent": UA,
         "Cookie": cookie_header(session)}
    h.update(headers or {})
    return client.request(method, arena.url + path, content=json.dumps(body), headers=h)


def parse_stream(text: str) -> tuple[str, list[str]]:
    content, lines = "", []
    for ln in text.split("\n"):
        ln = ln.strip()
        if not ln:
            continue
        lines.append(ln)
        if ln.startswith("a0:"):
            content += json.loads(ln[3:])
    return content, lines
