"""Anonymous sign-up (E9, §4.6): Turnstile and reCAPTCHA checks, the provisional id, the session answer."""

from __future__ import annotations

from .accounts import Accounts, encode_session
from .antibot import Recaptcha, Turnstile
from .common import UUID_ANY_RE
from .core import Core
from .http import Handler, Request, err, send
from .site import Site

# Where the session sits in the answer, per ``signup_nesting`` knob.
NESTINGS = {"top": lambda s: s, "session": lambda s: {"session": s}, "data": lambda s: {"data": s},
            "data.session": lambda s: {"data": {"session": s}}}


class SignUp:
    def __init__(self, core: Core, accounts: Accounts, recaptcha: Recaptcha, turnstile: Turnstile,
                 site: Site) -> None:
        self.core, self.accounts, self.recaptcha, self.turnstile = core, accounts, recaptcha, turnstile
        self.site = site  # its current reCAPTCHA and Turnstile keys
        self.used_provisional: set[str] = set()

    def _token_failure(self, req: Request, body: dict, legacy: bool) -> tuple[int, str] | None:
        site = self.site
        reason = None
        if self.core.knobs["signup_turnstile"] != "none":  # U5: the 2026 site signs up without Turnstile
            reason = self.turnstile.check(body.get("turnstileToken") or body.get("turnstile_token") or "",
                                          site.turnstile_sitekey, self.recaptcha)
        if reason:
            req.log["note"] = reason
            return 400, "Invalid turnstile token"
        if self.core.knobs["signup_requires_recaptcha"] and not legacy:
            reason = self.recaptcha.check(req, {"recaptchaV3Token": body.get("recaptchaToken")}, "sign_up", None,
                                          (site.sitekey, site.v2_sitekey),
                                          score_knobs=False)
            if reason:
                req.log["note"] = "recaptcha: " + reason
                return 403, "recaptcha validation failed"
        return None

    def _claim_provisional(self, req: Request, body: dict, legacy: bool) -> str | None:
        """The provisional id becomes the user id: it must match the cookie and be unused.  With
        ``provisional_id_store`` other than ``cookie`` (U5) the client made it: any unused uuid, matching the cookie
        only if one was sent."""
        cookie_pid = req.cookies.get("provisional_user_id")
        pid = (cookie_pid or self.core.uuid4()) if legacy else body.get("provisionalUserId")
        own = self.core.knobs["provisional_id_store"] != "cookie" and not cookie_pid
        with self.core.lock:
            if not isinstance(pid, str) or not UUID_ANY_RE.match(pid) or pid in self.used_provisional \
                    or pid in self.accounts.accounts or not (legacy or own or pid == cookie_pid):
                return None
            self.used_provisional.add(pid)
        return pid

    def serve(self, h: Handler, req: Request) -> None:
        if req.method != "POST":
            return send(h, 405, {"error": "Method not allowed"})
        if self.core.knobs["signup_fail"]:
            status = int(self.core.knobs["signup_fail"])
            return err(h, status, "Forbidden" if status == 403 else "Internal Server Error")
        if not isinstance(req.json, dict):
            return err(h, 400, "Invalid request body")
        body = req.json
        if self.core.knobs["signup_turnstile"] == "none" and not set(body) <= {"recaptchaToken", "provisionalUserId"}:
            req.log["note"] = "not the 2026 sign-up body"   # U5: the 2026 site knows no Turnstile field
            return err(h, 400, "Invalid request body")
        legacy = "turnstile_token" in body and "turnstileToken" not in body
        failure = self._token_failure(req, body, legacy)
        if failure:
            return err(h, *failure)
        pid = self._claim_provisional(req, body, legacy)
        if pid is None:
            return err(h, 400, "User already exists")
        session = self.accounts.make_session(self.accounts.new_account(uid=pid),
                                             int(self.core.knobs["session_lifetime"]))
        return send(h, 200, NESTINGS[self.core.knobs["signup_nesting"]](session),
                    cookies=self.accounts.session_cookies(encode_session(session), "whole"))
