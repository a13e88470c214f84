"""Late-2026 request policies of the chat endpoints (arena-protocol §0): the guest login gate (U4), the daily
image quota per account (U7), the 2026 body the web client sends (U9) and battle turns in direct-battle (U3)."""

from __future__ import annotations

import math
from typing import Any

from .core import Core

GATED_MODES = ("direct", "direct-battle", "side-by-side", "auto")
LOGIN_GATE_BODY = {"error": "LOGIN_GATE", "message": "Direct mode requires user login"}
BATTLE_TURN_ERROR = ("Bad next turn request in Battles in Direct mode. DIRECT was requested, but expected a "
                     "BATTLE turn")
SKIP_ERROR = "Skipping only allowed for first response"
UNSELECTABLE_ERROR = "Selected model is not available for user selection"
QUOTA_TEXT = "Too many requests, please try again later."
# The real image-quota 429 (fixtures/real/errors/dec-edit-22): text/plain, retry-after 0, modality image.
QUOTA_HEADERS = [("retry-after", "0"), ("access-control-allow-origin", "*"),
                 ("cache-control", "public, max-age=0, must-revalidate"), ("ratelimit", "limit=0, remaining=0, reset=0"),
                 ("ratelimit-modality", "image"), ("ratelimit-policy", "0;w=0")]
DAY = 86400.0


class Refused(Exception):
    """A request the site refuses: a status with ``{"error": message}``, or another body and headers."""

    def __init__(self, status: int, message: str, body: Any = None, ctype: str = "application/json",
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.ctype = status, message, ctype
        self.body = {"error": message} if body is None else body
        self.headers = headers or []


def check_login_gate(core: Core, account: dict | None, mode: str | None) -> None:
    """U4: a guest (anonymous) account may not use the direct modes."""
    if core.knobs["login_gate"] and (account or {}).get("anonymous", True) and mode in GATED_MODES:
        raise Refused(401, LOGIN_GATE_BODY["message"], body=LOGIN_GATE_BODY)


def is_2026_body(body: dict) -> bool:
    """U9: the web client's 2026 body: ``modelBMessageId`` and ``userMessage.metadata.autoModalityMetadata``."""
    um = body.get("userMessage")
    metadata = um.get("metadata") if isinstance(um, dict) else None
    return isinstance(body.get("modelBMessageId"), str) and isinstance(metadata, dict) \
        and isinstance(metadata.get("autoModalityMetadata"), dict)


class ImageQuota:
    """U7: ``image_quota`` image replies per account per day.  A success says what is left; past the quota an
    image request gets the real 429 while text chats go on."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.days: dict[str, dict] = {}

    def _day(self, uid: str) -> dict:
        now = self.core.now()
        day = self.days.get(uid)
        if day is None or now >= day["start"] + DAY:
            day = self.days[uid] = {"start": now, "used": 0}
        return day

    def check(self, uid: str, modality: str) -> None:
        limit = int(self.core.knobs["image_quota"] or 0)
        if not limit or modality != "image":
            return
        with self.core.lock:
            if self._day(uid)["used"] >= limit:
                raise Refused(429, QUOTA_TEXT, body=QUOTA_TEXT, ctype="text/plain; charset=UTF-8",
                              headers=QUOTA_HEADERS)

    def spend(self, uid: str) -> list[tuple[str, str]]:
        """Count an image reply; its rate-limit headers (as the real 2025-12 success)."""
        limit = int(self.core.knobs["image_quota"])
        with self.core.lock:
            day = self._day(uid)
            day["used"] += 1
            reset = math.ceil(day["start"] + DAY - self.core.now())
        return [("ratelimit", f"limit={limit}, remaining={max(0, limit - day['used'])}, reset={reset}"),
                ("ratelimit-policy", f"{limit};w={int(DAY)}")]


def pending_battle_refusal(ev: dict) -> None:
    """U3: after a battle turn, a plain follow-up is refused until the turn is skipped."""
    if ev.get("pending_battle"):
        raise Refused(400, BATTLE_TURN_ERROR)


def is_battle_turn(core: Core, ev: dict) -> bool:
    """U3: in direct-battle, every k-th reply of an evaluation carries both lanes."""
    every = int(core.knobs["battle_turn_every"] or 0)
    replies = sum(1 for m in ev["messages"] if m["role"] == "assistant") + 1
    return ev["mode"] == "direct-battle" and every > 0 and replies % every == 0


def skip_battle(core: Core, ev: dict, body: dict) -> None:
    """U3: ``skip-direct-battle`` with the battle turn's two message ids ends the battle turn."""
    pending = ev.get("pending_battle")
    if core.knobs["battle_skip_refused"] or not pending:
        raise Refused(400, SKIP_ERROR)
    a = body.get("messageAId") or body.get("modelAMessageId")
    b = body.get("messageBId") or body.get("modelBMessageId")
    if (a, b) != (pending["a"], pending["b"]):
        raise Refused(400, "Invalid messageAId or messageBId")
    ev["pending_battle"] = None
