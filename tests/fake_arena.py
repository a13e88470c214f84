"""Fake LM Arena: a local, standard-library-only emulator of the arena.ai web protocol.

Why this exists
---------------
The bridge talks to a private, moving target (see ``shared/arena-protocol.md``).  Tests must not touch the real
site, so this module stands in for *all* of it on one local origin:

* the Next.js page with flight data (model list, JS chunk list, reCAPTCHA script tag),
* JS chunks with server-action ids, the reCAPTCHA sitekey and the Supabase anon key,
* Supabase auth (session cookies, the refresh grant), anonymous sign-up,
* the three streaming chat endpoints, with strict validation and a deterministic reply generator,
* server actions plus an R2 stand-in for image upload and generated images,
* fake ``grecaptcha`` and ``turnstile`` scripts (so that a real headless Chromium can mint tokens here),
* a Cloudflare-like interstitial and a legacy-host redirect,
* fault injection and framing knobs to reproduce every variant the protocol document lists.

Design choices
--------------
* ``http.server.ThreadingHTTPServer`` (daemon threads, big listen backlog) so that we control every byte written
  and flushed: streams use HTTP/1.1 chunked encoding, one chunk per write, with TCP_NODELAY.
* Strict by default: what the real site rejects, the emulator rejects, with the real status and message.
* Deterministic: a seeded ``random.Random`` and a clock that is ``time.time() + clock_offset``.

Run standalone: ``python tests/fake_arena.py --port 9000 [--no-recaptcha]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import re
import socket
import string
import struct
import sys
import threading
import time
import traceback
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

# =====================================================================================================================
# Constants
# =====================================================================================================================

# The repository's own copy of the scraped list, so that a plain clone runs the emulator and the tests.
DEFAULT_MODELS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "models.json")

DEFAULT_SITEKEY = "6LeTGMcsAAAAALuIlkVwIxaAuZA8VledA6d3Nnb0"
V2_SITEKEY = "6Ld7ePYrAAAAAB34ovoFoDau1fqCJ6IyOjFEQaMn"
TURNSTILE_SITEKEY = "0x4AAAAAAA65vWDmG-O_lPtT"
TURNSTILE_PASS_KEY = "1x00000000000000000000AA"
TURNSTILE_FAIL_KEY = "2x00000000000000000000AB"
TURNSTILE_DUMMY_TOKEN = "XXXX.DUMMY.TOKEN.XXXX"
TOKEN_PREFIX = "0cAFcWeA"
AUTH_COOKIE = "arena-auth-prod-v1"
CTX_COOKIE = "arena-ctx"
R2_MAX_BYTES = 10 * 1024 * 1024
CHAT_PATHS = ("create", "post", "retry")
UUID7_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
UUID_ANY_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Extra text appended to replies when the ``unicode`` knob is on: CJK, RTL, an astral emoji (emitted as a
# surrogate-pair \\uXXXX escape), an embedded double quote and an embedded newline.
UNICODE_EXTRA = ' 你好，世界 שלום مرحبا 😀🎉 "quoted"\nsecond line'

DEFAULT_KNOBS = {
    # --- anti-bot ---
    "recaptcha": "required",            # "required" | "off"
    "recaptcha_fail_next": 0,           # fail the next N chat token checks (score too low)
    "recaptcha_fail_always": False,
    "recaptcha_penalty": None,          # {"k":3,"w":60,"p":1200}: K requests within W s pass, the next flags P s
    "v2_passes_when_v3_fails": False,   # v2 tokens ignore the three score knobs above
    "context_bound_tokens": False,      # token ctx must equal the request's arena-ctx cookie
    "token_max_age": 120.0,
    "grecaptcha_ready_delay": 0.05,     # fake grecaptcha script: delay before ready() callbacks run
    "grecaptcha_no_enterprise": False,  # script defines no grecaptcha.enterprise
    "grecaptcha_execute_rejects": False,
    "grecaptcha_wrong_sitekey": False,  # script mints tokens for a wrong sitekey
    "turnstile_delay": 0.2,             # fake Turnstile: delay before callback(token)
    "turnstile_accept_dummy": False,    # accept XXXX.DUMMY.TOKEN.XXXX at sign-up
    "recaptcha_script_host": "",        # prefix of the page's recaptcha script src ("" = this origin)
    # --- Cloudflare / hosts ---
    "cloudflare": False,
    "cloudflare_delay": 0.5,
    "cf_clearance_lifetime": 1800.0,
    "legacy_redirect": False,
    # --- accounts ---
    "session_lifetime": 3600,           # lifetime of sessions issued by sign-up
    "refresh_cookie_form": "whole",     # "whole" | "chunks": form of the Set-Cookie on a page-GET refresh
    "chunk_size": 3180,
    "refresh_grace": 10.0,
    "signup_requires_recaptcha": True,
    "signup_nesting": "top",            # "top" | "session" | "data" | "data.session"
    "signup_fail": None,                # None | 500 | 403 | any status
    "page_auto_signup": False,          # the page signs up by itself when it has no auth cookie
    "rotate_on_chat": False,            # a chat reply carries Set-Cookie with a rotated session (refresh token used)
    # --- chat validation ---
    "mode_policy": "both",              # "both" | "no_direct"
    "unknown_model_status": 400,        # 400 {"error":"Invalid model"} | 404 {"error":"Models not found"}
    "check_modality": True,             # request modality must match the model (404 Models not found)
    # --- page ---
    "flight_split": True,               # split the initialModels payload across two pushes
    # --- stream content ---
    "script": [],                       # FIFO of raw line lists, one per stream request
    "image_output": "url",              # "url" | "data" | "file"
    "finish_reason": None,              # override "stop"
    "lines": 0,                         # N > 0: reply is a0:"line <i>\n" for i=1..N
    "words_per_part": 2,
    "unicode": False,
    "noise_codes": False,
    "b_lines": False,                   # True|"stop": b lines + bd before ad; "unknown": also ad finishReason unknown
    # --- stream framing ---
    "data_prefix": False,               # True: "data: <line>"; "sse": also a blank line after each
    "crlf": False,
    "no_final_newline": False,
    "split": "none",                    # "none" | "random" | "coalesce"
    "heartbeat_every": 0.0,
    "first_byte_delay": 0.0,
    "line_delay": 0.0,
    "stream_framing": "chunked",        # "chunked" | "close" (close-delimited body)
    "ratelimit_limit": 3000,
}

# Knobs whose default is mutable: copied on reset.
_MUTABLE_KNOBS = ("script",)

# =====================================================================================================================
# Small helpers: base64, JWT, ids, PNG
# =====================================================================================================================


def b64url(data: bytes) -> str:
    """base64url without padding (the alphabet Supabase and JWTs use)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64_any_decode(text: str) -> bytes:
    """Strict decode of base64 in either alphabet, with or without padding."""
    t = text.strip().replace("-", "+").replace("_", "/")
    t += "=" * (-len(t) % 4)
    return base64.b64decode(t, validate=True)


def is_uuid7(value) -> bool:
    return isinstance(value, str) and bool(UUID7_RE.match(value))


def make_uuid7(ms: int | None = None, rng: random.Random | None = None) -> str:
    """A UUIDv7 string (used by tests that do not run the bridge)."""
    rng = rng or random
    ms = int(time.time() * 1000) if ms is None else ms
    rand_a = rng.getrandbits(12)
    rand_b = rng.getrandbits(62)
    n = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    h = "%032x" % n
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def make_png(width: int = 8, height: int = 8, rgb=(200, 60, 30)) -> bytes:
    """A real, valid RGB PNG built with zlib+struct (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


def js_string(value: str, escape_astral: bool = False) -> str:
    """JSON string literal with raw UTF-8 (like JSON.stringify); optionally astral chars as surrogate escapes."""
    out = json.dumps(value, ensure_ascii=False)
    if escape_astral:
        def esc(m):
            cp = ord(m.group(0)) - 0x10000
            return "\\u%04x\\u%04x" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
        out = re.sub("[\U00010000-\U0010FFFF]", esc, out)
    return out


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def parse_cookie_header(header: str) -> dict:
    """Cookie header -> dict (no SimpleCookie: it chokes on real-world values)."""
    out = {}
    for part in header.split(";"):
        if "=" not in part:
            continue
        name, _, value = part.strip().partition("=")
        if name and name not in out:
            out[name.strip()] = value.strip()
    return out


def word_parts(text: str, per_part: int) -> list[str]:
    """Split text into deltas of ``per_part`` words each, keeping all whitespace (joined parts == text)."""
    tokens = re.findall(r"\S+\s*|\s+", text)
    per_part = max(1, int(per_part or 1))
    return ["".join(tokens[i:i + per_part]) for i in range(0, len(tokens), per_part)] or [""]


# =====================================================================================================================
# HTTP server plumbing
# =====================================================================================================================


class _Server(ThreadingHTTPServer):
    """Threading server sized for hundreds of concurrent streams."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    block_on_close = False

    def handle_error(self, request, client_address):  # connection resets are normal in fault tests
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, BrokenPipeError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


class _Abort(Exception):
    """Raised to stop handling a request after the connection was deliberately cut."""


class _Handler(BaseHTTPRequestHandler):
    """Per-connection handler; all logic lives in FakeArena, this class only does I/O."""
    protocol_version = "HTTP/1.1"
    server_version = "cloudflare"
    sys_version = ""
    arena: "FakeArena" = None  # set on a subclass per emulator instance

    def setup(self):
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def version_string(self):
        return "cloudflare"

    def send_response(self, code, message=None):
        entry = getattr(self, "log_entry", None)
        if entry is not None:
            entry["status"] = code
        super().send_response(code, message)

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            data = b""
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _any(self):
        try:
            self.arena._dispatch(self)
        except _Abort:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        except Exception:  # a bug in the emulator: answer 500 and show the traceback
            traceback.print_exc()
            self.close_connection = True
            try:
                if not getattr(self, "_headers_sent", False):
                    self.arena._send(self, 500, {"error": "emulator bug: " + traceback.format_exc(limit=1)})
            except Exception:
                pass

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_HEAD = _any


class _Request:
    """Parsed request view handed to route handlers."""

    def __init__(self, h: _Handler, body: bytes):
        split = urlsplit(h.path)
        self.method = h.command
        self.raw_path = h.path
        self.path = split.path
        self.query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers = {}
        for k, v in h.headers.items():  # repeated headers are joined (cookies with "; ", others with ", ")
            k = k.lower()
            headers[k] = (headers[k] + ("; " if k == "cookie" else ", ") + v) if k in headers else v
        self.headers = headers
        self.cookies = parse_cookie_header(headers.get("cookie", ""))
        self.body = body
        try:
            self.json = json.loads(body.decode("utf-8")) if body else None
        except (ValueError, UnicodeDecodeError):
            self.json = None
        self.ip = h.client_address[0]
        self.ua = headers.get("user-agent", "")
        self.kind = "other"
        self.uid = None
        self.log = None


# =====================================================================================================================
# The emulator
# =====================================================================================================================


class FakeArena:
    """One emulated LM Arena origin.  See the module docstring and the protocol document §13."""

    # -----------------------------------------------------------------------------------------------------------------
    # Lifecycle
    # -----------------------------------------------------------------------------------------------------------------

    def __init__(self, models_path=DEFAULT_MODELS_PATH, seed=0, host="127.0.0.1", port=0):
        with open(models_path, encoding="utf-8") as fh:
            self.models = json.load(fh)
        self.models_by_id = {m["id"]: m for m in self.models}
        self.rng = random.Random(seed)
        self._secret = hashlib.sha256(f"fake-arena-secret-{seed}".encode()).digest()
        self._lock = threading.RLock()
        self.clock_offset = 0.0
        self.knobs = {}
        self.requests: list[dict] = []
        self._faults: list[dict] = []
        # accounts and evaluations (kept across reset)
        self.accounts: dict[str, dict] = {}
        self.evaluations: dict[str, dict] = {}
        self._refresh: dict[str, dict] = {}
        self._forced_expired: set[str] = set()
        self._used_message_ids: set[str] = set()
        self._used_provisional: set[str] = set()
        self._rate: dict[str, list] = {}
        # anti-bot state
        self._used_nonces: dict[str, float] = {}
        self._penalty: dict[str, dict] = {}
        self._clearances: dict[str, dict] = {}
        # site parameters
        self.sitekey = DEFAULT_SITEKEY
        self.v2_sitekey = V2_SITEKEY
        self.turnstile_sitekey = TURNSTILE_SITEKEY
        self.r2: dict[str, dict] = {}
        self._server = _Server((host, port), type("FakeArenaHandler", (_Handler,), {"arena": self}))
        self.host, self.port = self._server.server_address[:2]
        self.url = f"http://{host}:{self.port}"
        self.anon_key = self._jwt({"iss": "supabase", "ref": "fakearena", "role": "anon",
                                   "iat": 1700000000, "exp": 2000000000}, alg="HS256")
        self._redeploy_ids()
        self._thread = None
        self.reset()

    def start(self) -> "FakeArena":
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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def now(self) -> float:
        """The emulator's clock: wall time plus ``clock_offset`` (to test expiry without waiting)."""
        return time.time() + self.clock_offset

    # -----------------------------------------------------------------------------------------------------------------
    # Knobs, faults, log
    # -----------------------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Knobs back to defaults, log and faults cleared, clock offset 0, score state cleared.

        Accounts, evaluations, R2 objects, sitekey and build ids are kept."""
        with self._lock:
            self.knobs = {k: (list(v) if k in _MUTABLE_KNOBS else v) for k, v in DEFAULT_KNOBS.items()}
            self._faults.clear()
            self.requests.clear()
            self._penalty.clear()
            self.clock_offset = 0.0

    def configure(self, **knobs) -> None:
        """Set knobs (see DEFAULT_KNOBS).  Unknown names raise ValueError, so typos do not pass silently."""
        with self._lock:
            for k, v in knobs.items():
                if k == "clock_offset":
                    self.clock_offset = float(v)
                elif k == "sitekey":
                    self.rotate_sitekey(v)
                elif k not in DEFAULT_KNOBS:
                    raise ValueError(f"unknown knob {k!r}")
                else:
                    self.knobs[k] = list(v) if k == "script" else v

    def fault(self, times=1, **spec) -> None:
        """Queue a fault for the next ``times`` matching requests.

        Match keys: ``path`` ("stream" default = create|post|retry, or one of create, post, retry, page, action, r2,
        signup, refresh, any) and ``user`` (arena user id).  Status faults (``status`` or ``expire_auth``) answer
        before validation; stream faults (``disconnect_after``, ``content_less``, ``first_byte_delay``,
        ``line_delay``) apply when a valid request starts streaming."""
        spec = dict(spec)
        spec.setdefault("path", "stream")
        spec["times"] = int(times)
        with self._lock:
            self._faults.append(spec)

    def _take_fault(self, kind: str, uid, status_phase: bool):
        with self._lock:
            for f in self._faults:
                is_status = "status" in f or f.get("expire_auth")
                if bool(is_status) != status_phase:
                    continue
                p = f["path"]
                if not (p == kind or p == "any" or (p == "stream" and kind in CHAT_PATHS)):
                    continue
                if f.get("user") and f["user"] != uid:
                    continue
                f["times"] -= 1
                if f["times"] <= 0:
                    self._faults.remove(f)
                return f
        return None

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].startswith("/nextjs-api/stream/")]

    def clear_log(self) -> None:
        self.requests.clear()

    # -----------------------------------------------------------------------------------------------------------------
    # Site parameters: build ids, server actions, sitekey
    # -----------------------------------------------------------------------------------------------------------------

    def _hex(self, n: int) -> str:
        return "".join(self.rng.choice("0123456789abcdef") for _ in range(n))

    def _redeploy_ids(self):
        self.build_id = "".join(self.rng.choice(string.ascii_letters + string.digits + "_-") for _ in range(21))
        self.deployment_id = "dpl_" + "".join(self.rng.choice(string.ascii_letters + string.digits) for _ in range(28))
        self.action_ids = {"generateUploadUrl": "70" + self._hex(40), "getSignedUrl": "60" + self._hex(40)}
        self._decoy_action_id = "40" + self._hex(40)

    def redeploy(self) -> None:
        """New build id, deployment id, chunk names and action ids; the old ones answer 404."""
        with self._lock:
            self._redeploy_ids()

    def rotate_sitekey(self, new=None) -> None:
        alphabet = string.ascii_letters + string.digits + "_-"
        self.sitekey = new or ("6L" + "".join(self.rng.choice(alphabet) for _ in range(38)))

    def _chunk_names(self) -> dict:
        """Chunk file names derive from build id and sitekey, so a redeploy or rotation renames them."""
        def h(tag):
            return hashlib.sha1(f"{self.build_id}/{self.sitekey}/{tag}".encode()).hexdigest()[:16]
        return {"webpack": f"webpack-{h('w')}", "actions": h("a"), "auth": h("s")}

    def _chunk_js(self, which: str) -> str:
        if which == "webpack":
            return ('(()=>{"use strict";var e={},t={};function r(o){var n=t[o];if(void 0!==n)return n.exports;'
                    'var a=t[o]={exports:{}};return e[o](a,a.exports,r),a.exports}r.m=e;self.__webpack_require__=r})();')
        if which == "actions":
            ids = self.action_ids
            return (
                '"use strict";(self.webpackChunk_N_E=self.webpackChunk_N_E||[]).push([[4321],{71234:(e,t,n)=>{'
                'n.d(t,{generateUploadUrl:()=>o,getSignedUrl:()=>i,deleteEvaluationSession:()=>d});var s=n(35001);'
                f'let o=(0,s.createServerReference)("{ids["generateUploadUrl"]}",s.callServer,void 0,'
                's.findSourceMapURL,"generateUploadUrl"),'
                f'i=(0,s.createServerReference)("{ids["getSignedUrl"]}",s.callServer,void 0,'
                's.findSourceMapURL,"getSignedUrl"),'
                f'd=(0,s.createServerReference)("{self._decoy_action_id}",s.callServer,void 0,'
                's.findSourceMapURL,"deleteEvaluationSession")},'
                '81234:(e,t,n)=>{n.d(t,{mint:()=>a});let r={submit:"chat_submit",retry:"chat_retry",signUp:"sign_up"};'
                'async function a(e){await new Promise(t=>window.grecaptcha.enterprise.ready(t));'
                'return e===r.submit?grecaptcha.enterprise.execute("' + self.sitekey + '",{action:"chat_submit"}):'
                'grecaptcha.enterprise.execute("' + self.sitekey + '",{action:e})}'
                f'let v2key="{self.v2_sitekey}",c="recaptcha-v2-container"}}}}]);')
        if which == "auth":
            return (
                '"use strict";(self.webpackChunk_N_E=self.webpackChunk_N_E||[]).push([[8765],{35999:(e,t,n)=>{'
                f'let r="{self.url}",o="{self.anon_key}";'
                't.createClient=()=>(0,n(1).createBrowserClient)(r,o,{cookieOptions:{name:"arena-auth-prod-v1"}})}}]);')
        raise KeyError(which)

    # -----------------------------------------------------------------------------------------------------------------
    # Accounts and sessions (§4)
    # -----------------------------------------------------------------------------------------------------------------

    def _jwt(self, claims: dict, alg="ES256") -> str:
        header = {"alg": alg, "typ": "JWT"} if alg != "ES256" else {"alg": "ES256", "kid": str(uuid.UUID(
            int=int.from_bytes(self._secret[:16], "big"), version=4)), "typ": "JWT"}
        signing = b64url(compact(header).encode()) + "." + b64url(compact(claims).encode())
        mac = hmac.new(self._secret, signing.encode(), hashlib.sha256).digest()
        return signing + "." + b64url(mac + hashlib.sha256(mac).digest())  # 64 bytes, like an ES256 signature

    def _jwt_claims(self, token: str):
        """Claims of a JWT this emulator signed, else None (signature is checked, expiry is not)."""
        try:
            head, payload, sig = token.split(".")
            mac = hmac.new(self._secret, f"{head}.{payload}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(b64_any_decode(sig), mac + hashlib.sha256(mac).digest()):
                return None
            return json.loads(b64_any_decode(payload))
        except Exception:
            return None

    def _uuid4(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _new_account(self, uid=None, anonymous=True, big=False) -> dict:
        uid = uid or self._uuid4()
        acct = {"id": uid, "supabase_id": self._uuid4(), "anonymous": anonymous, "big": big,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(self.now()))}
        with self._lock:
            self.accounts[uid] = acct
        return acct

    def _make_session(self, acct: dict, lifetime: int) -> dict:
        """Session JSON with the keys and key order of §4.1 and an access token per §4.2."""
        now = int(self.now())
        iso = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(now))
        anonymous, big = acct["anonymous"], acct["big"]
        email = "" if anonymous else f"user-{acct['id'][:8]}@example.org"
        app_meta = {} if anonymous else {"provider": "google" if big else "email",
                                         "providers": ["google" if big else "email"]}
        user_meta = {"id": acct["id"]}
        identities = []
        if big:  # logged-in users carry a large identity list: the usual reason for cookie chunking
            user_meta.update({"avatar_url": "https://lh3.googleusercontent.com/a/" + "A" * 300,
                              "full_name": "Fake Arena User", "email_verified": True})
            for n in range(3):
                identities.append({"identity_id": self._uuid4(), "id": str(10 ** 20 + n), "user_id": acct["supabase_id"],
                                   "identity_data": {"avatar_url": "https://lh3.googleusercontent.com/a/" + "B" * 400,
                                                     "email": email, "email_verified": True,
                                                     "full_name": "Fake Arena User", "iss": "https://accounts.google.com",
                                                     "name": "Fake Arena User", "sub": str(10 ** 20 + n)},
                                   "provider": "google", "last_sign_in_at": iso, "created_at": iso,
                                   "updated_at": iso, "email": email})
        claims = {"iss": self.url + "/auth/v1", "sub": acct["supabase_id"], "aud": "authenticated",
                  "exp": now + int(lifetime), "iat": now, "email": email, "phone": "", "app_metadata": app_meta,
                  "user_metadata": user_meta, "role": "authenticated", "aal": "aal1",
                  "amr": [{"method": "anonymous" if anonymous else "password", "timestamp": now}],
                  "session_id": self._uuid4(), "is_anonymous": anonymous}
        refresh_token = "".join(self.rng.choice(string.ascii_lowercase + string.digits) for _ in range(12))
        session = {"access_token": self._jwt(claims), "token_type": "bearer", "expires_in": int(lifetime),
                   "expires_at": now + int(lifetime), "refresh_token": refresh_token,
                   "user": {"id": acct["supabase_id"], "aud": "authenticated", "role": "authenticated",
                            "email": email, "phone": "", "last_sign_in_at": iso, "app_metadata": app_meta,
                            "user_metadata": user_meta, "identities": identities, "created_at": acct["created_at"],
                            "updated_at": iso, "is_anonymous": anonymous}}
        with self._lock:
            self._refresh[refresh_token] = {"uid": acct["id"], "lifetime": int(lifetime), "used_at": None,
                                            "successor": None}
        return session

    @staticmethod
    def encode_session(session: dict, alphabet="url", padding=False) -> str:
        raw = compact(session).encode("utf-8")
        enc = base64.b64encode(raw).decode() if alphabet == "std" else base64.urlsafe_b64encode(raw).decode()
        return "base64-" + (enc if padding else enc.rstrip("="))

    @staticmethod
    def decode_session(value: str):
        """Cookie value -> session dict, or None.  Accepts quotes, %-encoding, both alphabets, raw JSON."""
        if not isinstance(value, str):
            return None
        v = value.strip().strip('"')
        if "%" in v:
            v = unquote(v)
        try:
            if v.startswith("base64-"):
                obj = json.loads(b64_any_decode(v[len("base64-"):]).decode("utf-8"))
            elif v.startswith("{"):
                obj = json.loads(v)
            else:
                return None
        except Exception:
            return None
        return obj if isinstance(obj, dict) else None

    def new_session(self, lifetime=3600, anonymous=True, alphabet="url", padding=False, big=False) -> str:
        """Create an account and return its cookie value ``base64-…``."""
        acct = self._new_account(anonymous=anonymous, big=big)
        return self.encode_session(self._make_session(acct, lifetime), alphabet, padding)

    @staticmethod
    def split_session(value, chunk_size=3180) -> list[str]:
        """Chunk values for ``arena-auth-prod-v1.0``, ``.1``, … (plain slices; ``base64-`` stays in chunk 0)."""
        return [value[i:i + chunk_size] for i in range(0, len(value), chunk_size)] or [""]

    def _session_info(self, value):
        """(uid, expired, session) for a cookie value signed by us, else None."""
        session = self.decode_session(value)
        if not session or not isinstance(session.get("access_token"), str):
            return None
        claims = self._jwt_claims(session["access_token"])
        if not claims or claims.get("iss") != self.url + "/auth/v1":
            return None
        uid = (claims.get("user_metadata") or {}).get("id")
        if uid not in self.accounts:
            return None
        expired = self.now() >= float(claims.get("exp", 0)) or session["access_token"] in self._forced_expired
        return uid, expired, session

    def session_user(self, value) -> str | None:
        """Arena user id of a cookie value (signature checked, expiry ignored); None if not one of ours."""
        info = self._session_info(value)
        return info[0] if info else None

    def expire_session(self, value) -> None:
        """Make this session count as expired from now on (a refresh is then needed)."""
        session = self.decode_session(value)
        if session and session.get("access_token"):
            with self._lock:
                self._forced_expired.add(session["access_token"])

    def _auth_from_cookies(self, cookies: dict):
        """Best session in the request: whole cookie and/or chunks, preferring a valid, later-expiring one.

        Returns (uid or None, state, session or None) with state "ok" | "expired" | "invalid" | "missing"."""
        candidates = []
        whole = cookies.get(AUTH_COOKIE)
        if whole:
            candidates.append(whole)
        chunks = {}
        for name, v in cookies.items():
            m = re.fullmatch(re.escape(AUTH_COOKIE) + r"\.(\d+)", name)
            if m:
                chunks[int(m.group(1))] = v
        if chunks:
            candidates.append("".join(chunks[i] for i in sorted(chunks)))
        if not candidates:
            return None, "missing", None
        best = None
        for c in candidates:
            info = self._session_info(c)
            if info is None:
                continue
            uid, expired, session = info
            key = (not expired, session.get("expires_at") or 0)
            if best is None or key > best[0]:
                best = (key, uid, expired, session)
        if best is None:
            return None, "invalid", None
        _, uid, expired, session = best
        return uid, ("expired" if expired else "ok"), session

    def _use_refresh_token(self, rt):
        """Supabase rotation: first use issues a successor; reuse within the grace returns it; later → None."""
        with self._lock:
            rec = self._refresh.get(rt) if isinstance(rt, str) else None
            if rec is None:
                return None
            now = self.now()
            if rec["used_at"] is not None:
                if now - rec["used_at"] <= float(self.knobs["refresh_grace"]):
                    return rec["successor"]
                return None
            # A session made already expired (a test's negative lifetime) refreshes to a normal one.
            lifetime = rec["lifetime"] if rec["lifetime"] > 0 else int(self.knobs["session_lifetime"])
            new = self._make_session(self.accounts[rec["uid"]], lifetime)
            rec["used_at"], rec["successor"] = now, new
            return new

    def _session_cookies(self, value: str, form: str, had_names=()) -> list[str]:
        """Set-Cookie values for a session in "whole" or "chunks" form, deleting the other form."""
        attrs = "Path=/; Max-Age=34560000; SameSite=Lax"
        out = []
        if form == "chunks":
            size = int(self.knobs["chunk_size"])
            if len(value) <= size:
                size = max(1, (len(value) + 1) // 2)
            parts = self.split_session(value, size)
            out += [f"{AUTH_COOKIE}.{i}={p}; {attrs}" for i, p in enumerate(parts)]
            out.append(f"{AUTH_COOKIE}=; Path=/; Max-Age=0")
            for name in had_names:
                m = re.fullmatch(re.escape(AUTH_COOKIE) + r"\.(\d+)", name)
                if m and int(m.group(1)) >= len(parts):
                    out.append(f"{name}=; Path=/; Max-Age=0")
        else:
            out.append(f"{AUTH_COOKIE}={value}; {attrs}")
            out += [f"{n}=; Path=/; Max-Age=0" for n in had_names if n.startswith(AUTH_COOKIE + ".")]
        return out

    # -----------------------------------------------------------------------------------------------------------------
    # reCAPTCHA and Turnstile tokens (§10, §13.7)
    # -----------------------------------------------------------------------------------------------------------------

    def mint_token(self, action="chat_submit", sitekey=None, v2=False, age=0.0, context=None) -> str:
        """A token shaped like a real one: ``0cAFcWeA`` + base64url(JSON claims, NUL, HMAC, random filler).

        ``context`` is the browser-context id (cookie ``arena-ctx``) for the ``context_bound_tokens`` knob."""
        claims = {"k": sitekey or (self.v2_sitekey if v2 else self.sitekey), "a": action or "",
                  "t": round(self.now() - float(age), 3), "n": self._hex(16), "v2": bool(v2)}
        if context:
            claims["c"] = str(context)
        payload = compact(claims).encode()
        mac = hmac.new(self._secret, b"recaptcha|" + payload, hashlib.sha256).digest()
        filler = bytes(self.rng.getrandbits(8) for _ in range(1200 - len(payload)) ) if len(payload) < 1200 else b""
        return TOKEN_PREFIX + b64url(payload + b"\x00" + mac + filler)

    def _decode_token(self, token):
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            return None
        try:
            raw = b64_any_decode(token[len(TOKEN_PREFIX):])
            payload, _, rest = raw.partition(b"\x00")
            mac = hmac.new(self._secret, b"recaptcha|" + payload, hashlib.sha256).digest()
            if not hmac.compare_digest(rest[:32], mac):
                return None
            return json.loads(payload)
        except Exception:
            return None

    def _check_recaptcha(self, req: _Request, body: dict, action: str, uid, score_knobs=True):
        """Return None if the request's token passes, else a reason string (logged in the request log)."""
        if self.knobs["recaptcha"] == "off":
            return None
        v3, v2 = body.get("recaptchaV3Token"), body.get("recaptchaV2Token")
        if isinstance(v3, str) and v3:
            token, want_v2 = v3, False
        elif isinstance(v2, str) and v2 and v3 is None:
            token, want_v2 = v2, True
        else:
            return "no token"
        info = self._decode_token(token)
        if info is None:
            return "bad signature"
        now = self.now()
        with self._lock:
            for n, t in list(self._used_nonces.items()):
                if t < now - 600:
                    del self._used_nonces[n]
            if info["n"] in self._used_nonces:
                return "token reused"
            self._used_nonces[info["n"]] = now
        if bool(info.get("v2")) != want_v2:
            return "token kind mismatch"
        if now - float(info["t"]) > float(self.knobs["token_max_age"]) or float(info["t"]) > now + 5:
            return "token expired"
        if want_v2:
            if info["k"] not in (self.v2_sitekey, self.sitekey):
                return "wrong sitekey"
        else:
            if info["k"] != self.sitekey:
                return "wrong sitekey"
            if info["a"] != action:
                return f"wrong action {info['a']!r}"
        if self.knobs["context_bound_tokens"]:
            if not info.get("c") or info.get("c") != req.cookies.get(CTX_COOKIE):
                return "browser context mismatch"
        if not score_knobs:
            return None
        exempt = want_v2 and self.knobs["v2_passes_when_v3_fails"]
        with self._lock:
            reason = None
            pen = self.knobs["recaptcha_penalty"]
            if pen and uid:
                st = self._penalty.setdefault(uid, {"times": [], "until": 0.0})
                if st["until"] > now:
                    st["until"] = now + float(pen.get("p", 1200))
                    reason = "account penalty"
                else:
                    st["times"] = [t for t in st["times"] if t > now - float(pen.get("w", 60))]
                    if len(st["times"]) >= int(pen.get("k", 3)):
                        st["until"] = now + float(pen.get("p", 1200))
                        st["times"] = []
                        reason = "account penalty"
                    else:
                        st["times"].append(now)
            if self.knobs["recaptcha_fail_next"] > 0:
                if not exempt:
                    self.knobs["recaptcha_fail_next"] -= 1
                reason = reason or "low score (fail_next)"
            if self.knobs["recaptcha_fail_always"]:
                reason = reason or "low score (fail_always)"
        return None if exempt else reason

    def _mint_turnstile(self, sitekey: str) -> str:
        claims = {"k": sitekey, "t": round(self.now(), 3), "n": self._hex(16)}
        payload = compact(claims).encode()
        mac = hmac.new(self._secret, b"turnstile|" + payload, hashlib.sha256).digest()
        return "0." + b64url(payload) + "." + b64url(mac) + "." + self._hex(64)

    def _check_turnstile(self, token):
        if token == TURNSTILE_DUMMY_TOKEN and self.knobs["turnstile_accept_dummy"]:
            return None
        try:
            _, payload, sig, _ = token.split(".")
            raw = b64_any_decode(payload)
            mac = hmac.new(self._secret, b"turnstile|" + raw, hashlib.sha256).digest()
            if not hmac.compare_digest(b64_any_decode(sig), mac):
                return "bad turnstile signature"
            claims = json.loads(raw)
        except Exception:
            return "bad turnstile token"
        if claims["k"].startswith("2x") or claims["k"] not in (self.turnstile_sitekey, TURNSTILE_PASS_KEY):
            return "turnstile sitekey rejected"
        if self.now() - claims["t"] > 300:
            return "turnstile token expired"
        with self._lock:
            if "ts" + claims["n"] in self._used_nonces:
                return "turnstile token reused"
            self._used_nonces["ts" + claims["n"]] = self.now()
        return None

    # -----------------------------------------------------------------------------------------------------------------
    # Cloudflare clearance (§13.12)
    # -----------------------------------------------------------------------------------------------------------------

    def issue_clearance(self, ua: str, ip: str = "127.0.0.1") -> str:
        """A cf_clearance value bound to this UA and IP (for tests that do not run a browser)."""
        value = self._hex(43) + "-" + str(int(self.now())) + "-1.2.1.1-" + b64url(os.urandom(30))
        with self._lock:
            self._clearances[value] = {"ua": ua, "ip": ip,
                                       "exp": self.now() + float(self.knobs["cf_clearance_lifetime"])}
        return value

    def _cleared(self, req: _Request) -> bool:
        rec = self._clearances.get(req.cookies.get("cf_clearance", ""))
        return bool(rec and rec["ua"] == req.ua and rec["ip"] == req.ip and rec["exp"] > self.now())

    # =================================================================================================================
    # Dispatch
    # =================================================================================================================

    def _dispatch(self, h: _Handler):
        body = h._read_body()
        req = _Request(h, body)
        entry = {"method": req.method, "path": req.path, "query": req.query, "headers": req.headers,
                 "cookies": req.cookies, "body": body, "json": req.json, "status": None, "time": self.now()}
        h.log_entry = entry
        req.log = entry
        self.requests.append(entry)
        path = req.path

        if path.startswith("/__emulator/"):
            return self._control(h, req)

        # Legacy host alias (§1): 301 to the same path on the main origin, or plain alias when the knob is off.
        host = req.headers.get("host", "").split(":")[0]
        legacy = host == "legacy.localhost" or path.startswith("/__legacy")
        if legacy:
            rest = path[len("/__legacy"):] if path.startswith("/__legacy") else path
            rest = rest or "/"
            qs = urlsplit(req.raw_path).query
            if self.knobs["legacy_redirect"]:
                return self._send(h, 301, b"", "text/plain",
                                  headers=[("Location", self.url + rest + ("?" + qs if qs else ""))])
            path = req.path = rest

        # Third-party stand-ins (Google, Cloudflare challenge, Supabase, R2) are not behind the interstitial.
        exempt = path.startswith(("/recaptcha/", "/__recaptcha/", "/turnstile/", "/__turnstile/", "/cdn-cgi/",
                                  "/r2/", "/auth/v1/"))
        if self.knobs["cloudflare"] and not exempt and not self._cleared(req):
            return self._cf_challenge(h, req)

        uid, _state, _ = self._auth_from_cookies(req.cookies)
        req.uid = uid
        req.kind = self._kind(req)
        fault = self._take_fault(req.kind, uid, status_phase=True)
        if fault:
            entry["fault"] = {k: v for k, v in fault.items() if k != "times"}
            return self._apply_status_fault(h, fault)

        m = req.method
        if path.startswith("/recaptcha/") and path.endswith((".js",)):
            return self._grecaptcha_script(h, req)
        if path == "/__recaptcha/mint":
            return self._recaptcha_mint(h, req)
        if path.startswith("/turnstile/"):
            return self._turnstile_script(h, req)
        if path == "/__turnstile/mint":
            return self._turnstile_mint(h, req)
        if path.startswith("/cdn-cgi/"):
            return self._cf_endpoints(h, req)
        if path.startswith("/r2/"):
            return self._r2(h, req)
        if path == "/auth/v1/token":
            return self._auth_token(h, req)
        if path.startswith("/_next/static/chunks/"):
            return self._chunk(h, req)
        if path in ("/nextjs-api/sign-up", "/api/sign-up"):
            return self._signup(h, req)
        if path.startswith("/nextjs-api/stream/"):
            return self._chat(h, req)
        if m == "POST" and "next-action" in req.headers:
            return self._server_action(h, req)
        if m in ("GET", "HEAD") and self._is_page(path):
            return self._page(h, req)
        return self._send(h, 404, {"error": "Not found"})

    @staticmethod
    def _is_page(path):
        return path == "/" or path.startswith("/c/") or path.startswith("/text") or path.startswith("/image")

    def _kind(self, req: _Request) -> str:
        p = req.path
        if p == "/nextjs-api/stream/create-evaluation":
            return "create"
        if p.startswith("/nextjs-api/stream/post-to-evaluation/"):
            return "post"
        if p.startswith("/nextjs-api/stream/retry-evaluation-session-message/"):
            return "retry"
        if p.startswith("/r2/"):
            return "r2"
        if p in ("/nextjs-api/sign-up", "/api/sign-up"):
            return "signup"
        if p.startswith("/auth/v1/"):
            return "refresh"
        if req.method == "POST" and "next-action" in req.headers:
            return "action"
        if req.method == "GET" and self._is_page(p):
            return "page"
        return "other"

    # -----------------------------------------------------------------------------------------------------------------
    # Response helpers
    # -----------------------------------------------------------------------------------------------------------------

    def _send(self, h: _Handler, status, body=b"", ctype="application/json", headers=(), cookies=()):
        if isinstance(body, (dict, list)):
            body = compact(body).encode()
        elif isinstance(body, str):
            body = body.encode("utf-8")
        h.send_response(status)
        if ctype:
            h.send_header("Content-Type", ctype if ";" in ctype or not ctype.startswith("text/")
                          else ctype + "; charset=utf-8")
        for k, v in headers:
            h.send_header(k, v)
        for c in cookies:
            h.send_header("Set-Cookie", c)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h._headers_sent = True
        if h.command != "HEAD":
            h.wfile.write(body)

    def _err(self, h, status, message, headers=()):
        return self._send(h, status, {"error": message}, headers=headers)

    def _apply_status_fault(self, h, f):
        if f.get("first_byte_delay"):
            time.sleep(float(f["first_byte_delay"]))
        if f.get("expire_auth") and "status" not in f:
            return self._err(h, 401, "Unauthorized")
        status = int(f["status"])
        defaults = {400: "Invalid content", 401: "Unauthorized", 403: "recaptcha validation failed",
                    404: "Not found", 413: "Request Entity Too Large", 422: "flagged", 429: "Too Many Requests",
                    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
        headers = list((f.get("headers") or {}).items())
        body = f.get("body")
        if f.get("html"):
            if body is None:
                body = (f"<!DOCTYPE html><html><head><title>{status} {defaults.get(status, 'Error')}</title></head>"
                        f"<body><center><h1>{status} {defaults.get(status, 'Error')}</h1></center>"
                        "<hr><center>cloudflare</center></body></html>")
            return self._send(h, status, body if isinstance(body, str) else compact(body), "text/html", headers)
        if body is None:
            body = {"error": defaults.get(status, "Error")}
        elif isinstance(body, str):
            try:
                json.loads(body)
            except ValueError:
                body = {"error": body}
        return self._send(h, status, body, "application/json", headers)

    # =================================================================================================================
    # Control endpoints (§13 "control endpoint")
    # =================================================================================================================

    def _control(self, h, req):
        p, body = req.path, (req.json if isinstance(req.json, dict) else {})
        try:
            if p == "/__emulator/config" and req.method == "POST":
                self.configure(**body)
                return self._send(h, 200, {"ok": True, "knobs": self.knobs})
            if p == "/__emulator/config":
                return self._send(h, 200, self.knobs)
            if p == "/__emulator/fault":
                self.fault(**body)
                return self._send(h, 200, {"ok": True})
            if p == "/__emulator/reset":
                self.reset()
                return self._send(h, 200, {"ok": True})
            if p == "/__emulator/requests":
                log = [dict(r, body=r["body"].decode("utf-8", "replace")) for r in list(self.requests)
                       if not r["path"].startswith("/__emulator/")]
                return self._send(h, 200, log)
            if p == "/__emulator/session":
                value = self.new_session(**body)
                return self._send(h, 200, {"value": value, "user": self.session_user(value),
                                           "chunks": self.split_session(value, int(self.knobs["chunk_size"]))})
            if p == "/__emulator/mint":
                return self._send(h, 200, {"token": self.mint_token(**body)})
            if p == "/__emulator/expire_session":
                self.expire_session(body.get("value"))
                return self._send(h, 200, {"ok": True})
            if p == "/__emulator/redeploy":
                self.redeploy()
                return self._send(h, 200, {"build_id": self.build_id, "action_ids": self.action_ids})
            if p == "/__emulator/rotate_sitekey":
                self.rotate_sitekey(body.get("new"))
                return self._send(h, 200, {"sitekey": self.sitekey})
            if p == "/__emulator/clearance":
                return self._send(h, 200, {"cf_clearance": self.issue_clearance(body.get("ua", ""),
                                                                                body.get("ip", "127.0.0.1"))})
            if p == "/__emulator/state":
                return self._send(h, 200, {"url": self.url, "sitekey": self.sitekey, "build_id": self.build_id,
                                           "action_ids": self.action_ids, "anon_key": self.anon_key,
                                           "clock_offset": self.clock_offset, "evaluations": self.evaluations})
        except (TypeError, ValueError) as exc:
            return self._send(h, 400, {"error": str(exc)})
        return self._send(h, 404, {"error": "unknown control endpoint"})

    # =================================================================================================================
    # Page (E1) and JS chunks (E11)
    # =================================================================================================================

    def _flight_text(self) -> tuple[str, str]:
        names = self._chunk_names()
        chunk_refs = ",".join(f'"{1000 + i}","static/chunks/{n}.js?dpl={self.deployment_id}"'
                              for i, n in enumerate(names.values()))
        first_chat = next((m["id"] for m in self.models if m.get("organization")
                           and (m.get("capabilities") or {}).get("outputCapabilities", {}).get("text")),
                          self.models[0]["id"])
        models_json = compact(self.models)
        head = (f'0:{{"P":null,"b":"{self.build_id}","p":"","c":["",""],"i":false}}\n'
                f'2:I[71234,[{chunk_refs}],"default"]\n'
                f'3:I[81234,[{chunk_refs}],"ModelProvider"]\n')
        payload = (f'5:["$","$L3",null,{{"initialModels":{models_json},"initialModelAId":"{first_chat}",'
                   f'"initialModelBId":null,"initialModality":"chat","children":["$","$L2",null,{{}}]}}]\n')
        text = head + payload
        if not self.knobs["flight_split"]:
            return text, ""
        cut = len(head) + len(payload) // 2
        return text[:cut], text[cut:]

    def _page_html(self) -> str:
        names = self._chunk_names()
        rc_host = self.knobs["recaptcha_script_host"] or ""
        scripts = "".join(f'<script src="/_next/static/chunks/{n}.js?dpl={self.deployment_id}" async=""></script>'
                          for n in names.values())

        def push(s):
            return "<script>self.__next_f.push([1," + js_string(s).replace("<", "\\u003c") + "])</script>"
        part1, part2 = self._flight_text()
        pushes = push(part1) + (push(part2) if part2 else "")
        signup = ""
        if self.knobs["page_auto_signup"]:
            signup = ("<script>(function(){if(/(^|; )arena-auth-prod-v1(\\.0)?=/.test(document.cookie))return;"
                      "function pid(){var m=document.cookie.match(/(?:^|; )provisional_user_id=([^;]+)/);"
                      "return m?m[1]:''}"
                      "function go(){if(!window.turnstile||!window.grecaptcha||!grecaptcha.enterprise)"
                      "return setTimeout(go,50);"
                      "turnstile.render('#signup-turnstile',{sitekey:'" + self.turnstile_sitekey + "',"
                      "callback:function(t){grecaptcha.enterprise.ready(function(){grecaptcha.enterprise.execute('"
                      + self.sitekey + "',{action:'sign_up'}).then(function(r){return fetch('/nextjs-api/sign-up',"
                      "{method:'POST',headers:{'Content-Type':'application/json'},body:JSON.stringify("
                      "{turnstileToken:t,recaptchaToken:r,provisionalUserId:pid()})})}).then(function(res){"
                      "window.__arenaSignUp=res.status})})}})}go()})()</script>")
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charSet=\"utf-8\"/>"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
                f"<title>LMArena</title>{scripts}"
                f'<script src="{rc_host}/recaptcha/enterprise.js?render={self.sitekey}" async=""></script>'
                '<script src="/turnstile/v0/api.js?render=explicit" async=""></script>'
                "</head><body><main id=\"root\"><h1>LMArena</h1><div id=\"signup-turnstile\"></div>"
                "<div id=\"recaptcha-v2-container\"></div></main>"
                "<script>(self.__next_f=self.__next_f||[]).push([0])</script>"
                f"{pushes}{signup}</body></html>")

    def _page(self, h, req):
        cookies = []
        if "__cf_bm" not in req.cookies:
            cookies.append(f"__cf_bm={b64url(os.urandom(40))}-{int(self.now())}-1.0.1.1-x; Path=/; Max-Age=1800; "
                           "HttpOnly")
        if "_cfuvid" not in req.cookies:
            cookies.append(f"_cfuvid={self._hex(40)}-{int(self.now() * 1000)}-0.0.1.1-604800000; Path=/; HttpOnly")
        if "provisional_user_id" not in req.cookies:
            cookies.append(f"provisional_user_id={self._uuid4()}; Path=/; Max-Age=31536000; SameSite=Lax")
        # Middleware refresh: an expired but well-formed session comes back fresh (§4.5 step 1).
        uid, state, session = self._auth_from_cookies(req.cookies)
        if state == "expired":
            new = self._use_refresh_token(session.get("refresh_token"))
            if new:
                had = [n for n in req.cookies if n == AUTH_COOKIE or n.startswith(AUTH_COOKIE + ".")]
                cookies += self._session_cookies(self.encode_session(new), self.knobs["refresh_cookie_form"], had)
                req.log["note"] = "session refreshed"
        return self._send(h, 200, self._page_html(), "text/html; charset=utf-8", cookies=cookies,
                          headers=[("x-powered-by", "Next.js"), ("Cache-Control", "private, no-cache, no-store")])

    def _chunk(self, h, req):
        name = req.path[len("/_next/static/chunks/"):]
        for which, n in self._chunk_names().items():
            if name == n + ".js":
                return self._send(h, 200, self._chunk_js(which), "application/javascript; charset=utf-8",
                                  headers=[("Cache-Control", "public, max-age=31536000, immutable")])
        return self._send(h, 404, "Not Found", "text/plain")

    # =================================================================================================================
    # Fake grecaptcha and Turnstile scripts (§13.13, §13.14)
    # =================================================================================================================

    def _origin_of(self, req) -> str:
        host = req.headers.get("host") or f"{self.host}:{self.port}"
        return "http://" + host

    def _grecaptcha_script(self, h, req):
        enterprise = req.path.endswith("enterprise.js")
        cfg = {"base": self._origin_of(req), "render": req.query.get("render", ""),
               "onload": req.query.get("onload", ""),
               "readyDelay": int(float(self.knobs["grecaptcha_ready_delay"]) * 1000),
               "noEnterprise": bool(self.knobs["grecaptcha_no_enterprise"]) or not enterprise,
               "rejects": bool(self.knobs["grecaptcha_execute_rejects"]),
               "wrongSitekey": bool(self.knobs["grecaptcha_wrong_sitekey"]), "ctxCookie": CTX_COOKIE}
        js = "(function(){var C=" + compact(cfg) + r""";
function ctx(){var m=document.cookie.match(new RegExp('(?:^|; )'+C.ctxCookie+'=([^;]+)'));if(m)return m[1];
 var id='';for(var i=0;i<16;i++)id+=Math.floor(Math.random()*16).toString(16);
 document.cookie=C.ctxCookie+'='+id+'; path=/';return id}
function mint(key,action,v2){return fetch(C.base+'/__recaptcha/mint?sitekey='+encodeURIComponent(key||'')+
 '&action='+encodeURIComponent(action||'')+'&v2='+(v2?1:0)+'&ctx='+encodeURIComponent(ctx()),{credentials:'omit'})
 .then(function(r){if(!r.ok)throw new Error('recaptcha mint failed: '+r.status);return r.json()})
 .then(function(j){return j.token})}
var isReady=false,q=[];
setTimeout(function(){isReady=true;q.splice(0).forEach(function(cb){try{cb()}catch(e){console.error(e)}});
 if(C.onload&&typeof window[C.onload]==='function')window[C.onload]()},C.readyDelay);
var widgets={},nextId=0;
var api={
 ready:function(cb){if(isReady)setTimeout(cb,0);else q.push(cb)},
 execute:function(key,opts){
  if(typeof key==='number'||key===undefined&&Object.keys(widgets).length){var w=widgets[key||0];
   return w?mint(w.sitekey,'',true).then(function(t){w.token=t;if(w.cb)w.cb(t);return t}):Promise.reject(new Error('no widget'))}
  if(C.rejects)return Promise.reject(new Error('reCAPTCHA execute failed'));
  var k=C.wrongSitekey?'6LwrongwrongwrongwrongwrongwrongwrongAAA':(key||C.render);
  return mint(k,opts&&opts.action,false)},
 render:function(el,p){var id=nextId++;p=p||{};var w={sitekey:p.sitekey,cb:p.callback,err:p['error-callback'],token:''};
  widgets[id]=w;setTimeout(function(){mint(w.sitekey,'',true).then(function(t){w.token=t;if(w.cb)w.cb(t)},
  function(e){if(w.err)w.err(e)})},C.readyDelay+50);return id},
 getResponse:function(id){var w=widgets[id||0];return w?w.token:''},
 reset:function(id){var w=widgets[id||0];if(w){w.token='';setTimeout(function(){mint(w.sitekey,'',true)
  .then(function(t){w.token=t;if(w.cb)w.cb(t)})},C.readyDelay+50)}}
};
var g=window.grecaptcha=window.grecaptcha||{};
g.ready=api.ready;g.execute=api.execute;g.render=api.render;g.getResponse=api.getResponse;g.reset=api.reset;
if(!C.noEnterprise)g.enterprise=api;
})();"""
        return self._send(h, 200, js, "text/javascript; charset=utf-8",
                          headers=[("Access-Control-Allow-Origin", "*"), ("Cache-Control", "no-store")])

    def _recaptcha_mint(self, h, req):
        q = req.query
        token = self.mint_token(action=q.get("action", ""), sitekey=q.get("sitekey") or None,
                                v2=q.get("v2") in ("1", "true"), context=q.get("ctx") or None)
        return self._send(h, 200, {"token": token}, headers=[("Access-Control-Allow-Origin", "*"),
                                                             ("Cache-Control", "no-store")])

    def _turnstile_script(self, h, req):
        cfg = {"base": self._origin_of(req), "delay": int(float(self.knobs["turnstile_delay"]) * 1000),
               "onload": req.query.get("onload", "")}
        js = "(function(){var C=" + compact(cfg) + r""";
var ws={},n=0;
function el(x){return typeof x==='string'?document.querySelector(x):x}
var t=window.turnstile={
 ready:function(cb){setTimeout(cb,0)},
 render:function(container,p){p=p||{};var id='cf-chl-widget-'+(n++);var c=el(container);var box=null;
  if(c){box=document.createElement('div');box.id=id;box.className='cf-turnstile-fake';
   var inp=document.createElement('input');inp.type='hidden';inp.name='cf-turnstile-response';box.appendChild(inp);
   c.appendChild(box)}
  var w=ws[id]={p:p,token:'',box:box,timer:null};
  function run(){w.timer=setTimeout(function(){
   if(String(p.sitekey||'').indexOf('2x')===0){var cb=p['error-callback'];if(cb)cb('110200');return}
   fetch(C.base+'/__turnstile/mint?sitekey='+encodeURIComponent(p.sitekey||''),{credentials:'omit'})
   .then(function(r){return r.json()}).then(function(j){if(!ws[id])return;w.token=j.token;
    if(w.box)w.box.firstChild.value=j.token;if(p.callback)p.callback(j.token)},
    function(e){var cb=p['error-callback'];if(cb)cb(String(e))})},C.delay)}
  w.run=run;run();return id},
 execute:function(container,p){return t.render(container,p)},
 getResponse:function(id){var w=id?ws[id]:ws[Object.keys(ws)[0]];return w?w.token:undefined},
 reset:function(id){var w=id?ws[id]:ws[Object.keys(ws)[0]];if(w){clearTimeout(w.timer);w.token='';w.run()}},
 remove:function(id){var w=ws[id];if(w){clearTimeout(w.timer);if(w.box&&w.box.parentNode)w.box.parentNode.removeChild(w.box);
  delete ws[id]}},
 isExpired:function(){return false}
};
if(C.onload&&typeof window[C.onload]==='function')setTimeout(window[C.onload],0);
})();"""
        return self._send(h, 200, js, "text/javascript; charset=utf-8",
                          headers=[("Access-Control-Allow-Origin", "*"), ("Cache-Control", "no-store")])

    def _turnstile_mint(self, h, req):
        return self._send(h, 200, {"token": self._mint_turnstile(req.query.get("sitekey", ""))},
                          headers=[("Access-Control-Allow-Origin", "*")])

    # =================================================================================================================
    # Cloudflare interstitial (§13.12)
    # =================================================================================================================

    def _cf_challenge(self, h, req):
        delay = int(float(self.knobs["cloudflare_delay"]) * 1000)
        html = ("<!DOCTYPE html><html lang=\"en-US\"><head><title>Just a moment...</title>"
                "<meta http-equiv=\"Content-Type\" content=\"text/html; charset=UTF-8\">"
                "<meta name=\"robots\" content=\"noindex,nofollow\"></head><body>"
                "<div class=\"main-wrapper\" role=\"main\"><div class=\"main-content\">"
                f"<h1 class=\"zone-name-title h1\">{req.headers.get('host', '')}</h1>"
                "<p id=\"challenge-body-text\">Verify you are human by completing the action below.</p>"
                "<noscript><div class=\"h2\"><span id=\"challenge-error-text\">"
                "Enable JavaScript and cookies to continue</span></div></noscript>"
                "<div id=\"cf-turnstile\"><iframe title=\"Widget containing a Cloudflare security challenge\" "
                f"src=\"/cdn-cgi/challenge-platform/challenges.cloudflare.com/turnstile/if/ov2/{self._hex(8)}/normal\" "
                "width=\"300\" height=\"65\"></iframe></div></div></div>"
                "<script>setTimeout(function(){fetch('/cdn-cgi/challenge-platform/solve',{method:'POST',"
                f"credentials:'same-origin'}}).then(function(){{location.reload()}})}},{delay});</script>"
                "</body></html>")
        return self._send(h, 403, html, "text/html; charset=UTF-8",
                          headers=[("cf-mitigated", "challenge"), ("Cache-Control", "private, no-store"),
                                   ("cf-ray", self._hex(16) + "-AMS")])

    def _cf_endpoints(self, h, req):
        if req.path == "/cdn-cgi/challenge-platform/solve" and req.method == "POST":
            value = self.issue_clearance(req.ua, req.ip)
            expires = time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                    time.gmtime(time.time() + float(self.knobs["cf_clearance_lifetime"])))
            return self._send(h, 200, {"ok": True},
                              cookies=[f"cf_clearance={value}; Path=/; Expires={expires}; HttpOnly"])
        if "challenges.cloudflare.com" in req.path:
            return self._send(h, 200, "<!DOCTYPE html><html><body><label><input type=checkbox checked> "
                                      "Verifying...</label></body></html>", "text/html")
        return self._send(h, 404, "Not Found", "text/plain")

    # =================================================================================================================
    # Supabase refresh grant (E10) and sign-up (E9)
    # =================================================================================================================

    def _auth_token(self, h, req):
        if req.method != "POST":
            return self._send(h, 405, {"message": "Method not allowed"})
        if req.headers.get("apikey") != self.anon_key:
            return self._send(h, 401, {"message": "Invalid API key",
                                       "hint": "Double check your Supabase `anon` or `service_role` API key."})
        if req.query.get("grant_type") != "refresh_token":
            return self._send(h, 400, {"code": 400, "error_code": "validation_failed",
                                       "msg": "Unsupported grant type"})
        rt = (req.json or {}).get("refresh_token") if isinstance(req.json, dict) else None
        new = self._use_refresh_token(rt)
        if new is None:
            return self._send(h, 400, {"code": 400, "error_code": "refresh_token_not_found",
                                       "msg": "Invalid Refresh Token: Refresh Token Not Found"})
        return self._send(h, 200, new)

    def _signup(self, h, req):
        if req.method != "POST":
            return self._send(h, 405, {"error": "Method not allowed"})
        if self.knobs["signup_fail"]:
            st = int(self.knobs["signup_fail"])
            return self._err(h, st, "Forbidden" if st == 403 else "Internal Server Error")
        body = req.json if isinstance(req.json, dict) else None
        if body is None:
            return self._err(h, 400, "Invalid request body")
        legacy = "turnstile_token" in body and "turnstileToken" not in body
        reason = self._check_turnstile(body.get("turnstileToken") or body.get("turnstile_token") or "")
        if reason:
            req.log["note"] = reason
            return self._err(h, 400, "Invalid turnstile token")
        if self.knobs["signup_requires_recaptcha"] and not legacy:
            reason = self._check_recaptcha(req, {"recaptchaV3Token": body.get("recaptchaToken")}, "sign_up", None,
                                           score_knobs=False)
            if reason:
                req.log["note"] = "recaptcha: " + reason
                return self._err(h, 403, "recaptcha validation failed")
        cookie_pid = req.cookies.get("provisional_user_id")
        pid = body.get("provisionalUserId") if not legacy else (cookie_pid or self._uuid4())
        with self._lock:
            if not pid or pid != (cookie_pid if not legacy else pid) or pid in self._used_provisional \
                    or pid in self.accounts:
                return self._err(h, 400, "User already exists")
            self._used_provisional.add(pid)
        acct = self._new_account(uid=pid)
        session = self._make_session(acct, int(self.knobs["session_lifetime"]))
        value = self.encode_session(session)
        nesting = self.knobs["signup_nesting"]
        payload = {"top": session, "session": {"session": session}, "data": {"data": session},
                   "data.session": {"data": {"session": session}}}[nesting]
        return self._send(h, 200, payload, cookies=self._session_cookies(value, "whole"))

    # =================================================================================================================
    # Server actions (E5, E7) and R2 (E6, E8)
    # =================================================================================================================

    def _r2_sign(self, method: str, key: str, date: str, expires: int) -> str:
        return hmac.new(self._secret, f"r2|{method}|{key}|{date}|{expires}".encode(), hashlib.sha256).hexdigest()

    def presign(self, key: str, method="GET", expires=3600) -> str:
        """Presigned R2-style URL on this origin (``x-id=GetObject`` or ``PutObject``)."""
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.now()))
        q = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Content-Sha256": "UNSIGNED-PAYLOAD",
             "X-Amz-Credential": f"fakeaccesskey/{date[:8]}/auto/s3/aws4_request", "X-Amz-Date": date,
             "X-Amz-Expires": str(expires), "X-Amz-Signature": self._r2_sign(method, key, date, expires),
             "X-Amz-SignedHeaders": "host"}
        if method == "PUT":
            q.update({"x-amz-checksum-crc32": "AAAAAA==", "x-amz-sdk-checksum-algorithm": "CRC32",
                      "x-id": "PutObject"})
        else:
            q.update({"x-amz-checksum-mode": "ENABLED", "x-id": "GetObject"})
        return f"{self.url}/r2/{quote(key)}?{urlencode(q)}"

    def _server_action(self, h, req):
        origin = req.headers.get("origin", "")
        if not origin or urlsplit(origin).netloc != req.headers.get("host", ""):
            return self._send(h, 403, "Forbidden: invalid Server Actions request.", "text/plain")
        action_id = req.headers.get("next-action", "")
        name = {v: k for k, v in self.action_ids.items()}.get(action_id)
        if name is None:
            return self._send(h, 404, "Server action not found.", "text/plain",
                              headers=[("x-nextjs-action-not-found", "1")])
        args = req.json if isinstance(req.json, list) else None
        uid, state, _ = self._auth_from_cookies(req.cookies)
        if args is None:
            result = {"success": False, "error": "Invalid arguments"}
        elif state != "ok":
            result = {"success": False, "error": "Unauthorized"}
        elif name == "generateUploadUrl":
            filename = str(args[0]) if args else "upload.png"
            key = f"{uid}/{int(self.now() * 1000)}-{filename}"
            result = {"success": True, "data": {"uploadUrl": self.presign(key, "PUT"), "key": key}}
        else:
            key = str(args[0]) if args else ""
            result = {"success": True, "data": {"url": self.presign(key, "GET")}}
        body = f'0:{{"a":"$@1","f":"","b":"{self.build_id}"}}\n1:{compact(result)}\n'
        return self._send(h, 200, body, "text/x-component",
                          headers=[("x-action-revalidated", "[[],0,0]"), ("x-powered-by", "Next.js"),
                                   ("Vary", "RSC, Next-Router-State-Tree, Next-Router-Prefetch")])

    def _r2_error(self, h, status, code, message):
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
               "</Error>")
        return self._send(h, status, xml, "application/xml", headers=[("Access-Control-Allow-Origin", "*")])

    def _r2(self, h, req):
        cors = [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "GET, PUT"),
                ("Access-Control-Allow-Headers", "*"), ("Access-Control-Max-Age", "3600")]
        if req.method == "OPTIONS":
            return self._send(h, 204, b"", None, headers=cors)
        key = unquote(req.path[len("/r2/"):])
        q = req.query
        method = {"GET": "GET", "HEAD": "GET", "PUT": "PUT"}.get(req.method)
        if method is None:
            return self._r2_error(h, 405, "MethodNotAllowed", "The specified method is not allowed")
        want_id = "PutObject" if method == "PUT" else "GetObject"
        try:
            date, expires = q["X-Amz-Date"], int(q["X-Amz-Expires"])
            ok = hmac.compare_digest(q["X-Amz-Signature"], self._r2_sign(method, key, date, expires))
            issued = time.mktime(time.strptime(date, "%Y%m%dT%H%M%SZ")) - time.timezone
        except (KeyError, ValueError):
            return self._r2_error(h, 403, "AccessDenied", "Missing or malformed signature")
        if not ok or q.get("x-id") != want_id:
            return self._r2_error(h, 403, "SignatureDoesNotMatch",
                                  "The request signature we calculated does not match the signature you provided.")
        if self.now() > issued + expires:
            return self._r2_error(h, 403, "AccessDenied", "Request has expired")
        if method == "PUT":
            if len(req.body) > R2_MAX_BYTES:
                return self._r2_error(h, 413, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
            etag = '"' + hashlib.md5(req.body).hexdigest() + '"'
            with self._lock:
                self.r2[key] = {"bytes": req.body, "content_type": req.headers.get("content-type",
                                                                                  "application/octet-stream"),
                                "expires": issued + expires}
            return self._send(h, 200, b"", None, headers=cors + [("ETag", etag)])
        obj = self.r2.get(key)
        if obj is None:
            return self._r2_error(h, 404, "NoSuchKey", "The specified key does not exist.")
        return self._send(h, 200, obj["bytes"], obj["content_type"],
                          headers=cors + [("ETag", '"' + hashlib.md5(obj["bytes"]).hexdigest() + '"')])

    # =================================================================================================================
    # Chat endpoints E2/E3/E4 (§6, §13.6)
    # =================================================================================================================

    def _model_modality_ok(self, model: dict, modality: str) -> bool:
        out = (model.get("capabilities") or {}).get("outputCapabilities") or {}
        if modality == "image":
            return bool(out.get("image"))
        if modality == "search":
            return bool(out.get("search"))
        if modality == "chat":
            return bool(out.get("text"))
        return True

    def _chat(self, h, req):
        kind = req.kind
        if kind not in CHAT_PATHS:
            return self._err(h, 404, "Not found")
        if (kind == "retry") != (req.method == "PUT") or (kind != "retry" and req.method != "POST"):
            return self._err(h, 405, "Method not allowed")
        body = req.json
        if not isinstance(body, dict):
            return self._err(h, 400, "Invalid request body")

        # --- auth ---
        uid, state, _ = self._auth_from_cookies(req.cookies)
        if state != "ok":
            req.log["note"] = "auth: " + state
            return self._err(h, 401, "Unauthorized")

        # --- reCAPTCHA ---
        reason = self._check_recaptcha(req, body, "chat_retry" if kind == "retry" else "chat_submit", uid)
        if reason:
            req.log["note"] = "recaptcha: " + reason
            return self._err(h, 403, "recaptcha validation failed")

        # --- new turn: userMessage or legacy messages[] ---
        parts = req.path.split("/")
        content, attachments = None, []
        if kind != "retry":
            um = body.get("userMessage")
            if isinstance(um, dict):
                content, attachments = um.get("content"), um.get("experimental_attachments") or []
            elif isinstance(body.get("messages"), list):
                users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
                if users:
                    content, attachments = users[-1].get("content"), users[-1].get("experimental_attachments") or []
            if not isinstance(content, str) or not isinstance(attachments, list):
                return self._err(h, 400, "Invalid content")

        with self._lock:
            if kind == "create":
                return self._chat_create(h, req, body, uid, content, attachments)
            if kind == "post":
                return self._chat_post(h, req, body, uid, parts[-1], content, attachments)
            return self._chat_retry(h, req, body, uid, parts[-3], parts[-1])

    def _check_ids(self, h, body, keys, required):
        for k in keys:
            v = body.get(k)
            if v is None and k not in required:
                continue
            if not is_uuid7(v):
                self._err(h, 400, f"Invalid {k}")
                return False
        for k in keys:
            v = body.get(k)
            if v is not None and (v in self._used_message_ids or v in self.evaluations):
                self._err(h, 400, f"Message {v} already exists")
                return False
        return True

    def _check_model(self, h, mid, mode, modality, which="modelAId"):
        model = self.models_by_id.get(mid) if isinstance(mid, str) else None
        if model is None:
            if int(self.knobs["unknown_model_status"]) == 404:
                self._err(h, 404, "Models not found")
            else:
                self._err(h, 400, f"Invalid {which}")
            return None
        if not model.get("organization") and mode != "battle":
            self._err(h, 400, "Cannot select private models in non-battle mode")
            return None
        if self.knobs["check_modality"] and not self._model_modality_ok(model, modality):
            self._err(h, 404, "Models not found")
            return None
        return model

    def _chat_create(self, h, req, body, uid, content, attachments):
        mode = body.get("mode")
        if mode is None:
            return self._err(h, 400, "mode is required")
        if mode not in ("direct", "direct-battle", "battle", "side-by-side"):
            return self._err(h, 400, f"Invalid mode: {mode}")
        if mode == "direct" and self.knobs["mode_policy"] == "no_direct":
            return self._err(h, 400, "'direct' mode is not allowed when starting a new conversation")
        modality = body.get("modality") or "chat"
        if modality not in ("chat", "image", "search"):
            return self._err(h, 400, f"Invalid modality: {modality}")
        two = mode in ("battle", "side-by-side")
        required = ("id", "userMessageId", "modelAMessageId") + (("modelBMessageId",) if two else ())
        if not is_uuid7(body.get("id")):
            return self._err(h, 400, "Invalid id")
        if body["id"] in self.evaluations or body["id"] in self._used_message_ids:
            return self._err(h, 400, f"Evaluation session {body['id']} already exists")
        if not self._check_ids(h, body, ("userMessageId", "modelAMessageId", "modelBMessageId"), required):
            return None
        if mode == "battle":
            pool = [m for m in self.models if m.get("organization") and self._model_modality_ok(m, modality)]
            a, b = self.rng.sample(pool, 2)
        else:
            a = self._check_model(h, body.get("modelAId"), mode, modality)
            if a is None:
                return None
            b = None
            if mode == "side-by-side":
                b = self._check_model(h, body.get("modelBId"), mode, modality, "modelBId")
                if b is None:
                    return None
        ev = {"user": uid, "model_id": a["id"], "model_b_id": b["id"] if b else None, "mode": mode,
              "modality": modality, "messages": [], "created": self.now()}
        self.evaluations[body["id"]] = ev
        self._used_message_ids.update(v for v in (body.get("userMessageId"), body.get("modelAMessageId"),
                                                  body.get("modelBMessageId")) if v)
        return self._start_reply(h, req, body["id"], ev, content, attachments, body)

    def _owned(self, h, eid, uid):
        ev = self.evaluations.get(eid)
        if ev is None:
            self._err(h, 404, "Evaluation session not found")
            return None
        if ev["user"] != uid:
            self._err(h, 401, f"User {uid} does not have access to evaluation session {eid}")
            return None
        return ev

    def _chat_post(self, h, req, body, uid, eid, content, attachments):
        if body.get("id") not in (None, eid):
            return self._err(h, 400, "Evaluation id mismatch")
        ev = self._owned(h, eid, uid)
        if ev is None:
            return None
        two = ev["mode"] in ("battle", "side-by-side")
        required = ("userMessageId", "modelAMessageId") + (("modelBMessageId",) if two else ())
        if not self._check_ids(h, body, ("userMessageId", "modelAMessageId", "modelBMessageId"), required):
            return None
        modality = body.get("modality") or ev["modality"]
        if body.get("modelAId") is not None and ev["mode"] != "battle":
            model = self._check_model(h, body["modelAId"], ev["mode"], modality)
            if model is None:
                return None
        self._used_message_ids.update(v for v in (body.get("userMessageId"), body.get("modelAMessageId"),
                                                  body.get("modelBMessageId")) if v)
        return self._start_reply(h, req, eid, ev, content, attachments, body)

    def _chat_retry(self, h, req, body, uid, eid, mid):
        ev = self._owned(h, eid, uid)
        if ev is None:
            return None
        idx = next((i for i, m in enumerate(ev["messages"]) if m.get("id") == mid and m["role"] == "assistant"), None)
        if idx is None:
            return self._err(h, 404, "Message not found")
        user_idx = max(i for i in range(idx) if ev["messages"][i]["role"] == "user")
        um = ev["messages"][user_idx]
        return self._start_reply(h, req, eid, ev, um["content"], um.get("attachments") or [], body,
                                 retry_of=idx, turn=sum(1 for m in ev["messages"][:user_idx + 1] if m["role"] == "user"))

    # =================================================================================================================
    # Reply generation (§7, §13.8)
    # =================================================================================================================

    def _start_reply(self, h, req, eid, ev, content, attachments, body, retry_of=None, turn=None):
        """Build the lines for this reply (under the lock), then stream them (outside it)."""
        n = turn or (sum(1 for m in ev["messages"] if m["role"] == "user") + 1)
        model = self.models_by_id[ev["model_id"]]
        modality = body.get("modality") or ev["modality"]
        a_msg = body.get("modelAMessageId") or (ev["messages"][retry_of]["id"] if retry_of is not None else None)
        script = self.knobs["script"].pop(0) if self.knobs["script"] else None
        k = self.knobs
        text = f"turn {n}: {content}"
        if k["unicode"]:
            text += UNICODE_EXTRA
        reasoning = ""
        lines: list[str] = []
        esc = bool(k["unicode"])
        per = int(k["words_per_part"])
        if script is not None:
            lines = [str(x) for x in script]
            text = ""
            for ln in lines:
                if ln.startswith("a0:"):
                    try:
                        text += json.loads(ln[3:])
                    except ValueError:
                        pass
        else:
            if k["noise_codes"]:
                lines.append("af:" + compact({"messageId": a_msg}))
                lines.append('a8:[{"type":"annotation","value":"noise"}]')
            if modality == "image":
                lines.append('a2:[{"type":"heartbeat"}]')
                lines += self._image_lines(ev, a_msg, content)
                text = ""
            elif k["lines"]:
                text = "".join(f"line {i}\n" for i in range(1, int(k["lines"]) + 1))
                lines += ["a0:" + js_string(f"line {i}\n", esc) for i in range(1, int(k["lines"]) + 1)]
            else:
                if "thinking" in model.get("publicName", ""):
                    reasoning = f"thinking about: {content}"
                    lines += ["ag:" + js_string(p, esc) for p in word_parts(reasoning, per)]
                if modality == "search":
                    lines += self._citation_sources()
                    cited = text + "<!--citation:1--> see also source two<!--citation:2-->."
                    lines += ["a0:" + js_string(p, esc) for p in word_parts(text, per)]
                    lines += ["a0:" + js_string(p, esc) for p in
                              ("<!--cita", "tion:1--> see also", " source two<!--citation:", "2-->.")]
                    text = cited
                else:
                    lines += ["a0:" + js_string(p, esc) for p in word_parts(text, per)]
            if k["noise_codes"]:
                lines.append('a9:{"toolCallId":"noise-1","toolName":"noop","args":{}}')
                lines.append('ah:{"sourceType":"url","id":"noise-src","url":"https://example.org/noise",'
                             '"title":"Noise"}')
            finish = k["finish_reason"] or "stop"
            if finish == "error":
                lines.append('a3:"An error occurred while generating the response"')
            prompt_tokens = sum(len(str(m["content"]).split()) for m in ev["messages"] if m["role"] == "user") \
                + len(str(content).split())
            usage = {"promptTokens": max(1, prompt_tokens), "completionTokens": max(1, len(text.split()))}
            if k["noise_codes"]:
                lines.append("ae:" + compact({"finishReason": finish, "usage": usage, "isContinued": False}))
            two = ev["mode"] in ("battle", "side-by-side") or k["b_lines"]
            a_finish = "unknown" if k["b_lines"] == "unknown" else finish
            ad = "ad:" + compact({"finishReason": a_finish, "usage": usage})
            if two:
                b_text = f"model b turn {n}: {content}"
                b_lines = ["b0:" + js_string(p, esc) for p in word_parts(b_text, per)]
                merged = []
                for ln in lines:  # interleave b lines at seeded random positions
                    while b_lines and self.rng.random() < 0.5:
                        merged.append(b_lines.pop(0))
                    merged.append(ln)
                lines = merged + b_lines + ['bd:{"finishReason":"stop"}', ad]
            else:
                lines.append(ad)

        fault = self._take_fault(req.kind, req.uid, status_phase=False)
        if fault:
            req.log["fault"] = {x: y for x, y in fault.items() if x != "times"}
            cl = fault.get("content_less")
            if cl:
                lines = {"empty": [], "only_ad": ['ad:{"finishReason":"stop"}'],
                         "only_a3": ['a3:"Resource exhausted. Please try again later."'],
                         "has_arena_error": ['a0:"hasArenaError"', 'ad:{"finishReason":"stop"}'],
                         "json_error": ['{"error":"Internal server error"}']}[cl]
        record = not (fault and (fault.get("content_less") or fault.get("disconnect_after") is not None))

        def on_complete():
            if not record:
                return
            with self._lock:
                if retry_of is not None:
                    ev["messages"][retry_of].update(content=text, reasoning=reasoning)
                    return
                ev["messages"].append({"id": body.get("userMessageId"), "role": "user", "content": content,
                                       "attachments": attachments})
                ev["messages"].append({"id": a_msg, "role": "assistant", "content": text, "reasoning": reasoning,
                                       "model_id": ev["model_id"]})
        opts = {x: k[x] for x in ("data_prefix", "crlf", "no_final_newline", "split", "heartbeat_every",
                                  "first_byte_delay", "line_delay", "stream_framing")}
        if fault:
            for x in ("first_byte_delay", "line_delay"):
                if fault.get(x) is not None:
                    opts[x] = fault[x]
            opts["disconnect_after"] = fault.get("disconnect_after")
        headers = self._ratelimit_headers(req.uid, modality)
        if k["rotate_on_chat"]:
            _, _, session = self._auth_from_cookies(req.cookies)
            new = self._use_refresh_token((session or {}).get("refresh_token"))
            if new:
                had = [n for n in req.cookies if n == AUTH_COOKIE or n.startswith(AUTH_COOKIE + ".")]
                headers += [("Set-Cookie", c) for c in self._session_cookies(self.encode_session(new), "whole", had)]
        # Stream outside the lock: hundreds of streams run concurrently.
        self._lock.release()
        try:
            self._write_stream(h, lines, opts, headers, before_last=on_complete)
        finally:
            self._lock.acquire()
        return None

    def _citation_sources(self) -> list[str]:
        out = []
        for sid, url, title in (("1", "https://example.org/a", "Example A"), ("2", "https://example.com/b", "Example B")):
            src = {"source": {"id": sid, "url": url, "title": title, "favicon": url.rsplit("/", 1)[0] + "/favicon.ico"}}
            out.append("ac:" + compact({"toolCallId": "citation-source", "argsTextDelta": compact(src)}))
        return out

    def _image_lines(self, ev, a_msg, content) -> list[str]:
        digest = hashlib.sha256(str(content).encode()).digest()
        png = make_png(8, 8, digest[:3])
        mode = self.knobs["image_output"]
        data = base64.b64encode(png).decode()
        if mode == "data":
            return ["a2:" + compact([{"type": "image", "data": data, "mimeType": "image/png"}])]
        if mode == "file":
            return ["ak:" + compact({"mimeType": "image/png", "data": data})]
        key = f"{ev['user']}/{int(self.now() * 1000)}-{a_msg}.png"
        self.r2[key] = {"bytes": png, "content_type": "image/png", "expires": self.now() + 3600}
        return ["a2:" + compact([{"type": "image", "image": self.presign(key, "GET"), "mimeType": "image/png"}])]

    def _ratelimit_headers(self, uid, modality) -> list:
        now = self.now()
        if modality == "image":
            limit, window = 3, 3600
        else:
            limit, window = int(self.knobs["ratelimit_limit"]), 300
        with self._lock:
            times = [t for t in self._rate.get((uid, window), []) if t > now - window] + [now]
            self._rate[(uid, window)] = times
        reset = int(window - (now - times[0]))
        return [("ratelimit", f"limit={limit}, remaining={max(0, limit - len(times))}, reset={reset}"),
                ("ratelimit-policy", f"{limit};w={window}")]

    # -----------------------------------------------------------------------------------------------------------------
    # Stream writer: framing, splitting, delays, heartbeats, disconnects
    # -----------------------------------------------------------------------------------------------------------------

    def _write_stream(self, h: _Handler, lines: list[str], opts: dict, extra_headers, before_last=None) -> bool:
        """Write the stream; True if it completed (False on a deliberate disconnect or a client hang-up).

        ``before_last`` runs just before the final bytes go out, so that the history is recorded before the
        client can see the end of the reply and send a follow-up (no race in tests)."""
        before_last = before_last or (lambda: None)
        if opts.get("first_byte_delay"):
            time.sleep(float(opts["first_byte_delay"]))
        chunked = opts.get("stream_framing", "chunked") != "close"
        h.send_response(200)
        for k, v in [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                     ("Access-Control-Allow-Origin", "*"), ("x-request-id", self._uuid4()),
                     ("x-vercel-id", "fra1::iad1::" + self._hex(12))] + list(extra_headers):
            h.send_header(k, v)
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        h._headers_sent = True

        def write(data: bytes):
            if not data:
                return
            h.wfile.write((b"%x\r\n" % len(data) + data + b"\r\n") if chunked else data)
            h.wfile.flush()

        prefix = "data: " if opts.get("data_prefix") else ""
        eol = "\r\n" if opts.get("crlf") else "\n"
        sep = eol + (eol if opts.get("data_prefix") == "sse" else "")
        encoded = [(prefix + ln + sep).encode("utf-8") for ln in lines]
        if encoded and opts.get("no_final_newline"):
            encoded[-1] = encoded[-1][:-len(sep.encode())]
        cut = opts.get("disconnect_after")
        if cut is not None:
            encoded = encoded[:int(cut)]
        heartbeat = float(opts.get("heartbeat_every") or 0)
        hb_line = (prefix + 'a2:[{"type":"heartbeat"}]' + sep).encode()
        line_delay = float(opts.get("line_delay") or 0)
        try:
            if heartbeat:
                write(hb_line)
            mode = opts.get("split", "none")
            if mode == "coalesce":
                before_last()
                write(b"".join(encoded))
            elif mode == "random":
                blob = b"".join(encoded)
                cuts = set()
                i = blob.find(b"0:")
                if i > 0:
                    cuts.add(i)  # inside the "a0:" prefix
                for j, byte in enumerate(blob):
                    if byte >= 0xC0:
                        cuts.add(j + 1)  # inside a multi-byte UTF-8 character
                        break
                pos = 0
                while pos < len(blob):
                    pos += self.rng.randint(1, 24)
                    cuts.add(pos)
                edges = sorted(c for c in cuts if 0 < c < len(blob))
                start = 0
                for e in edges + [len(blob)]:
                    if e == len(blob):
                        before_last()
                    piece = blob[start:e]
                    write(piece)
                    start = e
                    if line_delay and b"\n" in piece:
                        time.sleep(line_delay)
            else:
                last = time.monotonic()
                for idx, data in enumerate(encoded):
                    if line_delay and idx:
                        end = time.monotonic() + line_delay
                        while True:
                            remaining = end - time.monotonic()
                            if remaining <= 0:
                                break
                            if heartbeat and time.monotonic() - last >= heartbeat:
                                write(hb_line)
                                last = time.monotonic()
                            time.sleep(min(remaining, heartbeat or remaining, 0.05) if heartbeat else remaining)
                    if idx == len(encoded) - 1:
                        before_last()
                    write(data)
                    last = time.monotonic()
            if cut is not None:
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise _Abort()
            if not encoded:
                before_last()
            if chunked:
                h.wfile.write(b"0\r\n\r\n")
                h.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            # The client went away mid-stream: tests check that a bridge cancels upstream when its own client does.
            h.log_entry["aborted"] = True
            h.close_connection = True
            return False


# =====================================================================================================================
# Standalone entry point
# =====================================================================================================================


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fake LM Arena emulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=DEFAULT_MODELS_PATH)
    ap.add_argument("--no-recaptcha", action="store_true", help="accept requests without reCAPTCHA tokens")
    ap.add_argument("--cloudflare", action="store_true", help="enable the Cloudflare interstitial")
    args = ap.parse_args(argv)
    arena = FakeArena(models_path=args.models, seed=args.seed, host=args.host, port=args.port)
    if args.no_recaptcha:
        arena.configure(recaptcha="off")
    if args.cloudflare:
        arena.configure(cloudflare=True)
    arena.start()
    print(f"Fake LM Arena listening on {arena.url}", flush=True)
    print(f"session cookie: arena-auth-prod-v1={arena.new_session()}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        arena.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
