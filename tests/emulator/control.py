"""The control API (§13 "control endpoint"): ``/__emulator/<name>`` switches knobs, queues faults, makes
sessions and tokens, and reads the request log and the site state, so that a test in another process (or a
human with curl) drives the emulator like an in-process test does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .accounts import split_session
from .http import Handler, Request, send

if TYPE_CHECKING:
    from .emulator import FakeArena


def _config(arena: FakeArena, req: Request) -> Any:
    if req.method == "POST":
        arena.configure(**req.obj)
        return {"ok": True, "knobs": arena.knobs}
    return arena.knobs


def _fault(arena: FakeArena, req: Request) -> Any:
    arena.fault(**req.obj)
    return {"ok": True}


def _reset(arena: FakeArena, _req: Request) -> Any:
    arena.reset()
    return {"ok": True}


def _requests(arena: FakeArena, _req: Request) -> Any:
    return [dict(r, body=r["body"].decode("utf-8", "replace")) for r in list(arena.requests)
            if not r["path"].startswith("/__emulator/")]


def _session(arena: FakeArena, req: Request) -> Any:
    value = arena.new_session(**req.obj)
    return {"value": value, "user": arena.session_user(value),
            "chunks": split_session(value, int(arena.knobs["chunk_size"]))}


def _mint(arena: FakeArena, req: Request) -> Any:
    return {"token": arena.mint_token(**req.obj)}


def _expire_session(arena: FakeArena, req: Request) -> Any:
    arena.expire_session(str(req.obj.get("value") or ""))
    return {"ok": True}


def _redeploy(arena: FakeArena, _req: Request) -> Any:
    arena.redeploy()
    return {"build_id": arena.build_id, "action_ids": arena.action_ids}


def _rotate_sitekey(arena: FakeArena, req: Request) -> Any:
    arena.rotate_sitekey(req.obj.get("new"))
    return {"sitekey": arena.sitekey}


def _clearance(arena: FakeArena, req: Request) -> Any:
    return {"cf_clearance": arena.issue_clearance(req.obj.get("ua", ""), req.obj.get("ip", "127.0.0.1"))}


def _replay(arena: FakeArena, req: Request) -> Any:
    arena.replay(req.obj.get("folder"))
    return {"ok": True}


def _state(arena: FakeArena, _req: Request) -> Any:
    return {"url": arena.url, "sitekey": arena.sitekey, "build_id": arena.build_id, "action_ids": arena.action_ids,
            "anon_key": arena.anon_key, "clock_offset": arena.clock_offset, "evaluations": arena.evaluations,
            "penalties": {uid: until for uid in arena.accounts if (until := arena.penalty_until(uid))},
            "image_quota_used": {uid: day["used"] for uid, day in arena.chat.quota.days.items()},
            "open_connections": arena.open_connections}


def _script(arena: FakeArena, req: Request) -> Any:
    """POST one reply spec (or ``{"replies": [spec, …]}``) to queue it; GET the queue."""
    if req.method == "POST":
        for spec in req.obj.get("replies") or [req.obj]:
            arena.script_reply(**spec)
    return {"queue": arena.knobs["script"]}


def _captures(arena: FakeArena, _req: Request) -> Any:
    return {"captures": arena.captures()}


def _kill_account(arena: FakeArena, req: Request) -> Any:
    arena.kill_account(str(req.obj.get("user") or req.obj.get("value") or ""))
    return {"ok": True}


# Endpoint name (after ``/__emulator/``) -> what it does; each answers 200 with JSON.
ENDPOINTS: dict[str, Callable[[FakeArena, Request], Any]] = {
    "config": _config, "fault": _fault, "reset": _reset, "requests": _requests, "session": _session,
    "mint": _mint, "expire_session": _expire_session, "redeploy": _redeploy, "rotate_sitekey": _rotate_sitekey,
    "clearance": _clearance, "state": _state, "replay": _replay, "script": _script, "captures": _captures,
    "kill_account": _kill_account,
}


def serve(arena: FakeArena, h: Handler, req: Request) -> None:
    endpoint = ENDPOINTS.get(req.path[len("/__emulator/"):])
    if endpoint is None:
        return send(h, 404, {"error": "unknown control endpoint"})
    try:
        return send(h, 200, endpoint(arena, req))
    except (TypeError, ValueError) as exc:
        return send(h, 400, {"error": str(exc)})
