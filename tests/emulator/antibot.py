"""Anti-bot stand-ins: reCAPTCHA tokens and their checks (§10, §13.7), Turnstile (§13.14), the Cloudflare
interstitial (§13.12) and the fake ``grecaptcha``/``turnstile`` scripts a real Chromium runs (§13.13)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable

from .common import (
    PAGE_HEADER,
    TOKEN_PREFIX,
    TURNSTILE_DUMMY_TOKEN,
    TURNSTILE_PASS_KEY,
    b64_any_decode,
    b64url,
    compact,
)
from .core import Core
from .http import Handler, Request, send
from .scripts import GRECAPTCHA_JS, TURNSTILE_JS, challenge_html, widget_html

# How long an interactive challenge's widget can be solved after the page showed it.
WIDGET_LIFETIME = 600.0

# U2 defaults: K requests within W seconds pass, the next flags the account for P seconds; a failed token flags too.
PENALTY_DEFAULTS = {"k": 3, "w": 60.0, "p": 1200.0, "on_fail": True}

SCRIPT_HEADERS = [("Access-Control-Allow-Origin", "*"), ("Cache-Control", "no-store")]


def pick_token(body: dict) -> tuple[str, bool] | None:
    """(token, is_v2) from a chat body: a v3 token, or a v2 token with the v3 field absent or null."""
    v3, v2 = body.get("recaptchaV3Token"), body.get("recaptchaV2Token")
    if isinstance(v3, str) and v3:
        return v3, False
    if isinstance(v2, str) and v2 and v3 is None:
        return v2, True
    return None


def penalty_settings(knob: object) -> dict | None:
    if not knob:
        return None
    given = knob if isinstance(knob, dict) else {}
    out = {**PENALTY_DEFAULTS, **{k: v for k, v in given.items() if k in PENALTY_DEFAULTS}}
    return {"k": int(out["k"]), "w": float(out["w"]), "p": float(out["p"]), "on_fail": bool(out["on_fail"])}


class Recaptcha:
    """Mints tokens shaped like real ones and checks them as the site does: signature, single use, kind, age,
    sitekey, action, browser context, then the score knobs (penalty, fail next N, fail always)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.used_nonces: dict[str, float] = {}
        self.penalty: dict[str, dict] = {}

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.core.secret, b"recaptcha|" + payload, hashlib.sha256).digest()

    def mint(self, sitekey: str, action: str = "chat_submit", v2: bool = False, age: float = 0.0,
             context: str | None = None) -> str:
        """``0cAFcWeA`` + base64url(JSON claims, NUL, HMAC, random filler).

        ``context`` is the id of the page that mints it (the ``context_bound_tokens`` knob, U1)."""
        core = self.core
        claims = {"k": sitekey, "a": action or "", "t": round(core.now() - float(age), 3), "n": core.hex(16),
                  "v2": bool(v2)}
        if context:
            claims["c"] = self.page_hash(str(context))
        payload = compact(claims).encode()
        filler = bytes(core.rng.getrandbits(8) for _ in range(max(0, 1200 - len(payload))))
        return TOKEN_PREFIX + b64url(payload + b"\x00" + self._mac(payload) + filler)

    def decode(self, token: str) -> dict | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        try:
            raw = b64_any_decode(token[len(TOKEN_PREFIX):])
            payload, _, rest = raw.partition(b"\x00")
            if not hmac.compare_digest(rest[:32], self._mac(payload)):
                return None
            info = json.loads(payload)
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _spend(self, nonce: str) -> bool:
        """Mark a nonce used; False if it already was (tokens verify once)."""
        now = self.core.now()
        with self.core.lock:
            for n, t in list(self.used_nonces.items()):
                if t < now - 600:
                    del self.used_nonces[n]
            if nonce in self.used_nonces:
                return False
            self.used_nonces[nonce] = now
            return True

    def page_hash(self, page_id: str) -> str:
        """What a token keeps of the page that minted it: a keyed hash, so a reader of the token cannot forge
        the page's header from it."""
        return hmac.new(self.core.secret, b"page|" + page_id.encode(), hashlib.sha256).hexdigest()[:24]

    def _from_page(self, info: dict, req: Request) -> bool:
        """U1: the request is the minting page's own fetch() (the fake script adds the page's id to those)."""
        page_id = req.headers.get(PAGE_HEADER)
        return bool(page_id and info.get("c") and hmac.compare_digest(str(info["c"]), self.page_hash(page_id)))

    def _claims_reason(self, info: dict, want_v2: bool, action: str, sitekeys: tuple[str, str],
                       req: Request) -> str | None:
        sitekey, v2_sitekey = sitekeys
        now, knobs = self.core.now(), self.core.knobs
        checks = (
            (bool(info.get("v2")) != want_v2, "token kind mismatch"),
            (now - float(info["t"]) > float(knobs["token_max_age"]) or float(info["t"]) > now + 5, "token expired"),
            (info["k"] not in ((v2_sitekey, sitekey) if want_v2 else (sitekey,)), "wrong sitekey"),
            (not want_v2 and info["a"] != action, f"wrong action {info['a']!r}"),
            (bool(knobs["context_bound_tokens"]) and not self._from_page(info, req), "not sent by the minting page"),
        )
        return next((reason for failed, reason in checks if failed), None)

    def _token_reason(self, req: Request, picked: tuple[str, bool] | None, action: str,
                      sitekeys: tuple[str, str]) -> str | None:
        if picked is None:
            return "no token"
        info = self.decode(picked[0])
        if info is None:
            return "bad signature"
        if not self._spend(str(info.get("n"))):
            return "token reused"
        return self._claims_reason(info, picked[1], action, sitekeys, req)

    def check(self, req: Request, body: dict, action: str, uid: str | None, sitekeys: tuple[str, str],
              score_knobs: bool = True) -> str | None:
        """None if the request's token passes, else a reason string (logged in the request log).

        Order: an account under penalty fails at once (and the penalty grows); then the token itself; then the
        score knobs.  With ``on_fail``, a failed token puts the account under penalty too."""
        knobs = self.core.knobs
        if knobs["recaptcha"] in ("off", "absent"):
            return None
        picked = pick_token(body)
        scored = score_knobs and not (picked and picked[1] and knobs["v2_passes_when_v3_fails"])
        penalty = penalty_settings(knobs["recaptcha_penalty"]) if scored and uid else None

        def verdict() -> str | None:
            reason = self._token_reason(req, picked, action, sitekeys)
            return self._score_reason(uid, penalty) if reason is None and scored else reason
        return self._penalised(uid, penalty, verdict) if penalty and uid else verdict()

    def _penalised(self, uid: str, penalty: dict, verdict: Callable[[], str | None]) -> str | None:
        if self._extend_flag(uid, penalty):
            return "account penalty"
        reason = verdict()
        if reason and penalty["on_fail"] and reason != "account penalty":
            self._flag(uid, penalty)
        return reason

    def _score_reason(self, uid: str | None, penalty: dict | None) -> str | None:
        knobs = self.core.knobs
        with self.core.lock:
            reason = self._window_reason(uid, penalty) if penalty and uid else None
            if knobs["recaptcha_fail_next"] > 0:
                knobs["recaptcha_fail_next"] -= 1
                reason = reason or "low score (fail_next)"
            if knobs["recaptcha_fail_always"]:
                reason = reason or "low score (fail_always)"
        return reason

    # --- U2: account penalties ----------------------------------------------------------------------------------------

    def _flag(self, uid: str, penalty: dict) -> None:
        with self.core.lock:
            st = self.penalty.setdefault(uid, {"times": [], "until": 0.0})
            st["until"], st["times"] = self.core.now() + penalty["p"], []

    def _extend_flag(self, uid: str, penalty: dict) -> bool:
        """True if the account is under penalty; every attempt meanwhile extends it to now + P."""
        with self.core.lock:
            st = self.penalty.get(uid)
            if st is None or st["until"] <= self.core.now():
                return False
            st["until"] = self.core.now() + penalty["p"]
            return True

    def _window_reason(self, uid: str, penalty: dict) -> str | None:
        """K requests within W s pass; the next one puts the account under penalty for P s."""
        now = self.core.now()
        st = self.penalty.setdefault(uid, {"times": [], "until": 0.0})
        st["times"] = [t for t in st["times"] if t > now - penalty["w"]]
        if len(st["times"]) >= penalty["k"]:
            self._flag(uid, penalty)
            return "account penalty"
        st["times"].append(now)
        return None

    def penalty_until(self, uid: str) -> float:
        """When the account's penalty ends (0 when it has none)."""
        st = self.penalty.get(uid)
        return st["until"] if st and st["until"] > self.core.now() else 0.0

    # --- the page's script ------------------------------------------------------------------------------------------

    def script(self, h: Handler, req: Request, base: str) -> None:
        knobs = self.core.knobs
        cfg = {"base": base, "render": req.query.get("render", ""), "onload": req.query.get("onload", ""),
               "readyDelay": int(float(knobs["grecaptcha_ready_delay"]) * 1000),
               "noEnterprise": bool(knobs["grecaptcha_no_enterprise"]) or not req.path.endswith("enterprise.js"),
               "rejects": bool(knobs["grecaptcha_execute_rejects"]),
               "wrongSitekey": bool(knobs["grecaptcha_wrong_sitekey"]), "pageHeader": PAGE_HEADER}
        send(h, 200, "(function(){var C=" + compact(cfg) + ";" + GRECAPTCHA_JS, "text/javascript; charset=utf-8",
             headers=SCRIPT_HEADERS)


class Turnstile:
    """Turnstile tokens: minted by the fake widget, verified once at sign-up."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.core.secret, b"turnstile|" + payload, hashlib.sha256).digest()

    def mint(self, sitekey: str) -> str:
        claims = {"k": sitekey, "t": round(self.core.now(), 3), "n": self.core.hex(16)}
        payload = compact(claims).encode()
        return "0." + b64url(payload) + "." + b64url(self._mac(payload)) + "." + self.core.hex(64)

    def check(self, token: str, sitekey: str, spend: Recaptcha) -> str | None:
        if token == TURNSTILE_DUMMY_TOKEN and self.core.knobs["turnstile_accept_dummy"]:
            return None
        try:
            _, payload, sig, _ = token.split(".")
            raw = b64_any_decode(payload)
            if not hmac.compare_digest(b64_any_decode(sig), self._mac(raw)):
                return "bad turnstile signature"
            claims = json.loads(raw)
        except ValueError:
            return "bad turnstile token"
        if claims["k"].startswith("2x") or claims["k"] not in (sitekey, TURNSTILE_PASS_KEY):
            return "turnstile sitekey rejected"
        if self.core.now() - claims["t"] > 300:
            return "turnstile token expired"
        return None if spend._spend("ts" + claims["n"]) else "turnstile token reused"

    def script(self, h: Handler, req: Request, base: str) -> None:
        cfg = {"base": base, "delay": int(float(self.core.knobs["turnstile_delay"]) * 1000),
               "onload": req.query.get("onload", "")}
        send(h, 200, "(function(){var C=" + compact(cfg) + ";" + TURNSTILE_JS, "text/javascript; charset=utf-8",
             headers=SCRIPT_HEADERS)


class Cloudflare:
    """The interstitial and ``cf_clearance`` bound to the UA and IP that solved it.

    With ``cloudflare_interactive`` the page never solves itself: only a click on its widget's checkbox posts
    the widget's id, which the solve endpoint wants (issued by a challenge page, unexpired, used once)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.clearances: dict[str, dict] = {}
        self.widgets: dict[str, float] = {}  # interactive widget id -> when its challenge page was served

    def issue(self, ua: str, ip: str = "127.0.0.1") -> str:
        """A cf_clearance value bound to this UA and IP (for tests that do not run a browser)."""
        core = self.core
        value = core.hex(43) + "-" + str(int(core.now())) + "-1.2.1.1-" + b64url(os.urandom(30))
        with core.lock:
            self.clearances[value] = {"ua": ua, "ip": ip,
                                      "exp": core.now() + float(core.knobs["cf_clearance_lifetime"])}
        return value

    def cleared(self, req: Request) -> bool:
        rec = self.clearances.get(req.cookies.get("cf_clearance", ""))
        return bool(rec and rec["ua"] == req.ua and rec["ip"] == req.ip and rec["exp"] > self.core.now())

    def _new_widget(self) -> str:
        widget_id, now = self.core.hex(8), self.core.now()
        with self.core.lock:
            for old, shown in list(self.widgets.items()):
                if shown < now - WIDGET_LIFETIME:
                    del self.widgets[old]
            self.widgets[widget_id] = now
        return widget_id

    def _widget_shown(self, widget_id: object, spend: bool) -> bool:
        with self.core.lock:
            ok = isinstance(widget_id, str) and self.widgets.get(widget_id, 0.0) > self.core.now() - WIDGET_LIFETIME
            if ok and spend:
                del self.widgets[str(widget_id)]
        return ok

    def challenge(self, h: Handler, req: Request) -> None:
        interactive = bool(self.core.knobs["cloudflare_interactive"])
        widget_id = self._new_widget() if interactive else self.core.hex(8)
        html = challenge_html(req.headers.get("host", ""), widget_id,
                              int(float(self.core.knobs["cloudflare_delay"]) * 1000), interactive)
        send(h, 403, html, "text/html; charset=UTF-8",
             headers=[("cf-mitigated", "challenge"), ("Cache-Control", "private, no-store"),
                      ("cf-ray", self.core.hex(16) + "-AMS")])

    def _solve(self, h: Handler, req: Request) -> None:
        if self.core.knobs["cloudflare_interactive"] and not self._widget_shown(req.obj.get("widget"), spend=True):
            req.log["note"] = "cloudflare: no click on a shown challenge widget"
            return send(h, 403, {"ok": False})
        value = self.issue(req.ua, req.ip)
        lifetime = float(self.core.knobs["cf_clearance_lifetime"])
        expires = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + lifetime))
        return send(h, 200, {"ok": True}, cookies=[f"cf_clearance={value}; Path=/; Expires={expires}; HttpOnly"])

    def endpoints(self, h: Handler, req: Request) -> None:
        if req.path == "/cdn-cgi/challenge-platform/solve" and req.method == "POST":
            return self._solve(h, req)
        if "challenges.cloudflare.com" in req.path:
            widget_id = req.path.rstrip("/").split("/")[-2]
            interactive = self.core.knobs["cloudflare_interactive"] and self._widget_shown(widget_id, spend=False)
            return send(h, 200, widget_html(widget_id if interactive else None), "text/html")
        return send(h, 404, "Not Found", "text/plain")
