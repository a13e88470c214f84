"""``FakeArena``: one emulated LM Arena origin, wiring the parts together behind a routing table."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, Self
from urllib.parse import urlsplit

from . import control
from .accounts import Accounts, decode_session, encode_session, split_session
from .antibot import Cloudflare, Recaptcha, Turnstile
from .catalog import Catalog
from .chat import Chat
from .common import DEFAULT_MODELS_PATH, DEFAULT_SITEKEY, TURNSTILE_SITEKEY
from .core import Core
from .faults import Faults, answer_status_fault
from .http import Handler, Request, Server, send
from .replay import capture_names, load_capture
from .replies import ReplyBuilder
from .saved_runs import Replay
from .signup import SignUp
from .site import Page, Site
from .uploads import R2, ServerActions

SIGNUP_PATHS = ("/nextjs-api/sign-up", "/api/sign-up")
# Third-party stand-ins (Google, Cloudflare challenge, Supabase, R2) are not behind the interstitial.
NOT_BEHIND_CLOUDFLARE = ("/recaptcha/", "/__recaptcha/", "/turnstile/", "/__turnstile/", "/cdn-cgi/", "/r2/",
                         "/auth/v1/")


def is_page(path: str) -> bool:
    return path == "/" or path.startswith(("/c/", "/text", "/image"))


def is_action(req: Request) -> bool:
    return req.method == "POST" and "next-action" in req.headers


# Request kind (for fault matching), first match wins.
KINDS: tuple[tuple[str, Callable[[Request], bool]], ...] = (
    ("skip", lambda r: r.path.startswith("/nextjs-api/stream/skip-direct-battle/")),
    ("create", lambda r: r.path == "/nextjs-api/stream/create-evaluation"),
    ("post", lambda r: r.path.startswith("/nextjs-api/stream/post-to-evaluation/")),
    ("retry", lambda r: r.path.startswith("/nextjs-api/stream/retry-evaluation-session-message/")),
    ("r2", lambda r: r.path.startswith("/r2/")),
    ("signup", lambda r: r.path in SIGNUP_PATHS),
    ("refresh", lambda r: r.path.startswith("/auth/v1/")),
    ("action", is_action),
    ("page", lambda r: r.method == "GET" and is_page(r.path)),
)


def kind_of(req: Request) -> str:
    return next((name for name, test in KINDS if test(req)), "other")


class FakeArena:
    """One emulated LM Arena origin.  See the package docstring and the protocol document §13."""

    def __init__(self, models_path: str = DEFAULT_MODELS_PATH, seed: int = 0, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        with open(models_path, encoding="utf-8") as fh:
            self.models: list[dict] = json.load(fh)
        core = self.core = Core(seed)
        self._server = Server((host, port), type("FakeArenaHandler", (Handler,), {"app": self}))
        core.host, core.port = host, int(self._server.server_address[1])
        core.url = f"http://{host}:{core.port}"
        self.accounts_ = Accounts(core)
        self.catalog = Catalog(core, self.models)
        self.site = Site(core, self.catalog, TURNSTILE_SITEKEY, DEFAULT_SITEKEY)
        self.site.anon_key = self.accounts_.anon_key
        self.recaptcha = Recaptcha(core)
        self.turnstile = Turnstile(core)
        self.cloudflare = Cloudflare(core)
        self.faults = Faults(core)
        self.storage = R2(core)
        self.page = Page(core, self.site, self.accounts_)
        self.signup = SignUp(core, self.accounts_, self.recaptcha, self.turnstile, self.site)
        self.actions = ServerActions(core, self.site, self.accounts_, self.storage)
        self.chat = Chat(core, self.site, self.accounts_, self.recaptcha, self.faults,
                         ReplyBuilder(core, self.storage), self.catalog)
        self._thread: threading.Thread | None = None
        self.routes = self._routes()
        self.replaying: Replay | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Serve in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"fake-arena-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state views (tests read these) ------------------------------------------------------------------------------

    url = property(lambda self: self.core.url)
    host = property(lambda self: self.core.host)
    port = property(lambda self: self.core.port)
    knobs = property(lambda self: self.core.knobs)
    requests = property(lambda self: self.core.requests)
    models_by_id = property(lambda self: self.catalog.base_by_id)
    evaluations = property(lambda self: self.chat.evaluations)
    accounts = property(lambda self: self.accounts_.accounts)
    r2 = property(lambda self: self.storage.objects)
    sitekey = property(lambda self: self.site.sitekey)
    v2_sitekey = property(lambda self: self.site.v2_sitekey)
    turnstile_sitekey = property(lambda self: self.site.turnstile_sitekey)
    build_id = property(lambda self: self.site.build_id)
    deployment_id = property(lambda self: self.site.deployment_id)
    action_ids = property(lambda self: self.site.action_ids)
    anon_key = property(lambda self: self.accounts_.anon_key)
    open_connections = property(lambda self: self._server.open_connections)   # client connections still open

    @property
    def clock_offset(self) -> float:
        return self.core.clock_offset

    @clock_offset.setter
    def clock_offset(self, value: float) -> None:
        self.core.clock_offset = float(value)

    def now(self) -> float:
        """The emulator's clock: wall time plus ``clock_offset`` (to test expiry without waiting)."""
        return self.core.now()

    # --- knobs, faults, log ------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Knobs back to defaults, log and faults cleared, clock offset 0, score state and Cloudflare clearances
        cleared (a browser that solved a challenge in an earlier test has to solve it again).

        Accounts, evaluations, R2 objects, sitekey and build ids are kept."""
        with self.core.lock:
            self.core.reset_knobs()
            self.faults.queue.clear()
            self.core.requests.clear()
            self.recaptcha.penalty.clear()
            self.cloudflare.clearances.clear()
            self.cloudflare.widgets.clear()
            self.chat.quota.days.clear()
            self.core.clock_offset = 0.0

    def configure(self, **knobs: Any) -> None:
        """Set knobs (see DEFAULT_KNOBS).  Unknown names raise ValueError, so typos do not pass silently."""
        with self.core.lock:
            for k, v in knobs.items():
                if k == "clock_offset":
                    self.clock_offset = float(v)
                elif k == "sitekey":
                    self.rotate_sitekey(v)
                else:
                    self.core.set_knob(k, v)

    def replay(self, folder: str | None) -> None:
        """Answer from a saved run's recordings (see ``saved_runs``) where it has one; None stops replaying."""
        self.replaying = Replay(folder, self.url) if folder else None

    def fault(self, times: int = 1, **spec: Any) -> None:
        """Queue a fault for the next ``times`` matching requests (see ``Faults.add``)."""
        self.faults.add(times, **spec)

    def chat_requests(self) -> list[dict]:
        return [r for r in self.core.requests if r["path"].startswith("/nextjs-api/stream/")]

    def clear_log(self) -> None:
        self.core.requests.clear()

    # --- site parameters, sessions, tokens ---------------------------------------------------------------------------

    def redeploy(self) -> None:
        """New build id, deployment id, chunk names and action ids; the old ones answer 404."""
        self.site.redeploy()

    def rotate_sitekey(self, new: str | None = None) -> None:
        self.site.rotate_sitekey(new)

    encode_session = staticmethod(encode_session)
    decode_session = staticmethod(decode_session)
    split_session = staticmethod(split_session)

    def new_session(self, lifetime: int = 3600, anonymous: bool = True, alphabet: str = "url",
                    padding: bool = False, big: bool = False) -> str:
        """Create an account and return its cookie value ``base64-…``."""
        return self.accounts_.new_session(lifetime, anonymous, alphabet, padding, big)

    def session_user(self, value: str) -> str | None:
        return self.accounts_.session_user(value)

    def expire_session(self, value: str) -> None:
        self.accounts_.expire_session(value)

    def mint_token(self, action: str = "chat_submit", sitekey: str | None = None, v2: bool = False,
                   age: float = 0.0, context: str | None = None) -> str:
        """A reCAPTCHA token as the fake script mints it (``context``: the browser context it belongs to)."""
        key = sitekey or (self.site.v2_sitekey if v2 else self.site.sitekey)
        return self.recaptcha.mint(key, action, v2, age, context)

    def script_reply(self, text: str | None = None, reasoning: str | None = None, finish: str = "stop",
                     usage: dict | None = None, lines: list[str] | None = None, replay: str | None = None,
                     cut: int | str | None = None) -> None:
        """Queue the reply of the next chat request (FIFO, one per stream request, any account): its ``text``
        and optional ``reasoning``, ``finish`` and ``usage``; or raw ``lines``; or a real capture to ``replay``
        (optionally ``cut`` after N bytes or at a "random" offset)."""
        spec: dict[str, Any] = {"lines": list(lines)} if lines is not None else \
            {"replay": replay, "cut": cut} if replay else {"text": text or "", "reasoning": reasoning or "",
                                                         "finish": finish, "usage": usage}
        if replay:
            load_capture(replay)  # an unknown name fails here, not in the middle of a test's chat
        with self.core.lock:
            self.core.knobs["script"].append(spec)

    def captures(self) -> list[str]:
        """Names of the real captures ``script_reply(replay=…)`` can replay."""
        return capture_names()

    def kill_account(self, user: str) -> None:
        """U9: a dead credential (by arena user id or session cookie value)."""
        self.accounts_.kill(self.session_user(user) or user)

    def penalty_until(self, user: str) -> float:
        """U2: when the account's reCAPTCHA penalty ends (0: none)."""
        return self.recaptcha.penalty_until(user)

    def _mint_turnstile(self, sitekey: str) -> str:
        return self.turnstile.mint(sitekey)

    def issue_clearance(self, ua: str, ip: str = "127.0.0.1") -> str:
        return self.cloudflare.issue(ua, ip)

    def presign(self, key: str, method: str = "GET", expires: int = 3600) -> str:
        return self.storage.presign(key, method, expires)

    # --- dispatch ----------------------------------------------------------------------------------------------------

    def _origin_of(self, req: Request) -> str:
        return "http://" + (req.headers.get("host") or f"{self.host}:{self.port}")

    def _recaptcha_mint(self, h: Handler, req: Request) -> None:
        q = req.query
        token = self.mint_token(action=q.get("action", ""), sitekey=q.get("sitekey") or None,
                                v2=q.get("v2") in ("1", "true"), context=q.get("ctx") or None)
        send(h, 200, {"token": token}, headers=[("Access-Control-Allow-Origin", "*"), ("Cache-Control", "no-store")])

    def _turnstile_mint(self, h: Handler, req: Request) -> None:
        send(h, 200, {"token": self.turnstile.mint(req.query.get("sitekey", ""))},
             headers=[("Access-Control-Allow-Origin", "*")])

    def _routes(self) -> tuple[tuple[Callable[[Request], bool], Callable[[Handler, Request], None]], ...]:
        """Path (and method) -> handler, first match wins."""
        return (
            (lambda r: r.path.startswith("/recaptcha/") and r.path.endswith(".js"),
             lambda h, r: self.recaptcha.script(h, r, self._origin_of(r))),
            (lambda r: r.path == "/__recaptcha/mint", self._recaptcha_mint),
            (lambda r: r.path == "/recaptcha/enterprise/anchor",
             lambda h, _r: send(h, 200, "<!DOCTYPE html><html><body></body></html>", "text/html")),
            (lambda r: r.path.startswith("/turnstile/"), lambda h, r: self.turnstile.script(h, r, self._origin_of(r))),
            (lambda r: r.path == "/__turnstile/mint", self._turnstile_mint),
            (lambda r: r.path.startswith("/cdn-cgi/"), self.cloudflare.endpoints),
            (lambda r: r.path.startswith("/r2/"), self.storage.serve),
            (lambda r: r.path == "/auth/v1/token", self.accounts_.refresh_grant),
            (lambda r: r.path.startswith("/_next/static/chunks/"), self.site.chunk),
            (lambda r: r.path in SIGNUP_PATHS, self.signup.serve),
            (lambda r: r.path.startswith("/nextjs-api/stream/"), self.chat.serve),
            (is_action, self.actions.serve),
            (lambda r: r.method in ("GET", "HEAD") and is_page(r.path), self.page.serve),
        )

    def _legacy(self, h: Handler, req: Request) -> bool:
        """Legacy host alias (§1): True when answered with a 301 (``legacy_redirect``), else the path is
        rewritten in place and served as on the main origin."""
        legacy_prefix = req.path.startswith("/__legacy")
        if req.headers.get("host", "").split(":")[0] != "legacy.localhost" and not legacy_prefix:
            return False
        rest = (req.path[len("/__legacy"):] if legacy_prefix else req.path) or "/"
        if self.core.knobs["legacy_redirect"]:
            qs = urlsplit(req.raw_path).query
            send(h, 301, b"", "text/plain", headers=[("Location", self.url + rest + ("?" + qs if qs else ""))])
            return True
        req.path = rest
        return False

    def dispatch(self, h: Handler) -> None:
        body = h.read_body()
        req = Request(h, body)
        entry = {"method": req.method, "path": req.path, "query": req.query, "headers": req.headers,
                 "cookies": req.cookies, "body": body, "json": req.json, "status": None, "time": self.now()}
        h.log_entry = req.log = entry
        self.core.requests.append(entry)
        if req.path.startswith("/__emulator/"):
            return control.serve(self, h, req)
        if self._legacy(h, req):
            return None
        if self.replaying is not None and self.replaying.answer(h, req):
            return None
        if self.core.knobs["cloudflare"] and not req.path.startswith(NOT_BEHIND_CLOUDFLARE) \
                and not self.cloudflare.cleared(req):
            return self.cloudflare.challenge(h, req)
        req.uid = self.accounts_.from_cookies(req.cookies)[0]
        req.kind = kind_of(req)
        fault = self.faults.take(req.kind, req.uid, status_phase=True)
        if fault:
            entry["fault"] = {k: v for k, v in fault.items() if k != "times"}
            return answer_status_fault(h, fault)
        handler = next((handle for test, handle in self.routes if test(req)), None)
        if handler is None:
            return send(h, 404, {"error": "Not found"})
        return handler(h, req)
