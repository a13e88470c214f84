"""Fault injection (§13.9): a queue of faults for the next N matching requests, answered before validation
(status faults) or when a valid request starts streaming (stream faults)."""

from __future__ import annotations

import json
import time
from typing import Any

from .common import CHAT_PATHS, compact
from .core import Core
from .http import Handler, err, send

# Default message per status of a status fault.
STATUS_MESSAGES = {400: "Invalid content", 401: "Unauthorized", 403: "recaptcha validation failed",
                   404: "Not found", 413: "Request Entity Too Large", 422: "flagged", 429: "Too Many Requests",
                   500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}

# The body of a content-less 200, per ``content_less`` fault.
CONTENT_LESS = {"empty": [], "only_ad": ['ad:{"finishReason":"stop"}'],
                "only_a3": ['a3:"Resource exhausted. Please try again later."'],
                "has_arena_error": ['a0:"hasArenaError"', 'ad:{"finishReason":"stop"}'],
                "json_error": ['{"error":"Internal server error"}']}


def path_matches(pattern: str, kind: str) -> bool:
    return pattern in (kind, "any") or (pattern == "stream" and kind in CHAT_PATHS)


def is_status_fault(fault: dict) -> bool:
    return "status" in fault or bool(fault.get("expire_auth"))


class Faults:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.queue: list[dict] = []

    def add(self, times: int = 1, **spec: Any) -> None:
        """Queue a fault for the next ``times`` matching requests.

        Match keys: ``path`` ("stream" default = create|post|retry, or one of create, post, retry, page, action, r2,
        signup, refresh, any) and ``user`` (arena user id).  Status faults (``status`` or ``expire_auth``) answer
        before validation; stream faults (``disconnect_after``, ``content_less``, ``first_byte_delay``,
        ``line_delay``) apply when a valid request starts streaming."""
        spec = dict(spec)
        spec.setdefault("path", "stream")
        spec["times"] = int(times)
        with self.core.lock:
            self.queue.append(spec)

    def take(self, kind: str, uid: str | None, status_phase: bool) -> dict | None:
        with self.core.lock:
            for f in self.queue:
                if is_status_fault(f) != status_phase or not path_matches(f["path"], kind):
                    continue
                if f.get("user") and f["user"] != uid:
                    continue
                f["times"] -= 1
                if f["times"] <= 0:
                    self.queue.remove(f)
                return f
        return None


def _json_body(body: Any, status: int) -> Any:
    if body is None:
        return {"error": STATUS_MESSAGES.get(status, "Error")}
    if isinstance(body, str):
        try:
            json.loads(body)
        except ValueError:
            return {"error": body}
    return body


def _html_body(body: Any, status: int) -> str:
    if body is None:
        title = f"{status} {STATUS_MESSAGES.get(status, 'Error')}"
        return (f"<!DOCTYPE html><html><head><title>{title}</title></head>"
                f"<body><center><h1>{title}</h1></center><hr><center>cloudflare</center></body></html>")
    return body if isinstance(body, str) else compact(body)


def answer_status_fault(h: Handler, fault: dict) -> None:
    if fault.get("first_byte_delay"):
        time.sleep(float(fault["first_byte_delay"]))
    if "status" not in fault:  # expire_auth alone
        return err(h, 401, "Unauthorized")
    status = int(fault["status"])
    headers = list((fault.get("headers") or {}).items())
    if fault.get("html"):
        return send(h, status, _html_body(fault.get("body"), status), "text/html", headers)
    return send(h, status, _json_body(fault.get("body"), status), "application/json", headers)
