"""The chat endpoints E2/E3/E4 (§6, §13.6) and skip-direct-battle (U3): strict validation, evaluations and
their history, and the reply stream with its rate-limit headers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .accounts import Accounts
from .antibot import Recaptcha
from .catalog import ROUTER_MODEL_ID, Catalog
from .common import is_uuid7, make_uuid7
from .core import Core
from .faults import CONTENT_LESS, Faults
from .http import WRITE_PLANS, Handler, Request, StreamOptions, StreamWriter, send
from .policy import (
    UNSELECTABLE_ERROR,
    ImageQuota,
    Refused,
    check_login_gate,
    is_2026_body,
    is_battle_turn,
    pending_battle_refusal,
    skip_battle,
)
from .replay import Capture, lane_text, load_capture
from .replies import Reply, ReplyBuilder, Turn, raw_lines
from .site import Site

MODES = ("direct", "direct-battle", "battle", "side-by-side", "auto")
MODALITIES = ("chat", "image", "search")
TWO_LANE_MODES = ("battle", "side-by-side")
MESSAGE_ID_KEYS = ("userMessageId", "modelAMessageId", "modelBMessageId")
# The method each chat path answers.
CHAT_METHODS = {"create": "POST", "post": "POST", "retry": "PUT", "skip": "POST"}
# The output capability a request modality needs from its model.
MODALITY_OUTPUT = {"image": "image", "search": "search", "chat": "text"}
USER_GONE = ['a3:"User not found"', 'ad:{"finishReason":"error"}']
STREAM_HEADERS = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                  ("Access-Control-Allow-Origin", "*")]


def model_fits(model: dict, modality: str) -> bool:
    out = (model.get("capabilities") or {}).get("outputCapabilities") or {}
    return modality not in MODALITY_OUTPUT or bool(out.get(MODALITY_OUTPUT[modality]))


def new_turn(body: dict) -> tuple[Any, Any]:
    """(content, attachments) of the new user turn: ``userMessage``, or the last user message of ``messages[]``."""
    um = body.get("userMessage")
    if isinstance(um, dict):
        return um.get("content"), um.get("experimental_attachments") or []
    if isinstance(body.get("messages"), list):
        users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return users[-1].get("content"), users[-1].get("experimental_attachments") or []
    return None, []


@dataclass
class Pending:
    """A validated request whose reply is built and streamed outside the emulator's lock."""
    eid: str
    ev: dict
    content: str
    attachments: list
    body: dict
    retry_of: int | None = None
    turn: int | None = None


class Chat:
    def __init__(self, core: Core, site: Site, accounts: Accounts, recaptcha: Recaptcha, faults: Faults,
                 builder: ReplyBuilder, catalog: Catalog) -> None:
        self.core, self.site, self.accounts, self.recaptcha = core, site, accounts, recaptcha
        self.faults, self.builder, self.catalog = faults, builder, catalog
        self.quota = ImageQuota(core)
        self.evaluations: dict[str, dict] = {}
        self.used_message_ids: set[str] = set()
        self._rate: dict[tuple[str | None, int], list[float]] = {}

    # --- entry -----------------------------------------------------------------------------------------------------

    def serve(self, h: Handler, req: Request) -> None:
        try:
            if req.kind == "skip":
                return self._skip(h, req)
            pending = self._validate(req)
        except Refused as exc:
            return send(h, exc.status, exc.body, exc.ctype, exc.headers)
        if pending is None:  # a dead credential: the site answers 200 with an error part (U9)
            return self._write(h, req, USER_GONE, [], lambda: None, None)
        return self._stream(h, req, pending)

    def _authorised(self, req: Request, body: Any) -> str:
        kind = req.kind
        if kind not in CHAT_METHODS:
            raise Refused(404, "Not found")
        if req.method != CHAT_METHODS[kind]:
            raise Refused(405, "Method not allowed")
        if not isinstance(body, dict):
            raise Refused(400, "Invalid request body")
        uid, state, _ = self.accounts.from_cookies(req.cookies)
        if state != "ok" or uid is None:
            req.log["note"] = "auth: " + state
            raise Refused(401, "Unauthorized")
        return uid

    def _skip(self, h: Handler, req: Request) -> None:
        """U3: ``POST /nextjs-api/stream/skip-direct-battle/<evaluationId>`` ends a pending battle turn."""
        uid = self._authorised(req, req.json)
        with self.core.lock:
            skip_battle(self.core, self._owned(req.path.split("/")[-1], uid), req.json)
        return send(h, 200, {"success": True})

    def _precheck(self, req: Request, body: dict, uid: str, eid: str) -> None:
        """What the site refuses before it looks at the token: the login gate and the image quota."""
        ev = self.evaluations.get(eid) if req.kind != "create" else None
        mode = body.get("mode") if req.kind == "create" else (ev or {}).get("mode")
        check_login_gate(self.core, self.accounts.accounts.get(uid), mode)
        self.quota.check(uid, body.get("modality") or (ev or {}).get("modality") or "chat")

    def _validate(self, req: Request) -> Pending | None:
        body = req.json
        uid = self._authorised(req, body)
        parts = req.path.split("/")
        eid = parts[-3] if req.kind == "retry" else parts[-1]
        self._precheck(req, body, uid, eid)
        reason = self.recaptcha.check(req, body, "chat_retry" if req.kind == "retry" else "chat_submit", uid,
                                      (self.site.sitekey, self.site.v2_sitekey))
        if not reason and req.kind != "retry" and self.core.knobs["strict_2026_body"] and not is_2026_body(body):
            reason = "not the 2026 body (strict_2026_body)"
        if reason:
            req.log["note"] = "recaptcha: " + reason
            raise Refused(403, "recaptcha validation failed")
        if self.accounts.accounts.get(uid, {}).get("dead"):
            return None
        with self.core.lock:
            if req.kind == "retry":
                return self._retry(body, uid, eid, parts[-1])
            content, attachments = new_turn(body)
            if not isinstance(content, str) or not isinstance(attachments, list):
                raise Refused(400, "Invalid content")
            if req.kind == "create":
                return self._create(body, uid, content, attachments)
            return self._post(body, uid, eid, content, attachments)

    # --- validation ------------------------------------------------------------------------------------------------

    def _check_ids(self, body: dict, required: tuple[str, ...]) -> None:
        for k in MESSAGE_ID_KEYS:
            if (body.get(k) is not None or k in required) and not is_uuid7(body.get(k)):
                raise Refused(400, f"Invalid {k}")
        for k in MESSAGE_ID_KEYS:
            v = body.get(k)
            if v is not None and (v in self.used_message_ids or v in self.evaluations):
                raise Refused(400, f"Message {v} already exists")

    def _spend_ids(self, body: dict) -> None:
        self.used_message_ids.update(v for v in (body.get(k) for k in MESSAGE_ID_KEYS) if v)

    def _check_model(self, mid: Any, mode: str, modality: str, which: str = "modelAId") -> dict:
        model = self.catalog.get(mid)
        if model is None:
            if int(self.core.knobs["unknown_model_status"]) == 404:
                raise Refused(404, "Models not found")
            raise Refused(400, f"Invalid {which}")
        if not model.get("organization") and mode != "battle":
            raise Refused(400, "Cannot select private models in non-battle mode")
        if not self.catalog.selectable(model):
            raise Refused(400, UNSELECTABLE_ERROR)
        if self.core.knobs["check_modality"] and not model_fits(model, modality):
            raise Refused(404, "Models not found")
        return model

    def _check_mode(self, body: dict) -> tuple[str, str]:
        mode, modality = body.get("mode"), body.get("modality") or "chat"
        if mode is None:
            raise Refused(400, "mode is required")
        if mode not in MODES:
            raise Refused(400, f"Invalid mode: {mode}")
        if mode == "direct" and self.core.knobs["mode_policy"] == "no_direct":
            raise Refused(400, "'direct' mode is not allowed when starting a new conversation")
        if modality not in MODALITIES:
            raise Refused(400, f"Invalid modality: {modality}")
        return mode, modality

    def _pick_models(self, body: dict, mode: str, modality: str) -> tuple[dict, dict | None]:
        if mode == "battle":
            pool = [m for m in self.catalog.models if m.get("organization") and model_fits(m, modality)]
            pair = self.core.rng.sample(pool, 2)
            return pair[0], pair[1]
        a = self._check_model(body.get("modelAId"), mode, modality)
        b = self._check_model(body.get("modelBId"), mode, modality, "modelBId") if mode == "side-by-side" else None
        return a, b

    def _owned(self, eid: str, uid: str) -> dict:
        ev = self.evaluations.get(eid)
        if ev is None:
            raise Refused(404, "Evaluation session not found")
        if ev["user"] != uid:
            raise Refused(401, f"User {uid} does not have access to evaluation session {eid}")
        return ev

    # --- the three paths -------------------------------------------------------------------------------------------

    def _create(self, body: dict, uid: str, content: str, attachments: list) -> Pending:
        mode, modality = self._check_mode(body)
        if not is_uuid7(body.get("id")):
            raise Refused(400, "Invalid id")
        if body["id"] in self.evaluations or body["id"] in self.used_message_ids:
            raise Refused(400, f"Evaluation session {body['id']} already exists")
        two = ("modelBMessageId",) if mode in TWO_LANE_MODES else ()
        self._check_ids(body, ("id", "userMessageId", "modelAMessageId", *two))
        a, b = self._pick_models(body, mode, modality)
        ev = {"user": uid, "model_id": a["id"], "model_b_id": b["id"] if b else None, "mode": mode,
              "modality": modality, "messages": [], "created": self.core.now(), "pending_battle": None}
        self.evaluations[body["id"]] = ev
        self._spend_ids(body)
        return Pending(body["id"], ev, content, attachments, body)

    def _post(self, body: dict, uid: str, eid: str, content: str, attachments: list) -> Pending:
        if body.get("id") not in (None, eid):
            raise Refused(400, "Evaluation id mismatch")
        ev = self._owned(eid, uid)
        pending_battle_refusal(ev)
        two = ("modelBMessageId",) if ev["mode"] in TWO_LANE_MODES else ()
        self._check_ids(body, ("userMessageId", "modelAMessageId", *two))
        if body.get("modelAId") is not None and ev["mode"] != "battle":
            self._check_model(body["modelAId"], ev["mode"], body.get("modality") or ev["modality"])
        self._spend_ids(body)
        return Pending(eid, ev, content, attachments, body)

    def _retry(self, body: dict, uid: str, eid: str, mid: str) -> Pending:
        ev = self._owned(eid, uid)
        msgs = ev["messages"]
        idx = next((i for i, m in enumerate(msgs) if m.get("id") == mid and m["role"] == "assistant"), None)
        if idx is None:
            raise Refused(404, "Message not found")
        user_idx = max(i for i in range(idx) if msgs[i]["role"] == "user")
        um = msgs[user_idx]
        return Pending(eid, ev, um["content"], um.get("attachments") or [], body, retry_of=idx,
                       turn=sum(1 for m in msgs[:user_idx + 1] if m["role"] == "user"))

    # --- the reply -------------------------------------------------------------------------------------------------

    def _turn(self, p: Pending) -> Turn:
        ev, body = p.ev, p.body
        users = [m for m in ev["messages"] if m["role"] == "user"]
        a_msg = body.get("modelAMessageId") or (ev["messages"][p.retry_of]["id"] if p.retry_of is not None else None)
        model = self.catalog.get(ev["model_id"]) or {}
        turn = Turn(number=p.turn or len(users) + 1, content=p.content,
                    modality=body.get("modality") or ev["modality"], model=model,
                    message_id=a_msg, user=ev["user"], two_lanes=ev["mode"] in TWO_LANE_MODES,
                    prompt_words=sum(len(str(m["content"]).split()) for m in users) + len(str(p.content).split()),
                    routed_to=self.catalog.router_target() if model.get("id") == ROUTER_MODEL_ID else None)
        if p.retry_of is None and is_battle_turn(self.core, ev):
            self._make_battle_turn(turn, body.get("modelBMessageId"))
        return turn

    def _make_battle_turn(self, turn: Turn, b_msg: str | None) -> None:
        """U3: this reply carries lane B too, under the client's modelBMessageId (or one we announce)."""
        turn.two_lanes = True
        turn.b_message_id = b_msg or make_uuid7(rng=self.core.rng)
        turn.announce_b = not b_msg

    def _reply(self, turn: Turn) -> Reply | Capture:
        """The next scripted reply (raw lines, a spec, or a capture to replay), else the generated one."""
        with self.core.lock:
            script = self.core.knobs["script"].pop(0) if self.core.knobs["script"] else None
        if script is None:
            return self.builder.build(turn)
        if not isinstance(script, dict):
            return raw_lines(list(script))
        if script.get("replay"):
            capture = load_capture(str(script["replay"]))
            capture.cut = script.get("cut")
            return capture
        return self.builder.scripted(script)

    def _recorder(self, p: Pending, turn: Turn, text: str, reasoning: str) -> Callable[[], None]:
        """What to keep in the history once the reply is (nearly) out."""
        ev, body = p.ev, p.body

        def record() -> None:
            with self.core.lock:
                if p.retry_of is not None:
                    ev["messages"][p.retry_of].update(content=text, reasoning=reasoning)
                    return
                ev["messages"].append({"id": body.get("userMessageId"), "role": "user", "content": p.content,
                                       "attachments": p.attachments})
                ev["messages"].append({"id": turn.message_id, "role": "assistant", "content": text,
                                       "reasoning": reasoning, "model_id": ev["model_id"]})
                if turn.b_message_id:
                    ev["pending_battle"] = {"a": turn.message_id, "b": turn.b_message_id}
        return record

    def _headers(self, req: Request, turn: Turn) -> list[tuple[str, str]]:
        if turn.modality == "image" and self.core.knobs["image_quota"] and req.uid:
            headers = self.quota.spend(req.uid)
        else:
            headers = self.ratelimit_headers(req.uid, turn.modality)
        if self.core.knobs["rotate_on_chat"]:
            headers += [("Set-Cookie", c) for c in self.accounts.rotated_cookies(req.cookies, "whole")]
        return headers

    def _stream(self, h: Handler, req: Request, p: Pending) -> None:
        turn = self._turn(p)
        reply = self._reply(turn)
        if isinstance(reply, Capture):
            return self._replay(h, req, reply, self._recorder(p, turn, lane_text(reply.body), ""))
        fault = self.faults.take(req.kind, req.uid, status_phase=False)
        keep = True
        if fault:
            req.log["fault"] = {x: y for x, y in fault.items() if x != "times"}
            if fault.get("content_less"):
                reply.lines = list(CONTENT_LESS[fault["content_less"]])
            keep = not (fault.get("content_less") or fault.get("disconnect_after") is not None)
        record = self._recorder(p, turn, reply.text, reply.reasoning) if keep else (lambda: None)
        return self._write(h, req, reply.lines, self._headers(req, turn), record, fault)

    def _write(self, h: Handler, req: Request, lines: list[str], headers: list[tuple[str, str]],
               record: Callable[[], None], fault: dict | None) -> None:
        opts = StreamOptions.from_knobs(self.core.knobs, fault)
        writer = StreamWriter(h, opts, self.core.rng)
        writer.start([*STREAM_HEADERS, ("x-request-id", self.core.uuid4()),
                      ("x-vercel-id", "fra1::iad1::" + self.core.hex(12)), *headers])
        writer.run(WRITE_PLANS[opts.split](opts.encode(lines), self.core.rng), record)

    def _replay(self, h: Handler, req: Request, capture: Capture, record: Callable[[], None]) -> None:
        """A real capture byte for byte, with its status and headers; ``cut`` (bytes, or "random") hangs up
        after that many bytes; the ``split`` knob chooses the writes (whole lines by default)."""
        req.log["replay"] = capture.name
        if capture.status != 200:
            return send(h, capture.status, capture.body, None, capture.headers)
        cut, blob = capture.cut, capture.body
        if cut == "random":
            cut = self.core.rng.randint(1, max(1, len(blob) - 1))
        opts = StreamOptions.from_knobs(self.core.knobs)
        if cut is not None:
            blob, opts.hang_up = blob[:int(cut)], True
        writer = StreamWriter(h, opts, self.core.rng)
        writer.start(capture.headers)
        writer.run(WRITE_PLANS[opts.split](blob.splitlines(keepends=True), self.core.rng),
                   record if cut is None else (lambda: None))
        return None

    def ratelimit_headers(self, uid: str | None, modality: str) -> list[tuple[str, str]]:
        now = self.core.now()
        limit, window = (3, 3600) if modality == "image" else (int(self.core.knobs["ratelimit_limit"]), 300)
        with self.core.lock:
            times = [t for t in self._rate.get((uid, window), []) if t > now - window] + [now]
            self._rate[(uid, window)] = times
        reset = int(window - (now - times[0]))
        return [("ratelimit", f"limit={limit}, remaining={max(0, limit - len(times))}, reset={reset}"),
                ("ratelimit-policy", f"{limit};w={window}")]
