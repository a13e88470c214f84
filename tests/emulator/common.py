"""Constants, default knobs and small encoders shared by every part of the emulator."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import struct
import time
import zlib
from typing import Any

# The repository's own copy of the scraped list, so that a plain clone runs the emulator and the tests.
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
DEFAULT_MODELS_PATH = os.path.join(FIXTURES, "models.json")
# Real captures of the site (Nov–Dec 2025), a copy of shared/fixtures/real.
REAL_FIXTURES = os.path.join(FIXTURES, "real")

DEFAULT_SITEKEY = "6LeTGMcsAAAAALuIlkVwIxaAuZA8VledA6d3Nnb0"
V2_SITEKEY = "6Ld7ePYrAAAAAB34ovoFoDau1fqCJ6IyOjFEQaMn"
TURNSTILE_SITEKEY = "0x4AAAAAAA65vWDmG-O_lPtT"
TURNSTILE_PASS_KEY = "1x00000000000000000000AA"
TURNSTILE_FAIL_KEY = "2x00000000000000000000AB"
TURNSTILE_DUMMY_TOKEN = "XXXX.DUMMY.TOKEN.XXXX"
TOKEN_PREFIX = "0cAFcWeA"
AUTH_COOKIE = "arena-auth-prod-v1"
# The header the fake grecaptcha script adds to its page's own fetch() calls (U1): the page id of the tab.
PAGE_HEADER = "x-arena-page"
R2_MAX_BYTES = 10 * 1024 * 1024
CHAT_PATHS = ("create", "post", "retry")
UUID7_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
UUID_ANY_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
CHUNK_COOKIE_RE = re.compile(re.escape(AUTH_COOKIE) + r"\.(\d+)")

# Extra text appended to replies when the ``unicode`` knob is on: CJK, RTL, an astral emoji (emitted as a
# surrogate-pair \\uXXXX escape), an embedded double quote and an embedded newline.
UNICODE_EXTRA = ' 你好，世界 שלום مرحبا 😀🎉 "quoted"\nsecond line'

DEFAULT_KNOBS: dict[str, Any] = {
    # --- anti-bot ---
    "recaptcha": "required",            # "required" | "off" | "absent" (off, and nothing on the page or in
                                        # the chunks names reCAPTCHA: a deployment that enforces no token)
    "recaptcha_fail_next": 0,           # fail the next N chat token checks (score too low)
    "recaptcha_fail_always": False,
    "recaptcha_penalty": None,          # U2 {"k":2,"w":20,"p":1200,"on_fail":true}: see Recaptcha.penalty_reason
    "v2_passes_when_v3_fails": False,   # v2 tokens ignore the three score knobs above
    "context_bound_tokens": False,      # U1: a token passes only when sent by the page (tab) that minted it
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
    "cloudflare_interactive": False,    # the challenge passes only by a click on its widget's checkbox
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
    "signup_turnstile": "required",     # U5: "required" | "none" (2026: no Turnstile on the page or in the body)
    "provisional_id_store": "cookie",   # U5: "cookie" | "local_storage" (no cookie) | "none" (the client makes one)
    "login_gate": False,                # U4: guests get 401 LOGIN_GATE in direct, direct-battle, side-by-side, auto
    # --- chat validation ---
    "mode_policy": "both",              # "both" | "no_direct"
    "unknown_model_status": 400,        # 400 {"error":"Invalid model"} | 404 {"error":"Models not found"}
    "check_modality": True,             # request modality must match the model (404 Models not found)
    "battle_turn_every": 0,             # U3: in direct-battle every k-th reply is a battle turn (both lanes)
    "battle_skip_refused": False,       # U3: skip-direct-battle answers 400 "Skipping only allowed for first response"
    "strict_2026_body": False,          # U9: create/follow-up need modelBMessageId + autoModalityMetadata, else 403
    "image_quota": 0,                   # U7: image replies per account per day (0: no daily quota)
    # --- page ---
    "flight_split": True,               # split the initialModels payload across two pushes
    "models_at": "both",                # U10: "both" | "direct_only" (initialModels only at /?mode=direct)
    "anon_key_in_chunks": True,         # U10: False: no Supabase anon key in the JS chunks
    "sitekey_call_site": "literal",     # U8: "literal" execute(k,{action:"chat_submit"}) | "variable" {action:e} | "hidden"
    "sitekey_in_page": "render",        # U8: "render" (?render=<key>) | "k" (render=explicit + ?k=<key>) | "none" | "live"
    "model_fields_2026": False,         # U9: every model gets displayName and userSelectable
    "unselectable_models": [],          # U9: ids or publicNames served with userSelectable:false, refused in chats
    "router_model": None,               # U9: publicName the "max" router model routes to (a2 routed_model part)
    "action_answer": "short",           # U9: "short" | "flight" (whole page flight tree, result on line 1:)
    # --- stream content ---
    "script": [],                       # FIFO of scripted replies, one per stream request (see replies.scripted)
    "citation_format": "markers",       # U6: "markers" (<!--citation:N-->) | "offsets" (charLocation, real 2025-12)
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
    "first_byte_delay": 0.0,            # hold the answer back (watching for a hang-up: README "Held answers")
    "line_delay": 0.0,                  # wait between lines (watching for a hang-up too)
    "stream_framing": "chunked",        # "chunked" | "close" (close-delimited body)
    "ratelimit_limit": 3000,
}

# Knobs whose default is mutable: copied on reset.
MUTABLE_KNOBS = ("script", "unselectable_models")


def b64url(data: bytes) -> str:
    """base64url without padding (the alphabet Supabase and JWTs use)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64_any_decode(text: str) -> bytes:
    """Strict decode of base64 in either alphabet, with or without padding."""
    t = text.strip().replace("-", "+").replace("_", "/")
    t += "=" * (-len(t) % 4)
    return base64.b64decode(t, validate=True)


def is_uuid7(value: object) -> bool:
    return isinstance(value, str) and bool(UUID7_RE.match(value))


def make_uuid7(ms: int | None = None, rng: random.Random | None = None) -> str:
    """A UUIDv7 string (used by tests that do not run the bridge)."""
    source: Any = rng or random
    ms = int(time.time() * 1000) if ms is None else ms
    rand_a = source.getrandbits(12)
    rand_b = source.getrandbits(62)
    n = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def make_png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] | bytes = (200, 60, 30)) -> bytes:
    """A real, valid RGB PNG built with zlib+struct (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


def _surrogates(m: re.Match) -> str:
    cp = ord(m.group(0)) - 0x10000
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"


def js_string(value: str, escape_astral: bool = False) -> str:
    """JSON string literal with raw UTF-8 (like JSON.stringify); optionally astral chars as surrogate escapes."""
    out = json.dumps(value, ensure_ascii=False)
    return re.sub("[\U00010000-\U0010FFFF]", _surrogates, out) if escape_astral else out


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def parse_cookie_header(header: str) -> dict[str, str]:
    """Cookie header -> dict (no SimpleCookie: it chokes on real-world values)."""
    out: dict[str, str] = {}
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


def iso_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(t))
