#!/usr/bin/env python3
"""LM Arena Bridge: an OpenAI-compatible endpoint for the models on LM Arena (https://arena.ai).

One file, read top to bottom: every section uses only what the sections above it define, so the file is
its own table of contents. Each section names one thing.

Contents:

  Part I: Foundations
    Settings                flags and environment, one frozen object
    Tools                   time, a sliding window, request traces, a prefetching queue
    Schema                  the SQLite schema's migrations, in order
    Store                   the one SQLite file: accounts and their budgets, keys, usage, models, site parameters, conversations

  Part II: LM Arena (the upstream; names failures, never chooses a client's status)
    Site discovery          pure: the page and its JS chunks in, site parameters out
    Sessions                the Session value type, what users paste, accounts from it
    Stream parser           pure: LM Arena's data stream in, events out
    Chat bodies             pure: models' capabilities, ids, the body of a chat turn, image attachments
    Failure policy          tables: an answer's failure kind, the next step for the n-th failure, the request path
    Page agent              the JavaScript run in an LM Arena page, by the sidecar and by the userscript
    Sidecar client          the lazily started Playwright helper (sidecar.py) behind a Unix socket
    Browser executor        the user's own browsers (userscript): accounts of kind browser, jobs by long poll
    Userscript              the script a user installs: header, the page agent, the long-poll transport
    Browser fingerprints    pure: one table pairing curl_cffi's TLS imitation with that browser's User-Agent
    Upstream responses      streamed answers, closed at once: curl_cffi's, and an in-page fetch's relayed
    Upstream HTTP client    origin, requests (direct or in the sidecar's page), discovery, clearance, actions
    Uploads                 images to LM Arena's storage, reused while their signed URLs last
    Account pool            choice, pacing, cool-downs, refresh, sign-up, session adoption
    Turn runner             open a turn (the policy loop), follow up, stream

  Part III: Client APIs (each API section defines its own route table)
    Metrics                 Prometheus counters and histograms per app, gauges read at scrape time, causes
    API plumbing            the API error type and its status table, app state, keys, bodies, rate limits, usage
    Client hang-ups         a request whose client leaves before its answer: cancelled, recorded as 499
    OpenAI chat requests    validation, model choice, transcripts, conversation fingerprints
    OpenAI chat replies     events -> content, chunks and completion objects
    Tool emulation: requests  pure, for every API: tools, tool choice, formats -> instructions; tool history
    Tool emulation: replies   pure: <tool_call> blocks out of a streaming reply, the loop guard, JSON answers
    OpenAI chat tools       tools, tool_choice, response_format, refusals in; Ollama's model list out
    Chat jobs               one chat request on the engine: plan, read for calls, ask once more, remember
    OpenAI images           image input (data: URIs, URLs) and image generation
    OpenAI routes           chat completions, streaming, models, images, probes: openai_routes()

  Part IV: Agent APIs (SPEC §7.2, §7.3: Claude Code, Codex CLI)
    Anthropic requests      pure: a Messages body -> the turn (history with calls and results, tools, format)
    Anthropic replies       pure: the turn's events -> Messages SSE, message bodies, Anthropic's errors
    Responses requests      pure: a Responses body (instructions, items, tools, text.format) -> the turn
    Responses replies       pure: the turn's events -> Responses SSE with sequence numbers, response objects
    Agent routes            /v1/messages, count_tokens, /v1/responses on chat jobs; stored responses; HEAD /

  Part V: Operations
    Saved runs              redaction of every secret, the recorder behind `doctor --save`
    Doctor verdicts         result lines, the step runner, one pure verdict per step
    Doctor                  the checks against the live site, with the bridge's own parts: DOCTOR_STEPS
    Dashboard kit           HTML escaping and the shared page layout
    Dashboard sign-in       admin password, trusted proxies, sessions, the sign-in pages
    Executor routes         the userscript's long poll and event uploads (CORS, pairing secret), its download
    Dashboard pages         the admin pages: DASHBOARD, one table of pages
    App                     health, /metrics, background jobs, create_app composing every section's routes
    CLI                     serve, keys, tokens, models, doctor: COMMANDS, one table of commands


Serve with `python -m bridge` (see the end of the file for why not `python bridge.py`); run
`python bridge.py --help` for every flag and environment variable.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import calendar
import codecs
import collections
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import hmac
import html
import io
import ipaddress
import json
import logging
import math
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

if __name__ == "__main__":
    # sqlite_utils imports numpy whenever it is installed, only to map numpy types to columns; the bridge
    # stores none, and numpy (with its BLAS buffers) was 20 MB, a third of the server's idle memory.
    sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]

import httpx
import sqlite_utils
from curl_cffi import CurlOpt
from curl_cffi.requests import AsyncSession
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Match, Route

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

log = logging.getLogger("bridge")


# =====================================================================================================
# Settings
# =====================================================================================================

@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its flag, the environment variables that can set it, and its help text.

    The table below is the single source for argparse, the environment, and the README's configuration
    table, so the three cannot drift apart."""
    name: str
    flag: str | None          # None: secrets are taken from the environment only, never from argv (ps shows it)
    env: tuple[str, ...]
    kind: Callable[[str], Any]
    default: Any
    help: str
    bare: str | None = None   # what the flag given without a value means (None: the flag takes a value)


def _bool(text: str) -> bool:
    return str(text).strip().lower() in {"1", "true", "yes", "on"}


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


def networks(text: str) -> tuple[Network, ...]:
    """BRIDGE_TRUSTED_PROXY: addresses and networks (CIDR), comma separated. The setting was once a switch:
    `1`/`true` still means loopback (a proxy on the same machine), `0`/`false`, none."""
    words = [word.strip() for word in str(text).split(",") if word.strip()]
    if len(words) == 1 and words[0].lower() in {"0", "false", "no", "off"}:
        return ()
    if len(words) == 1 and _bool(words[0]):
        words = list(LOOPBACK_NETWORKS)
    try:
        return tuple(ipaddress.ip_network(word, strict=False) for word in words)
    except ValueError as exc:
        raise ValueError(f"not an address or network (CIDR): {exc}") from None


def _bool_or_auto(text: str) -> bool | None:
    """A switch that may be left to the bridge: "auto" (or empty) is None."""
    return None if str(text).strip().lower() in {"", "auto"} else _bool(text)


REQUEST_PATH_SETTINGS = ("auto", "page", "direct")     # BRIDGE_REQUEST_PATH; REQUEST_PATHS says what each does
AT_LEAST_ONE = ("login_attempts", "login_budget")      # settings that have no "off" (0)

OPTIONS: tuple[Option, ...] = (
    Option("host", "--host", ("BRIDGE_HOST",), str, "127.0.0.1", "address to listen on"),
    Option("port", "--port", ("BRIDGE_PORT", "PORT"), int, 8000, "port to listen on"),
    Option("db", "--db", ("BRIDGE_DB",), str, "bridge.db", "SQLite file holding all state"),
    Option("arena_url", "--arena-url", ("ARENA_URL",), str, "https://arena.ai", "LM Arena origin"),
    Option("log_level", "--log-level", ("BRIDGE_LOG_LEVEL",), str, "info", "info or debug (request traces)"),
    Option("admin_password", None, ("BRIDGE_ADMIN_PASSWORD",), str, None,
           "dashboard password; generated and printed once when unset and none is stored"),
    Option("auth_tokens", None, ("ARENA_AUTH_TOKENS",), str, "",
           "arena accounts to import at start (comma or newline separated)"),
    Option("sidecar", "--sidecar", ("BRIDGE_SIDECAR",), str, "auto", "auto (start the browser when needed) or off"),
    Option("browser", "--browser", ("BRIDGE_BROWSER",), str, None, "Chromium/Chrome binary for the sidecar"),
    Option("sidecar_socket", "--sidecar-socket", ("BRIDGE_SIDECAR_SOCKET",), str, None,
           "Unix socket of the sidecar (default: beside the database)"),
    Option("sidecar_idle", "--sidecar-idle", ("BRIDGE_SIDECAR_IDLE",), float, 300.0,
           "seconds without use before the sidecar (and its browser) is stopped"),
    Option("sidecar_timeout", "--sidecar-timeout", ("BRIDGE_SIDECAR_TIMEOUT",), float, 45.0,
           "seconds a request waits for the sidecar before failing with 503"),
    Option("headful", "--headful", ("BRIDGE_HEADFUL",), _bool_or_auto, None,
           "run the sidecar's Chromium with a window (under Xvfb when there is no display; headless, with a "
           "warning, where neither is); auto (the default): "
           "headful when xvfb-run or a display exists, since LM Arena scores a headful browser better"),
    Option("request_timeout", "--request-timeout", ("BRIDGE_REQUEST_TIMEOUT",), float, 120.0,
           "seconds a chat request may take until LM Arena starts answering (all attempts together)"),
    Option("stream_idle_timeout", "--stream-idle-timeout", ("BRIDGE_STREAM_IDLE_TIMEOUT",), float, 180.0,
           "seconds of upstream silence after which a stream is given up"),
    Option("ping_interval", "--ping-interval", ("BRIDGE_PING_INTERVAL",), float, 5.0,
           "seconds between SSE keep-alive comments while waiting"),
    Option("discovery_interval", "--discovery-interval", ("BRIDGE_DISCOVERY_INTERVAL",), float, 3600.0,
           "seconds between refreshes of the model list and site parameters"),
    Option("conversation_ttl", "--conversation-ttl", ("BRIDGE_CONVERSATION_TTL",), float, 7 * 86400.0,
           "seconds an idle conversation stays reusable for follow-ups"),
    Option("usage_days", "--usage-days", ("BRIDGE_USAGE_DAYS",), float, 90.0,
           "days each request stays in the usage log (the usage page's periods need 30); older ones are summed "
           "per day and key, so all-time totals stay (0: keep every request)"),
    Option("default_rpm", "--default-rpm", ("BRIDGE_DEFAULT_RPM",), int, 60, "requests per minute for new API keys"),
    Option("body_timeout", "--body-timeout", ("BRIDGE_BODY_TIMEOUT",), float, 60.0,
           "seconds a client has to send its whole request body (then 408), so that slow bodies cannot hold "
           "connections open"),
    Option("max_body", "--max-body", ("BRIDGE_MAX_BODY",), int, 20 * 1024 * 1024, "largest request body in bytes"),
    Option("max_prompt_chars", "--max-prompt-chars", ("BRIDGE_MAX_PROMPT_CHARS",), int, 100_000,
           "largest message sent to LM Arena; older turns of a long history are dropped first, a newest "
           "message longer than this is refused (400)"),
    Option("max_inflight_body_mb", "--max-inflight-body-mb", ("BRIDGE_MAX_INFLIGHT_BODY_MB",), int, 64,
           "MiB of request bodies all requests in flight may hold together; beyond it a request gets 503 with "
           "Retry-After"),
    Option("max_images", "--max-images", ("BRIDGE_MAX_IMAGES",), int, 10,
           "most images one request attaches (each is an upload to LM Arena); more in the newest message: 400"),
    Option("allow_private_urls", "--allow-private-urls", ("BRIDGE_ALLOW_PRIVATE_URLS",), _bool, False,
           "let image URLs point at private and loopback addresses"),
    Option("anonymous", "--anonymous", ("BRIDGE_ANONYMOUS",), str, "auto",
           "auto (create an anonymous arena account when none is usable) or off"),
    Option("signup_interval", "--signup-interval", ("BRIDGE_SIGNUP_INTERVAL",), float, 3600.0,
           "least seconds between two anonymous sign-ups"),
    Option("browser_models", "--browser-models", ("BRIDGE_BROWSER_MODELS",), str, "",
           "models (public names, comma separated) always sent through the sidecar's page"),
    Option("arena_mode", "--arena-mode", ("BRIDGE_ARENA_MODE",), str, None,
           "mode sent for new conversations: direct-battle or direct (unset: direct-battle, or the mode learned "
           "when LM Arena refused the other; a mode error tries the other)"),
    Option("bare_body", "--bare-body", ("BRIDGE_BARE_BODY",), _bool, False,
           "send chats without the 2026 web client's modelBMessageId and autoModalityMetadata"),
    Option("impersonate", "--impersonate", ("BRIDGE_IMPERSONATE",), str, "chrome",
           "browser whose TLS/HTTP2 fingerprint curl_cffi imitates"),
    Option("account_min_interval", "--account-min-interval", ("BRIDGE_ACCOUNT_MIN_INTERVAL",), float, 0.0,
           "least seconds between two chat requests on one arena account (0 = no pacing)"),
    Option("account_rph", "--account-rph", ("BRIDGE_ACCOUNT_RPH",), int, 10,
           "chat requests per hour per arena account, the low end of what LM Arena is reported to tolerate "
           "(10-20); beyond it a request waits a few seconds for an account, then gets 429 (0 = no budget)"),
    Option("request_path", "--request-path", ("BRIDGE_REQUEST_PATH",), str, "auto",
           "how chats reach LM Arena: auto (through the browser page unless the direct path is known to work), "
           "page, or direct (re-tried at most daily on an account the site refused)"),
    Option("trusted_proxy", "--trusted-proxy", ("BRIDGE_TRUSTED_PROXY",), networks, (),
           "addresses and networks (CIDR, comma separated) of the reverse proxies whose X-Forwarded-For/-Proto "
           "are believed, only on connections from them; 1 or true (and the flag without a value): loopback",
           bare="1"),
    Option("login_attempts", "--login-attempts", ("BRIDGE_LOGIN_ATTEMPTS",), int, 5,
           "dashboard sign-ins (and wrong userscript pairing secrets) one client address may try per 5 minutes"),
    Option("login_budget", "--login-budget", ("BRIDGE_LOGIN_BUDGET",), int, 30,
           "sign-ins (and wrong pairing secrets) all addresses together may try per minute; beyond it every "
           "address gets 429 with Retry-After until the minute frees one"),
    Option("shutdown_timeout", "--shutdown-timeout", ("BRIDGE_SHUTDOWN_TIMEOUT",), float, 20.0,
           "on SIGTERM/SIGINT, seconds that running requests and streams get to finish before they are cut"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, each described once in OPTIONS (defaults included): build it with Settings.load()."""

    host: str
    port: int
    db: str
    arena_url: str
    log_level: str
    admin_password: str | None
    auth_tokens: str
    sidecar: str
    browser: str | None
    sidecar_socket: str | None
    sidecar_idle: float
    sidecar_timeout: float
    headful: bool | None
    request_timeout: float
    stream_idle_timeout: float
    ping_interval: float
    discovery_interval: float
    conversation_ttl: float
    usage_days: float
    default_rpm: int
    body_timeout: float
    max_body: int
    max_prompt_chars: int
    max_inflight_body_mb: int
    max_images: int
    allow_private_urls: bool
    anonymous: str
    signup_interval: float
    browser_models: str
    arena_mode: str | None
    bare_body: bool
    impersonate: str
    account_min_interval: float
    account_rph: int
    request_path: str
    trusted_proxy: tuple[Network, ...]
    login_attempts: int
    login_budget: int
    shutdown_timeout: float

    @classmethod
    def load(cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Defaults, then the environment, then flags: a flag wins over the environment.
        `Settings.load(env={})` gives the defaults alone."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for opt in OPTIONS:
            value = getattr(args, opt.name, None) if args is not None else None
            if value is None:
                raw = next((env[name] for name in opt.env if env.get(name, "") != ""), None)
                value = opt.kind(raw) if raw is not None else opt.default
            values[opt.name] = value
        values["arena_url"] = values["arena_url"].rstrip("/")
        if values["request_path"] not in REQUEST_PATH_SETTINGS:
            raise SystemExit(f"BRIDGE_REQUEST_PATH must be one of {', '.join(REQUEST_PATH_SETTINGS)}, "
                             f"not {values['request_path']!r}")
        # A throttle of 0 guesses would lock the dashboard for good (and failed on its empty window).
        for opt in OPTIONS:
            if opt.name in AT_LEAST_ONE and values[opt.name] < 1:
                raise SystemExit(f"{opt.env[0]} must be 1 or more, not {values[opt.name]}")
        return cls(**values)

    @property
    def socket_path(self) -> str:
        if self.sidecar_socket:
            return self.sidecar_socket
        folder = os.path.dirname(os.path.abspath(self.db))
        return os.path.join(folder, "bridge-sidecar.sock")


# =====================================================================================================
# Tools
# =====================================================================================================

def now() -> float:
    return time.time()


def format_time(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


# json.dumps(value, ensure_ascii=False) builds a JSONEncoder per call, 7x the cost of reusing one: these
# are kept, for what runs per request or per line (json_text spells JSON as json.dumps does).
json_text = json.JSONEncoder(ensure_ascii=False).encode
compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


SURROGATE_RE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """Surrogate pairs as the characters they spell, lone surrogates as U+FFFD: JSON escapes can carry
    either, and a string with a lone one cannot be encoded to UTF-8 (one ended a reply without an error)."""
    if SURROGATE_RE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def value_key(value: Any) -> bytes:
    """An exact key for a JSON value (a Memo's), cheap: its pickle, whose C writer is about eight times
    faster than compact_json. Equal bytes are equal values of equal types (1, 1.0 and true differ). Fast
    mode (no pickle memo) makes the bytes the value's alone, not which objects it shares (a body parsed in
    one piece shares its key strings, one parsed in pieces shares fewer). Only compared, never unpickled."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, 5)
    pickler.fast = True         # documented as deprecated, yet the one switch for this; JSON has no cycles
    pickler.dump(value)
    return out.getvalue()


class Memo:
    """The latest results of a pure computation, by a key that spells out all of its input: a changed
    input is a new key, so no result is ever stale. Bounded twice, so that what it holds stays small
    whatever clients send: at most `entries` results (the least recently used goes first), and none kept
    for a key longer than `longest` characters (bytes, for a bytes key). Locked: a large request's steps
    call it from a worker thread (off_loop), and a key evicted between another caller's lookup and its
    move_to_end was a KeyError."""

    def __init__(self, entries: int, longest: int) -> None:
        self.entries, self.longest = entries, longest
        self.results: collections.OrderedDict[str | bytes, Any] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str | bytes, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.results:
                self.results.move_to_end(key)
                return self.results[key]
        result = compute()      # outside the lock: two callers may compute one key, never wait on each other
        if len(key) <= self.longest:
            with self.lock:
                self.results[key] = result
                if len(self.results) > self.entries:
                    self.results.popitem(last=False)
        return result


class SlidingWindow:
    """Events per key over a sliding window, in memory (a restart forgives). It serves both the API keys'
    requests per minute and the dashboard's sign-in attempts per address."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.times: dict[Any, collections.deque[float]] = {}

    def admit(self, key: Any, allowed: int) -> float:
        """0 with the event counted, or the seconds until `key` may have another."""
        at = time.monotonic()
        recent = self.times.setdefault(key, collections.deque())
        while recent and at - recent[0] >= self.seconds:
            recent.popleft()
        if len(recent) >= allowed:
            return self.seconds - (at - recent[0])
        recent.append(at)
        return 0.0

    def full(self, key: Any, allowed: int) -> float:
        """The seconds until `key` may have another event, without counting one (0: it may now)."""
        at = time.monotonic()
        recent = self.times.get(key) or collections.deque()
        while recent and at - recent[0] >= self.seconds:
            recent.popleft()
        return self.seconds - (at - recent[0]) if len(recent) >= allowed else 0.0

    def forget(self, key: Any) -> None:
        self.times.pop(key, None)

    def prune(self) -> None:
        """Drop keys with no event in the window, so that many keys (addresses) cannot grow it without bound."""
        at = time.monotonic()
        for stale in [k for k, times in self.times.items() if not times or at - times[-1] >= self.seconds]:
            del self.times[stale]


async def traced(call: Awaitable[Any], method: str, url: str, account: dict | None, via: str = "") -> Any:
    """Await one request to LM Arena (or its storage); with BRIDGE_LOG_LEVEL=debug, log one line for it:
    the URL's path alone (a query can carry a signature), the status (of the headers, for a stream), the
    time, and the account's id and label, never its cookies, tokens or any header."""
    started, outcome = time.perf_counter(), "no answer"
    try:
        response = await call
        outcome = str(response.status_code)
        return response
    finally:
        if log.isEnabledFor(logging.DEBUG):
            who = f"account {account['id']} ({account.get('label') or '-'})" if account else "no account"
            log.debug("upstream %s %s%s -> %s in %.0f ms, %s", method, urllib.parse.urlsplit(url).path, via,
                      outcome, (time.perf_counter() - started) * 1000, who)


def request_trace(app: Any) -> Any:
    """ASGI middleware: with BRIDGE_LOG_LEVEL=debug, one line per client request when it ends (a stream
    too): method, path (never the query), status, time, and the API key's name and id, never the key."""
    async def trace(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not log.isEnabledFor(logging.DEBUG):
            return await app(scope, receive, send)
        started, status = time.perf_counter(), ["no answer"]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)
        try:
            await app(scope, receive, sending)
        finally:
            key = (scope.get("state") or {}).get("key")
            log.debug("client %s %s -> %s in %.0f ms, %s", scope["method"], scope["path"], status[0],
                      (time.perf_counter() - started) * 1000, f"key {key['id']} ({key['name']})" if key else "no key")
    return trace


class Prefetcher:
    """Pulls items from an async iterator in a task of its own, up to `ahead` items before the caller
    (0: no bound), so that the caller can wake up for a keep-alive without disturbing the pull, take
    every item already pulled at once, and cancel the pull as a plain asyncio task (whose clean-up then
    completes even inside a cancelled anyio scope). A failure reaches the caller in order, after the
    items before it. It serves the SSE loop and the browser's relayed stream."""
    END = object()

    def __init__(self, items: AsyncIterator[Any], ahead: int = 0) -> None:
        self.items = items
        self.queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue(ahead)
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._pull())

    async def _pull(self) -> None:
        try:
            async for item in self.items:
                await self.queue.put((item, None))
            await self.queue.put((self.END, None))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, raised there
            await self.queue.put((None, exc))

    @staticmethod
    def _unpack(item: tuple[Any, BaseException | None]) -> Any:
        value, error = item
        if error is not None:
            raise error
        return value

    def ready(self) -> Any:
        """An item (or END) already pulled, without waiting; None when there is none yet."""
        try:
            return self._unpack(self.queue.get_nowait())
        except asyncio.QueueEmpty:
            return None

    async def next(self, timeout: float | None = None) -> Any:
        """The next item, None when `timeout` passed first, or END."""
        self.start()
        try:
            async with asyncio.timeout(timeout):
                item = await self.queue.get()
        except TimeoutError:
            return None
        return self._unpack(item)

    async def finished(self, timeout: float) -> None:
        """Wait up to `timeout` for the pull to reach the end of the items."""
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=timeout)

    def cancel(self) -> None:
        """Stop the pull without waiting for its clean-up: awaited from inside a cancelled anyio scope,
        that clean-up was cancelled again half-way (a relayed stream's connection then stayed open)."""
        if self.task is not None:
            self.task.cancel()

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if isinstance(self.items, AsyncGenerator):
            with contextlib.suppress(RuntimeError):
                await self.items.aclose()


# =====================================================================================================
# Schema
# =====================================================================================================

def _migrate_v1(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key")
    db.table("accounts").create({
        "id": int, "label": str, "kind": str, "auth": str, "form": str, "cookies": str, "user_agent": str,
        "expires_at": float, "state": str, "cooldown_until": float, "cooldown_reason": str, "failures": int,
        "last_error": str, "last_used": float, "created": float, "needs_browser": int, "direct_retry_at": float,
    }, pk="id", not_null={"auth"}, defaults={"state": "ok", "failures": 0, "last_used": 0.0, "needs_browser": 0})
    db.table("api_keys").create({
        "id": int, "name": str, "prefix": str, "hash": str, "rpm": int, "created": float, "revoked": float,
    }, pk="id")
    db.table("api_keys").create_index(["hash"], unique=True)
    db.table("usage").create({
        "id": int, "ts": float, "key_id": int, "model": str, "status": int, "latency_ms": float,
        "prompt_tokens": int, "completion_tokens": int, "error": str,
    }, pk="id")
    db.table("usage").create_index(["ts"])
    db.table("models").create({"position": int, "id": str, "public_name": str, "data": str}, pk="position")
    db.table("site_params").create({"key": str, "value": str, "updated": float}, pk="key")
    db.table("conversations").create({
        "evaluation_id": str, "account_id": int, "model_id": str, "key_id": int, "turns": int, "updated": float,
    }, pk="evaluation_id")
    db.table("conversation_keys").create({
        "fingerprint": str, "evaluation_id": str, "turns": int, "updated": float,
    }, pk="fingerprint")
    db.table("uploads").create({"key": str, "account_id": int, "attachment": str, "expires": float}, pk="key")
    db.table("admin_sessions").create({"token_hash": str, "csrf": str, "expires": float}, pk="token_hash")


def _migrate_v2(db: sqlite_utils.Database) -> None:
    """Usage older than the kept window, summed per day, key and model, so that totals survive pruning."""
    db.table("usage_daily").create({
        "day": float, "key_id": int, "model": str, "requests": int, "errors": int, "tokens": int, "last_used": float,
    }, pk=("day", "key_id", "model"), not_null={"key_id", "model"})


def _migrate_v3(db: sqlite_utils.Database) -> None:
    """The late-2026 site (issue 14): the model LM Arena's router chose, and quotas per account and modality."""
    db.table("usage").add_column("routed_model", str)
    db.table("quotas").create({"account_id": int, "modality": str, "until": float, "reason": str},
                              pk=("account_id", "modality"))


def _migrate_v4(db: sqlite_utils.Database) -> None:
    """Responses the Responses API may continue (previous_response_id): the history each one ends."""
    db.table("responses").create({"id": str, "key_id": int, "history": str, "created": float}, pk="id")
    db.table("responses").create_index(["created"])


def _migrate_v5(db: sqlite_utils.Database) -> None:
    """Browser executors (SPEC §8): the userscripts' pairing secrets, hashed, and each browser account's record."""
    db.table("executor_pairings").create({"id": int, "hash": str, "created": float, "revoked": float}, pk="id")
    db.table("executor_pairings").create_index(["hash"], unique=True)
    db.table("browser_executors").create({
        "account_id": int, "user": str, "connected_since": float, "last_seen": float, "last_job": float,
        "jobs": int, "failures": int, "last_error": str,
    }, pk="account_id", defaults={"jobs": 0, "failures": 0})


def _migrate_v6(db: sqlite_utils.Database) -> None:
    """Each chat request sent on an account, for its hourly budget (BRIDGE_ACCOUNT_RPH): kept in memory only,
    the budget was forgiven by every restart, and a burst right after one could put each account in penalty (U2)."""
    db.table("account_requests").create({"account_id": int, "ts": float}, not_null={"account_id", "ts"})
    db.table("account_requests").create_index(["ts"])


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_migrate_v1, _migrate_v2, _migrate_v3,
                                                                   _migrate_v4, _migrate_v5, _migrate_v6)


# =====================================================================================================
# Store
# =====================================================================================================

ACCOUNT_PUBLIC_FIELDS = ("id", "label", "kind", "form", "expires_at", "state", "cooldown_until",
                         "cooldown_reason", "failures", "last_error", "last_used", "needs_browser")
BUDGET_WINDOW = 3600.0      # seconds: an account's budget counts the chat requests it sent in the last hour (U2)


class Store:
    """All durable state. Short transactions on one connection; WAL so that the CLI can write beside a
    running server without either of them seeing a half-written row."""

    def __init__(self, path: str):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # It holds sessions and hashes: 0600 whatever the umask. SQLite gives the -wal and -shm files the
        # database's mode; files an older version left readable are tightened too.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for name in (path, path + "-wal", path + "-shm"):
            with contextlib.suppress(OSError):
                os.chmod(name, 0o600)
        conn = sqlite3.connect(path, check_same_thread=False, timeout=15)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=15000")
        self.migrate()

    def migrate(self) -> None:
        """Each migration in one explicit transaction with its version bump (Python's sqlite3 opens none for
        DDL), so a crash half-way leaves the version before it; IMMEDIATE, read inside: one process at a time."""
        conn = self.db.conn
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = self.schema_version
                if version < len(MIGRATIONS):
                    MIGRATIONS[version](self.db)
                    conn.execute(f"PRAGMA user_version = {version + 1}")
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
            if version >= len(MIGRATIONS):
                return

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.db.conn.close()

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict]:
        cursor = self.db.execute(sql, tuple(params))
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def write(self, sql: str, params: Iterable[Any] = ()) -> int:
        with self.db.conn:
            return self.db.execute(sql, tuple(params)).rowcount

    # --- meta and site parameters -------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.rows("SELECT value FROM meta WHERE key = ?", [key])
        return row[0]["value"] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.db.conn:
            self.db.table("meta").upsert({"key": key, "value": value}, pk="key")

    def site_params(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self.rows("SELECT key, value FROM site_params")}

    def site_params_with_times(self) -> list[dict]:
        return self.rows("SELECT key, value, updated FROM site_params ORDER BY key")

    def site_params_updated(self) -> float | None:
        return self.rows("SELECT MAX(updated) AS t FROM site_params")[0]["t"]

    def set_site_params(self, **values: Any) -> None:
        stamp = now()
        with self.db.conn:
            self.db.table("site_params").upsert_all(
                [{"key": k, "value": json.dumps(v), "updated": stamp} for k, v in values.items()], pk="key")

    # --- models ---------------------------------------------------------------------------------------
    def replace_models(self, models: list[dict]) -> None:
        self._models = None
        with self.db.conn:
            self.db.execute("DELETE FROM models")
            self.db.table("models").insert_all(
                [{"position": i, "id": m.get("id"), "public_name": m.get("publicName"), "data": json.dumps(m)}
                 for i, m in enumerate(models)], pk="position")

    _models: tuple[int, list[dict]] | None = None

    def model_count(self) -> int:
        return self.rows("SELECT COUNT(*) AS n FROM models")[0]["n"]

    def models(self) -> list[dict]:
        """The stored model list, parsed once and reused until the table changes (this connection's own
        writes reset the cache; PRAGMA data_version reveals another connection's, e.g. the CLI's).
        Parsing all models on every chat request was its largest cost. The dicts are shared: read-only."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if self._models is None or self._models[0] != version:
            self._models = (version, [json.loads(r["data"])
                                      for r in self.rows("SELECT data FROM models ORDER BY position")])
        return list(self._models[1])

    # --- arena accounts -------------------------------------------------------------------------------
    def add_account(self, **fields: Any) -> int:
        fields.setdefault("created", now())
        with self.db.conn:
            return int(self.db.table("accounts").insert(fields).last_pk or 0)

    def accounts(self) -> list[dict]:
        return self.rows("SELECT * FROM accounts ORDER BY id")

    def account(self, account_id: int) -> dict | None:
        rows = self.rows("SELECT * FROM accounts WHERE id = ?", [account_id])
        return rows[0] if rows else None

    def update_account(self, account_id: int, **fields: Any) -> None:
        """One UPDATE (runs twice per chat request; sqlite_utils' update() also reads the row and the
        schema first). A missing account still raises sqlite_utils' NotFoundError."""
        sets = ", ".join(f'"{k}" = ?' for k in fields)
        with self.db.conn:
            if not fields or self.db.execute(
                    f"UPDATE accounts SET {sets} WHERE id = ?",
                    [*map(sqlite_utils.db.jsonify_if_needed, fields.values()), account_id]).rowcount != 1:
                self.db.table("accounts").get(account_id)

    def swap_account_auth(self, account_id: int, old_auth: str, **fields: Any) -> bool:
        """Store a refreshed session only if nobody stored a newer one meanwhile (compare-and-swap)."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        return self.write(f"UPDATE accounts SET {sets} WHERE id = ? AND auth = ?",
                          [*fields.values(), account_id, old_auth]) == 1

    def remove_account(self, account_id: int) -> bool:
        with self.db.conn:
            self.db.execute("DELETE FROM conversations WHERE account_id = ?", [account_id])
            # Ids are reused after a delete: an upload of the removed user must not reach the next account.
            self.db.execute("DELETE FROM uploads WHERE account_id = ?", [account_id])
            self.db.execute("DELETE FROM quotas WHERE account_id = ?", [account_id])
            self.db.execute("DELETE FROM browser_executors WHERE account_id = ?", [account_id])
            self.db.execute("DELETE FROM account_requests WHERE account_id = ?", [account_id])
            self._sent = None
            return self.db.execute("DELETE FROM accounts WHERE id = ?", [account_id]).rowcount == 1

    # --- chat requests sent per account: the hourly budget (U2) ---------------------------------------
    _sent: tuple[int, dict[int, collections.deque[float]]] | None = None

    def sent_requests(self) -> dict[int, collections.deque[float]]:
        """When each account sent its chat requests of the last BUDGET_WINDOW, oldest first (times that left
        the window since the last request stay until the next one: readers skip them). The table is the
        truth, which a restart keeps; this copy of it, read once and written through by record_request,
        spares each choice of an account a query. It is read again when another connection wrote the file
        (PRAGMA data_version: a `doctor` CLI beside a server)."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if self._sent is None or self._sent[0] != version:
            sent: dict[int, collections.deque[float]] = {}
            for account_id, at in self.db.execute("SELECT account_id, ts FROM account_requests WHERE ts > ? "
                                                  "ORDER BY ts", [now() - BUDGET_WINDOW]):
                sent.setdefault(account_id, collections.deque()).append(at)
            self._sent = (version, sent)
        return self._sent[1]

    def record_request(self, account_id: int) -> None:
        """A chat request is sent on the account now; the requests older than the window are forgotten."""
        sent = self.sent_requests()     # brought up to date first: this connection's own write leaves it so
        at = now()
        with self.db.conn:
            forgotten = self.db.execute("DELETE FROM account_requests WHERE ts <= ?", [at - BUDGET_WINDOW]).rowcount
            self.db.execute("INSERT INTO account_requests (account_id, ts) VALUES (?, ?)", [account_id, at])
        for times in sent.values() if forgotten else ():
            while times and times[0] <= at - BUDGET_WINDOW:
                times.popleft()
        sent.setdefault(account_id, collections.deque()).append(at)

    # --- quotas per account and modality (U7) ---------------------------------------------------------
    def set_quota(self, account_id: int, modality: str, until: float, reason: str) -> None:
        with self.db.conn:
            self.db.table("quotas").upsert({"account_id": account_id, "modality": modality, "until": until,
                                            "reason": reason}, pk=("account_id", "modality"))

    def quotas(self, at: float) -> dict[tuple[int, str], float]:
        """The quotas used up at `at`: (account id, modality) -> when they reset."""
        return {(r["account_id"], r["modality"]): r["until"]
                for r in self.rows("SELECT * FROM quotas WHERE until > ?", [at])}

    # --- API keys -------------------------------------------------------------------------------------
    def create_key(self, name: str, rpm: int) -> tuple[int, str]:
        key = "sk-arena-" + secrets.token_urlsafe(32)
        with self.db.conn:
            key_id = self.db.table("api_keys").insert({
                "name": name, "prefix": key[:13], "hash": sha256_hex(key), "rpm": rpm, "created": now(),
                "revoked": None}).last_pk
        return int(key_id or 0), key

    def key_by_secret(self, key: str) -> dict | None:
        rows = self.rows("SELECT * FROM api_keys WHERE hash = ? AND revoked IS NULL", [sha256_hex(key)])
        return rows[0] if rows else None

    def api_keys(self) -> list[dict]:
        return self.rows("SELECT id, name, prefix, rpm, created, revoked FROM api_keys ORDER BY id")

    def revoke_key(self, key_id: int) -> bool:
        return self.write("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", [now(), key_id]) == 1

    # --- usage ----------------------------------------------------------------------------------------
    def record_usage(self, rows: list[dict], one_by_one: bool = False) -> None:
        """The rows in one transaction; when that fails, each on its own (text made encodable: a lone
        surrogate cannot be), so that one bad row cannot lose the others."""
        try:
            with self.db.conn:
                self.db.table("usage").insert_all(rows)
        except (sqlite3.Error, ValueError) as exc:
            if one_by_one:
                log.error("a usage row could not be written (%s): %r", exc, rows)
                return
            for row in rows:
                self.record_usage([{k: without_lone_surrogates(v) if isinstance(v, str) else v
                                    for k, v in row.items()}], one_by_one=True)

    def prune_usage(self, days: float) -> int:
        """Sum the usage rows older than `days` into usage_daily (per day, key and model) and delete them, in
        one transaction; how many were deleted. 0 days keeps every row. Rows without a key or a model (a
        model-list request) are summed under key 0 and model "": NULLs would never meet in the primary key."""
        if days <= 0:
            return 0
        cutoff = now() - days * 86400
        with self.db.conn:
            self.db.execute("""
                INSERT INTO usage_daily (day, key_id, model, requests, errors, tokens, last_used)
                SELECT CAST(ts / 86400 AS INTEGER) * 86400.0, COALESCE(key_id, 0), COALESCE(model, ''), COUNT(*),
                       SUM(status >= 400), COALESCE(SUM(prompt_tokens + completion_tokens), 0), MAX(ts)
                FROM usage WHERE ts < ? GROUP BY 1, 2, 3
                ON CONFLICT (day, key_id, model) DO UPDATE SET requests = requests + excluded.requests,
                    errors = errors + excluded.errors, tokens = tokens + excluded.tokens,
                    last_used = MAX(last_used, excluded.last_used)""", [cutoff])
            return self.db.execute("DELETE FROM usage WHERE ts < ?", [cutoff]).rowcount

    # --- conversations --------------------------------------------------------------------------------
    def conversation_for(self, fingerprint: str, ttl: float) -> dict | None:
        """The evaluation that holds exactly this history, if it has not moved on since."""
        rows = self.rows(
            "SELECT c.*, k.turns AS key_turns FROM conversation_keys k JOIN conversations c "
            "ON c.evaluation_id = k.evaluation_id WHERE k.fingerprint = ? AND c.updated > ?",
            [fingerprint, now() - ttl])
        if not rows or rows[0]["key_turns"] != rows[0]["turns"]:
            return None
        return rows[0]

    def remember_conversation(self, fingerprint: str, evaluation_id: str, account_id: int, model_id: str,
                              key_id: int, turns: int) -> None:
        stamp = now()
        with self.db.conn:   # the statements sqlite_utils' upsert() runs, without its six schema lookups each
            self.db.execute(
                "INSERT INTO conversations (evaluation_id, account_id, model_id, key_id, turns, updated) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(evaluation_id) DO UPDATE SET "
                "account_id = excluded.account_id, model_id = excluded.model_id, key_id = excluded.key_id, "
                "turns = excluded.turns, updated = excluded.updated",
                [evaluation_id, account_id, model_id, key_id, turns, stamp])
            self.db.execute(
                "INSERT INTO conversation_keys (fingerprint, evaluation_id, turns, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(fingerprint) DO UPDATE SET evaluation_id = excluded.evaluation_id, "
                "turns = excluded.turns, updated = excluded.updated", [fingerprint, evaluation_id, turns, stamp])

    # --- uploaded images ------------------------------------------------------------------------------
    def cached_upload(self, key: str) -> dict | None:
        rows = self.rows("SELECT attachment FROM uploads WHERE key = ? AND expires > ?", [key, now()])
        return json.loads(rows[0]["attachment"]) if rows else None

    def remember_upload(self, key: str, account_id: int, attachment: dict, expires: float) -> None:
        with self.db.conn:
            self.db.table("uploads").upsert({"key": key, "account_id": account_id, "attachment": json.dumps(attachment),
                                       "expires": expires}, pk="key")

    def conversation_count(self, ttl: float) -> int:
        return self.rows("SELECT count(*) AS n FROM conversations WHERE updated > ?", [now() - ttl])[0]["n"]

    def forget_old_conversations(self, ttl: float) -> None:
        cutoff = now() - ttl
        with self.db.conn:
            self.db.execute("DELETE FROM conversation_keys WHERE updated < ?", [cutoff])
            self.db.execute("DELETE FROM conversations WHERE updated < ?", [cutoff])
            self.db.execute("DELETE FROM uploads WHERE expires < ?", [now()])
            self.db.execute("DELETE FROM responses WHERE created < ?", [cutoff])

    # --- stored responses (the Responses API's previous_response_id) ---------------------------------
    def remember_response(self, response_id: str, key_id: int, history: str) -> None:
        """`history`: the JSON of the messages the response ends (encoded by the caller, off the event loop)."""
        self.write("INSERT INTO responses (id, key_id, history, created) VALUES (?, ?, ?, ?)",
                   [response_id, key_id, history, now()])

    def response_history(self, response_id: str, key_id: int) -> str | None:
        """The JSON of the history a stored response ends, for the key that created it only (decoded by
        the caller, off the event loop when it is long)."""
        rows = self.rows("SELECT history FROM responses WHERE id = ? AND key_id = ?", [response_id, key_id])
        return rows[0]["history"] if rows else None

    # --- dashboard: admin password and sessions ---------------------------------------------------------
    def set_admin_password(self, hashed: str, keep_session: str | None = None) -> None:
        """A new password signs out every session but the one that set it."""
        with self.db.conn:
            self.db.table("meta").upsert({"key": "admin_password", "value": hashed}, pk="key")
            self.db.execute("DELETE FROM admin_sessions WHERE token_hash IS NOT ?", [keep_session])

    def create_admin_session(self, token_hash: str, csrf: str, expires: float) -> None:
        with self.db.conn:
            self.db.execute("DELETE FROM admin_sessions WHERE expires < ?", [now()])
            self.db.table("admin_sessions").insert({"token_hash": token_hash, "csrf": csrf, "expires": expires})

    def admin_session(self, token_hash: str) -> dict | None:
        rows = self.rows("SELECT * FROM admin_sessions WHERE token_hash = ? AND expires > ?", [token_hash, now()])
        return rows[0] if rows else None

    def end_admin_session(self, token_hash: str) -> None:
        self.write("DELETE FROM admin_sessions WHERE token_hash = ?", [token_hash])

    # --- dashboard: usage reports (usage rows without a model are model-list requests) -----------------
    def usage_summary(self, since: float) -> dict:
        """Every request and error; the median latency of successful chat requests only."""
        totals = self.rows("SELECT COUNT(*) AS requests, COALESCE(SUM(status >= 400), 0) AS errors "
                           "FROM usage WHERE ts >= ?", [since])[0]
        ok = "FROM usage WHERE ts >= ? AND status < 400 AND model IS NOT NULL"
        median = self.rows(f"SELECT latency_ms {ok} ORDER BY latency_ms LIMIT 1 "
                           f"OFFSET (SELECT (COUNT(*) - 1) / 2 {ok})", [since, since])
        return {**totals, "median_ms": median[0]["latency_ms"] if median else None}

    def usage_by_model(self, since: float) -> list[dict]:
        """Busiest model first; the median latency is over successful requests only."""
        return self.rows("""
            WITH timed AS (
                SELECT model, status, latency_ms, prompt_tokens + completion_tokens AS tokens,
                       ROW_NUMBER() OVER by_latency AS position, COUNT(*) OVER outcome AS outcome_count
                FROM usage WHERE ts >= ? AND model IS NOT NULL
                WINDOW outcome AS (PARTITION BY model, status < 400), by_latency AS (outcome ORDER BY latency_ms))
            SELECT model, COUNT(*) AS requests, SUM(status >= 400) AS errors, SUM(tokens) AS tokens,
                   MAX(CASE WHEN status < 400 AND position = (outcome_count + 1) / 2 THEN latency_ms END) AS median_ms
            FROM timed GROUP BY model ORDER BY requests DESC, model""", [since])

    def usage_by_key(self, since: float) -> list[dict]:
        """Every key, used or not, with its requests since then (never the hash), the pruned days that began
        since then included: with since=0, the all-time totals."""
        return self.rows("""
            SELECT k.id, k.name, k.prefix, k.rpm, k.created, k.revoked, COALESCE(u.requests, 0) AS requests,
                   COALESCE(u.errors, 0) AS errors, COALESCE(u.tokens, 0) AS tokens, u.last_used
            FROM api_keys k LEFT JOIN (
                SELECT key_id, SUM(requests) AS requests, SUM(errors) AS errors, SUM(tokens) AS tokens,
                       MAX(last_used) AS last_used FROM (
                    SELECT key_id, COUNT(*) AS requests, SUM(status >= 400) AS errors,
                           SUM(prompt_tokens + completion_tokens) AS tokens, MAX(ts) AS last_used
                    FROM usage WHERE ts >= ? GROUP BY key_id
                    UNION ALL
                    SELECT key_id, SUM(requests), SUM(errors), SUM(tokens), MAX(last_used)
                    FROM usage_daily WHERE day >= ? GROUP BY key_id)
                GROUP BY key_id) u ON u.key_id = k.id
            ORDER BY k.id""", [since, since])

    def usage_routed(self, since: float) -> list[dict]:
        """Which models LM Arena's router chose for the router models asked for (U9)."""
        return self.rows("SELECT model, routed_model, COUNT(*) AS requests FROM usage WHERE ts >= ? "
                         "AND routed_model IS NOT NULL GROUP BY 1, 2 ORDER BY requests DESC", [since])

    def usage_errors(self, since: float) -> list[dict]:
        return self.rows("SELECT COALESCE(error, 'http_' || status) AS error, status, COUNT(*) AS count, "
                         "MAX(ts) AS last FROM usage WHERE ts >= ? AND status >= 400 "
                         "GROUP BY 1, 2 ORDER BY count DESC", [since])


# #####################################################################################################
# Part II: LM Arena
# #####################################################################################################

# =====================================================================================================
# Site discovery
# =====================================================================================================

FALLBACK_SITEKEY = "6LeTGMcsAAAAALuIlkVwIxaAuZA8VledA6d3Nnb0"
FALLBACK_TURNSTILE_SITEKEY = "0x4AAAAAAA65vWDmG-O_lPtT"
TURNSTILE_RE = re.compile(r'["\'](0x4[0-9A-Za-z_-]{18,})["\']')
PUSH_RE = re.compile(r'self\.__next_f\.push\(\[\s*1\s*,\s*("(?:[^"\\]|\\.)*")\s*\]\)', re.DOTALL)
CHUNK_RE = re.compile(r'(?:/_next/)?static/chunks/[\w./~-]+?\.js(?:\?dpl=[\w-]+)?')
# The call site names the action as a literal (early 2026) or as a variable (the real web client: U8).
SITEKEY_CALL_RE = re.compile(
    r'\.execute\(\s*["\'](6L[0-9A-Za-z_-]{38})["\']\s*,\s*\{\s*action\s*:\s*(?:["\'](\w+)["\']|[\w$.]+)')
# render=<key> on the script, or k=<key> on the invisible widget's anchor URL (HTML-escaped as &amp;k=).
SITEKEY_SCRIPT_RE = re.compile(r'recaptcha/[^"\'\s<>]*?[?&;](?:render|k)=(6L[0-9A-Za-z_-]{38})')
SERVER_ACTION_RE = re.compile(
    r'createServerReference\)\(\s*"([0-9a-f]{42})"\s*,[^;]*?,\s*"(\w+)"\s*\)')
JWT_RE = re.compile(r'eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+')
BUILD_RE = re.compile(r'dpl=(dpl_[\w-]+)')


def b64url_decode(text: str) -> bytes:
    """Strict base64 decoding that accepts both alphabets, with or without padding."""
    text = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt_claims(token: str) -> dict | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def flight_text(page: str) -> str:
    """The Next.js flight data: every `self.__next_f.push([1,"…"])` string, decoded and joined, so that a
    payload split across two pushes reads as one."""
    parts = []
    for literal in PUSH_RE.findall(page):
        try:
            parts.append(json.loads(literal))
        except ValueError:
            continue
    return "".join(parts)


def extract_models(page: str) -> list[dict] | None:
    text = flight_text(page)
    marker = '"initialModels":'
    at = text.find(marker)
    if at < 0:
        return None
    try:
        models, _ = json.JSONDecoder().raw_decode(text, at + len(marker))
    except ValueError:
        return None
    return models if isinstance(models, list) else None


def extract_chunk_urls(page: str) -> list[str]:
    seen: dict[str, None] = {}
    for found in CHUNK_RE.findall(page + flight_text(page)):
        path = found if found.startswith("/_next/") else "/_next/" + found
        seen.setdefault(path, None)
    return list(seen)


def extract_sitekey(text: str) -> tuple[str, str | None] | None:
    call = SITEKEY_CALL_RE.search(text)
    if call:
        return call.group(1), call.group(2)
    script = SITEKEY_SCRIPT_RE.search(text)
    return (script.group(1), None) if script else None


def extract_server_actions(text: str) -> dict[str, str]:
    return {name: action_id for action_id, name in SERVER_ACTION_RE.findall(text)}


def extract_anon_key(text: str) -> str | None:
    for candidate in JWT_RE.findall(text):
        claims = jwt_claims(candidate)
        if claims and claims.get("role") == "anon":
            return candidate
    return None


def add_keys_in(text: str, found: dict[str, Any]) -> None:
    """The sitekeys and the anon key that `text` holds, where no earlier text gave them."""
    if "sitekey" not in found and (key := extract_sitekey(text)):
        found["sitekey"] = key[0]
        if key[1]:
            found["recaptcha_action"] = key[1]
    if "anon_key" not in found and (anon := extract_anon_key(text)):
        found["anon_key"] = anon
    if "turnstile_sitekey" not in found and (turnstile := TURNSTILE_RE.search(text)):
        found["turnstile_sitekey"] = turnstile.group(1)


def discover_site(page: str, scripts: Iterable[str]) -> dict[str, Any]:
    """Everything the bridge learns from the site's HTML and JS chunks; keys left out when not found."""
    found: dict[str, Any] = {}
    models = extract_models(page)
    if models is not None:
        found["models"] = models
    actions: dict[str, str] = {}
    for text in (page, *scripts):
        add_keys_in(text, found)
        actions.update(extract_server_actions(text))
    if actions:
        found["server_actions"] = actions
    if build := BUILD_RE.search(page):
        found["build_id"] = build.group(1)
    return found


def names_recaptcha(page: str, scripts: list[str], found: dict[str, Any]) -> bool | None:
    """Whether the site uses reCAPTCHA: a sitekey was found, or the page or a chunk names it. Only a site
    that says nothing of it is taken to enforce no token (REQUEST_PATHS' "no_token"); None (unknown) when a
    chunk failed to load (read as ""): a chat sent without a token to a site that wants one costs the account
    a penalty (U2)."""
    if "sitekey" in found or any("recaptcha" in text.lower() for text in (page, *scripts)):
        return True
    return None if "" in scripts else False


def is_cloudflare_challenge(status: int, headers: dict[str, str], body: str) -> bool:
    if headers.get("cf-mitigated", "").lower() == "challenge":
        return True
    return status in (403, 503) and ("Just a moment..." in body or "Enable JavaScript and cookies to continue" in body)


def moved_origin(url: str, origin: str, location: str | None) -> str | None:
    """The new origin when the site redirects `url` (on `origin`) to the same path elsewhere, as
    lmarena.ai does to arena.ai; None for any other redirect."""
    path = url[len(origin):]
    if not location or not path or not location.endswith(path):
        return None
    new = location[:-len(path)]
    return new if new.startswith(("http://", "https://")) and new != origin else None


# =====================================================================================================
# Sessions
# =====================================================================================================

AUTH_COOKIE = "arena-auth-prod-v1"
CHUNK_SIZE = 3180
BROWSER_COOKIE_LIMIT = 4096
CLEARANCE_COOKIES = ("cf_clearance", "__cf_bm", "_cfuvid", "provisional_user_id")
EXPIRY_MARGIN = 30.0
ACCOUNT_INPUT_HELP = ("expected the arena-auth-prod-v1 cookie value (base64-…), its arena-auth-prod-v1.0/.1 "
                      "chunks, a Cookie: header that contains them, or an access-token JWT")
CHUNK_NAME_RE = re.compile(re.escape(AUTH_COOKIE) + r"\.\d+")


def join_chunks(cookies: dict[str, str]) -> str:
    numbered = sorted((int(name.rsplit(".", 1)[1]), value) for name, value in cookies.items()
                      if CHUNK_NAME_RE.fullmatch(name))
    return "".join(value for _, value in numbered)


@dataclasses.dataclass(frozen=True)
class Session:
    """One LM Arena session value and the form the site gave it in (arena-protocol §4): "whole" (one
    `base64-…` cookie), "chunks" (the same value split across `.0`, `.1`… cookies) or "jwt" (a bare access
    token). Every session format the bridge reads or writes is decoded and encoded here."""
    value: str
    form: str = "whole"

    @classmethod
    def of(cls, account: dict) -> Session:
        return cls(account["auth"], account["form"])

    @classmethod
    def encode(cls, data: dict, form: str = "whole") -> Session:
        return cls("base64-" + b64url_encode(json.dumps(data, separators=(",", ":")).encode()), form)

    @property
    def data(self) -> dict | None:
        """The decoded session object (access_token, refresh_token, expires_at, user…); None for a JWT."""
        if not self.value.startswith("base64-"):
            return None
        try:
            data = json.loads(b64url_decode(self.value[len("base64-"):]))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) and "access_token" in data else None

    @property
    def claims(self) -> dict:
        """The access token's claims (the value itself when it is a bare JWT)."""
        data = self.data
        return jwt_claims(data.get("access_token", "") if data is not None else self.value) or {}

    @property
    def expiry(self) -> float | None:
        """expires_at of the session, else the JWT's exp; None for an opaque value (learned from a 401)."""
        data = self.data
        if data is not None and isinstance(data.get("expires_at"), (int, float)):
            return float(data["expires_at"])
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None

    @property
    def owner(self) -> str | None:
        """The Supabase user the session belongs to."""
        return self.claims.get("sub")

    @property
    def anonymous(self) -> bool:
        return bool(self.claims.get("is_anonymous") or ((self.data or {}).get("user") or {}).get("is_anonymous"))

    def expired(self, at: float | None = None) -> bool:
        expiry = self.expiry
        return expiry is not None and (at or now()) >= expiry - EXPIRY_MARGIN

    def cookies(self) -> dict[str, str]:
        """The cookies that carry the session, in the form the site gave it to us. A value too long for one
        browser cookie (4,096 bytes with its name) goes in chunks, as the site's own client splits it:
        Chromium refuses the whole cookie, so the in-page path would fail."""
        if self.form != "chunks" and len(AUTH_COOKIE) + len(self.value) < BROWSER_COOKIE_LIMIT:
            return {AUTH_COOKIE: self.value}
        return {f"{AUTH_COOKIE}.{i}": self.value[start:start + CHUNK_SIZE]
                for i, start in enumerate(range(0, len(self.value), CHUNK_SIZE))}

    def refreshed(self, grant: dict) -> Session:
        """This session after a Supabase refresh grant answered `grant` (a JWT account becomes whole)."""
        merged = {**(self.data or {}), **grant}
        if not isinstance(grant.get("expires_at"), (int, float)):
            exp = (jwt_claims(merged.get("access_token", "")) or {}).get("exp")
            merged["expires_at"] = int(exp if exp else now() + int(merged.get("expires_in") or 3600))
        return Session.encode(merged, self.form if self.form != "jwt" else "whole")

    @classmethod
    def in_jar(cls, cookies: dict[str, str]) -> Session | None:
        """The session in a cookie jar, whole or chunked, if it decodes and is not expired."""
        for found in (cls(cookies.get(AUTH_COOKIE, ""), "whole"), cls(join_chunks(cookies), "chunks")):
            if found.value and found.data is not None and not found.expired():
                return found
        return None

    @classmethod
    def in_set_cookie(cls, set_cookies: list[str]) -> Session | None:
        """A fresh session from Set-Cookie headers, whole or chunked; None unless it decodes and is not
        expired."""
        jar: dict[str, str] = {}
        for header in set_cookies:
            name, _, rest = header.partition("=")
            jar[name.strip()] = rest.split(";", 1)[0].strip().strip('"')
        return cls.in_jar(jar)

    @classmethod
    def from_signup(cls, cookies: dict[str, str], body: Any) -> Session:
        """The session a sign-up gave (arena-protocol §4.6): its cookie, whole or chunked, else the session
        in the body (its text, or the JSON in it), at the top level or under session, data or data.session,
        or a body that is the value."""
        if isinstance(body, str):
            with contextlib.suppress(ValueError):
                body = json.loads(body)
        if cookies.get(AUTH_COOKIE):
            return cls(cookies[AUTH_COOKIE])
        if chunked := join_chunks(cookies):
            return cls(chunked, "chunks")
        body_dict = body if isinstance(body, dict) else {}
        data = body_dict.get("data")
        nested = data.get("session") if isinstance(data, dict) else None
        for candidate in (body, body_dict.get("session"), data, nested):
            if isinstance(candidate, dict) and candidate.get("access_token"):
                return cls.encode(candidate)
            if isinstance(candidate, str) and candidate.startswith("base64-"):
                return cls(candidate)
        raise ValueError("the sign-up answer held no session")


@dataclasses.dataclass(frozen=True)
class AccountInput:
    auth: str
    form: str  # "whole", "chunks" or "jwt"
    cookies: dict[str, str]
    anonymous: bool


def parse_cookie_pairs(text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for piece in re.split(r"[;\n]", text):
        name, sep, value = piece.strip().partition("=")
        if sep and name.strip():
            pairs[name.strip()] = value.strip().strip('"')
    return pairs


def pasted_value(text: str) -> tuple[str, str, dict[str, str]]:
    """(value, form, cookies) from what a user pasted: cookie pairs (whole or chunks, the later expiry
    wins), or a bare value, maybe split across lines."""
    if "=" not in text.split("base64-", 1)[0] and not text.startswith(AUTH_COOKIE):
        pieces = text.split()
        return "".join(p.strip('"\'') for p in pieces), "chunks" if len(pieces) > 1 else "whole", {}
    cookies = parse_cookie_pairs(text)
    candidates = [s for s in (Session(cookies.get(AUTH_COOKIE, ""), "whole"), Session(join_chunks(cookies), "chunks"))
                  if s.value]
    if not candidates:
        raise ValueError(f"no {AUTH_COOKIE} cookie found: {ACCOUNT_INPUT_HELP}")
    best = max(candidates, key=lambda s: s.expiry or 0)
    return best.value, best.form, cookies


def parse_account_input(text: str) -> AccountInput:
    """Normalise anything a user may paste (arena-protocol §4.4) into one session value.

    Raises ValueError naming what was expected; nothing half-parsed comes out."""
    text = text.strip()
    if text.lower().startswith("cookie:"):
        text = text[len("cookie:"):].strip()
    if "%" in text:
        text = urllib.parse.unquote(text)
    value, form, cookies = pasted_value(text)
    session = Session(value, form)
    if session.data is None:
        if "exp" not in (jwt_claims(value) or {}):
            raise ValueError(f"not a valid LM Arena session: {ACCOUNT_INPUT_HELP}")
        session = Session(value, "jwt")
    extras = {name: cookies[name] for name in CLEARANCE_COOKIES if cookies.get(name)}
    return AccountInput(auth=session.value, form=session.form, cookies=extras, anonymous=session.anonymous)


def account_of(store: Store, session: Session) -> dict | None:
    """The stored account of the session's LM Arena user (or holding this very value, when it names none)."""
    owner = session.owner
    return next((a for a in store.accounts()
                 if a["auth"] == session.value or (owner and Session.of(a).owner == owner)), None)


def add_account(store: Store, parsed: AccountInput, label: str = "", kind: str | None = None) -> tuple[int, str]:
    """Store an account, recognised by its LM Arena user id: adding a user that is stored already updates
    that account instead of adding a twin (twins break each other's refresh: refresh tokens are single-use).
    The newer session wins, so that an old value (ARENA_AUTH_TOKENS at every start, after the site rotated
    the session) never replaces the one the site rotated to; an expired or invalid account takes any.
    Returns the account's id and what happened: "added", "updated" or "unchanged"."""
    session = Session(parsed.auth, parsed.form)
    held = account_of(store, session)
    if held is None:
        return store.add_account(
            label=label, kind=kind or ("anonymous" if parsed.anonymous else "jwt" if parsed.form == "jwt" else "user"),
            auth=parsed.auth, form=parsed.form, cookies=json.dumps(parsed.cookies), user_agent=None,
            expires_at=session.expiry, state="ok", failures=0, last_used=0.0), "added"
    newer = (session.expiry or 0) > (Session.of(held).expiry or 0)
    if held["auth"] == parsed.auth or not (newer or held["state"] in ("expired", "invalid")):
        return held["id"], "unchanged"
    # A cool-down outlives a new session: the site's verdict was about the account, not its session.
    store.update_account(held["id"], auth=parsed.auth, form=parsed.form, expires_at=session.expiry,
                         cookies=json.dumps(parsed.cookies) if parsed.cookies else held["cookies"],
                         state="cooling_down" if held["state"] == "cooling_down" else "ok", failures=0,
                         last_error=None)
    return held["id"], "updated"


# What adding an account says, by what happened (the CLI and the dashboard add the id and the expiry).
ADD_OUTCOMES = {
    "added": "Account {id} added",
    "updated": "Account {id} updated: it is the same LM Arena user; its new session is stored",
    "unchanged": "Account {id} already holds this LM Arena user's session (the same or a newer one); nothing changed",
}


def import_env_accounts(store: Store, values: str) -> None:
    """ARENA_AUTH_TOKENS: add each account, or update the one of the same user (a session the site rotated
    since is newer and stays); a bad value is reported, never fatal."""
    for raw in filter(None, (v.strip() for v in re.split(r"[,\n]", values))):
        try:
            parsed = parse_account_input(raw)
        except ValueError as exc:
            log.error("ARENA_AUTH_TOKENS: skipped one value: %s", exc)
            continue
        account_id, outcome = add_account(store, parsed, label="from ARENA_AUTH_TOKENS")
        if outcome != "unchanged":
            log.info("ARENA_AUTH_TOKENS: %s", ADD_OUTCOMES[outcome].format(id=account_id))


# =====================================================================================================
# Stream parser
# =====================================================================================================

LINE_RE = re.compile(r"([ab])([0-9a-z]):(.*)", re.DOTALL)
CITATION_MARKER_RE = re.compile(r"<!--citation:([^-\s>]+)-->")


@dataclasses.dataclass(slots=True)
class Event:
    """One thing LM Arena said about model A's reply.

    kind: text | reasoning | citation | image | error | finish | heartbeat | routed (the model the "Max"
    router chose, by public name)."""
    kind: str
    value: Any = None
    usage: dict | None = None


def parse_data_part(payload: Any) -> Event | None:
    images = []
    heartbeat = False
    for item in payload if isinstance(payload, list) else []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "routed_model" and (item.get("publicName") or item.get("modelId")):
            return Event("routed", str(item.get("publicName") or item.get("modelId")))
        if item.get("type") == "heartbeat":
            heartbeat = True
        elif item.get("type") == "image":
            if item.get("image"):
                images.append(item["image"])
            elif item.get("data"):
                images.append(f"data:{item.get('mimeType', 'image/png')};base64,{item['data']}")
    if images:
        return Event("image", images)
    return Event("heartbeat") if heartbeat else None


def parse_citation(payload: Any) -> Event | None:
    if not isinstance(payload, dict) or payload.get("toolCallId") != "citation-source":
        return None
    try:
        source = json.loads(payload.get("argsTextDelta") or "").get("source")
    except (ValueError, AttributeError):
        return None
    sources = source if isinstance(source, list) else [source]
    found = [s for s in sources if isinstance(s, dict) and s.get("url")]
    return Event("citation", found) if found else None


def normalise_usage(usage: Any) -> dict | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("promptTokens", usage.get("prompt_tokens"))
    completion = usage.get("completionTokens", usage.get("completion_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def parse_text_part(payload: Any) -> Event | None:
    if payload == "hasArenaError":
        return Event("error", "LM Arena reported an error while generating the reply")
    return Event("text", payload) if isinstance(payload, str) else None


def parse_finish_part(payload: Any) -> Event:
    payload = payload if isinstance(payload, dict) else {}
    return Event("finish", payload.get("finishReason") or "stop", normalise_usage(payload.get("usage")))


def parse_file_part(payload: Any) -> Event | None:
    if isinstance(payload, dict) and str(payload.get("mimeType", "")).startswith("image/"):
        return Event("image", [f"data:{payload['mimeType']};base64,{payload.get('data', '')}"])
    return None


# What each line code of the data stream carries (arena-protocol §7.2); other codes are not model output.
PART_PARSERS: dict[str, Callable[[Any], Event | None]] = {
    "0": parse_text_part,
    "g": lambda payload: Event("reasoning", payload) if isinstance(payload, str) else None,
    "3": lambda payload: Event("error", payload if isinstance(payload, str) else json.dumps(payload)),
    "d": parse_finish_part,
    "2": parse_data_part,
    "c": parse_citation,
    "k": parse_file_part,
}


def parse_part(code: str, payload: Any) -> Event | None:
    parser = PART_PARSERS.get(code)
    return parser(payload) if parser is not None else None


JSON_DECODER = json.JSONDecoder()


def json_payload(raw: str) -> Any:
    """json.loads(raw) at a third of its cost for a payload without whitespace around it (every line the
    site sends): raw_decode skips json.loads' checks and whitespace matches, which were most of a line's
    parsing. Anything else is json.loads' to accept or refuse."""
    try:
        value, end = JSON_DECODER.raw_decode(raw)
    except ValueError:
        return json.loads(raw)
    return value if end == len(raw) else json.loads(raw)


def parse_stream_line(line: str) -> tuple[str, Event | None] | None:
    """One line of LM Arena's data stream -> (participant, event). None for lines that are not part of
    the protocol (counted by the caller, never fatal)."""
    line = line.strip()
    if line.startswith("data:"):
        line = line[5:].lstrip()
    if not line:
        return None
    match = LINE_RE.fullmatch(line)
    if match is None:
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and "error" in obj:
                    return "a", Event("error", str(obj["error"]))
        return None
    participant, code, raw = match.groups()
    try:
        payload = json_payload(raw)
    except ValueError:
        return None
    return participant, parse_part(code, payload)


class StreamParser:
    """Bytes from the network in, events for model A out.

    UTF-8 is decoded incrementally (a character may span reads), lines are split on LF with CR stripped,
    the last incomplete line waits for the next read, and close() flushes a final line without newline.
    A text or reasoning part that ends in the first half of a surrogate pair (an emoji split between two
    parts, each a JSON string) keeps that half back for the next part of its kind."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""
        self.skipped = 0
        self.held: dict[str, str] = {}     # event kind -> a high surrogate waiting for its other half
        self.lane_b = False     # model B spoke too: in direct-battle, the site made this a battle turn (U3)

    def feed(self, data: bytes) -> list[Event]:
        text = self.pending + self.decoder.decode(data)
        *lines, self.pending = text.split("\n")
        return self._events(lines)

    def close(self) -> list[Event]:
        lines = [self.pending + self.decoder.decode(b"", final=True)]
        self.pending = ""
        return self._events(lines) + self._unpaired()

    def _unpaired(self) -> list[Event]:
        """The halves still held back, as U+FFFD: their other half never came."""
        held, self.held = self.held, {}
        return [Event(kind, "\ufffd") for kind in held]

    def _text(self, event: Event) -> Event | None:
        """The event with its text made encodable; None when all of it is held back."""
        if not isinstance(event.value, str) or (not self.held and event.value.isascii()):
            return event        # the common part: ASCII has no surrogates to pair or replace
        text = event.value
        if event.kind in ("text", "reasoning"):
            text = self.held.pop(event.kind, "") + text
            if text and "\ud800" <= text[-1] <= "\udbff":
                self.held[event.kind], text = text[-1], text[:-1]
                if not text:
                    return None
        text = without_lone_surrogates(text)
        return event if text is event.value else dataclasses.replace(event, value=text)

    def _events(self, lines: list[str]) -> list[Event]:
        events = []
        for line in lines:
            parsed = parse_stream_line(line)
            if parsed is None:
                self.skipped += bool(line.strip())
                continue
            participant, event = parsed
            if participant == "a" and event is not None:   # the bridge asks for one model: B lines are not ours
                if event.kind == "finish":
                    events += self._unpaired()
                cleaned = self._text(event)
                if cleaned is not None:
                    events.append(cleaned)
            self.lane_b = self.lane_b or participant == "b"
        return events


def parse_stream(data: bytes | Iterable[bytes]) -> list[Event]:
    """All events of a whole response body (for tests and non-streaming use)."""
    parser = StreamParser()
    chunks = [data] if isinstance(data, bytes) else data
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.close()


# =====================================================================================================
# Chat bodies
# =====================================================================================================

OUTPUT_KINDS = {"text", "reasoning", "image", "citation"}


def utf16_index(text: str, units: int) -> int:
    """The index in `text` after `units` UTF-16 code units (the unit of the site's charLocation offsets)."""
    if units <= 0:
        return 0
    count = 0
    for index, char in enumerate(text):
        count += 2 if ord(char) > 0xFFFF else 1
        if count >= units:
            return index + 1
    return len(text)


def utf16_len(text: str) -> int:
    # Runs on every text part: ASCII (most replies) needs no count, and the encoder counts in C.
    return len(text) if text.isascii() else len(text.encode("utf-16-le", "surrogatepass")) // 2


class Citations:
    """The sources of one reply, numbered in order of first appearance, and where their numbers go.

    A source is known by its id (else its url); a repeat of it adds fields (the title comes late) and
    offsets (U6: `charLocation`, the end of each cited sentence in UTF-16 code units of the reply's text).
    place() puts `[n]` into the text as it passes those offsets; an offset named after its text went by
    is placed at once. Older replies mark citations in the text instead (`<!--citation:id-->`): number()
    answers those."""

    def __init__(self) -> None:
        self.sources: list[dict] = []
        self.numbers: dict[str, int] = {}
        self.pending: list[tuple[int, int]] = []     # (offset, number), not yet in the text
        self.placed: set[tuple[int, int]] = set()
        self.units = 0                               # UTF-16 length of the reply's text so far

    def add(self, sources: list[dict]) -> None:
        for source in sources:
            keys = [f"url:{source['url']}"] + ([f"id:{source['id']}"] if source.get("id") is not None else [])
            number = next((self.numbers[k] for k in reversed(keys) if k in self.numbers), None)
            if number is None:
                self.sources.append({})
                number = len(self.sources)
            self.sources[number - 1].update({k: v for k, v in source.items() if v not in (None, "")})
            self.numbers.update(dict.fromkeys(keys, number))
            for offset in source.get("charLocation") or []:
                if isinstance(offset, int) and (offset, number) not in self.placed:
                    self.placed.add((offset, number))
                    self.pending.append((offset, number))
        self.pending.sort()

    def number(self, source_id: str) -> int | None:
        return self.numbers.get(f"id:{source_id}")

    def place(self, text: str) -> str:
        """`text` (the reply's next piece) with the numbers whose offsets fall inside or at its end."""
        start, self.units = self.units, self.units + utf16_len(text)
        if not self.pending or self.pending[0][0] > self.units:
            return text
        out, at = [], 0
        while self.pending and self.pending[0][0] <= self.units:
            offset, number = self.pending.pop(0)
            cut = max(at, utf16_index(text, offset - start))
            out += [text[at:cut], f"[{number}]"]
            at = cut
        return "".join(out) + text[at:]

    def rest(self) -> str:
        """The numbers whose offsets lie past the end of the text (placed at its end)."""
        numbers, self.pending = self.pending, []
        return "".join(f"[{number}]" for _, number in numbers)

    def titled(self) -> list[tuple[str, str]]:
        """(url, title) of each source in number order; a source that never got a title shows its url."""
        return [(source["url"], str(source.get("title") or source["url"])) for source in self.sources]


def uuid7() -> str:
    """RFC 9562 UUIDv7: 48 bits of Unix milliseconds, version 7, variant 10, random rest."""
    ms = int(time.time() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def choose_modality(model: dict) -> str | None:
    out = (model.get("capabilities") or {}).get("outputCapabilities") or {}
    if out.get("image"):
        return "image"
    if out.get("search"):
        return "search"
    if out.get("text"):
        return "chat"
    return None


def accepts_images(model: dict) -> bool:
    return bool(((model.get("capabilities") or {}).get("inputCapabilities") or {}).get("image"))


def is_stealth(model: dict) -> bool:
    return not model.get("organization")


def is_selectable(model: dict) -> bool:
    """The site refuses chats with a model it marks `userSelectable: false` (U9); older lists lack the field."""
    return model.get("userSelectable") is not False


def auto_modality_metadata(modality: str) -> dict:
    """What the 2026 web client says about the modality it chose (U9): the user's own choice, certain."""
    return {"modality": modality, "confidence": 1.0, "source": "user"}


def chat_body(*, evaluation_id: str, model_id: str, content: str, modality: str, attachments: list[dict],
              mode: str | None, token: str | None, web_client_2026: bool = True) -> dict:
    """The 2026 compact body (§6.1/§6.2): `mode` only on a new conversation, token only when minted. As
    the 2026 web client (U3, U9), it names lane B's message (used if the site makes the reply a battle
    turn) and the modality's metadata; `web_client_2026=False` leaves both out."""
    body: dict[str, Any] = {"id": evaluation_id}
    if mode:
        body["mode"] = mode
    metadata = {"autoModalityMetadata": auto_modality_metadata(modality)} if web_client_2026 else {}
    body.update({
        "modelAId": model_id, "userMessageId": uuid7(), "modelAMessageId": uuid7(),
        "userMessage": {"content": content, "experimental_attachments": attachments, "metadata": metadata},
        "modality": modality,
    })
    if web_client_2026:
        body["modelBMessageId"] = uuid7()
    if token:
        body["recaptchaV3Token"] = token
    return body


@dataclasses.dataclass
class ImageInput:
    data: bytes
    mime: str
    where: str                      # e.g. "messages[2] image 1", for error messages

    @property
    def digest(self) -> str:
        return sha256_hex(self.data)


# =====================================================================================================
# Failure policy
# =====================================================================================================

MAX_UPSTREAM_ATTEMPTS = 3


class ArenaError(Exception):
    """A failure that ends a request, named by its kind (a short code such as "no_account" or
    "content_filter"). The upstream layer only names what happened: each client API chooses its status
    from the kind. `relayed` marks LM Arena's own last answer, passed on after the attempts ran out.
    `cause` is the kind of failure behind it: its own kind, or what LM Arena answered last when the
    attempts ran out of accounts (a reCAPTCHA storm ends as "accounts_cooling_down")."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None, relayed: bool = False):
        super().__init__(message)
        self.kind, self.message, self.retry_after, self.relayed = kind, message, retry_after, relayed
        self.cause = kind


def error_text(body: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(body)["error"])
    title = re.search(r"<title>(.*?)</title>", body, re.DOTALL)
    return title.group(1).strip() if title else body.strip()[:200]


RETRY_AFTER_LEAST = 5.0       # `retry-after: 0` alone (or a date passed): a short wait, never a retry loop
RETRY_AFTER_MOST = 86400.0    # anything longer (`inf`, a huge number) is absurd: a day, so no account is lost for ever
QUOTA_COOLDOWN = 3600.0       # `retry-after: 0` beside a `ratelimit` header that names no reset: a used-up quota (U7)


def retry_after_value(value: str) -> float | None:
    """The seconds a Retry-After value says, delta-seconds or an HTTP date; None when it is neither."""
    with contextlib.suppress(ValueError):
        seconds = float(value)
        return None if math.isnan(seconds) else seconds
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        from email.utils import parsedate_to_datetime
        return parsedate_to_datetime(value).timestamp() - now()
    return None


def ratelimit_fields(headers: dict[str, str]) -> dict[str, int]:
    """The `ratelimit: limit=1, remaining=0, reset=86400` header (IETF draft form) as numbers."""
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", headers.get("ratelimit", ""))}


QUOTA_DEFAULT = 86400.0            # a used-up modality quota that names no reset: the site's are daily (U7)
QUOTA_MODALITIES = {"text": "chat"}   # the site's name of a modality -> the bridge's


def quota_reset(headers: dict[str, str], default: float = QUOTA_DEFAULT) -> float:
    """Seconds until a used-up quota resets: `ratelimit`'s reset, else the `ratelimit-policy` window, else
    `default`. The 429 itself says `retry-after: 0` and `reset=0`: that is "used up", never "retry now"."""
    reset = ratelimit_fields(headers).get("reset") or 0
    window = re.search(r";\s*w=(\d+)", headers.get("ratelimit-policy", ""))
    return float(reset or (window and int(window.group(1))) or default)


def retry_after_seconds(headers: dict[str, str], body: str) -> float | None:
    """How long LM Arena asked to wait, between RETRY_AFTER_LEAST and RETRY_AFTER_MOST; None when it did not
    say (the caller's default applies). `retry-after: 0` is never "retry now": with a `ratelimit` header it
    means a quota is used up until that header's reset (arena-protocol §0 U7), alone a short wait."""
    seconds = asked_wait(headers, body)
    return None if seconds is None else min(RETRY_AFTER_MOST, max(RETRY_AFTER_LEAST, seconds))


def asked_wait(headers: dict[str, str], body: str) -> float | None:
    """The wait an answer names, unbounded: Retry-After, else the modality or model quota headers."""
    seconds = retry_after_value(headers.get("retry-after", "").strip())
    if seconds is not None and seconds <= 0 and "ratelimit" in headers:
        return quota_reset(headers, QUOTA_COOLDOWN)
    if seconds is not None:
        return seconds
    if headers.get("ratelimit-modality") and headers.get("ratelimit-remaining"):
        with contextlib.suppress(ValueError):
            return float(headers["ratelimit-remaining"])
    if "modelid" in body.lower() and "remaining" in ratelimit_fields(headers):
        return float(ratelimit_fields(headers)["remaining"])
    return None


def used_up_quota(headers: dict[str, str], modality: str) -> tuple[str, float] | None:
    """(modality, seconds to its reset) when an answer says a quota is used up, by the 429's modality
    header or by a served reply's `remaining=0`; else None."""
    fields = ratelimit_fields(headers)
    if fields.get("remaining") != 0:
        return None
    said = headers.get("ratelimit-modality")
    return QUOTA_MODALITIES.get(said, said) if said else modality, quota_reset(headers)


# What an LM Arena answer other than 200 means: the first row whose test holds names its kind. The tests
# get (status, lower-case headers, body, lower-case body).
ANSWER_KINDS: tuple[tuple[str, Callable[[int, dict[str, str], str, str], bool]], ...] = (
    ("moved", lambda status, headers, body, low: status in (301, 308)),
    ("cloudflare", lambda status, headers, body, low: is_cloudflare_challenge(status, headers, body)),
    ("recaptcha", lambda status, headers, body, low: status == 403 and "recaptcha" in low),
    ("recaptcha", lambda status, headers, body, low: status == 429 and "prompt failed" in low),
    ("login_gate", lambda status, headers, body, low: status == 401 and "login_gate" in low),
    ("unauthorized", lambda status, headers, body, low: status == 401),
    ("quota", lambda status, headers, body, low: status == 429 and bool(headers.get("ratelimit-modality"))),
    ("rate_limited", lambda status, headers, body, low: status == 429),
    ("mode", lambda status, headers, body, low: status == 400 and "mode" in low and "not allowed" in low),
    ("battle_pending", lambda status, headers, body, low: status == 400 and "expected a battle turn" in low),
    ("not_found", lambda status, headers, body, low: status == 404),
    ("server", lambda status, headers, body, low: status >= 500),
    ("client", lambda status, headers, body, low: True),
)

# When an answer is final (LM Arena refused the request itself): the first row whose test on (status,
# lower-case message) holds names the failure and how to say it; else "upstream_<status>".
REFUSALS: tuple[tuple[Callable[[int, str], bool], str, str], ...] = (
    (lambda status, low: "private models" in low, "model_not_available",
     "LM Arena serves this model only in anonymous battles"),
    (lambda status, low: status == 422 or "flagged" in low, "content_filter", "LM Arena's moderation flagged the message"),
    (lambda status, low: status == 413, "attachment_too_large", "LM Arena refused the attachment as too large"),
    (lambda status, low: status == 404, "model_not_found", "LM Arena does not serve this model here"),
    (lambda status, low: "not available for user selection" in low, "model_not_available",
     "LM Arena does not let users select this model"),
    (lambda status, low: status == 403, "upstream_forbidden", "LM Arena refused the request"),
)


@dataclasses.dataclass(frozen=True)
class Answer:
    """An LM Arena answer other than 200, as the failure policy reads it."""
    status: int
    headers: dict[str, str]      # lower-case names
    body: str

    @property
    def kind(self) -> str:
        low = self.body.lower()
        return next(kind for kind, test in ANSWER_KINDS if test(self.status, self.headers, self.body, low))

    @property
    def message(self) -> str:
        return error_text(self.body)

    @property
    def retry_after(self) -> float | None:
        return retry_after_seconds(self.headers, self.body)

    def relayed(self) -> ArenaError:
        return ArenaError(self.kind, f"LM Arena answered {self.status}: {self.message}", relayed=True)

    def refusal(self) -> ArenaError:
        message = self.message
        low = message.lower()
        kind, what = next(((kind, what) for test, kind, what in REFUSALS if test(self.status, low)),
                          (f"upstream_{self.status}", "LM Arena refused the request"))
        return ArenaError(kind, f"{what}: {message}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What to do about one kind of failure. The n-th failure of the kind (n from 0, counted per account
    or per request) runs the first step from steps[n] on that applies; past the end, the last step
    repeats. When no step applies, the answer is final and the request fails with it ("refuse")."""
    scope: str                  # "account" or "request"
    steps: tuple[str, ...]


# The retry policy of a chat attempt (arena-protocol §8), one row per failure kind. The steps:
#   follow_move     the site moved to another origin: switch to it and send again
#   clear_cloudflare  get Cloudflare clearance from the browser sidecar and send again
#   give_up         fail with the kind (a challenge the browser could not pass)
#   rediscover      reload the site's parameters (the page's text, then its live reCAPTCHA configuration): a
#                   rotated sitekey heals here and the account sends again; with the key unchanged the site
#                   refused the account itself, and every attempt during its penalty would extend it (U2):
#                   back off
#   back_off        cool the account down, doubling per consecutive failure, and move to another; a refused
#                   direct attempt also moves every account's chats into the sidecar's page (U1, kept)
#   refresh         refresh the account's session and send again (another account when that fails)
#   expire          mark the account expired and move to another
#   needs_login     a guest behind the site's login gate (U4): no refresh or sign-up helps; mark the account
#                   "needs a signed-in account" and move to another
#   cool_down       cool the account down as long as LM Arena asked, and move to another
#   use_up_quota    the account's quota of this modality is used up until its reset (other modalities keep
#                   working, U7): move to another account
#   switch_mode     try the other arena mode for new conversations
#   start_over      the held conversation is gone (or broken by an unanswered battle turn, U3): start a new
#                   one carrying the history
#   pause           wait a moment and send again
#   refuse          fail with what LM Arena said
POLICY: dict[str, Rule] = {
    "moved": Rule("request", ("follow_move",)),
    "cloudflare": Rule("request", ("clear_cloudflare", "give_up")),
    "recaptcha": Rule("account", ("rediscover", "back_off")),
    "login_gate": Rule("account", ("needs_login",)),
    "unauthorized": Rule("account", ("refresh", "expire")),
    "rate_limited": Rule("account", ("cool_down",)),
    "quota": Rule("account", ("use_up_quota",)),
    "mode": Rule("request", ("switch_mode",)),
    "battle_pending": Rule("request", ("start_over",)),
    "not_found": Rule("request", ("start_over",)),
    "server": Rule("request", ("pause", "refuse")),
    "client": Rule("request", ("refuse",)),
}


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What the policy may look at when it picks a step for one failed attempt."""
    needs_browser: bool         # the account has been in browser mode
    in_page: bool               # this attempt went through the sidecar's page
    followup: bool              # it continued a held conversation
    sidecar: bool               # a sidecar may be used
    moved: bool                 # the answer redirected to the same path on another origin


# When a step can help; a step not named here always applies.
STEP_APPLIES: dict[str, Callable[[Attempt], bool]] = {
    "follow_move": lambda a: a.moved,
    "switch_mode": lambda a: not a.followup,
    "start_over": lambda a: a.followup,
}


def next_step(kind: str, failures: int, attempt: Attempt) -> str:
    """The step for the `failures`-th earlier failure of `kind` (0: the first), by POLICY."""
    steps = POLICY[kind].steps
    candidates = steps[failures:] or steps[-1:]
    return next((step for step in candidates if STEP_APPLIES.get(step, lambda a: True)(attempt)), "refuse")


# The request path (arena-protocol §0 U1, U2). The site binds reCAPTCHA tokens to the page that minted them,
# and every refused attempt costs the account a penalty of tens of minutes: a chat goes through a browser page
# (the sidecar's in-page fetch) unless the direct path is known to work. The table below is the whole rule;
# its input is the first evidence that holds.

@dataclasses.dataclass(frozen=True)
class PathFacts:
    """What the bridge knows, for one account, about how its chats can reach the site."""
    browser: bool               # a browser page can send it (the sidecar is not off)
    account_refused: bool       # the site refused this account's direct attempt (in_browser_mode)
    site_said: str | None       # site_params.request_path: "page" (a direct attempt refused), "direct" (one served)
    recaptcha_seen: bool | None  # discovery found reCAPTCHA on the site; False: it enforces no token


def in_browser_mode(account: dict, at: float) -> bool:
    """The site refused this account's direct attempt: its chats go through the page until its next try of the
    direct path, a day later and only once it is in good standing again (no failure since)."""
    return bool(account["needs_browser"]) and (at < (account["direct_retry_at"] or 0) or bool(account["failures"]))


PATH_EVIDENCE: tuple[tuple[str, Callable[[PathFacts], bool]], ...] = (
    ("no_browser", lambda f: not f.browser),
    ("account_refused", lambda f: f.account_refused),
    ("site_refused", lambda f: f.site_said == "page"),
    ("direct_worked", lambda f: f.site_said == "direct"),
    ("no_token", lambda f: f.recaptcha_seen is False),
    ("unknown", lambda f: True),           # tokens may be bound: assume they are
)

# BRIDGE_REQUEST_PATH -> evidence -> path. "page" without a browser fails with the sidecar's clear 503; "direct"
# still keeps an account the site refused in the page until its daily retry (in_browser_mode).
REQUEST_PATHS: dict[str, dict[str, str]] = {
    "auto": {"no_browser": "direct", "account_refused": "page", "site_refused": "page", "direct_worked": "direct",
             "no_token": "direct", "unknown": "page"},
    "direct": {"no_browser": "direct", "account_refused": "page", "site_refused": "direct",
               "direct_worked": "direct", "no_token": "direct", "unknown": "direct"},
    "page": {evidence: "page" for evidence, _ in PATH_EVIDENCE},
}


PATH_LEARNT = {"page": "refused the token of", "direct": "served"}   # site_said: what the site did to a direct chat


def request_path_for(setting: str, facts: PathFacts) -> str:
    """"page" or "direct" for a chat, by REQUEST_PATHS."""
    evidence = next(name for name, holds in PATH_EVIDENCE if holds(facts))
    return REQUEST_PATHS[setting][evidence]


def account_path(settings: Settings, site_params: dict, account: dict, at: float) -> str:
    """"page" or "direct" for this account's next chat: the facts REQUEST_PATHS reads, gathered in one place
    so the turn runner and the dashboard cannot disagree."""
    facts = PathFacts(browser=settings.sidecar != "off", account_refused=in_browser_mode(account, at),
                      site_said=site_params.get("request_path"), recaptcha_seen=site_params.get("recaptcha_seen"))
    return request_path_for(settings.request_path, facts)


class FailureLog:
    """The last few failed attempts of each account, kept in memory for the dashboard's Diagnostics
    page: when, the failure kind the policy saw, and what LM Arena said."""

    def __init__(self, per_account: int = 5) -> None:
        self.entries: dict[int, collections.deque[tuple[float, str, str]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=per_account))

    def add(self, account_id: int, kind: str, message: str) -> None:
        self.entries[account_id].append((now(), kind, message))

    def recent(self) -> list[tuple[int, float, str, str]]:
        """(account, when, kind, message), the newest first."""
        rows = [(account_id, *entry) for account_id, entries in self.entries.items() for entry in entries]
        return sorted(rows, key=lambda row: row[1], reverse=True)


# =====================================================================================================
# Page agent
# =====================================================================================================

PAGE_AGENT_JS = r"""
// The page agent: the one piece of JavaScript the bridge runs in an LM Arena page, in the sidecar's
// Chromium (transport: Playwright) and in the user's own browser (transport: the userscript).
//
// window.__arenaBridge (version 1), defined once per top-level document, never enumerable:
//   state()   -> {version, origin, url, user: {id, email, anonymous} | null, sitekeys: [string],
//                 grecaptcha: bool, interstitial: bool, recaptchaOrigin}   the signed-in user comes from
//                 the session cookie; sitekeys from the live ___grecaptcha_cfg and render=/k= in script
//                 URLs; recaptchaOrigin is where the page's reCAPTCHA script comes from (for one that loads
//                 none: Google's on the real site, else the page's own, an emulator standing in for it)
//   mint(action, sitekey?, timeoutMs?) -> Promise<string>   a reCAPTCHA v3 (Enterprise) token;
//                 sitekey defaults to the first the page knows; rejects with an Error
//   chat(jobId, request, emit) -> Promise<void>, never rejects. request = {url, method, headers, body,
//                 recaptcha?: {action, sitekey, token?}}; url must be on the page's origin. With
//                 `recaptcha`, the body (JSON) gets recaptchaV3Token: the given token, else one minted.
//                 emit(event) is awaited (backpressure) and receives, in order:
//                   {type: 'head', status, headers}  once, when the response starts
//                   {type: 'chunk', text}            each piece of the body as the page reads it
//                   {type: 'done'} | {type: 'error', message, aborted}   exactly one, last
//   abort(jobId) -> bool   cancels that job's fetch; its chat() then emits {type: 'error', aborted: true}
//   signup({sitekey?, action?, turnstileSitekey?, timeoutMs?}) -> Promise<{status, text, bodies}>   an
//                 anonymous sign-up as the 2026 web client does it (U5): {recaptchaToken, provisionalUserId}
//                 first (no token without a sitekey); only when the site refuses that (4xx) and the page
//                 shows Turnstile, again with a Turnstile token. The provisional id is the cookie's, else
//                 localStorage's, else a new uuid4 kept in localStorage. bodies: ['2026'] or
//                 ['2026', 'turnstile']; rejects with an Error when the page fails (not on a refusal)
(() => {
  if (window !== window.top || window.__arenaBridge) return;
  const AUTH = 'arena-auth-prod-v1', PROVISIONAL = 'provisional_user_id';
  const FORBIDDEN = /^(accept-charset|accept-encoding|connection|content-length|cookie2?|date|dnt|expect|host|keep-alive|origin|referer|te|trailer|transfer-encoding|upgrade|user-agent|via|sec-.*|proxy-.*)$/i;
  const jobs = new Map();
  const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
  const recaptcha = () => {
    const g = window.grecaptcha;
    if (g && g.enterprise && typeof g.enterprise.execute === 'function') return g.enterprise;
    return g && !g.enterprise && typeof g.execute === 'function' ? g : null;
  };
  const cookies = () => {
    const jar = {};
    for (const part of document.cookie.split('; ')) jar[part.slice(0, part.indexOf('='))] = part.slice(part.indexOf('=') + 1);
    return jar;
  };
  const user = () => {
    const jar = cookies();
    let value = jar[AUTH] || '';
    if (!value) for (let i = 0; jar[AUTH + '.' + i] !== undefined; i++) value += jar[AUTH + '.' + i];
    try {
      const b64 = decodeURIComponent(value).replace(/^base64-/, '').replace(/-/g, '+').replace(/_/g, '/');
      const u = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(b64), c => c.charCodeAt(0)))).user;
      return {id: u.id, email: u.email || null, anonymous: !!u.is_anonymous};
    } catch (e) { return null; }
  };
  const sitekeys = () => {
    const keys = new Set();
    const visit = (o, depth) => {
      if (!o || typeof o !== 'object' || depth > 6 || o === window || o instanceof Node) return;
      for (const k of Object.keys(o)) {
        try { if (k === 'sitekey' && typeof o[k] === 'string') keys.add(o[k]); else visit(o[k], depth + 1); } catch (e) {}
      }
    };
    try { visit((window.___grecaptcha_cfg || {}).clients, 0); } catch (e) {}
    for (const el of document.querySelectorAll('script[src], iframe[src]')) {
      try {
        const url = new URL(el.src, location.href);
        for (const p of ['render', 'k']) { const v = url.searchParams.get(p); if (v && v !== 'explicit') keys.add(v); }
      } catch (e) {}
    }
    return [...keys];
  };
  const recaptchaOrigin = () => {
    const script = [...document.scripts].find(s => s.src.includes('/recaptcha/'));
    if (script) return new URL(script.src).origin;
    return /(^|\.)(lm)?arena\.ai$/.test(location.hostname) ? 'https://www.google.com' : location.origin;
  };
  const interstitial = () => document.title.includes('Just a moment...') ||
    (document.body ? document.body.innerText : '').includes('Enable JavaScript and cookies to continue');
  // U5: the site's cookie, else the 2026 client's localStorage entry, else a new uuid4 kept there as it does.
  const provisionalId = () => {
    let id = cookies()[PROVISIONAL] || '';
    try { id = id || localStorage.getItem(PROVISIONAL) || ''; } catch (e) {}
    if (!id) {
      const b = crypto.getRandomValues(new Uint8Array(16));
      b[6] = b[6] & 15 | 64; b[8] = b[8] & 63 | 128;
      const h = [...b].map(x => x.toString(16).padStart(2, '0')).join('');
      id = [h.slice(0, 8), h.slice(8, 12), h.slice(12, 16), h.slice(16, 20), h.slice(20)].join('-');
      try { localStorage.setItem(PROVISIONAL, id); } catch (e) {}
    }
    return decodeURIComponent(id);
  };
  const turnstileShown = () => !!window.turnstile ||
    !!document.querySelector('script[src*="/turnstile/"], iframe[src*="challenges.cloudflare.com"], .cf-turnstile');
  const turnstileToken = async (sitekey, timeoutMs) => {
    const deadline = Date.now() + timeoutMs;
    while (!window.turnstile || typeof window.turnstile.render !== 'function') {
      if (Date.now() > deadline) throw new Error('turnstile did not load');
      await sleep(50);
    }
    const el = document.querySelector('.cf-turnstile[data-sitekey]');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('turnstile timed out')), Math.max(0, deadline - Date.now()));
      const done = (f, v) => { clearTimeout(timer); f(v); };
      window.turnstile.render(document.body.appendChild(document.createElement('div')), {
        sitekey: sitekey || (el && el.dataset.sitekey), callback: t => done(resolve, t),
        'error-callback': e => done(reject, new Error('turnstile error ' + e))});
    });
  };
  const agent = {
    version: 1,
    state: () => ({version: 1, origin: location.origin, url: location.href, user: user(), sitekeys: sitekeys(),
                   grecaptcha: !!recaptcha(), interstitial: interstitial(), recaptchaOrigin: recaptchaOrigin()}),
    async mint(action, sitekey, timeoutMs = 30000) {
      const deadline = Date.now() + timeoutMs;
      while (!recaptcha()) {
        if (Date.now() > deadline) throw new Error('grecaptcha did not load');
        await sleep(50);
      }
      const g = recaptcha(), key = sitekey || sitekeys()[0];
      if (!key) throw new Error('the page knows no reCAPTCHA sitekey');
      const late = sleep(Math.max(0, deadline - Date.now())).then(() => { throw new Error('grecaptcha was not ready in time'); });
      await Promise.race([new Promise(resolve => g.ready(resolve)), late]);
      const token = await Promise.race([g.execute(key, {action}), late]);
      if (typeof token !== 'string' || !token) throw new Error('grecaptcha returned no token');
      return token;
    },
    async chat(jobId, request, emit) {
      const ctl = new AbortController();
      jobs.set(jobId, ctl);
      try {
        const url = new URL(request.url, location.href);
        if (url.origin !== location.origin) throw new Error('refused: ' + url.origin + ' is not this page\'s origin');
        const method = (request.method || 'GET').toUpperCase();
        const headers = Object.fromEntries(Object.entries(request.headers || {}).filter(([k]) => !FORBIDDEN.test(k)));
        let body = request.body === undefined ? null : request.body;
        const rc = request.recaptcha;
        if (rc) body = JSON.stringify({...JSON.parse(body), recaptchaV3Token: rc.token || await agent.mint(rc.action, rc.sitekey)});
        if (ctl.signal.aborted) throw new Error('aborted');
        const init = {method, headers, credentials: 'include', signal: ctl.signal};
        if (body !== null && method !== 'GET' && method !== 'HEAD') init.body = body;
        const r = await fetch(url.href, init);
        const h = {};
        r.headers.forEach((v, k) => { h[k] = v; });
        await emit({type: 'head', status: r.status, headers: h});
        const reader = r.body ? r.body.getReader() : null, dec = new TextDecoder();
        for (let part = reader && await reader.read(); part && !part.done; part = await reader.read()) {
          const text = dec.decode(part.value, {stream: true});
          if (text) await emit({type: 'chunk', text});
        }
        const tail = dec.decode();
        if (tail) await emit({type: 'chunk', text: tail});
        await emit({type: 'done'});
      } catch (e) {
        const aborted = ctl.signal.aborted;
        try { await emit({type: 'error', message: aborted ? 'aborted' : String(e && e.message || e), aborted}); } catch (_) {}
      } finally {
        ctl.abort();
        jobs.delete(jobId);
      }
    },
    abort(jobId) {
      const ctl = jobs.get(jobId);
      if (ctl) ctl.abort();
      return !!ctl;
    },
    async signup({sitekey, action = 'sign_up', turnstileSitekey, timeoutMs = 30000} = {}) {
      const send = async extra => {
        const body = {...extra, provisionalUserId: provisionalId()};
        if (sitekey) body.recaptchaToken = await agent.mint(action, sitekey, timeoutMs);
        const r = await fetch('/nextjs-api/sign-up', {method: 'POST', credentials: 'include',
          headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
        return {status: r.status, text: await r.text()};
      };
      const first = await send({});
      if (first.status < 400 || first.status >= 500 || first.status === 429 || !turnstileShown()) {
        return {...first, bodies: ['2026']};
      }
      const again = await send({turnstileToken: await turnstileToken(turnstileSitekey, timeoutMs)});
      return {...again, bodies: ['2026', 'turnstile']};
    },
  };
  Object.defineProperty(window, '__arenaBridge', {value: Object.freeze(agent), enumerable: false});
})();
"""


def write_page_agent(path: str) -> str:
    """The page agent in a file only our user can read or change (it runs with the accounts' sessions), for
    the sidecar's --page-agent; the sidecar reads it at start and never imports this module."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
        f.write(PAGE_AGENT_JS)
    return path


class PageFetchFailed(Exception):
    """A page agent's chat() ended with an error event (its message), or its events ended before the last."""


async def page_fetch_items(events: AsyncIterator[dict]) -> AsyncGenerator[tuple[int, dict[str, str]] | str | dict, None]:
    """A chat()'s events (PAGE_AGENT_JS), from the sidecar's page or the user's, as a stream of the in-page
    fetch yields them: (status, headers), then the body's text as the page reads it, and last the cookie jar
    a done event carries (the sidecar's does: the site may rotate the session while answering)."""
    async for event in events:
        kind = event.get("type")
        if kind == "head":
            yield int(event.get("status") or 0), {str(k): str(v) for k, v in (event.get("headers") or {}).items()}
        elif kind == "chunk":
            yield str(event.get("text") or "")
        elif kind == "done":
            if event.get("cookies"):
                yield dict(event["cookies"])
            return
        else:
            raise PageFetchFailed(str(event.get("message") or "failed")[:300])
    raise PageFetchFailed("its events ended without finishing")


# =====================================================================================================
# Sidecar client
# =====================================================================================================

class SidecarError(Exception):
    """A sidecar failure. The message is user-facing: the bridge answers 503 with it."""


def headful_wanted(setting: bool | None, environ: Mapping[str, str], xvfb_run: str | None) -> bool:
    """Headful wherever a window can be had (a display, or xvfb-run for a virtual one) unless the setting says
    no: LM Arena's reCAPTCHA scores a headful browser better than a headless one."""
    window = bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY") or xvfb_run)
    if setting and not window:
        log.warning("BRIDGE_HEADFUL=1 without a display and without xvfb-run (apt-get install xvfb): headless")
    return window if setting is None else setting and window


def tree_pss_mb(root_pid: int) -> float:
    """MiB of a process and its descendants (the sidecar, Playwright's driver, Chromium's processes): their
    PSS, as Chromium's processes share most of their pages. Linux's /proc; 0 where it is not readable."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError), open(f"/proc/{entry}/stat") as f:
            children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    total_kb, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            total_kb += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return round(total_kb / 1024, 1)


class SidecarClient:
    """Starts sidecar.py on demand, talks to it over its Unix socket, stops it when idle.

    Every public call is bounded by request_timeout (start-up included) and fails with SidecarError,
    never hangs. A dead child is restarted once per call. Tokens for (sitekey, action) are kept in a
    small pool refilled in the background after each call, so a steady stream of requests rarely
    waits for a mint; the pool never starts a browser on its own, only after a caller asked.
    """

    TOKEN_POOL_SIZE = 2
    TOKEN_MAX_AGE = 100.0  # reCAPTCHA tokens live ~120 s; keep a margin for the request itself
    STATUS_TIMEOUT = 3.0
    STOP_TIMEOUT = 5.0

    def __init__(self, *, socket_path: str, arena_url: str, browser: str | None, mode: str = "auto",
                 request_timeout: float = 45.0, idle_timeout: float = 300.0, python: str = sys.executable,
                 sidecar_script: str | None = None, headful: bool = False, log_level: str = "info") -> None:
        self.socket_path = socket_path
        self.arena_url = arena_url
        self.browser = browser
        self.mode = mode
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.python = python
        self.sidecar_script = sidecar_script or os.path.join(os.path.dirname(os.path.abspath(__file__)), "sidecar.py")
        self.headful = headful
        self.log_level = log_level
        self._proc: asyncio.subprocess.Process | None = None
        self._http: httpx.AsyncClient | None = None
        self._start_lock = asyncio.Lock()
        self._failure: str | None = None
        self._starting = False
        self._active = 0  # calls and streams in flight; the idle reaper waits for them
        self._last_used = time.monotonic()
        self._reaper: asyncio.Task | None = None
        self._pool: dict[tuple[str, str], collections.deque[tuple[float, str]]] = {}
        self._refills: dict[tuple[str, str], asyncio.Task] = {}

    @classmethod
    def from_settings(cls, settings: Settings, arena_url: str) -> SidecarClient:
        """The sidecar for `settings`, on LM Arena's current origin (it may have moved since it was set)."""
        return cls(socket_path=settings.socket_path, arena_url=arena_url, browser=settings.browser,
                   mode=settings.sidecar, request_timeout=settings.sidecar_timeout,
                   idle_timeout=settings.sidecar_idle, log_level=settings.log_level,
                   headful=headful_wanted(settings.headful, os.environ, shutil.which("xvfb-run")))

    # --- state ---------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def state(self) -> str:
        if self.mode == "off":
            return "off"
        if self._starting:
            return "starting"
        if self.alive:
            return "running"
        if self._failure:
            return f"failed: {self._failure}"
        return "stopped"

    async def status(self) -> dict:
        """The client state plus the sidecar's own /status and its memory when it runs. Never starts anything."""
        result: dict[str, Any] = {"state": self.state}
        if self.alive and not self._starting and self._http is not None and self._proc is not None:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await self._http.get("/status", timeout=self.STATUS_TIMEOUT)
                result.update({k: v for k, v in response.json().items() if k != "ok"})
            result["memory_mb"] = await asyncio.to_thread(tree_pss_mb, self._proc.pid)  # 0.1 s with Chromium
        return result

    # --- public calls --------------------------------------------------------------------------------

    async def token(self, sitekey: str, action: str) -> str:
        """A fresh single-use reCAPTCHA v3 token: from the pool when one is ready, else minted now."""
        key = (sitekey, action)
        pool = self._pool.setdefault(key, collections.deque())
        self._touch()
        while pool:
            minted_at, token = pool.popleft()
            if time.monotonic() - minted_at < self.TOKEN_MAX_AGE:
                self._refill(key)
                return token
        result = await self._call("/token", {"sitekey": sitekey, "action": action})
        self._refill(key)
        return self._field(result, "token")

    async def clearance(self) -> tuple[dict, str]:
        """Fresh Cloudflare clearance: (cookies of the arena host, the browser's exact User-Agent)."""
        result = await self._call("/clearance", {})
        return dict(result.get("cookies") or {}), self._field(result, "user_agent")

    async def signup(self, turnstile_sitekey: str | None, recaptcha_sitekey: str | None) -> dict:
        """A new anonymous account as the site answered it: {"status", "text", "cookies", "user_agent", "bodies"}
        (the sign-up bodies sent: the 2026 one, then the Turnstile one when the site refused it)."""
        result = await self._call("/signup", {"turnstile_sitekey": turnstile_sitekey,
                                              "recaptcha_sitekey": recaptcha_sitekey, "recaptcha_action": "sign_up"})
        if not 200 <= int(result.get("status") or 0) < 400:
            raise SidecarError(f"sign-up ({'+'.join(result.get('bodies') or [])} body) answered "
                               f"{result.get('status')}: {str(result.get('text'))[:200]}")
        return result

    async def sitekeys(self) -> list[str]:
        """The reCAPTCHA sitekeys a freshly loaded page of the site uses (its live configuration, U8); none
        when the browser fails."""
        try:
            result = await self._call("/sitekeys", {})
        except SidecarError as exc:
            log.warning("could not read the page's live reCAPTCHA configuration: %s", exc)
            return []
        return [key for key in result.get("sitekeys") or [] if isinstance(key, str) and key]

    async def fetch_stream(self, request: dict) -> AsyncGenerator[tuple[int, dict] | str | dict, None]:
        """Run a request with the page agent's chat() in the sidecar's page: what page_fetch_items yields.

        Closing the iterator early closes the connection, and the sidecar aborts the page's fetch."""
        self._check_enabled()
        self._active += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                async for item in page_fetch_items(await self._open_stream(request, stack)):
                    yield item
        except PageFetchFailed as exc:
            raise SidecarError(f"browser sidecar: in-page fetch failed: {exc}") from None
        except httpx.HTTPError as exc:
            raise SidecarError(f"browser sidecar: the in-page fetch broke off ({type(exc).__name__})") from exc
        finally:
            self._active -= 1
            self._touch()

    async def move_to(self, arena_url: str) -> None:
        """LM Arena moved: the page, its cookies and its tokens belong to the old host, so the next call
        starts a sidecar on the new one."""
        self.arena_url = arena_url
        self._pool.clear()
        async with self._start_lock:
            await self._stop()

    async def aclose(self) -> None:
        """Stop the child (politely, then by force) and remove the socket."""
        for task in [*self._refills.values(), self._reaper]:
            if task is not None:
                task.cancel()
        self._refills.clear()
        self._reaper = None
        await self._stop()

    # --- calls with start-up, one restart and a deadline ---------------------------------------------

    def _check_enabled(self) -> None:
        if self.mode == "off":
            raise SidecarError("the browser sidecar is disabled (BRIDGE_SIDECAR=off); "
                               "a reCAPTCHA token is needed for this request")

    def _touch(self) -> None:
        self._last_used = time.monotonic()

    @staticmethod
    def _field(result: dict, name: str) -> Any:
        if not result.get(name):
            raise SidecarError(f"browser sidecar: the answer has no {name}")
        return result[name]

    async def _with_sidecar(self, send: Callable[[httpx.AsyncClient], Awaitable[Any]], *, start: bool = True) -> Any:
        """Run `send` against the sidecar, starting it, or restarting it once when the connection fails,
        all within request_timeout. start=False (background work) only uses a sidecar that already runs."""
        try:
            async with asyncio.timeout(self.request_timeout):
                for attempt in (1, 2):
                    if start:
                        await self._ensure_started()
                    if not self.alive or self._http is None:
                        raise SidecarError("browser sidecar is not running")
                    try:
                        return await send(self._http)
                    except httpx.TransportError as exc:
                        if attempt == 2 or not start:
                            raise SidecarError(f"browser sidecar connection failed ({type(exc).__name__})") from exc
                        log.warning("browser sidecar unreachable (%s); restarting it", type(exc).__name__)
                        await self._stop()
        except TimeoutError as exc:
            raise SidecarError(f"browser sidecar did not answer within {self.request_timeout:.0f}s") from exc
        raise SidecarError("browser sidecar: unreachable")  # not reached

    async def _call(self, path: str, payload: dict, *, start: bool = True) -> dict:
        """POST a small JSON request to the sidecar and return its JSON answer."""
        self._check_enabled()
        self._active += 1
        try:
            response = await self._with_sidecar(lambda http: http.post(path, json=payload, timeout=None), start=start)
            return self._decode(response)
        finally:
            self._active -= 1
            self._touch()

    @staticmethod
    def _decode(response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or not isinstance(body, dict):
            message = body.get("error") if isinstance(body, dict) else None
            raise SidecarError(f"browser sidecar: {message or f'HTTP {response.status_code}'}")
        return body

    async def _open_stream(self, request: dict, stack: contextlib.AsyncExitStack) -> AsyncIterator[dict]:
        """POST /fetch's events, bounded (start-up included) until the first: the page's answer began or failed.
        Only opening it is retried on a restarted sidecar: once it answered, the page may have sent the chat."""
        async def send(http: httpx.AsyncClient) -> AsyncIterator[str]:
            response = await stack.enter_async_context(
                http.stream("POST", "/fetch", json=request, timeout=httpx.Timeout(None)))
            if response.status_code != 200:
                await response.aread()
                self._decode(response)
            return response.aiter_lines()

        deadline = time.monotonic() + self.request_timeout
        lines = await self._with_sidecar(send)
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                first = await anext(lines, '{"type": "error", "message": "it answered nothing"}')
        except TimeoutError:
            raise SidecarError(f"browser sidecar did not answer within {self.request_timeout:.0f}s") from None

        async def events() -> AsyncIterator[dict]:
            yield json.loads(first)
            async for line in lines:
                yield json.loads(line)
        return events()

    # --- the child process ---------------------------------------------------------------------------

    async def _ensure_started(self) -> None:
        async with self._start_lock:
            if self.alive:
                return
            if self._proc is not None:
                log.warning("browser sidecar exited with code %s; restarting it", self._proc.returncode)
                await self._stop()
            self._starting = True
            try:
                await self._spawn()
                self._failure = None
            except BaseException as exc:  # also the caller's deadline cancelling us mid-start
                self._failure = str(exc) if isinstance(exc, SidecarError) else "did not become ready"
                await self._stop(force=True)
                raise
            finally:
                self._starting = False

    async def _spawn(self) -> None:
        if len(os.fsencode(self.socket_path)) > 100:  # the kernel's limit for AF_UNIX paths is ~107 bytes
            raise SidecarError(f"the sidecar socket path is too long: {self.socket_path} "
                               "(set BRIDGE_SIDECAR_SOCKET to a shorter one)")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a stale socket would look like a live sidecar
        args = [self.python, self.sidecar_script, "--socket", self.socket_path, "--arena-url", self.arena_url,
                "--page-agent", write_page_agent(self.socket_path + ".agent.js"), "--log-level", self.log_level]
        if self.browser:
            args += ["--browser", self.browser]
        if self.headful:
            args.append("--headful")
        log.info("starting the browser sidecar")
        # A session of its own: Ctrl-C in a terminal reaches the bridge only, which drains its streams and then
        # stops the sidecar. Logs go to our stderr.
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, start_new_session=True)
        self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
                                       base_url="http://sidecar")
        # Ready when /status answers; the caller's deadline bounds this loop.
        while True:
            if self._proc.returncode is not None:
                raise SidecarError(f"browser sidecar exited at start (code {self._proc.returncode})")
            if os.path.exists(self.socket_path):
                with contextlib.suppress(httpx.HTTPError):
                    if (await self._http.get("/status", timeout=self.STATUS_TIMEOUT)).status_code == 200:
                        break
            await asyncio.sleep(0.1)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_when_idle())
        log.info("browser sidecar running (pid %d)", self._proc.pid)

    async def _stop(self, *, force: bool = False) -> None:
        proc, http = self._proc, self._http
        self._proc, self._http = None, None
        if proc is not None and proc.returncode is None:
            # SIGTERM: it closes its browser and exits. After SIGKILL, its driver, browser and display end as
            # its pipes close.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL if force else signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if http is not None:
            await http.aclose()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def _reap_when_idle(self) -> None:
        """Stop the sidecar (and its browser) after idle_timeout seconds without calls."""
        while self.alive:
            if self._idle():
                async with self._start_lock:
                    if self._idle():    # a call may have come in while we waited for the lock
                        log.info("browser sidecar idle for %.0fs; stopping it", time.monotonic() - self._last_used)
                        await self._stop()
                        return
            await asyncio.sleep(max(0.2, min(5.0, self.idle_timeout - (time.monotonic() - self._last_used))))

    def _idle(self) -> bool:
        return (self._active == 0 and not self._refills_running()
                and time.monotonic() - self._last_used >= self.idle_timeout)

    # --- token pool ----------------------------------------------------------------------------------

    def _refills_running(self) -> bool:
        return any(not task.done() for task in self._refills.values())

    def _refill(self, key: tuple[str, str]) -> None:
        task = self._refills.get(key)
        if task is None or task.done():
            self._refills[key] = asyncio.create_task(self._refill_pool(key))

    async def _refill_pool(self, key: tuple[str, str]) -> None:
        pool = self._pool.setdefault(key, collections.deque())
        while True:
            now = time.monotonic()
            while pool and now - pool[0][0] >= self.TOKEN_MAX_AGE:
                pool.popleft()
            if len(pool) >= self.TOKEN_POOL_SIZE or not self.alive:
                return
            try:
                result = await self._call("/token", {"sitekey": key[0], "action": key[1]}, start=False)
            except SidecarError as exc:
                log.debug("token pool refill failed: %s", exc)
                return
            if result.get("token"):
                pool.append((time.monotonic(), result["token"]))


# =====================================================================================================
# Browser executor
# =====================================================================================================

EXECUTOR_ORIGINS = ("https://arena.ai", "https://lmarena.ai")   # where the userscript runs (and SPEC §8's CORS)
EXECUTOR_SECRET_HEADER = "X-Bridge-Executor-Secret"
EXECUTOR_POLL_HOLD = 20.0       # a long poll waits this long for a job before it answers empty
EXECUTOR_GRACE = 4.0            # a page with no poll open for this long has gone (closed, navigated, asleep)
EXECUTOR_QUEUE = 256            # events buffered per job before the page's uploads wait (backpressure)


class ExecutorUnavailable(ArenaError):
    """The browser executor cannot run a job: not connected, gone, or silent past the timeout. Before the
    reply began, the turn runner moves to another account."""

    def __init__(self, message: str):
        super().__init__("browser_unavailable", message)


def executor_user(page_state: Any) -> dict:
    """The signed-in user as the page's state() reports it, cut to the few short strings the bridge keeps."""
    user = page_state.get("user") if isinstance(page_state, dict) else None
    if not isinstance(user, dict):
        return {}
    return {k: str(user[k])[:200] for k in ("id", "email") if user.get(k)} | {"anonymous": bool(user.get("anonymous"))}


class ExecutorRecords:
    """The browser executors' durable state in the store: the userscripts' pairing secrets (only their
    hashes) and each browser account's record (signed-in user, connection times, jobs, failures)."""

    def __init__(self, store: Store):
        self.store = store
        self.rows, self.write, self.db = store.rows, store.write, store.db

    def create_pairing(self) -> tuple[int, str]:
        """A new pairing secret for a userscript; only its hash is kept."""
        secret = "bx-" + secrets.token_urlsafe(32)
        with self.db.conn:
            pairing_id = self.db.table("executor_pairings").insert(
                {"hash": sha256_hex(secret), "created": now(), "revoked": None}).last_pk
        return int(pairing_id or 0), secret

    def pairing_by_secret(self, secret: str) -> int | None:
        rows = self.rows("SELECT id FROM executor_pairings WHERE hash = ? AND revoked IS NULL", [sha256_hex(secret)])
        return rows[0]["id"] if rows else None

    def active_pairings(self) -> set[int]:
        return {r["id"] for r in self.rows("SELECT id FROM executor_pairings WHERE revoked IS NULL")}

    def revoke_pairings(self) -> int:
        return self.write("UPDATE executor_pairings SET revoked = ? WHERE revoked IS NULL", [now()])

    def record(self, account_id: int) -> dict:
        rows = self.rows("SELECT * FROM browser_executors WHERE account_id = ?", [account_id])
        return rows[0] if rows else {}

    def update_record(self, account_id: int, **fields: Any) -> None:
        with self.db.conn:
            self.db.table("browser_executors").upsert({"account_id": account_id, **fields}, pk="account_id")

    def count_job(self, account_id: int, error: str | None) -> None:
        column = "failures" if error else "jobs"
        self.write(f"UPDATE browser_executors SET {column} = {column} + 1, last_job = ?, last_error = ? "
                   "WHERE account_id = ?", [now(), error, account_id])


@dataclasses.dataclass(eq=False)
class ExecutorJob:
    """One chat request sent to a page: the events its page agent uploads, in order."""
    id: str
    request: dict
    events: asyncio.Queue = dataclasses.field(default_factory=lambda: asyncio.Queue(EXECUTOR_QUEUE))
    taken: bool = False


@dataclasses.dataclass(eq=False)
class ExecutorConnection:
    """One page (one tab load) that polls with a pairing secret, serving one browser account."""
    executor_id: str
    pairing_id: int
    account_id: int
    user_key: str
    since: float = dataclasses.field(default_factory=now)
    seen: float = dataclasses.field(default_factory=time.monotonic)
    polls: int = 0                      # polls held open right now
    waiting: list[ExecutorJob] = dataclasses.field(default_factory=list)    # jobs for the next poll
    running: dict[str, ExecutorJob] = dataclasses.field(default_factory=dict)
    aborts: set[str] = dataclasses.field(default_factory=set)               # jobs the page must abort
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    closed: str | None = None           # why the bridge dropped it
    greeted: bool = False               # its first poll was answered at once, so the page shows "connected"

    def live(self) -> bool:
        return self.closed is None and (self.polls > 0 or time.monotonic() - self.seen < EXECUTOR_GRACE)


class BrowserExecutors:
    """The browsers connected through the userscript (SPEC §8), each an account of kind `browser` whose
    session stays in the browser: pages long-poll for jobs, run each with the page agent's chat(), and
    upload its events, which reach the turn runner as a stream. A page that stops polling, a pairing that
    is revoked, a job silent past `timeout`: each ends its jobs with ExecutorUnavailable, never a hang."""

    def __init__(self, store: Store, timeout: float):
        self.store = store
        self.records = ExecutorRecords(store)
        self.timeout = timeout
        self.connections: dict[str, ExecutorConnection] = {}
        self.jobs: dict[str, tuple[ExecutorConnection, ExecutorJob]] = {}

    def start(self) -> None:
        """At the server's start nobody polls yet: every browser account starts disconnected."""
        self.store.write("UPDATE accounts SET state = 'disconnected' WHERE kind = 'browser' AND state = 'ok'")

    # --- pages: connect, poll, upload events ----------------------------------------------------------
    def connect(self, executor_id: str, pairing_id: int, page_state: Any) -> ExecutorConnection:
        """The page's connection, opened on its first poll (or again when its tab signed in as someone else)."""
        user = executor_user(page_state)
        user_key = "browser:" + (user.get("id") or executor_id)
        conn = self.connections.get(executor_id)
        if conn is not None and conn.pairing_id == pairing_id and conn.user_key == user_key and conn.closed is None:
            conn.seen = time.monotonic()
            return conn
        if conn is not None:
            self.drop(conn, "the page reconnected")
        conn = ExecutorConnection(executor_id, pairing_id, self.account_for(user_key, user), user_key)
        self.connections[executor_id] = conn
        self.records.update_record(conn.account_id, user=json.dumps(user), connected_since=conn.since,
                                          last_seen=now())
        log.info("browser executor connected: account %s (%s)", conn.account_id, user.get("email") or user_key)
        return conn

    def account_for(self, user_key: str, user: dict) -> int:
        """The browser account of this user (one per LM Arena user, however many tabs), usable again."""
        label = "browser: " + (user.get("email") or ("anonymous" if user.get("anonymous") else "signed out"))
        held = next((a for a in self.store.accounts() if a["kind"] == "browser" and a["auth"] == user_key), None)
        if held is None:
            return self.store.add_account(label=label, kind="browser", auth=user_key, form="browser", cookies="{}",
                                          state="ok", failures=0, last_used=0.0)
        cooling = held["state"] == "cooling_down" and (held["cooldown_until"] or 0) > now()
        self.store.update_account(held["id"], label=label, state="cooling_down" if cooling else "ok")
        return held["id"]

    async def poll(self, conn: ExecutorConnection, gone: Callable[[], Awaitable[bool]],
                   hold: float = EXECUTOR_POLL_HOLD) -> dict:
        """Wait up to `hold` for jobs or aborts for this page and hand them over; a page that hung up
        gets nothing (its jobs stay for its next poll, or fail when it does not come back)."""
        conn.polls += 1
        try:
            deadline = time.monotonic() + (hold if conn.greeted else 0.0)
            conn.greeted = True
            while not (conn.waiting or conn.aborts or conn.closed) and time.monotonic() < deadline:
                conn.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await conn.wake.wait()
                if await gone():
                    return {}
            if conn.closed:
                return {"closed": conn.closed}
            jobs, conn.waiting = conn.waiting, []
            for job in jobs:
                job.taken = True
                conn.running[job.id] = job
            aborts, conn.aborts = sorted(conn.aborts), set()
            return {"jobs": [{"id": job.id, "type": "chat", "request": job.request} for job in jobs], "abort": aborts}
        finally:
            conn.polls -= 1
            conn.seen = time.monotonic()

    async def deliver(self, executor_id: str, pairing_id: int, job_id: str, events: list) -> bool:
        """Queue a page's events for its job, waiting while the queue is full; True: the page should abort
        the job (the client left, or the bridge no longer knows it)."""
        conn = self.connections.get(executor_id)
        entry = self.jobs.get(job_id)
        if conn is None or conn.pairing_id != pairing_id or entry is None or entry[0] is not conn:
            return True
        conn.seen = time.monotonic()
        for event in events:
            if not isinstance(event, dict):
                continue
            try:
                async with asyncio.timeout(self.timeout):
                    await entry[1].events.put(event)
            except TimeoutError:
                return True
        return job_id in conn.aborts or job_id not in self.jobs

    # --- the bridge's side: run a job --------------------------------------------------------------------
    def connection_for(self, account_id: int) -> ExecutorConnection | None:
        """The account's live page that polled last (a user may have several tabs open)."""
        live = [c for c in self.connections.values() if c.account_id == account_id and c.live()]
        return max(live, key=lambda c: c.seen) if live else None

    async def run(self, account_id: int, request: dict) -> AsyncGenerator[tuple[int, dict] | str, None]:
        """Run `request` (built by the bridge: a path on LM Arena's origin) in the account's page: yields
        (status, headers), then the body's text as it arrives. Closing it early aborts the page's fetch."""
        conn = self.connection_for(account_id)
        if conn is None:
            raise ExecutorUnavailable("the browser executor is not connected")
        job = ExecutorJob(uuid.uuid4().hex, request)
        self.jobs[job.id] = (conn, job)
        conn.waiting.append(job)
        conn.wake.set()
        error: str | None = None
        ended = False
        try:
            async for item in page_fetch_items(self.events(job)):
                if not isinstance(item, dict):  # a cookie jar: the session stays in the user's browser
                    yield item
            ended = True
        except PageFetchFailed as failed:
            ended, error = True, str(failed)
            raise ExecutorUnavailable(f"the browser executor's page failed: {error}") from None
        except ExecutorUnavailable as failed:
            ended, error = True, failed.message
            raise
        finally:
            self.finish(conn, job, ended, error)

    async def events(self, job: ExecutorJob) -> AsyncIterator[dict]:
        """The job's events as its page delivers them; one not delivered within the timeout fails the job."""
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    event = await job.events.get()
            except TimeoutError:
                what = "answer" if job.taken else "take the job"
                raise ExecutorUnavailable(f"the browser executor did not {what} within {self.timeout:.0f} s") from None
            yield event

    def finish(self, conn: ExecutorConnection, job: ExecutorJob, ended: bool, error: str | None) -> None:
        """Forget the job and count it; one that did not end by itself (its client left) is aborted in the page."""
        self.jobs.pop(job.id, None)
        if job in conn.waiting:
            conn.waiting.remove(job)
        elif conn.running.pop(job.id, None) is not None and not ended and conn.closed is None:
            conn.aborts.add(job.id)
            conn.wake.set()
        self.records.count_job(conn.account_id, error)

    # --- liveness -----------------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Drop pages that stopped polling and those whose pairing was revoked (also from the CLI)."""
        active = self.records.active_pairings() if self.connections else set()
        for conn in list(self.connections.values()):
            if conn.pairing_id not in active:
                self.drop(conn, "its pairing secret was revoked")
            elif not conn.live():
                self.drop(conn, "the page stopped polling (closed, reloaded or asleep)")

    def drop(self, conn: ExecutorConnection, reason: str) -> None:
        conn.closed = reason
        conn.wake.set()
        if self.connections.get(conn.executor_id) is conn:
            del self.connections[conn.executor_id]
        for job in [*conn.waiting, *conn.running.values()]:
            with contextlib.suppress(asyncio.QueueFull):
                while job.events.full():
                    job.events.get_nowait()
                job.events.put_nowait({"type": "lost", "message": f"the browser executor disconnected: {reason}"})
        if self.connection_for(conn.account_id) is None:
            self.store.write("UPDATE accounts SET state = 'disconnected' WHERE id = ? AND state IN ('ok', 'refreshing')",
                             [conn.account_id])
            self.records.update_record(conn.account_id, last_seen=now(), last_error=reason)
        log.info("browser executor of account %s disconnected: %s", conn.account_id, reason)

    def counts(self) -> dict[str, int]:
        """Browser accounts by state, for /metrics: connected (a live page) or disconnected."""
        browsers = [a["id"] for a in self.store.accounts() if a["kind"] == "browser"]
        connected = sum(self.connection_for(account_id) is not None for account_id in browsers)
        return {"connected": connected, "disconnected": len(browsers) - connected}

    def status(self) -> list[dict]:
        """Each browser account with its live pages: who it is signed in as, since when, its jobs."""
        result = []
        for account in self.store.accounts():
            if account["kind"] != "browser":
                continue
            record = self.records.record(account["id"])
            pages = [c for c in self.connections.values() if c.account_id == account["id"] and c.live()]
            result.append({"account_id": account["id"], "connected": bool(pages), "pages": len(pages),
                           "user": json.loads(record.get("user") or "{}"),
                           "connected_since": min((c.since for c in pages), default=None),
                           "last_seen": record.get("last_seen"), "last_job": record.get("last_job"),
                           "jobs": record.get("jobs", 0), "failures": record.get("failures", 0),
                           "running": sum(len(c.running) for c in pages), "last_error": record.get("last_error")})
        return result


# =====================================================================================================
# Userscript
# =====================================================================================================

USERSCRIPT = r"""// ==UserScript==
// @name         LM Arena Bridge: browser executor
// @namespace    lmarena-bridge
// @version      {version}
// @description  Runs the chats of the LM Arena Bridge at {bridge} in this signed-in LM Arena tab
{matches}// @connect      {host}
// @grant        GM_xmlhttpRequest
// @run-at       document-start
// @inject-into  page
// @sandbox      JavaScript
// @noframes
// ==/UserScript==
{agent}
// The transport: long polls to the bridge for jobs, the page agent's events uploaded in batches.
(() => {{
  if (window !== window.top) return;
  const BRIDGE = {bridge_json}, SECRET = {secret_json}, HEADER = {header_json};
  const agent = window.__arenaBridge, executor = crypto.randomUUID();
  // The fetch as it was before the page's own scripts wrap it: the bridge is not the page's origin.
  const plainFetch = window.fetch.bind(window);
  const gm = typeof GM_xmlhttpRequest === 'function' ? GM_xmlhttpRequest : null;
  const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
  const post = (path, payload, timeoutMs) => {{
    const headers = {{'Content-Type': 'application/json', [HEADER]: SECRET}};
    const data = JSON.stringify(payload);
    const parse = (status, text) => {{ let body = {{}}; try {{ body = JSON.parse(text); }} catch (e) {{}} return {{status, body}}; }};
    if (gm) return new Promise((resolve, reject) => gm({{method: 'POST', url: BRIDGE + path, headers, data, timeout: timeoutMs,
      onload: r => resolve(parse(r.status, r.responseText)), onerror: reject, ontimeout: reject, onabort: reject}}));
    return plainFetch(BRIDGE + path, {{method: 'POST', headers, body: data, credentials: 'omit', cache: 'no-store',
      signal: AbortSignal.timeout(timeoutMs)}}).then(async r => parse(r.status, await r.text()));
  }};
  let badge = null, shown = ['disconnected', 'starting'];
  const show = (state, why) => {{
    shown = [state, why || state];
    if (!badge && document.body) {{
      badge = document.createElement('div');
      badge.id = 'arena-bridge-badge';
      badge.style.cssText = 'position:fixed;right:8px;bottom:8px;z-index:2147483647;font:11px/1.4 system-ui,sans-serif;' +
        'padding:2px 8px;border-radius:9px;background:rgba(20,20,20,.75);color:#fff;pointer-events:none;opacity:.8';
      document.body.appendChild(badge);
    }}
    if (!badge) return;
    const dot = {{connected: '#3c3', working: '#39f', disconnected: '#e44'}}[state];
    badge.dataset.state = state;
    badge.title = 'LM Arena Bridge: ' + shown[1];
    badge.innerHTML = '';
    badge.append(Object.assign(document.createElement('span'), {{textContent: '\u25cf ', style: 'color:' + dot}}),
                 'bridge ' + state);
  }};
  document.addEventListener('DOMContentLoaded', () => show(...shown));
  const running = new Set();
  const idle = () => show(running.size ? 'working' : 'connected');
  const run = async job => {{
    running.add(job.id); idle();
    let batch = [], flushing = null;
    const flush = async () => {{
      try {{
        while (batch.length) {{
          const events = batch; batch = [];
          const r = await post('/executor/events', {{executor, job: job.id, events}}, 30000).catch(() => null);
          if (!r || r.status !== 200 || r.body.abort) agent.abort(job.id);
        }}
      }} finally {{ flushing = null; }}
    }};
    const emit = async event => {{
      batch.push(event);
      if (!flushing) flushing = flush();
      if (event.type === 'done' || event.type === 'error' || batch.length > 32) await flushing;
    }};
    await agent.chat(job.id, job.request, emit);
    running.delete(job.id); idle();
  }};
  const loop = async () => {{
    for (let backoff = 1000; ;) {{
      const r = await post('/executor/poll', {{executor, state: agent.state()}}, 60000).catch(() => null);
      if (r && r.status === 200 && !r.body.closed) {{
        backoff = 1000; idle();
        for (const id of r.body.abort || []) agent.abort(id);
        for (const job of r.body.jobs || []) run(job);
        continue;
      }}
      if (r && r.status === 401) return show('disconnected', 'the bridge refused the pairing secret (revoked?): install a new userscript');
      show('disconnected', r ? 'the bridge answered ' + r.status : 'the bridge is unreachable');
      const asked = r && r.status === 429 ? 1000 * (r.body.retry_after || 60) : 0;
      await sleep(Math.max(asked, backoff) * (0.8 + 0.4 * Math.random()));
      backoff = Math.min(backoff * 2, 60000);
    }}
  }};
  loop();
}})();
"""
USERSCRIPT_VERSION = "1.0.0"


def origin_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def executor_origins(arena_url: str) -> tuple[str, ...]:
    """The origins the userscript runs on and whose pages may call the executor routes."""
    return tuple(dict.fromkeys([*EXECUTOR_ORIGINS, origin_of(arena_url)]))


def render_userscript(bridge_url: str, secret: str, arena_url: str) -> str:
    """The userscript for one pairing: its header, the page agent (the same PAGE_AGENT_JS the sidecar runs)
    and the transport, with the bridge's URL and the pairing secret baked in."""
    bridge_url = bridge_url.rstrip("/")
    matches = "".join(f"// @match        {origin}/*\n" for origin in executor_origins(arena_url))
    return USERSCRIPT.format(version=USERSCRIPT_VERSION, bridge=bridge_url, matches=matches,
                             host=urllib.parse.urlsplit(bridge_url).hostname or "localhost", agent=PAGE_AGENT_JS.strip(),
                             bridge_json=json.dumps(bridge_url), secret_json=json.dumps(secret),
                             header_json=json.dumps(EXECUTOR_SECRET_HEADER))


# =====================================================================================================
# Browser fingerprints
# =====================================================================================================

@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """One browser curl_cffi imitates: its impersonation target (TLS and HTTP/2 fingerprint) and the
    identifying headers that browser sends, as curl_cffi's own defaults for the target have them."""
    target: str
    family: str                 # the browser a User-Agent names: "Chrome" or "Firefox"
    major: int
    user_agent: str
    sec_ch_ua: str | None       # Chrome's client hints brand list; Firefox sends none


_MAC = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36"
# The site scores each message with the User-Agent and the JA4 TLS fingerprint together (§0 U1): a request
# sends the User-Agent of the browser its TLS handshake imitates, never another's. Newest of each family first.
FINGERPRINTS: tuple[Fingerprint, ...] = (
    Fingerprint("chrome152", "Chrome", 152, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, "
                "like Gecko) Chrome/152.0.0.0 Safari/537.36",
                '"Chromium";v="152", "Not?A_Brand";v="24", "Google Chrome";v="152"'),
    Fingerprint("chrome146", "Chrome", 146, _MAC.format(v=146),
                '"Chromium";v="146", "Not-A.Brand";v="24", "Google Chrome";v="146"'),
    Fingerprint("chrome142", "Chrome", 142, _MAC.format(v=142),
                '"Chromium";v="142", "Google Chrome";v="142", "Not_A Brand";v="99"'),
    Fingerprint("chrome136", "Chrome", 136, _MAC.format(v=136),
                '"Chromium";v="136", "Google Chrome";v="136", "Not.A/Brand";v="99"'),
    Fingerprint("chrome131", "Chrome", 131, _MAC.format(v=131),
                '"Google Chrome";v="131", "Chromium";v="131", "Not_A Brand";v="24"'),
    Fingerprint("firefox147", "Firefox", 147, "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:147.0) "
                "Gecko/20100101 Firefox/147.0", None),
)
IMPERSONATE_ALIASES = {"chrome": "chrome152", "firefox": "firefox147"}   # BRIDGE_IMPERSONATE's family names
UA_BROWSER_RE = re.compile(r"\b(Firefox|Chrome)/(\d+)")
UA_PLATFORMS = (("Android", "Android"), ("Windows", "Windows"), ("Macintosh", "macOS"), ("CrOS", "Chrome OS"),
                ("Linux", "Linux"))


def chrome_hints(major: int, user_agent: str) -> dict[str, str]:
    """The client hints a Chromium of this User-Agent sends with it: its version and platform."""
    platform = next((name for marker, name in UA_PLATFORMS if marker in user_agent), "Windows")
    return {"sec-ch-ua": f'"Chromium";v="{major}", "Not_A Brand";v="24"',
            "sec-ch-ua-mobile": "?1" if "Mobile" in user_agent else "?0", "sec-ch-ua-platform": f'"{platform}"'}


def paired_fingerprint(impersonate: str, user_agent: str | None) -> tuple[str, dict[str, str]]:
    """The impersonation target and the identifying headers for a direct request, one browser's both.

    A User-Agent the bridge must send (the sidecar's browser's, to which Cloudflare bound cf_clearance) picks
    the target of its own family, the newest not newer than it, with client hints of its own version. Without
    one, BRIDGE_IMPERSONATE's row gives both; a target the table does not know keeps curl_cffi's own headers,
    which match it. A User-Agent of no browser in the table (never the sidecar's Chromium) is sent as given:
    the clearance is bound to it."""
    target = IMPERSONATE_ALIASES.get(impersonate, impersonate)
    if user_agent:
        return fingerprint_of_user_agent(user_agent) or (target, {"User-Agent": user_agent})
    named = next((r for r in FINGERPRINTS if r.target == target), None)
    if named is None:
        return target, {}
    hints = {**chrome_hints(named.major, named.user_agent), "sec-ch-ua": named.sec_ch_ua} if named.sec_ch_ua else {}
    return named.target, {"User-Agent": named.user_agent, **hints}


def fingerprint_of_user_agent(user_agent: str) -> tuple[str, dict[str, str]] | None:
    """The target of the User-Agent's own browser family, the newest not newer than it (else the closest),
    with the client hints of its own version; None for a browser the table does not know."""
    found = UA_BROWSER_RE.search(user_agent)
    if found is None:
        return None
    family, major = found.group(1), int(found.group(2))
    row = min((r for r in FINGERPRINTS if r.family == family), key=lambda r: (r.major > major, abs(r.major - major)))
    hints = chrome_hints(major, user_agent) if family == "Chrome" else {}
    return row.target, {"User-Agent": user_agent, **hints}


# =====================================================================================================
# Upstream responses
# =====================================================================================================

class UpstreamSession(AsyncSession):
    """curl_cffi's session, able to stop a streamed request whose client left before its answer began. A
    task cancelled while `post(stream=True)` waits for the first bytes leaves the transfer running in
    curl_cffi's own task, out of reach (its connection stayed open for good when LM Arena held the answer
    back). So the session keeps which task each curl handle serves, from taking it out of the pool to
    putting it back, and stop_transfers(task) ends that task's transfers still running."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owners: dict[Any, asyncio.Task | None] = {}    # curl handle -> the task whose request holds it

    async def pop_curl(self) -> Any:
        curl = await super().pop_curl()
        self.owners[curl] = asyncio.current_task()
        return curl

    def release_curl(self, curl: Any) -> None:
        self.owners.pop(curl, None)
        super().release_curl(curl)

    def stop_transfers(self, task: asyncio.Task | None) -> None:
        """Taking a transfer out of curl's multi handle ends it now and closes its connection (a handle
        still held is still this task's: it goes back to the pool only once its transfer is over)."""
        for curl in [curl for curl, owner in self.owners.items() if owner is task]:
            self.acurl.remove_handle(curl)


async def close_streamed(http: AsyncSession, response: Any, grace: float = 0.0) -> None:
    """Close a streamed curl_cffi response at once, whatever is left of its transfer, after up to `grace`
    seconds for it to end by itself (a reply read to its finish: its connection is then kept for the next
    request). Response.aclose() waits for the whole transfer, and `quit_now` is read only when more bytes
    arrive (never, from a silent upstream): so quit_now is set for the bytes that may still come, and the
    transfer is taken out of curl's multi handle, which ends it now."""
    task = response.astream_task
    try:
        if task is not None and grace:
            await asyncio.wait({task}, timeout=grace)
    finally:
        if response.quit_now is not None:
            response.quit_now.set()
        if task is not None and not task.done():   # once done, its handle may be back in the pool: not ours
            http.acurl.remove_handle(response.curl)
    if task is not None:
        await asyncio.wait({task})


class BrowserResponse:
    """An in-page fetch relayed by the sidecar, with the few members of a curl_cffi response that the
    chat path reads, so both paths share one retry policy and one stream reader.

    The body is read by a Prefetcher: when a client goes away, Starlette cancels the request through an
    anyio cancel scope that would also cancel the clean-up of a read in progress, and the page's fetch
    would run on. Cancelling the prefetcher's task is a plain asyncio cancellation whose clean-up
    completes, so the sidecar sees the close and aborts the page's fetch."""

    def __init__(self, stream: AsyncGenerator[Any, None]):
        self.stream = stream
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self.body: Prefetcher | None = None
        self.cookies: dict[str, str] = {}       # the page's cookie jar once its fetch is done

    async def open(self) -> None:
        self.status_code, self.headers = await self.stream.__anext__()
        self.body = Prefetcher(self._chunks())
        self.body.start()

    async def opened(self, deadline: float) -> BrowserResponse:
        """This response once its status line arrived, bounded by the request's deadline."""
        try:
            await asyncio.wait_for(self.open(), timeout=max(0.1, deadline - now()))
        except TimeoutError:
            await self.aclose()
            raise ArenaError("upstream_timeout", "LM Arena did not answer the in-page request in time") from None
        return self

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for item in self.stream:
            if isinstance(item, dict):
                self.cookies = item
            else:
                yield item.encode()

    async def final_cookies(self, timeout: float) -> dict[str, str]:
        """The page's cookies after the fetch, waiting a little for its end (it follows the finish line)."""
        if self.body is not None:
            await self.body.finished(timeout)
        return self.cookies

    async def aiter_content(self) -> AsyncIterator[bytes]:
        assert self.body is not None, "open() first"
        while (chunk := await self.body.next()) is not Prefetcher.END:
            yield chunk

    async def acontent(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_content()])

    async def aclose(self) -> None:
        if self.body is not None:
            self.body.cancel()
        else:
            await self.stream.aclose()


# =====================================================================================================
# Upstream HTTP client
# =====================================================================================================

OTHER_MODE = {"direct-battle": "direct", "direct": "direct-battle"}
DEFAULT_ARENA_MODE = "direct-battle"
MODEL_PAGES = ("/?mode=direct", "/")      # where the model list is embedded, most likely first (U10)


def current_origin(settings: Settings, store: Store) -> str:
    """Where LM Arena lives now: the configured origin, or where it moved to (kept across restarts)."""
    moved = store.site_params().get("moved_origin") or {}
    return str(moved["to"]) if moved.get("from") == settings.arena_url and moved.get("to") else settings.arena_url


def unreachable(exc: BaseException) -> ArenaError:
    return ArenaError("upstream_unreachable", f"could not reach LM Arena ({type(exc).__name__})")


def parse_action_response(text: str) -> dict | None:
    """The `1:` line of a server action's text/x-component answer, if it says success."""
    for line in text.splitlines():
        ident, sep, payload = line.partition(":")
        if sep and ident == "1":
            with contextlib.suppress(ValueError):
                value = json.loads(payload)
                if isinstance(value, dict) and value.get("success") is True:
                    return value.get("data") or {}
    return None


def action_values(status: int, text: str, name: str, fields: tuple[str, ...]) -> list[str]:
    """The string `fields` of a server action's answer; ArenaError unless it succeeded with all of them."""
    data = parse_action_response(text) if status == 200 else None
    values = [data.get(field) for field in fields] if data is not None else []
    if values and all(isinstance(v, str) and v for v in values):
        return [str(v) for v in values]
    answer = "without " + " and ".join(fields) if status == 200 else str(status)
    raise ArenaError("upload_failed", f"LM Arena's {name} answered {answer}")


class ArenaSite:
    """LM Arena's site over HTTP, with curl_cffi imitating a browser's TLS and HTTP/2 fingerprint: its
    origin (and a move to another), the headers and cookies of a request, discovery of the site's
    parameters, Cloudflare clearance and reCAPTCHA tokens from the sidecar, and server actions."""

    def __init__(self, settings: Settings, store: Store, sidecar: SidecarClient,
                 on_mint: Callable[[bool], None] | None = None):
        self.settings = settings
        self.store = store
        self.sidecar = sidecar
        self.on_mint = on_mint or (lambda worked: None)     # told how each token mint went (the metrics)
        self.params: dict[str, Any] = store.site_params()
        self.origin = current_origin(settings, store)
        self.http = UpstreamSession(impersonate=settings.impersonate, max_clients=2048)
        self.discovery_lock = asyncio.Lock()
        self.clearance: asyncio.Task | None = None      # the clearance in flight, shared by every request
        self.last_discovery = 0.0
        self.last_live_lookup, self.live_asked = 0.0, False     # live_asked: since the last discovery (U8)
        # An explicit --arena-mode wins at start; the mode learned from a refusal is only the default.
        self.mode: str = settings.arena_mode or self.params.get("arena_mode") or DEFAULT_ARENA_MODE
        self.closing: set[asyncio.Task] = set()     # finished replies' transfers given their grace (close)

    async def aclose(self) -> None:
        for task in list(self.closing):
            task.cancel()       # close_streamed's clean-up still ends the transfer
        await asyncio.gather(*self.closing, return_exceptions=True)
        await self.http.close()

    async def close(self, response: Any, grace: float = 0.0) -> None:
        """Close a chat answer, from either path (in the page, or from here): at once, or, for a finished
        reply, after up to `grace` seconds for its transfer to end by itself (its connection is then kept).
        That wait runs in the background: the client's answer is complete, and lane B of a battle turn may
        stream on after model A's finish (the real capture's `bd:` comes after `ad:`)."""
        if isinstance(response, BrowserResponse):
            await response.aclose()
        elif grace:
            task = asyncio.ensure_future(close_streamed(self.http, response, grace))
            self.closing.add(task)
            task.add_done_callback(self.closing.discard)
        else:
            await close_streamed(self.http, response)

    # --- requests -----------------------------------------------------------------------------------
    def identity(self, account: dict | None) -> tuple[str, dict[str, str]]:
        """The impersonation target and identifying headers of a direct request (paired_fingerprint): the
        sidecar's browser's User-Agent first (its clearance is bound to it), then the account's."""
        user_agent = (self.params.get("clearance") or {}).get("user_agent") or (account or {}).get("user_agent")
        return paired_fingerprint(self.settings.impersonate, user_agent)

    def request_headers(self, account: dict | None, *, referer: str = "/?mode=direct",
                        content_type: str | None = "text/plain;charset=UTF-8", accept: str = "*/*") -> dict:
        # Clearance the sidecar earned goes last: it is bound to the browser's User-Agent sent with it, while
        # Cloudflare cookies that came with an account (pasted, or from its sign-up) may be stale by now.
        clearance = self.params.get("clearance") or {}
        cookies: dict[str, str] = {}
        if account is not None:
            cookies.update(json.loads(account.get("cookies") or "{}"))
            cookies.update(Session.of(account).cookies())
        cookies.update(clearance.get("cookies") or {})
        headers = {"Accept": accept, "Origin": self.origin, "Referer": self.origin + referer,
                   "Accept-Language": "en-US,en;q=0.9", "Sec-Fetch-Dest": "empty", "Sec-Fetch-Mode": "cors",
                   "Sec-Fetch-Site": "same-origin"}
        if content_type:
            headers["Content-Type"] = content_type
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        headers.update(self.identity(account)[1])
        return headers

    async def get(self, path: str, account: dict | None = None, timeout: float = 20.0) -> Any:
        for _ in range(2):
            try:
                response = await traced(self.http.get(self.origin + path, headers=self.request_headers(
                    account, content_type=None, accept="text/html,application/xhtml+xml,*/*"),
                    impersonate=self.identity(account)[0], timeout=timeout, discard_cookies=True,
                    allow_redirects=False), "GET", path, account)
            except Exception as exc:  # noqa: BLE001 - any network failure is one answer: unreachable
                raise unreachable(exc) from None
            if response.status_code not in (301, 308) or not await self.follow_move(path, response.headers.get("location")):
                break
        return response

    async def post_stream(self, path: str, body: dict, account: dict, deadline: float) -> Any:
        """The chat request sent from here, once its answer began. In this task (asyncio.timeout, not
        wait_for's task of its own), so that a timeout or a client that leaves stops the transfer too."""
        try:
            async with asyncio.timeout(max(0.1, deadline - now())):
                try:
                    return await traced(self.http.post(
                        self.origin + path, data=json_text(body).encode(),
                        headers=self.request_headers(account), impersonate=self.identity(account)[0], stream=True,
                        timeout=None, discard_cookies=True, allow_redirects=False), "POST", path, account)
                except asyncio.CancelledError:
                    self.http.stop_transfers(asyncio.current_task())
                    raise
        except TimeoutError:
            raise ArenaError("upstream_timeout", "LM Arena did not answer in time") from None
        except Exception as exc:  # noqa: BLE001 - any network failure is one answer: unreachable
            raise unreachable(exc) from None

    async def post_in_page(self, path: str, body: dict, account: dict, action: str,
                           deadline: float) -> BrowserResponse:
        """The chat request run by the sidecar's page with its own fetch, token minted in that page."""
        # Only the session: the page keeps its own Cloudflare cookies, which match its User-Agent.
        request = {"url": self.origin + path, "method": "POST", "body": json.dumps(body, ensure_ascii=False),
                   "headers": {"Content-Type": "text/plain;charset=UTF-8"}, "cookies": Session.of(account).cookies(),
                   "action": action, "sitekey": await self.mint_sitekey()}
        return await traced(BrowserResponse(self.sidecar.fetch_stream(request)).opened(deadline), "POST", path,
                            account, " (in the sidecar's page)")

    async def post_by_executor(self, executors: BrowserExecutors, path: str, body: dict, account: dict, action: str,
                               deadline: float) -> BrowserResponse:
        """The chat request run in the user's own page by its browser executor: a path on the page's origin
        (the page agent refuses any other), the token minted in that page; the session stays in the browser."""
        request = {"url": path, "method": "POST", "body": json.dumps(body, ensure_ascii=False),
                   "headers": {"Content-Type": "text/plain;charset=UTF-8"},
                   "recaptcha": {"action": action, "sitekey": self.sitekey}}
        return await traced(BrowserResponse(executors.run(account["id"], request)).opened(deadline), "POST", path,
                            account, " (in the user's browser)")

    def moves_to(self, path: str, location: str | None) -> str | None:
        """The new origin when a redirect of `path` points at the same path elsewhere."""
        return moved_origin(self.origin + path, self.origin, location)

    async def follow_move(self, path: str, location: str | None) -> bool:
        """Switch to the site's new origin (kept across restarts). Cookies and clearance of the old host
        are not valid there, so clearance is dropped; a POST is re-sent by the caller, never replayed as
        a GET by the HTTP library."""
        new = self.moves_to(path, location)
        if new is None:
            return False
        log.warning("LM Arena moved from %s to %s; following", self.origin, new)
        self.origin = new
        self.store.set_site_params(moved_origin={"from": self.settings.arena_url, "to": new}, clearance={})
        self.params = self.store.site_params()
        await self.sidecar.move_to(new)
        return True

    # --- site discovery -----------------------------------------------------------------------------
    async def discover(self, min_age: float = 30.0, may_start_browser: bool = True) -> dict[str, Any]:
        """Fetch the page and its JS chunks; store the model list and site parameters. One at a time, and
        not again within `min_age` seconds, so that a burst of failures cannot become a burst of page
        loads. Behind a Cloudflare challenge the sidecar is asked for clearance, unless the caller is a
        route that must never start a browser (the model list)."""
        async with self.discovery_lock:
            if now() - self.last_discovery < min_age:
                return self.params
            self.last_discovery = now()
            page = await self.model_page(may_start_browser)
            self.learn(page.text, await self.scripts(extract_chunk_urls(page.text)))
            return self.params

    async def model_page(self, may_start_browser: bool) -> Any:
        """The first page of MODEL_PAGES that embeds the model list (U10), else the last one loaded. A page
        that fails ends the discovery: the next page would not be served by a site that is down."""
        for path in MODEL_PAGES:
            page = await self.get(path)
            if is_cloudflare_challenge(page.status_code, dict(page.headers), page.text) and may_start_browser:
                await self.clear_cloudflare()
                page = await self.get(path)
            if page.status_code != 200:
                raise ArenaError("discovery_failed", f"LM Arena page answered {page.status_code}")
            if extract_models(page.text) is not None:
                break
        return page

    def learn(self, page: str, scripts: list[str]) -> dict[str, Any]:
        """Store what the page and its scripts say: the model list and the site parameters found."""
        found = discover_site(page, scripts)
        self.live_asked = False
        models = found.pop("models", None)
        if models:
            self.store.replace_models(models)
        self.store.set_site_params(**found, recaptcha_seen=names_recaptcha(page, scripts, found))
        self.params = self.store.site_params()
        log.info("discovered LM Arena: %d models, sitekey %s, %d server actions",
                 len(models or []), "found" if found.get("sitekey") else "not found",
                 len(found.get("server_actions") or {}))
        return found

    async def scripts(self, paths: list[str]) -> list[str]:
        """The JS chunks' text, eight at a time; a chunk that fails to load reads as empty."""
        semaphore = asyncio.Semaphore(8)

        async def fetch(path: str) -> str:
            async with semaphore:
                with contextlib.suppress(Exception):
                    response = await self.get(path)
                    if response.status_code == 200:
                        return response.text
            return ""

        return list(await asyncio.gather(*(fetch(p) for p in paths)))

    def arena_mode(self) -> str:
        return self.mode

    def learn_path(self, said: str) -> None:
        """Keep (across restarts) what the site did with a direct chat, for REQUEST_PATHS: "page" when it refused
        its token (it binds tokens to the page that minted them, U1), "direct" when it served it."""
        if self.params.get("request_path") != said:
            self.store.set_site_params(request_path=said)
            self.params["request_path"] = said
            log.warning("LM Arena %s a chat sent straight from the bridge", PATH_LEARNT[said])

    def switch_mode(self) -> None:
        """LM Arena refused the mode: new conversations use the other one from now on, and later starts
        without an explicit --arena-mode too."""
        self.mode = OTHER_MODE.get(self.mode, "direct")
        self.store.set_site_params(arena_mode=self.mode)
        log.info("LM Arena refused the mode; switching to %s", self.mode)

    # --- anti-bot -----------------------------------------------------------------------------------
    @property
    def sitekey(self) -> str:
        return self.params.get("sitekey") or FALLBACK_SITEKEY

    @property
    def recaptcha_action(self) -> str:
        return self.params.get("recaptcha_action") or "chat_submit"

    async def mint_sitekey(self) -> str:
        """Discovery's sitekey; when no text named one, the sidecar page's (asked once per discovery, U8)."""
        if "sitekey" not in self.params and not self.live_asked:
            self.live_asked = True
            await self.live_sitekey()
        return self.sitekey

    async def live_sitekey(self, refused: str | None = None, min_age: float = 2.0) -> bool:
        """Read the sitekey from the sidecar page's live reCAPTCHA configuration (U8), for when no text of
        the site names it or the site refused tokens for the key the text names (`refused`). One lookup at
        a time, not again within `min_age` seconds. True when a key other than `refused` is known now."""
        async with self.discovery_lock:
            if self.settings.sidecar != "off" and now() - self.last_live_lookup >= min_age:
                self.last_live_lookup = now()
                keys = await self.sidecar.sitekeys()
                # A page still running with the refused key says the key is fine: the site refused the account.
                if keys and refused not in keys and keys[0] != self.params.get("sitekey"):
                    log.info("reCAPTCHA sitekey taken from the page's live configuration")
                    self.store.set_site_params(sitekey=keys[0])
                    self.params = self.store.site_params()
        return self.params.get("sitekey") not in (None, refused)

    async def recaptcha_token(self, action: str) -> str | None:
        """A fresh v3 token from the sidecar, or None when the sidecar is off (the request then goes
        without one and the site decides), or when the site names no reCAPTCHA at all."""
        if self.settings.sidecar == "off" or self.params.get("recaptcha_seen") is False:
            return None
        try:
            token = await self.sidecar.token(await self.mint_sitekey(), action)
        except SidecarError:
            self.on_mint(False)
            raise
        self.on_mint(True)
        return token

    async def clear_cloudflare(self) -> None:
        """Single-flight: requests challenged while a clearance runs wait for it and share its cookies,
        instead of each running its own in the browser, one after another. Shielded: a waiter that is
        cancelled (its client left) does not cancel the clearance the others wait for."""
        if self.clearance is None or self.clearance.done():
            self.clearance = asyncio.create_task(self._clear_cloudflare())
        await asyncio.shield(self.clearance)

    async def _clear_cloudflare(self) -> None:
        cookies, user_agent = await self.sidecar.clearance()
        self.store.set_site_params(clearance={"cookies": cookies, "user_agent": user_agent})
        self.params = self.store.site_params()

    # --- battle turns (U3) -----------------------------------------------------------------------------
    async def skip_battle(self, account: dict, evaluation_id: str, lane_a: str, lane_b: str) -> bool:
        """Skip the battle turn the site made of a direct-battle reply, keeping lane A in the history
        (arena-protocol §0 U3). No token is needed. False when the site refused: the evaluation then stays
        broken and the next follow-up starts over (POLICY's battle_pending)."""
        headers = self.request_headers(account, content_type="application/json")
        try:
            path = f"/nextjs-api/stream/skip-direct-battle/{evaluation_id}"
            response = await traced(self.http.post(
                self.origin + path, headers=headers, impersonate=self.identity(account)[0],
                data=json.dumps({"messageAId": lane_a, "messageBId": lane_b, "modelAMessageId": lane_a,
                                 "modelBMessageId": lane_b}), timeout=20, discard_cookies=True,
                allow_redirects=False), "POST", path, account)
        except Exception as exc:  # noqa: BLE001 - any network failure: the battle turn stays unanswered
            log.warning("skipping the battle turn of %s failed (%s)", evaluation_id, type(exc).__name__)
            return False
        if response.status_code != 200:
            log.warning("LM Arena refused to skip the battle turn of %s: %s %s", evaluation_id,
                        response.status_code, error_text(response.text))
        return response.status_code == 200

    # --- server actions (arena-protocol §11) --------------------------------------------------------
    async def server_action(self, account: dict, name: str, args: list, fields: tuple[str, ...]) -> list[str]:
        """POST a Next.js server action and return the string `fields` of its data; on an unknown id,
        rediscover the ids once and try again."""
        refused_at: float | None = None
        for _ in range(2):
            action_id = await self.action_id(name, refused_at)
            headers = self.request_headers(account, referer="/", accept="text/x-component")
            headers["Next-Action"] = action_id
            sent = now()
            try:
                response = await traced(self.http.post(self.origin + "/?mode=direct", data=json.dumps(args),
                                                       headers=headers, impersonate=self.identity(account)[0],
                                                       timeout=30, discard_cookies=True, allow_redirects=False),
                                        "POST", "/", account, f" (server action {name})")
            except Exception as exc:  # noqa: BLE001 - any network failure is one answer: unreachable
                raise ArenaError("upload_failed", f"LM Arena's {name} could not be reached ({type(exc).__name__})") \
                    from None
            if response.status_code != 404:
                return action_values(response.status_code, response.text, name, fields)
            refused_at = sent
        raise ArenaError("site_changed", f"LM Arena's {name} server action id is stale even after rediscovery")

    async def action_id(self, name: str, refused_at: float | None) -> str:
        action_id = (self.params.get("server_actions") or {}).get(name)
        if not action_id or refused_at is not None:
            # Only a discovery that began after the refused call can know the new id; one that did is
            # reused, so that the uploads in flight during a deployment share one page load.
            await self.discover(min_age=now() - refused_at if refused_at is not None else 2.0)
            action_id = (self.params.get("server_actions") or {}).get(name)
        if not action_id:
            raise ArenaError("site_changed", f"LM Arena's {name} server action was not found on the site")
        return action_id


# =====================================================================================================
# Uploads
# =====================================================================================================

SIGNED_URL_LIFETIME = 3600.0      # when a signed URL does not say (arena-protocol §12.1)
UPLOAD_EXPIRY_MARGIN = 600.0      # a reused attachment must stay readable while the site answers with it


async def retry_once(step: Callable[[], Any], what: str) -> Any:
    """Run one upload step, and once more if it fails: server actions and storage fail transiently, and
    repeating one step is cheaper than starting the upload over."""
    try:
        return await step()
    except ArenaError as error:
        log.info("%s failed (%s); retrying once", what, error.message)
        return await step()


def signed_url_expiry(url: str) -> float | None:
    """When a presigned URL stops working: X-Amz-Date + X-Amz-Expires (arena-protocol §12.1)."""
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    with contextlib.suppress(KeyError, ValueError):
        return calendar.timegm(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")) + int(query["X-Amz-Expires"])
    return None


class Uploader:
    """Images to LM Arena's storage for a chat turn (arena-protocol §12.1), uploaded with the turn's own
    account (the site shows an attachment only to the user who uploaded it), reused while their signed
    URLs stay valid."""

    def __init__(self, store: Store, site: ArenaSite):
        self.store = store
        self.site = site

    async def attachments(self, account: dict, images: list[ImageInput]) -> list[dict]:
        """Attachments for a chat turn. An image this account uploaded before is reused until shortly
        before its signed URL expires, so that a client resending the same image (a regenerate, a
        repeated question) does not upload it again."""
        attachments = []
        for image in images:
            cache_key = f"{account['id']}:{image.digest}"
            attachment = self.store.cached_upload(cache_key)
            if attachment is None:
                attachment = await self.upload_image(account, image)
                expires = signed_url_expiry(attachment["url"]) or now() + SIGNED_URL_LIFETIME
                self.store.remember_upload(cache_key, account["id"], attachment, expires - UPLOAD_EXPIRY_MARGIN)
            attachments.append(attachment)
        return attachments

    async def upload_image(self, account: dict, image: ImageInput) -> dict:
        """generateUploadUrl -> PUT -> getSignedUrl, with the chat request's own account: the site shows
        an attachment only to the user who uploaded it."""
        extension = image.mime.split("/")[1].replace("jpeg", "jpg")
        filename = f"upload-{image.digest[:12]}.{extension}"
        upload_url, key = await retry_once(lambda: self.site.server_action(
            account, "generateUploadUrl", [filename, image.mime], ("uploadUrl", "key")), "generateUploadUrl")
        await retry_once(lambda: self.put_upload(upload_url, image), "the image PUT")
        (url,) = await retry_once(lambda: self.site.server_action(
            account, "getSignedUrl", [key], ("url",)), "getSignedUrl")
        return {"name": key, "contentType": image.mime, "url": url}

    async def put_upload(self, upload_url: str, image: ImageInput) -> None:
        try:
            put = await traced(self.site.http.put(upload_url, data=image.data, headers={"Content-Type": image.mime},
                                                  timeout=60, discard_cookies=True), "PUT", upload_url, None)
        except Exception as exc:  # noqa: BLE001 - any network failure is one answer: the upload failed
            raise ArenaError("upload_failed", f"the image upload to LM Arena's storage failed "
                                              f"({type(exc).__name__})") from None
        if put.status_code not in (200, 201, 204):
            raise ArenaError("upload_failed", f"LM Arena's storage answered {put.status_code} to the image upload")


# =====================================================================================================
# Account pool
# =====================================================================================================

RECAPTCHA_COOLDOWN = (20 * 60.0, 2 * 3600.0)   # first cool-down, cap; doubles per consecutive failure
RATE_LIMIT_COOLDOWN = 60.0                      # when a 429 names no wait
NEEDS_LOGIN = "needs_login"                     # the account state of a guest behind the login gate (U4)
NEEDS_LOGIN_HELP = ("LM Arena requires a signed-in account for direct chat (LOGIN_GATE), and this bridge has "
                    "only guest accounts. Sign in at arena.ai in a browser, copy its arena-auth-prod-v1 cookie "
                    "and add it with `python bridge.py tokens add VALUE` or on the dashboard's Accounts page.")
ACCOUNT_STATE_LABELS = {NEEDS_LOGIN: "needs a signed-in account", "cooling_down": "cooling down"}
DIRECT_RETRY_AFTER = 86400.0     # an account the site refused tries the direct path again after this (only with
                                 # BRIDGE_REQUEST_PATH=direct): each try that fails costs a penalty (U1, U2)


def account_state(account: dict, at: float | None = None) -> str:
    """The state a request sees: a finished cool-down reads as ok."""
    at = at or now()
    if account["state"] == "cooling_down" and (account["cooldown_until"] or 0) <= at:
        return "ok"
    return account["state"]


QUEUE_POLLS = (0.05, 0.5)       # seconds between looks of a queued request: the first one's at the store, the others'


def is_usable(account: dict, at: float | None = None) -> bool:
    """Can serve now. An account being refreshed counts: its requests wait for the refresh to finish."""
    return account_state(account, at) in ("ok", "refreshing")


class AccountPool:
    """The LM Arena accounts: which one serves a request (least recently used, paced), cool-downs, the
    path each needs (direct or in the browser), session refresh, anonymous sign-up, and keeping a session
    the site rotated while answering."""

    def __init__(self, settings: Settings, store: Store, site: ArenaSite, sidecar: SidecarClient):
        self.settings = settings
        self.store = store
        self.site = site
        self.sidecar = sidecar
        self.refresh_locks: dict[int, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.signup_lock = asyncio.Lock()
        # Accounts taken for a chat request (chosen, their session maybe refreshing, or the request sent)
        # whose answer's status is not yet in. A burst waits for them rather than sending a second request
        # on one account before the first says whether it is refused: on the late-2026 site each refused
        # attempt extends the account's penalty (U2).
        self.asking: set[int] = set()
        # The requests queued meanwhile, in order, each woken by an answer, one at a time. A poll alone left
        # a freed account idle for up to its interval, and each of a burst's requests polling the store 20
        # times a second cost more than relaying its reply: only the first in the queue polls (for pacing
        # and cool-downs, which end by time, not by an answer).
        self.queued: collections.deque[asyncio.Event] = collections.deque()

    # --- requests queued while accounts are asking ---------------------------------------------------
    def answered(self, account_id: int) -> None:
        """The account's answer is in: it asks no more, and the first request queued tries again (one, not
        all: the account serves one of them; one it cannot serve finds another on its next poll)."""
        self.asking.discard(account_id)
        self.wake_first()

    def wake_first(self) -> None:
        place = next((place for place in self.queued if not place.is_set()), None)
        if place is not None:
            place.set()

    def join_queue(self) -> asyncio.Event:
        place = asyncio.Event()
        self.queued.append(place)
        return place

    def leave_queue(self, place: asyncio.Event, served: bool) -> None:
        """Out of the queue; an answer that woke a request which leaves unserved wakes the next one."""
        self.queued.remove(place)
        if place.is_set() and not served:
            self.wake_first()

    async def wait_in_queue(self, place: asyncio.Event, until: float) -> None:
        """Until an answer wakes this place, or its poll of the store is due (not after `until`): soon for
        the first in the queue, while the others only look every QUEUE_POLLS[1] whether they are first. A
        place stays woken until it waits again, so that no answer is given to it meanwhile."""
        place.clear()
        while not place.is_set() and now() < until:
            first = self.queued[0] is place
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(QUEUE_POLLS[not first], until - now())):
                    await place.wait()
            if first:
                break

    # --- choice and pacing --------------------------------------------------------------------------
    def usable(self, exclude: set[int], modality: str = "chat") -> list[dict]:
        at = now()
        quotas, sent = self.store.quotas(at), self.sent_requests()
        return [a for a in self.store.accounts() if a["id"] not in exclude and is_usable(a, at)
                and (a["id"], modality) not in quotas and not self.budget_wait(a, sent)
                and at - (a["last_used"] or 0) >= self.settings.account_min_interval]

    def sent_requests(self) -> dict[int, collections.deque[float]]:
        """The store's chat requests per account when there is a budget to read them for (a query: read it
        once for all the accounts of one choice); none without one."""
        return self.store.sent_requests() if self.settings.account_rph > 0 else {}

    def budget_wait(self, account: dict, sent: dict[int, collections.deque[float]] | None = None) -> float:
        """Seconds until the account's hourly budget (BRIDGE_ACCOUNT_RPH, U2: 10-20 an hour reported) allows
        another chat request (0: it does now). The requests it sent are in the store (`sent`: read already):
        a restart forgives none."""
        rph = self.settings.account_rph
        if rph <= 0:
            return 0.0
        times = (self.store.sent_requests() if sent is None else sent).get(account["id"]) or ()
        # It has sent rph in the window when its rph-th latest is in it: the wait is until that one leaves.
        return max(0.0, BUDGET_WINDOW - (now() - times[-rph])) if len(times) >= rph else 0.0

    def spend(self, account: dict) -> None:
        """One chat request is sent on the account: it counts against its hourly budget."""
        if self.settings.account_rph > 0:
            self.store.record_request(account["id"])

    def soonest_budget(self, exclude: set[int]) -> float | None:
        """Seconds until the first account held back only by its budget may send; None: no account is."""
        if self.settings.account_rph <= 0:
            return None
        at, sent = now(), self.sent_requests()
        waits = [self.budget_wait(a, sent) for a in self.store.accounts() if a["id"] not in exclude and is_usable(a, at)]
        waits = [w for w in waits if w > 0]
        return min(waits) if waits else None

    def pick(self, exclude: set[int], modality: str = "chat") -> dict | None:
        """The least recently used account that can serve now and is not asking already."""
        usable = [a for a in self.usable(exclude, modality) if a["id"] not in self.asking]
        if not usable:
            return None
        at = now()
        account = min(usable, key=lambda a: a["last_used"] or 0)
        self.store.update_account(account["id"], last_used=at)
        return account

    async def account_for(self, followup: dict | None, excluded: set[int], modality: str = "chat") -> dict | None:
        """The account that owns the held conversation (the site refuses follow-ups from another), or
        any usable account for a new one, with a session that is not about to expire."""
        account = await self.first_choice(followup, excluded, modality)
        if account is not None and followup is not None:
            return await self.fresh(account)
        while account is not None:
            fresh = await self.taken_fresh(account)
            if fresh is not None:
                return fresh
            excluded.add(account["id"])
            account = self.pick(excluded, modality)
        return None

    async def taken_fresh(self, account: dict) -> dict | None:
        """`fresh` for a new conversation's account, which counts as asking from now on (the caller's attempt
        ends that: `answered`): a refresh awaits LM Arena, and a request that picked the account meanwhile
        would send beside it, past its hourly budget (BRIDGE_ACCOUNT_MIN_INTERVAL is 0 by default)."""
        self.asking.add(account["id"])
        fresh = None
        try:
            fresh = await self.fresh(account)
        finally:
            if fresh is None:
                self.answered(account["id"])
        return fresh

    async def first_choice(self, followup: dict | None, excluded: set[int], modality: str) -> dict | None:
        if followup is not None:
            account = self.store.account(followup["account_id"])
            usable = account is not None and account["id"] not in excluded and is_usable(account) \
                and (account["id"], modality) not in self.store.quotas(now()) and not self.budget_wait(account)
            return account if usable else None
        account = self.pick(excluded, modality)
        if account is None and not excluded and self.may_sign_up():
            account = await self.sign_up_anonymous()
        return account

    def unavailable(self, last: ArenaError | None = None, modality: str = "chat") -> ArenaError:
        """Why no account can serve, with the soonest recovery as Retry-After, and what LM Arena said last."""
        error = self.quota_used_up(modality) or self._unavailable()
        if last is not None:
            error.message += f" Last answer from LM Arena: {last.message}"
            error.cause = last.kind
        return error

    def soonest_recovery(self, accounts: list[dict], at: float) -> float | None:
        """Seconds until the first account cools down or its pacing allows a request; None: none will."""
        waits = [a["cooldown_until"] - at for a in accounts if account_state(a, at) == "cooling_down"]
        paced = [self.settings.account_min_interval - (at - (a["last_used"] or 0)) for a in accounts
                 if is_usable(a, at)]
        waits += [w for w in paced if w > 0]
        return max(1.0, min(waits)) if waits else None

    def quota_used_up(self, modality: str) -> ArenaError | None:
        """When the accounts that could serve have all used up this modality's quota: until the first
        resets (the request is answered without asking LM Arena)."""
        at = now()
        quotas = self.store.quotas(at)
        able = [a for a in self.store.accounts() if is_usable(a, at)]
        resets = [quotas[(a["id"], modality)] - at for a in able if (a["id"], modality) in quotas]
        if not able or len(resets) < len(able):
            return None
        return ArenaError("quota_exhausted", f"LM Arena's {modality} quota is used up on every account; the first "
                                             f"resets in {int(min(resets))} s. Other chats keep working.",
                          retry_after=min(resets))

    def _unavailable(self) -> ArenaError:
        accounts = self.store.accounts()
        if not accounts:
            return ArenaError("no_account", "No LM Arena account is configured. Add one in the dashboard or "
                                            "with `python bridge.py tokens add VALUE`.")
        paced = self.soonest_budget(set())
        if paced is not None:
            return ArenaError("accounts_paced", f"Every usable LM Arena account has sent its "
                                                f"{self.settings.account_rph} chat requests of the last hour "
                                                f"(BRIDGE_ACCOUNT_RPH); the first may send again in {int(paced) + 1} s. "
                                                f"Add accounts to serve more, or raise the budget at your accounts' "
                                                f"risk (LM Arena penalises accounts that send faster).",
                              retry_after=paced)
        wait = self.soonest_recovery(accounts, now())
        if wait is not None:
            return ArenaError("accounts_cooling_down", f"Every LM Arena account is cooling down; the first is "
                                                       f"usable again in {int(wait)} s.", retry_after=wait)
        if any(a["state"] == NEEDS_LOGIN for a in accounts):
            return ArenaError("needs_signed_in_account", NEEDS_LOGIN_HELP)
        return ArenaError("no_usable_account",
                          "No LM Arena account is usable (all expired or invalid); add a fresh one.")

    # --- cool-downs and paths -----------------------------------------------------------------------
    def cool_down(self, account: dict, seconds: float, reason: str) -> None:
        self.store.update_account(account["id"], state="cooling_down", cooldown_until=now() + seconds,
                                  cooldown_reason=reason, last_error=reason)
        log.warning("account %s cooling down for %d s: %s", account["id"], seconds, reason)

    def back_off(self, account: dict, reason: str) -> None:
        """A cool-down that doubles with each consecutive failure, up to a cap."""
        first, cap = RECAPTCHA_COOLDOWN
        failures = account.get("failures") or 0
        self.store.update_account(account["id"], failures=failures + 1)
        self.cool_down(account, min(cap, first * 2 ** failures), reason)

    def use_up_quota(self, account: dict, modality: str, seconds: float) -> None:
        """The account's quota of one modality is used up: only that modality waits for its reset (U7)."""
        self.store.set_quota(account["id"], modality, now() + seconds, f"{modality} quota used up")
        log.warning("account %s: LM Arena's %s quota is used up for %d s", account["id"], modality, seconds)

    def expire(self, account: dict, reason: str) -> None:
        self.store.update_account(account["id"], state="expired", last_error=reason)

    def needs_login(self, account: dict) -> None:
        """A guest the site's login gate stops (U4): it stays so until the user replaces it; never refreshed,
        never a reason to sign up another guest (who would be gated too)."""
        self.store.update_account(account["id"], state=NEEDS_LOGIN, last_error=NEEDS_LOGIN_HELP)
        log.warning("account %s is a guest and LM Arena requires a signed-in account (LOGIN_GATE)", account["id"])

    def expire_dead(self, account_id: int, said: str) -> None:
        """LM Arena no longer knows the account (`User not found`, U9): no refresh can bring it back."""
        self.store.update_account(account_id, state="invalid", last_error=f"LM Arena does not know this account "
                                                                         f"any more ({said}); add a fresh one")
        log.warning("account %s is dead: LM Arena answered %s", account_id, said)

    def refused_direct(self, account: dict) -> None:
        """The site refused this account's direct attempt: its chats go through the page, and the direct path
        is tried again at most once a day (in_browser_mode), each try costing a penalty when it fails (U2)."""
        self.store.update_account(account["id"], needs_browser=1, direct_retry_at=now() + DIRECT_RETRY_AFTER)

    def served(self, account: dict, in_page: bool) -> None:
        """The account was served: its failures are over; a direct success also ends its browser mode."""
        if account["failures"] or account["last_error"] or (account["needs_browser"] and not in_page):
            # Only when something changes: this runs on every successful request.
            self.store.update_account(account["id"], failures=0, last_error=None,
                                      needs_browser=account["needs_browser"] if in_page else 0)

    # --- refresh ------------------------------------------------------------------------------------
    async def fresh(self, account: dict) -> dict | None:
        """The account with a session that is not about to expire, refreshing it when needed."""
        if not Session.of(account).expired():
            return account
        return await self.refresh(account)

    async def refresh(self, account: dict) -> dict | None:
        """Refresh one account's session: the page's Set-Cookie first, then the Supabase refresh grant.

        Refreshes of one account are serialised, and the result is stored with compare-and-swap, so two
        requests racing here end with the newest session stored and both using it."""
        async with self.refresh_locks[account["id"]]:
            current = self.store.account(account["id"])
            if current is None:
                return None
            if current["auth"] != account["auth"] and not Session.of(current).expired():
                return current
            # A cool-down outlives a refresh: the site's verdict was about the account, not its session.
            after = "cooling_down" if account_state(current) == "cooling_down" else "ok"
            self.store.update_account(current["id"], state="refreshing")
            try:
                fresh = await self.refresh_by_page(current) or await self.refresh_by_grant(current)
            except BaseException:           # cancelled (the client left): the next request tries again
                self.store.update_account(current["id"], state=current["state"])
                raise
            if fresh is None:
                self.store.update_account(current["id"], state="expired",
                                          last_error="session expired and could not be refreshed")
                log.warning("account %s expired: refresh failed", current["id"])
                return None
            if self.store.swap_account_auth(current["id"], current["auth"], auth=fresh.value, form=fresh.form,
                                            expires_at=fresh.expiry, state=after, last_error=None):
                log.info("account %s refreshed", current["id"])
            else:   # another writer stored a newer session meanwhile: keep it, and end the refresh all the same
                self.store.write("UPDATE accounts SET state = ? WHERE id = ? AND state = 'refreshing'",
                                 [after, current["id"]])
            return self.store.account(current["id"])

    async def refresh_by_page(self, account: dict) -> Session | None:
        if Session.of(account).data is None:
            return None
        with contextlib.suppress(Exception):
            response = await self.site.get("/", account)
            return Session.in_set_cookie(response.headers.get_list("set-cookie"))
        return None

    async def refresh_by_grant(self, account: dict) -> Session | None:
        session = Session.of(account)
        data = session.data
        anon_key = self.site.params.get("anon_key")
        if data is None or not data.get("refresh_token") or not anon_key:
            return None
        issuer = session.claims.get("iss")
        if not issuer:
            return None
        try:
            url = issuer.rstrip("/") + "/token?grant_type=refresh_token"
            response = await traced(self.site.http.post(
                url, headers={"apikey": anon_key, "Authorization": f"Bearer {anon_key}",
                              "Content-Type": "application/json", "Accept": "application/json"},
                data=json.dumps({"refresh_token": data["refresh_token"]}), timeout=20, discard_cookies=True),
                "POST", url, account)
            if response.status_code != 200:
                log.warning("refresh grant answered %s", response.status_code)
                return None
            return session.refreshed(response.json())
        except Exception as exc:  # noqa: BLE001 - network or JSON failure: the account is simply not refreshed
            log.warning("refresh grant failed: %s", type(exc).__name__)
            return None

    async def adopt(self, account_id: int, fresh: Session | None) -> None:
        """Keep a session the site rotated while answering (Set-Cookie on the reply, or the page's cookie
        jar after an in-page fetch): Supabase refresh tokens are single-use, so a rotation the bridge did
        not store would leave it holding a session that can no longer be refreshed."""
        account = self.store.account(account_id) if fresh else None
        if fresh is None or account is None:
            return
        held = Session.of(account)
        # The page's jar is shared by every account's in-page requests: only this account's user counts.
        rotated = fresh.value != held.value and fresh.owner == held.owner and (fresh.expiry or 0) >= (held.expiry or 0)
        if rotated and self.store.swap_account_auth(account["id"], account["auth"], auth=fresh.value,
                                                    form=fresh.form, expires_at=fresh.expiry):
            log.info("account %s: kept the session LM Arena rotated while answering", account["id"])

    # --- sign-up ------------------------------------------------------------------------------------
    def may_sign_up(self) -> bool:
        """Only with zero setup or when every account has expired; never while some merely cool down."""
        if self.settings.anonymous == "off" or self.settings.sidecar == "off":
            return False
        return all(a["state"] in ("expired", "invalid") for a in self.store.accounts())

    async def sign_up_anonymous(self) -> dict | None:
        """Create an anonymous LM Arena account through the sidecar, as the site does for a new visitor.

        At most one attempt per signup_interval, remembered in SQLite so that neither failures nor
        restarts can turn into a sign-up loop."""
        async with self.signup_lock:
            last = float(self.store.meta("last_signup_attempt") or 0)
            wait = last + self.settings.signup_interval - now()
            if wait > 0:
                raise ArenaError("no_account", f"No LM Arena account is usable and the last anonymous sign-up "
                                               f"was recent; the next is allowed in {int(wait)} s. Add an account "
                                               f"with `python bridge.py tokens add VALUE`.", retry_after=wait)
            self.store.set_meta("last_signup_attempt", str(now()))
            log.info("no usable LM Arena account: signing up anonymously through the browser sidecar")
            try:
                result = await self.sidecar.signup(self.site.params.get("turnstile_sitekey") or FALLBACK_TURNSTILE_SITEKEY,
                                                   await self.site.mint_sitekey())
                found = Session.from_signup(result.get("cookies") or {}, result.get("text"))
                parsed = parse_account_input(found.value)
            except (SidecarError, ValueError) as exc:
                raise ArenaError("signup_failed", f"Could not create an anonymous LM Arena account: {exc}",
                                 retry_after=self.settings.signup_interval) from None
            cookies = {k: v for k, v in (result.get("cookies") or {}).items() if k in CLEARANCE_COOKIES}
            account_id = self.store.add_account(
                label="anonymous, created automatically", kind="anonymous", auth=parsed.auth, form=parsed.form,
                cookies=json.dumps(cookies), user_agent=result.get("user_agent"),
                expires_at=Session(parsed.auth).expiry, state="ok", failures=0, last_used=0.0)
            log.info("anonymous LM Arena account %s created (sign-up bodies: %s)", account_id,
                     ", ".join(result.get("bodies") or ()))
            return self.store.account(account_id)


# =====================================================================================================
# Turn runner
# =====================================================================================================

LOOP_SLICE = 0.005      # seconds a reply's buffered chunks are folded before other tasks get the loop

ACCOUNT_QUEUE_WAIT = 30.0         # how long a request waits for an account that is busy asking (U2)
BUDGET_QUEUE_WAIT = 5.0           # a request waits for an account's hourly budget only when it frees this soon
FINISHED_GRACE = 2.0              # how long a finished reply's transfer may take to end before it is cut
DEAD_CREDENTIAL_RE = re.compile(r"user not found", re.IGNORECASE)   # the site no longer knows the account (U9)


@dataclasses.dataclass
class OpenedTurn:
    response: Any
    account_id: int
    evaluation_id: str
    turns: int
    lanes: tuple[str, str | None] = ("", None)    # the message ids of lane A and lane B (U3)


@dataclasses.dataclass
class TurnPlan:
    """What to send for one chat request: a follow-up on a held evaluation when possible, else a new
    evaluation whose first message carries the history."""
    model: dict
    modality: str
    new_content: str
    images: list[ImageInput]
    followup: dict | None = None        # conversations row: evaluation_id, account_id
    followup_content: str = ""
    attempts: int = 0                   # upstream requests sent for it so far, across all retries
    dropped: int = 0                    # the earliest turns left out of new_content, to stay within the limit
    opened: OpenedTurn | None = None    # the turn that answered, once one did
    routed_model: str | None = None     # the model LM Arena's router chose, when it names one (U9)
    history: list[list[str]] | None = None  # the request's history normalised for matching (fingerprint_of)


@dataclasses.dataclass
class Tries:
    """One request's attempts so far, as the policy loop keeps them."""
    followup: dict | None
    modality: str = "chat"
    excluded: set[int] = dataclasses.field(default_factory=set)
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    last: ArenaError | None = None

    def count(self, kind: str, account_id: int) -> int:
        """How many earlier failures of `kind` in its rule's scope; counts this one."""
        key = (kind, account_id if POLICY[kind].scope == "account" else None)
        self.failures[key] += 1
        return self.failures[key] - 1


@dataclasses.dataclass
class Failure:
    """One failed attempt, as a policy step acts on it."""
    answer: Answer
    account: dict
    path: str
    in_page: bool
    tries: Tries


def check_event(event: Event) -> None:
    """An error LM Arena reports once the reply has begun ends the request."""
    if event.kind == "error":
        raise ArenaError("upstream_error", f"LM Arena error: {event.value}")
    if event.kind == "finish" and event.value == "error":
        raise ArenaError("upstream_error", "LM Arena reported an error while generating the reply")


class TurnRunner:
    """Runs chat turns on LM Arena: picks an account, uploads the images, sends the turn (a follow-up on a
    held conversation when possible), retries by the failure policy, and streams model A's events."""

    def __init__(self, settings: Settings, store: Store, site: ArenaSite, pool: AccountPool,
                 sidecar: SidecarClient, failures: FailureLog, executors: BrowserExecutors):
        self.settings = settings
        self.store = store
        self.site = site
        self.pool = pool
        self.sidecar = sidecar
        self.executors = executors
        self.uploads = Uploader(store, site)
        self.failures = failures
        self.browser_models = {m.strip() for m in settings.browser_models.split(",") if m.strip()}

    # --- a whole turn ---------------------------------------------------------------------------------
    async def events(self, plan: TurnPlan, deadline: float) -> AsyncGenerator[Event, None]:
        """Model A's events, after retries; `plan.opened` is the turn that answered. A 200 that carries no
        reply (empty body, only a finish or an error line) is retried once, in a new evaluation carrying
        the history, before anything reaches the client; all retries share one budget of upstream
        requests (arena-protocol §8). An error from LM Arena after the reply began is raised in order."""
        for retried in (False, True):
            plan.opened = await self.open(plan, deadline)
            empty_reason = "an empty reply"
            started = False
            stream = self.stream(plan.opened)
            try:
                async for event in stream:
                    if event.kind == "routed":
                        plan.routed_model = event.value
                        continue
                    if not started and event.kind in ("error", "finish"):
                        if event.kind == "error":
                            empty_reason = event.value
                        break
                    check_event(event)
                    started = started or event.kind in OUTPUT_KINDS
                    yield event
            finally:
                await stream.aclose()
            if started:
                return
            log.warning("LM Arena answered without content (%s)", empty_reason)
            if DEAD_CREDENTIAL_RE.search(str(empty_reason)):
                self.pool.expire_dead(plan.opened.account_id, str(empty_reason))
            if retried or plan.attempts >= MAX_UPSTREAM_ATTEMPTS:
                raise ArenaError("empty_reply", f"LM Arena returned no content: {empty_reason}")
            plan.followup = None

    # --- opening a turn: the policy loop ----------------------------------------------------------------
    async def open(self, plan: TurnPlan, deadline: float) -> OpenedTurn:
        """Send one chat turn, moving between accounts and retrying by POLICY, within a bounded number of
        attempts; returns once LM Arena answers 200."""
        tries = Tries(followup=plan.followup, modality=plan.modality)
        if plan.images:   # uploads go from the bridge with the account's session, which a browser account keeps
            tries.excluded.update(a["id"] for a in self.store.accounts() if a["kind"] == "browser")
        while plan.attempts < MAX_UPSTREAM_ATTEMPTS and now() < deadline:
            plan.attempts += 1
            account = await self.account(tries, deadline)
            opened = await self.attempt(plan, tries, account, deadline)
            if opened is not None:
                return opened
        if tries.last is not None and tries.excluded and not self.pool.usable(tries.excluded, tries.modality):
            raise self.pool.unavailable(tries.last, tries.modality)
        if tries.last is not None:
            raise tries.last
        raise ArenaError("upstream_timeout", "LM Arena did not answer in time")

    async def attempt(self, plan: TurnPlan, tries: Tries, account: dict, deadline: float) -> OpenedTurn | None:
        """One attempt on one account: the opened turn, or None once the policy acted on its failure. The
        account counts as asking until then (a cool-down may be on its way: pool.asking)."""
        self.pool.asking.add(account["id"])
        self.pool.spend(account)
        try:
            opened = await self.send(plan, tries, account, deadline)
            if isinstance(opened, OpenedTurn):
                return opened
            await self.handle(opened)
        except ExecutorUnavailable as gone:   # before the reply began: another account serves it
            log.info("account %s: %s; trying another account", account["id"], gone.message)
            tries.excluded.add(account["id"])
            tries.last = gone
        finally:
            self.pool.answered(account["id"])
        return None

    async def account(self, tries: Tries, deadline: float) -> dict:
        """The account for the next attempt; a follow-up whose account cannot serve starts over. While
        every usable account is asking, the request queues briefly for one (pool.asking)."""
        queued_until = min(deadline, now() + ACCOUNT_QUEUE_WAIT)
        place: asyncio.Event | None = None
        account = None
        try:
            while True:
                account = await self.pool.account_for(tries.followup, tries.excluded, tries.modality)
                if account is None and tries.followup is not None:
                    tries.followup = None
                    account = await self.pool.account_for(None, tries.excluded, tries.modality)
                if account is not None:
                    return account
                budget = self.pool.soonest_budget(tries.excluded)
                soon = budget is not None and budget <= BUDGET_QUEUE_WAIT
                if now() >= queued_until or not (self.pool.asking - tries.excluded or soon):
                    raise self.pool.unavailable(tries.last, tries.modality)
                place = place or self.pool.join_queue()
                await self.pool.wait_in_queue(place, queued_until)
        finally:
            if place is not None:
                self.pool.leave_queue(place, served=account is not None)

    async def send(self, plan: TurnPlan, tries: Tries, account: dict, deadline: float) -> OpenedTurn | Failure:
        followup = tries.followup
        attachments = await self.uploads.attachments(account, plan.images) if plan.images else []
        evaluation_id = followup["evaluation_id"] if followup else uuid7()
        path = (f"/nextjs-api/stream/post-to-evaluation/{evaluation_id}" if followup
                else "/nextjs-api/stream/create-evaluation")
        browser = account["kind"] == "browser"
        account_in_page = browser or self.account_in_page(account)
        in_page = account_in_page or self.model_in_page(plan.model)
        action = self.site.recaptcha_action
        body = chat_body(evaluation_id=evaluation_id, model_id=plan.model["id"], modality=plan.modality,
                         attachments=attachments, token=None if in_page else await self.site.recaptcha_token(action),
                         web_client_2026=not self.settings.bare_body, **self.turn_fields(plan, followup))
        if browser:
            response = await self.site.post_by_executor(self.executors, path, body, account, action, deadline)
        elif in_page:
            response = await self.site.post_in_page(path, body, account, action, deadline)
        else:
            response = await self.site.post_stream(path, body, account, deadline)
        if response.status_code == 200:
            if in_page == account_in_page and not browser:   # a path chosen for the model says nothing about the account
                self.pool.served(account, in_page)
            if not in_page:
                self.site.learn_path("direct")
            self.note_quota(account, plan.modality, response.headers)
            return OpenedTurn(response, account["id"], evaluation_id, followup["turns"] + 1 if followup else 1,
                              (body["modelAMessageId"], body.get("modelBMessageId")))
        answer = Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()},
                        await self.refusal_text(response))
        return Failure(answer, account, path, in_page, tries)

    async def refusal_text(self, response: Any) -> str:
        """The start of a refusal's body, then the answer closed. A body that never ends (the status came,
        the rest hangs) is given up after the stream's idle timeout: its status and headers still decide."""
        try:
            async with asyncio.timeout(self.settings.stream_idle_timeout):
                return (await response.acontent()).decode("utf-8", "replace")[:4000]
        except TimeoutError:
            return ""
        finally:
            await self.site.close(response)

    def turn_fields(self, plan: TurnPlan, followup: dict | None) -> dict[str, Any]:
        """A follow-up sends only the newest message and no mode; a new evaluation the whole history."""
        if followup is not None:
            return {"content": plan.followup_content, "mode": None}
        return {"content": plan.new_content, "mode": self.site.arena_mode()}

    async def handle(self, failure: Failure) -> None:
        """Run the policy's next step for a failed attempt (a step may raise to end the request)."""
        answer, account, tries = failure.answer, failure.account, failure.tries
        kind = answer.kind
        log.info("LM Arena answered %s (%s) on account %s", answer.status, kind, account["id"])
        self.failures.add(account["id"], kind, f"{answer.status}: {answer.message}")
        tries.last = answer.relayed()
        attempt = Attempt(needs_browser=bool(account["needs_browser"]), in_page=failure.in_page,
                          followup=tries.followup is not None, sidecar=self.settings.sidecar != "off",
                          moved=self.site.moves_to(failure.path, answer.headers.get("location")) is not None)
        step = next_step(kind, tries.count(kind, account["id"]), attempt)
        await getattr(self, "step_" + step)(failure)

    # --- the policy's steps (named in POLICY) ---------------------------------------------------------
    async def step_follow_move(self, failure: Failure) -> None:
        await self.site.follow_move(failure.path, failure.answer.headers.get("location"))

    async def step_clear_cloudflare(self, failure: Failure) -> None:
        await self.site.clear_cloudflare()

    async def step_give_up(self, failure: Failure) -> None:
        raise ArenaError("cloudflare", "LM Arena's Cloudflare challenge was not passed")

    async def step_rediscover(self, failure: Failure) -> None:
        before = self.site.sitekey
        await self.site.discover(min_age=2.0)
        if self.site.sitekey == before and not await self.site.live_sitekey(refused=before):
            await self.step_back_off(failure)

    async def step_back_off(self, failure: Failure) -> None:
        self.pool.back_off(failure.account, "reCAPTCHA validation failed")
        failure.tries.excluded.add(failure.account["id"])
        if not failure.in_page and self.settings.sidecar != "off":
            self.pool.refused_direct(failure.account)
            self.site.learn_path("page")

    async def step_refresh(self, failure: Failure) -> None:
        if await self.pool.refresh(failure.account) is None:
            failure.tries.excluded.add(failure.account["id"])

    async def step_needs_login(self, failure: Failure) -> None:
        self.pool.needs_login(failure.account)
        failure.tries.excluded.add(failure.account["id"])

    async def step_expire(self, failure: Failure) -> None:
        self.pool.expire(failure.account, failure.answer.message)
        failure.tries.excluded.add(failure.account["id"])

    async def step_cool_down(self, failure: Failure) -> None:
        answer = failure.answer
        asked = answer.retry_after
        self.pool.cool_down(failure.account, RATE_LIMIT_COOLDOWN if asked is None else asked,
                            f"rate limited by LM Arena: {answer.message}")
        failure.tries.excluded.add(failure.account["id"])

    async def step_use_up_quota(self, failure: Failure) -> None:
        headers = failure.answer.headers
        said = headers.get("ratelimit-modality") or failure.tries.modality
        self.pool.use_up_quota(failure.account, QUOTA_MODALITIES.get(said, said), quota_reset(headers))
        failure.tries.excluded.add(failure.account["id"])

    def note_quota(self, account: dict, modality: str, headers: Mapping[str, str]) -> None:
        used_up = used_up_quota({k.lower(): v for k, v in headers.items()}, modality)
        if used_up is not None:
            self.pool.use_up_quota(account, *used_up)

    async def step_switch_mode(self, failure: Failure) -> None:
        self.site.switch_mode()

    async def step_start_over(self, failure: Failure) -> None:
        failure.tries.followup = None

    async def step_pause(self, failure: Failure) -> None:
        await asyncio.sleep(0.5)

    async def step_refuse(self, failure: Failure) -> None:
        raise failure.answer.refusal()

    # --- the two paths ------------------------------------------------------------------------------------
    def account_in_page(self, account: dict) -> bool:
        """In-page fetch unless the direct path is known to work (REQUEST_PATHS, BRIDGE_REQUEST_PATH)."""
        return account_path(self.settings, self.site.params, account, now()) == "page"

    def model_in_page(self, model: dict) -> bool:
        """In-page fetch for the models configured so (BRIDGE_BROWSER_MODELS), on whichever account."""
        return self.settings.sidecar != "off" and model.get("publicName") in self.browser_models

    # --- streaming ------------------------------------------------------------------------------------
    async def stream(self, opened: OpenedTurn) -> AsyncGenerator[Event, None]:
        """Model A's events as they arrive; the upstream response is closed however this ends (including
        when the client goes away and the task is cancelled)."""
        parser = StreamParser()
        chunks = opened.response.aiter_content()
        paused = time.perf_counter()
        finished = False    # the reply read to its finish: its transfer may end by itself (FINISHED_GRACE)
        try:
            while True:
                try:   # asyncio.timeout, not wait_for: no extra task per chunk (the relay's hot path)
                    async with asyncio.timeout(self.settings.stream_idle_timeout):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    yield Event("error", "LM Arena went silent mid-reply")
                    return
                except Exception as exc:  # noqa: BLE001 - any broken connection ends the reply the same way
                    why = exc.message if isinstance(exc, ArenaError) else type(exc).__name__
                    yield Event("error", f"the connection to LM Arena broke mid-reply ({why})")
                    return
                for event in parser.feed(chunk):
                    yield event
                    if event.kind == "finish":
                        finished = True
                        await self.end_turn(opened, parser)
                        return
                # Chunks already received are read without a pause: a long reply that arrived at once
                # would be folded in one go, and every other client would wait for it.
                if time.perf_counter() - paused > LOOP_SLICE:
                    await asyncio.sleep(0)
                    paused = time.perf_counter()
            for event in parser.close():
                yield event
            await self.end_turn(opened, parser)
        finally:
            await self.site.close(opened.response, FINISHED_GRACE if finished else 0.0)

    async def end_turn(self, opened: OpenedTurn, parser: StreamParser) -> None:
        """After model A's reply: keep a rotated session, and answer a battle turn (U3) by skipping it,
        as the web UI's "Skip" does, so that the next follow-up is a plain direct turn again."""
        await self.adopt_session(opened)
        lane_a, lane_b = opened.lanes
        account = self.store.account(opened.account_id) if parser.lane_b and lane_b else None
        if account is not None and lane_b:
            await self.site.skip_battle(account, opened.evaluation_id, lane_a, lane_b)

    async def adopt_session(self, opened: OpenedTurn) -> None:
        response = opened.response
        if isinstance(response, BrowserResponse):
            fresh = Session.in_jar(await response.final_cookies(timeout=5.0))
        else:
            fresh = Session.in_set_cookie(response.headers.get_list("set-cookie"))
        await self.pool.adopt(opened.account_id, fresh)



# #####################################################################################################
# Part III: Client APIs
# #####################################################################################################

# =====================================================================================================
# Metrics
# =====================================================================================================

# README troubleshooting headings, by the cause the doctor found. tests/test_doctor.py checks that each
# anchor exists in README.md, so a renamed heading cannot leave the doctor pointing nowhere.
TROUBLESHOOTING = {
    "network": "#cannot-reach-lm-arena",
    "cloudflare": "#cloudflare-challenge",
    "models": "#models-missing",
    "discovery": "#sitekey-or-server-actions-not-found",
    "session": "#expired-sessions-and-401",
    "login_gate": "#guest-accounts-behind-the-login-gate",
    "cooldown": "#429-and-cool-downs",
    "browser": "#browser-sidecar-unavailable",
    "recaptcha": "#recaptcha-failures",
    "upstream": "#lm-arena-errors",
    "images": "#image-uploads-fail",
    "executor": "#browser-executor-not-connected",
    "userscript": "#bridge-on-a-server-browser-at-home",
    "client_left": "#clients-that-hang-up",
}

# What a failure means, by its code (an upstream failure kind, or the API error code a request ended
# with): the cause `/metrics` counts it under, and the README entry that says what to do about it.
FAILURE_CAUSES: dict[str, tuple[str, str]] = {
    "rate_limited": ("rate_limit", "cooldown"),
    "rate_limit_exceeded": ("rate_limit", "cooldown"),      # the API key's own limit
    "quota": ("rate_limit", "cooldown"),
    "accounts_cooling_down": ("cool_down", "cooldown"),
    "accounts_paced": ("rate_limit", "cooldown"),
    "recaptcha": ("recaptcha", "recaptcha"),
    "cloudflare": ("cloudflare", "cloudflare"),
    "login_gate": ("login_gate", "login_gate"),
    "unauthorized": ("session", "session"),
    "no_usable_account": ("session", "session"),
    "no_account": ("no_account", "session"),
    "signup_failed": ("no_account", "session"),
    "sidecar_unavailable": ("browser", "browser"),
    "browser_unavailable": ("browser", "executor"),
    "server": ("upstream_5xx", "upstream"),
    "upstream_timeout": ("upstream_5xx", "upstream"),
    "upstream_unreachable": ("network", "network"),
    "discovery_failed": ("network", "network"),
    "site_changed": ("site_changed", "discovery"),
    "upload_failed": ("upload", "images"),
    "client": ("client_error", "upstream"),     # a 4xx of LM Arena's that no other kind names
    # A client that hung up (CLIENT_LEFT, the code of ClientLeft): not bad input, so counted apart from
    # client_error (a burst of them is a client's or a proxy's timeout, not a broken request).
    "client_disconnected": ("client_left", "client_left"),
}


def cause_of(code: str | None, status: int) -> str:
    """The metrics cause of a failed request: from its code when the table names it, else the side
    that failed (the client's request, LM Arena, or the bridge)."""
    if code in FAILURE_CAUSES:
        return FAILURE_CAUSES[code][0]
    if status < 500:
        return "client_error"
    return "upstream_5xx" if (code or "").startswith("upstream_5") else "bridge"


def fix_for(code: str | None) -> str:
    """The troubleshooting key for a failure code ("upstream" when the table does not name it)."""
    return FAILURE_CAUSES[code][1] if code in FAILURE_CAUSES else "upstream"



# prometheus_client, measured on this project's 2-core machine (bench.py phase 7 repeats it): one
# counter increment and two histogram observations cost 4.9 us per request against 0.5 us for a
# hand-written dict-and-bisect version; Metrics.request (a counter and a histogram, with the model-name
# check) costs 3.5 us, the time-to-first-token observation another 3.8 us. The bridge spends about
# 1,700-2,300 us of CPU per request, so counting is below 0.5 % of it, and no latency figure moves beyond
# noise. Imported beside the bridge's other libraries it adds 0.6 MB of RSS and 11 ms of start-up; a
# scrape of 300 label sets renders in 4 ms. Cheap enough to use the maintained library rather than
# write the exposition format.
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


@dataclasses.dataclass(frozen=True)
class AccountGauge:
    id: int
    kind: str
    state: str                      # as a request sees it: a finished cool-down reads "ok"
    cooldown_until: float | None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The values `/metrics` reads at scrape time from the store and the app state, so that nothing
    is counted on the request path for them."""
    accounts: list[AccountGauge]
    sidecar: str
    executors: dict[str, int]       # executor state -> how many
    conversations: int
    tasks: int = 0                  # asyncio tasks alive (a leak shows as a count that only grows)
    transfers: int = 0              # upstream HTTP transfers holding a connection handle


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self.snapshot()
        state = GaugeMetricFamily("bridge_account_state", "1 for each account's current state",
                                  labels=["account", "kind", "state"])
        cooldown = GaugeMetricFamily("bridge_account_cooldown_end_seconds",
                                     "Unix time an account's cool-down ends (0: none)", labels=["account"])
        for account in now.accounts:
            state.add_metric([str(account.id), account.kind, account.state], 1)
            cooling = account.state == "cooling_down" and account.cooldown_until
            cooldown.add_metric([str(account.id)], float(account.cooldown_until or 0) if cooling else 0.0)
        sidecar = GaugeMetricFamily("bridge_sidecar_state", "1 for the browser sidecar's state", labels=["state"])
        sidecar.add_metric([now.sidecar], 1)
        executors = GaugeMetricFamily("bridge_executors", "Connected browser executors by state", labels=["state"])
        for name, count in sorted(now.executors.items()):
            executors.add_metric([name], count)
        conversations = GaugeMetricFamily("bridge_conversations", "Conversations the bridge can continue")
        conversations.add_metric([], now.conversations)
        tasks = GaugeMetricFamily("bridge_asyncio_tasks", "asyncio tasks alive in the server")
        tasks.add_metric([], now.tasks)
        transfers = GaugeMetricFamily("bridge_upstream_transfers", "HTTP transfers to LM Arena in progress")
        transfers.add_metric([], now.transfers)
        yield from (state, cooldown, sidecar, executors, conversations, tasks, transfers)


class Metrics:
    """The bridge's Prometheus metrics, one registry per app (never the library's global one, so two
    apps in one process, as in tests, count apart). Counters and histograms move on the request path;
    account, sidecar, executor and conversation gauges are read from `snapshot` when scraped.

    A model becomes a label only when it is one of `model_names()` (LM Arena's public names, re-read on
    a miss at most every `names_max_age` seconds): every label set is kept for ever, so a name a client
    made up counts as "other"."""

    def __init__(self, snapshot: Callable[[], Snapshot], model_names: Callable[[], Iterable[str]],
                 names_max_age: float = 60.0):
        self.model_names, self.names_max_age = model_names, names_max_age
        self.known: frozenset[str] = frozenset()
        self.known_at = -math.inf
        self.registry = CollectorRegistry()
        self.requests = Counter("bridge_requests", "Requests answered, by route, model and HTTP status",
                                ["route", "model", "status"], registry=self.registry)
        self.errors = Counter("bridge_errors", "Failed requests by route, model and cause",
                              ["route", "model", "cause"], registry=self.registry)
        self.latency = Histogram("bridge_request_duration_seconds", "Time to the whole answer", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("bridge_time_to_first_token_seconds", "Time to the first streamed token",
                                     ["route"], buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.mints = Counter("bridge_token_mints", "reCAPTCHA tokens asked of the browser, by result",
                             ["result"], registry=self.registry)
        self.registry.register(SnapshotCollector(snapshot))

    def model_label(self, model: str | None) -> str:
        if model is None:
            return "none"
        if model not in self.known and time.monotonic() - self.known_at > self.names_max_age:
            self.known, self.known_at = frozenset(self.model_names()), time.monotonic()
        return model if model in self.known else "other"

    def request(self, route: str, model: str | None, status: int, seconds: float, code: str | None = None) -> None:
        """One answered request: its route, the model asked for (None when the route has none), its
        status, how long it took and, when it failed, its error code."""
        name = self.model_label(model)
        self.requests.labels(route, name, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, name, cause_of(code, status)).inc()

    def first_token_after(self, route: str, seconds: float) -> None:
        self.first_token.labels(route).observe(seconds)

    def token_minted(self, worked: bool) -> None:
        self.mints.labels("ok" if worked else "failed").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# =====================================================================================================
# API plumbing
# =====================================================================================================

ROUTED_MODEL_HEADER = "x-arena-routed-model"    # the model LM Arena's "Max" router chose for this reply (U9)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 502: "upstream_error", 503: "service_unavailable",
               504: "timeout_error"}

# The client status for each kind of LM Arena failure; any other kind is a 502, and so is LM Arena's own
# answer passed on (`relayed`). "upstream_<status>" (a refusal the table does not name) is a 400 for a
# 4xx status, else a 502.
ARENA_STATUS = {
    "quota_exhausted": 429, "needs_signed_in_account": 503, "no_account": 503, "accounts_cooling_down": 503, "accounts_paced": 429, "no_usable_account": 503, "signup_failed": 503,
    "cloudflare": 503, "model_not_available": 403, "upstream_forbidden": 403, "content_filter": 422,
    "attachment_too_large": 413, "model_not_found": 404, "upstream_timeout": 504, "browser_unavailable": 503,
}


def arena_status(error: ArenaError) -> int:
    if error.relayed:
        return 502
    if error.kind in ARENA_STATUS:
        return ARENA_STATUS[error.kind]
    code = error.kind.removeprefix("upstream_")
    return 400 if code.isdigit() and int(code) < 500 else 502


class ApiError(Exception):
    """The one error type with an HTTP status and headers: what a client API answers a failure with. Its
    body here is OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None, cause: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.cause = cause or code          # what the metrics count it under (see FAILURE_CAUSES)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}

    @classmethod
    def from_arena(cls, error: ArenaError) -> ApiError:
        status = arena_status(error)
        headers = {}
        if error.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(error.retry_after + 0.999)))
            if error.retry_after > 120:
                headers["x-should-retry"] = "false"
        elif status == 503:
            headers["x-should-retry"] = "false"
        return cls(status, error.message, error.kind, headers=headers, cause=error.cause)


def api_error_for(error: Exception) -> ApiError:
    """The API error for anything that ends a request: an unexpected exception is logged and becomes a
    500 in the same shape, never a bare text page or a cut stream."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ArenaError):
        return ApiError.from_arena(error)
    if isinstance(error, SidecarError):
        return ApiError(503, f"The browser sidecar could not help: {error}", "sidecar_unavailable",
                        headers={"x-should-retry": "false"})
    log.error("unexpected %s while serving a request", type(error).__name__, exc_info=error)
    return ApiError(500, f"The bridge failed unexpectedly ({type(error).__name__}); see its log.", "internal_error")


class RateLimiter:
    """Requests per minute per API key, over a sliding 60-second window (in memory: a restart forgives)."""

    def __init__(self) -> None:
        self.window = SlidingWindow(60.0)

    def check(self, key: dict) -> None:
        rpm = key.get("rpm") or 0
        if rpm <= 0:
            return
        wait = self.window.admit(key["id"], rpm)
        if wait:
            seconds = max(1, int(wait + 0.999))
            raise ApiError(429, f"This API key is limited to {rpm} requests per minute; retry in {seconds} s.",
                           "rate_limit_exceeded", headers={"Retry-After": str(seconds)})


class GuessThrottle:
    """Guesses at a secret (the dashboard password, a userscript's pairing secret): a few per client address
    in a short window, which an admin who mistyped soon outlives, and a budget for all addresses together
    per minute, so that a guesser spread over many addresses is held to it too. Beyond either, every
    caller waits (429 with Retry-After) until the window frees one."""
    ADDRESS_WINDOW = 300.0

    def __init__(self, per_address: int, per_minute: int) -> None:
        self.per_address, self.per_minute = per_address, per_minute
        self.addresses = SlidingWindow(self.ADDRESS_WINDOW)
        self.everyone = SlidingWindow(60.0)

    def wait(self, address: str) -> tuple[float, bool]:
        """The seconds until `address` may guess (0: now), and whether the shared budget is what holds it."""
        self.addresses.prune()
        mine = self.addresses.full(address, self.per_address)
        return (mine, False) if mine else (self.everyone.full(None, self.per_minute), True)

    def count(self, address: str) -> None:
        self.addresses.admit(address, self.per_address)
        self.everyone.admit(None, self.per_minute)

    def forgive(self, address: str) -> None:
        self.addresses.forget(address)


class UsageRecorder:
    """One record per answered request: a usage row, buffered and written in batches by a background task
    (so that no request waits on an SQLite write), and the request's metrics."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.pending: list[dict] = []

    def add(self, route: str, key_id: int | None, model: str | None, status: int, started: float,
            prompt_tokens: int = 0, completion_tokens: int = 0, error: str | None = None,
            cause: str | None = None, routed_model: str | None = None) -> None:
        seconds = time.perf_counter() - started
        self.pending.append({"ts": now(), "key_id": key_id, "model": model, "status": status,
                             "latency_ms": round(seconds * 1000, 1), "prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens, "error": error,
                             "routed_model": routed_model})
        self.metrics.request(route, model, status, seconds, cause or error)

    def flush(self) -> None:
        rows, self.pending = self.pending, []
        self.store.record_usage(rows)


class BodyBudget:
    """The bytes of request body held by the requests in flight, bounded: a few clients sending large
    bodies at once (each also parsed and rendered, several times its size) could otherwise take all the
    memory of a small machine. Taken chunk by chunk as a body arrives; given back, by the middleware,
    when its request ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, request: Request, size: int) -> None:
        if self.used + size > self.limit:
            raise ApiError(503, "The bridge holds as many request bodies as it may; retry in a moment.",
                           "server_busy", headers={"Retry-After": "1"})
        self.used += size
        request.state.body_held = getattr(request.state, "body_held", 0) + size

    def middleware(self, app: Any) -> Any:
        budget = self

        async def guarded(scope: dict, receive: Callable, send: Callable) -> None:
            try:
                await app(scope, receive, send)
            finally:
                budget.used -= (scope.get("state") or {}).get("body_held", 0)
        return guarded


@dataclasses.dataclass
class BridgeState:
    """Everything a request handler needs; one per app, kept on `app.state.bridge`."""
    settings: Settings
    store: Store
    sidecar: SidecarClient
    site: ArenaSite
    pool: AccountPool
    turns: TurnRunner
    limiter: RateLimiter
    usage: UsageRecorder
    logins: GuessThrottle
    metrics: Metrics
    failures: FailureLog
    executors: BrowserExecutors
    bodies: BodyBudget
    executor_auth: GuessThrottle        # wrong pairing secrets, throttled like sign-ins
    chat_tools: Memo                    # chat requests' tools, read once per tool set (parse_chat_tools)
    anthropic_tools: Memo               # Messages requests' tools (parse_anthropic_request)
    responses_tools: Memo               # Responses requests' tools (parse_responses_request)
    tasks: list[asyncio.Task] = dataclasses.field(default_factory=list)

    async def models(self) -> list[dict]:
        """The stored model list; on a first start with none stored yet, wait (bounded) for discovery."""
        models = self.store.models()
        if not models:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.site.discover(min_age=5.0, may_start_browser=False), 30)
            models = self.store.models()
        if not models:
            raise ApiError(503, "The model list is not known yet: LM Arena could not be reached.", "models_unknown")
        return models


def bridge(request: Request) -> BridgeState:
    return request.app.state.bridge


def request_secret(request: Request) -> str:
    """The API key a request carries: `Authorization: Bearer KEY`, or `x-api-key: KEY` as Anthropic's
    clients send it."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secret.strip():
        return secret.strip()
    return request.headers.get("x-api-key", "").strip()


def authenticate(request: Request) -> dict:
    secret = request_secret(request)
    if not secret:
        raise ApiError(401, "Missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`).",
                       "missing_api_key")
    key = bridge(request).store.key_by_secret(secret)
    if key is None:
        raise ApiError(401, "Invalid API key.", "invalid_api_key")
    request.state.key = key          # the request trace names it (never its secret)
    return key


# Above this many bytes of body, a request's CPU-heavy steps (JSON parsing, validation, trimming, hashing) run
# in a worker thread: on the event loop, one large request would hold up every other client, /health too.
OFF_LOOP_BYTES = 256 * 1024


def large_body(request: Request) -> bool:
    """Whether the body read_body read was large enough for off_loop to move steps to a thread."""
    return getattr(request.state, "body_bytes", 0) > OFF_LOOP_BYTES


async def off_loop(large: bool, step: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(step, *args) if large else step(*args)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.", "request_too_large")
    body = bytearray()
    state = bridge(request)
    seconds = state.settings.body_timeout
    # A declared length is taken from the budget at once: a request is refused before its body arrives,
    # rather than many half-read bodies each holding a share.
    reserved = int(declared) if declared and declared.isdigit() else 0
    state.bodies.take(request, reserved)
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                state.bodies.take(request, max(0, len(body) + len(chunk) - max(reserved, len(body))))
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"The request body is larger than {limit} bytes.", "request_too_large")
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {seconds:g} s.", "request_timeout",
                       headers={"Connection": "close"}) from None
    request.state.body_bytes = len(body)
    return bytes(body)


# How a lone surrogate can get into a parsed body: a \uD800-\uDFFF escape, or its bytes (json.loads lets
# them pass). A body without either is not walked.
SURROGATE_HINT_RE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def lone_surrogate_at(value: Any) -> str | None:
    """Where in a parsed body a string holds a lone surrogate (pairs were joined by the parser), as the
    parameter path; None when none does. Such text cannot be encoded: stored, sent on or logged, it failed."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if SURROGATE_RE.search(item):
                return where or "body"
        elif isinstance(item, dict):
            # keys are pushed last, so popped first: a path named in the error never holds a bad key
            stack += [(v, f"{where}.{k}" if where else str(k)) for k, v in item.items()]
            stack += [(k, where or "body") for k in item]
        elif isinstance(item, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(item)]
    return None


# A large body is parsed and scanned in pieces of about this many bytes (see loads_in_pieces).
PIECE_BYTES = 256 * 1024
JSON_SPACE_RE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, at: int) -> int:
    """The index of the first character at or after `at` that is not JSON whitespace."""
    match = JSON_SPACE_RE.match(text, at)
    return match.end() if match else at


def _json_mark(text: str, at: int, marks: str) -> tuple[str, int]:
    """The structural character at `at` (after whitespace), one of `marks`, and the index after it."""
    at = _skip(text, at)
    if at >= len(text) or text[at] not in marks:
        raise ValueError(f"expected one of {marks!r} at character {at}")
    return text[at], at + 1


def _json_value(text: str, at: int) -> tuple[Any, int]:
    """The value at `at` (after whitespace) and the index after it; an array item by item."""
    at = _skip(text, at)
    if not text.startswith("[", at):
        return JSON_DECODER.raw_decode(text, at)
    items: list[Any] = []
    if text.startswith("]", _skip(text, at + 1)):
        return items, _skip(text, at + 1) + 1
    mark, at = ",", at + 1
    while mark == ",":
        item, at = JSON_DECODER.raw_decode(text, _skip(text, at))
        items.append(item)
        mark, at = _json_mark(text, at, ",]")
    return items, at


def _json_object(text: str, at: int) -> tuple[dict[str, Any], int]:
    """The members of the object whose `{` ends before `at`, one by one, and the index after its `}`."""
    value: dict[str, Any] = {}
    mark, at = _json_mark(text, at, '}"')
    while mark == '"':
        name, at = JSON_DECODER.raw_decode(text, at - 1)
        _, at = _json_mark(text, at, ":")
        value[name], at = _json_value(text, at)
        mark, at = _json_mark(text, at, ",}")
        if mark == ",":
            mark, at = _json_mark(text, at, '"')
    return value, at


def loads_in_pieces(body: bytes) -> Any:
    """json.loads for a large body, the top object's members (and the items of the top array, or of an
    array member) parsed one at a time: json.loads is one C call that keeps the GIL for the whole body,
    so even in a worker thread it held up the event loop (and /health) for as long. The same value as
    json.loads, or a ValueError."""
    text = body.decode(json.detect_encoding(body), "surrogatepass")
    start = _skip(text, 0)
    value, at = _json_object(text, start + 1) if text.startswith("{", start) else _json_value(text, start)
    if _skip(text, at) != len(text):
        raise ValueError("extra data after the JSON value")
    return value


def surrogate_hinted(body: bytes) -> bool:
    """SURROGATE_HINT_RE anywhere in the body, searched a piece at a time (one search is one C call that
    keeps the GIL); the pieces overlap by the pattern's length."""
    return any(SURROGATE_HINT_RE.search(body, at, at + PIECE_BYTES + 5) for at in range(0, len(body), PIECE_BYTES))


def parse_json_body(body: bytes) -> Any:
    try:
        value = loads_in_pieces(body) if len(body) > PIECE_BYTES else json.loads(body)
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.", "invalid_json") from None
    where = lone_surrogate_at(value) if surrogate_hinted(body) else None
    if where is not None:
        raise ApiError(400, f"`{where}` holds a lone UTF-16 surrogate, which is not text; send valid Unicode.",
                       "invalid_value", where)
    return value


async def read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    return await off_loop(large_body(request), parse_json_body, body)


# =====================================================================================================
# Client hang-ups
# =====================================================================================================
# A client that leaves before its answer began: Hypercorn only tells of it (http.disconnect), so the
# request is watched while nothing is sent; once a stream is sent, Starlette's response watches it.

CLIENT_LEFT = "client_disconnected"     # the usage error code of a request whose client hung up


class ClientLeft(ApiError):
    """The client hung up before its answer: recorded as status 499 (nginx's "client closed request"), as
    a stream whose client leaves mid-way is. The answer itself reaches nobody."""

    def __init__(self) -> None:
        super().__init__(499, "The client closed the connection before the answer.", CLIENT_LEFT)


class Unanswered(Response):
    """The answer to a request whose client left: nothing at all (the server would write it to a closed
    socket, and asyncio warn of each write)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


async def client_hangs_up(receive: Callable[[], Awaitable[Any]]) -> None:
    """Return once the client has hung up. Its request body was read whole, so all that is left to
    receive is the ASGI http.disconnect (a pending receive, a queue's get, can be cancelled safely)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(work: Awaitable[Any], receive: Callable[[], Awaitable[Any]] | None) -> Any:
    """`work`'s result, run in a task of its own while the client's connection is watched: a client that
    hangs up first has the task cancelled at once (and its upstream request with it), then ClientLeft is
    raised. The server only tells of a hang-up: a handler that does not listen for it runs to its end."""
    task = asyncio.ensure_future(work)
    if receive is None:
        return await task
    watch = asyncio.ensure_future(client_hangs_up(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done() and not watch.done():    # a watch that ended took the hang-up: nobody else will see it
        return task.result()
    task.cancel()
    await asyncio.wait({task})      # its clean-up (the upstream request closed) is over before the answer
    with contextlib.suppress(BaseException):
        task.result()               # done or failed meanwhile: there is nobody left to tell
    raise ClientLeft()


# =====================================================================================================
# OpenAI chat requests
# =====================================================================================================

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
SOURCES_HEADING = "\n\nSources:\n"


@dataclasses.dataclass
class ToolCall:
    """A function call in an assistant turn: the id its result refers to, the function, its arguments."""
    id: str
    name: str
    arguments: str                      # a JSON object, as text (the form OpenAI's APIs carry it in)


@dataclasses.dataclass
class Message:
    role: str
    text: str
    images: list[str]                   # image_url values as sent: data: URIs or http(s) URLs
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)   # an assistant turn's calls
    tool_call_id: str | None = None     # a tool result: the call it answers
    name: str | None = None             # a tool result: the function, when the API says (else found by id)


@dataclasses.dataclass
class ChatRequest:
    model: str
    messages: list[Message]
    stream: bool
    include_usage: bool


def json_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", "invalid_body")
    return body


def required_string(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"`{name}` is required and must be a non-empty string.", "missing_required_parameter",
                       name)
    return value.strip()


def required_array(body: dict, name: str) -> list:
    value = body.get(name)
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"`{name}` is required and must be a non-empty array.", "missing_required_parameter",
                       name)
    return value


def require_one(body: dict, what: str) -> None:
    """`n` other than 1 is refused rather than silently answered with one: the site gives one per request."""
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, f"`n` must be 1: LM Arena gives one {what} per request.", "unsupported_value", "n")


def parse_chat_request(body: Any) -> ChatRequest:
    body = json_object(body)
    model = required_string(body, "model")
    messages = [parse_message(m, i) for i, m in enumerate(required_array(body, "messages"))]
    if not any(m.role == "user" for m in messages):
        raise ApiError(400, "`messages` must contain at least one user message.", "invalid_value", "messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be a boolean.", "invalid_type", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object.", "invalid_type", "stream_options")
    require_one(body, "reply")
    return ChatRequest(model=model, messages=messages, stream=bool(stream),
                       include_usage=bool(options.get("include_usage")))


def parse_tool_calls(raw: Any, param: str) -> list[ToolCall]:
    """An assistant message's `tool_calls`, as a client sends them back."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, f"{param}.tool_calls must be an array.", "invalid_type", f"{param}.tool_calls")
    return [parse_tool_call(item, f"{param}.tool_calls[{i}]") for i, item in enumerate(raw)]


def parse_tool_call(item: Any, where: str) -> ToolCall:
    function = item.get("function") if isinstance(item, dict) else None
    arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if (not isinstance(function, dict) or not isinstance(item.get("id"), str)
            or not isinstance(function.get("name"), str) or not isinstance(arguments, str)):
        raise ApiError(400, f"{where} must have an `id` and a `function` with a `name` and `arguments`.",
                       "invalid_value", where)
    return ToolCall(item["id"], function["name"], arguments)


def tool_fields(raw: dict, role: str, param: str) -> dict[str, Any]:
    """An assistant message's calls; a tool result's call id (and the function, from the legacy role)."""
    if role == "assistant":
        return {"tool_calls": parse_tool_calls(raw.get("tool_calls"), param)}
    if role != "tool":
        return {}
    call_id, name = raw.get("tool_call_id"), raw.get("name")
    if call_id is not None and not isinstance(call_id, str):
        raise ApiError(400, f"{param}.tool_call_id must be a string.", "invalid_type", f"{param}.tool_call_id")
    return {"tool_call_id": call_id, "name": name if isinstance(name, str) else None}


def parse_message(raw: Any, index: int) -> Message:
    param = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise ApiError(400, f"{param} must be an object.", "invalid_type", param)
    role = raw.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise ApiError(400, f"{param}.role must be one of system, user, assistant, tool.", "invalid_value",
                       f"{param}.role")
    content = raw.get("content")
    texts: list[str] = []
    images: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            parse_content_part(part, f"{param}.content[{j}]", texts, images)
    elif content is not None or role not in ("assistant", "tool", "function"):
        raise ApiError(400, f"{param}.content must be a string or an array of content parts.", "invalid_type",
                       f"{param}.content")
    role = "system" if role == "developer" else "tool" if role == "function" else role
    return Message(role=role, text="\n".join(texts), images=images, **tool_fields(raw, role, param))


def parse_content_part(part: Any, param: str, texts: list[str], images: list[str]) -> None:
    """One part of a content array: its text or image URL is added to `texts` or `images`."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "input_text") and isinstance(part.get("text"), str):
        texts.append(part["text"])
    elif kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{param}.image_url.url must be a string.", "invalid_value", param)
        images.append(url)
    else:
        raise ApiError(400, f"{param} has an unsupported type {kind!r}; use text or image_url.",
                       "unsupported_content", param)


def usable_models(models: list[dict]) -> list[dict]:
    """Models a chat bridge can serve: not stealth, and with text, image or search output."""
    return [m for m in models if not is_stealth(m) and is_selectable(m) and choose_modality(m) is not None]


# Which entries of a public name can be served, in order; when none is left, the refusal (status, code, why).
MODEL_FILTERS: tuple[tuple[Callable[[dict], bool], int, str, str], ...] = (
    (lambda m: True, 404, "model_not_found", "does not exist on LM Arena (see /v1/models)."),
    (lambda m: choose_modality(m) is not None, 404, "model_not_found",
     "outputs neither text, images nor search results; this bridge cannot serve it."),
    (lambda m: not is_stealth(m), 403, "model_not_available",
     "is a stealth model: LM Arena only serves it in anonymous battles, not by name."),
    (is_selectable, 403, "model_not_available", "is not available for user selection on LM Arena."),
)


def resolve_model(models: list[dict], name: str, with_images: bool = False, modality: str | None = None) -> dict:
    """The entry for a public name. Names are not unique: prefer one we can serve, one whose output is the
    wanted `modality` (arena-protocol §9.4), and with images in the request, one that takes image input."""
    public = [m for m in models if m.get("publicName") == name]
    for keep, status, code, why in MODEL_FILTERS:
        public = [m for m in public if keep(m)]
        if not public:
            raise ApiError(status, f"The model `{name}` {why}", code, "model")
    public.sort(key=lambda m: (modality is not None and choose_modality(m) != modality,
                               with_images and not accepts_images(m)))
    return public[0]


ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool result"}


def render_message(message: Message, describe_images: bool) -> str:
    text = message.text
    if describe_images and message.images:
        text = (text + "\n" if text else "") + " ".join("[image]" for _ in message.images)
    return text


def transcript_block(message: Message, last: bool) -> str:
    return f"[{ROLE_LABELS[message.role]}]\n{render_message(message, describe_images=not last)}"


def keep_newest(head: list[str], body: list[str], limit: int) -> tuple[str, int]:
    """`head` and the newest blocks of `body` (at least one) within `limit` characters, and how many were left out."""
    # The joined length is kept as a running total (joining again per dropped block was quadratic: 50k short
    # messages held the event loop for 20 s).
    total = sum(map(len, head)) + sum(map(len, body)) + 2 * max(len(head) + len(body) - 1, 0)
    dropped = 0
    while len(body) - dropped > 1 and total > limit:
        total -= len(body[dropped]) + 2
        dropped += 1
    return "\n\n".join(head + body[dropped:]), dropped


def render_transcript(messages: list[Message], limit: int) -> tuple[str, int]:
    """The whole history as one role-labelled message, system prompts first and once, newest turns kept
    when it would exceed `limit` characters. Returns the text and how many turns were dropped."""
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    if len(turns) == 1 and not system:
        return render_message(turns[0], describe_images=False), 0
    head = [transcript_block(m, False) for m in system]
    return keep_newest(head, [transcript_block(m, i == len(turns) - 1) for i, m in enumerate(turns)], limit)


def canonical_json(text: str) -> str:
    """JSON text in one spelling (clients send arguments back re-serialised); other text as it is."""
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        return text


def normalise_for_match(message: Message) -> list[str]:
    """What must be equal for two histories to be the same conversation. Clients trim whitespace and
    drop or keep the Sources footer the bridge added, so neither counts."""
    text = message.text
    if message.role == "assistant":
        text = text.split(SOURCES_HEADING.strip("\n"), 1)[0]
    images = [sha256_hex(url)[:16] for url in message.images]
    calls = [f"{call.name} {canonical_json(call.arguments)}" for call in message.tool_calls]
    return [message.role, " ".join(text.split()), *images, *calls]


FINGERPRINT_SLICE = 1000      # messages encoded per json.dumps call (each call keeps the GIL throughout)


def fingerprint_of(key_id: int, model: str, normalised: list[list[str]]) -> str:
    """The fingerprint of a history already normalised (normalise_for_match, message by message): the
    hash of the JSON of [key_id, model, normalised], encoded and hashed a slice of messages at a time, so
    that a long history does not keep the GIL (and the event loop) in one call."""
    digest = hashlib.sha256(compact_json([key_id, model])[:-1].encode() + b",[")
    for start in range(0, len(normalised), FINGERPRINT_SLICE):
        piece = compact_json(normalised[start:start + FINGERPRINT_SLICE])[1:-1]
        digest.update((piece if start == 0 else "," + piece).encode())
    digest.update(b"]]")
    return digest.hexdigest()


def conversation_fingerprint(key_id: int, model: str, messages: list[Message]) -> str:
    return fingerprint_of(key_id, model, [normalise_for_match(m) for m in messages])


# =====================================================================================================
# OpenAI chat replies
# =====================================================================================================

FINISH_REASONS = {"stop": "stop", "length": "length", "content-filter": "content_filter",
                  "content_filter": "content_filter"}
MARKER_START = "<!--citation:"


def partial_marker_start(text: str) -> int:
    """Where an unfinished citation marker begins at the end of `text`, or -1."""
    cut = text.rfind("<")
    if cut < 0 or "-->" in text[cut:]:
        return -1
    tail = text[cut:]
    return cut if MARKER_START.startswith(tail) or tail.startswith(MARKER_START) else -1


class ReplyBuilder:
    """Turns LM Arena events into OpenAI content: citation markers become [n], images become Markdown
    after the text, sources become a footer and `url_citation` annotations.

    A citation marker can be split across text parts, so text that may be the start of a marker is held
    back until the next part decides it."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.citations = Citations()
        self.images: list[str] = []
        self.held = ""
        self.finish_reason = "stop"
        self.usage: dict | None = None
        self.annotations: list[dict] = []

    def add(self, event: Event) -> tuple[str, str] | None:
        """Fold one event into the reply; returns a ("content"|"reasoning", text) delta to relay."""
        if event.kind == "text":
            text = self.text(event.value)
            return ("content", text) if text else None
        if event.kind == "reasoning":
            self.reasoning.append(event.value)
            return "reasoning", event.value
        if event.kind == "citation":
            self.add_sources(event.value)
        elif event.kind == "image":
            self.images.extend(event.value)
        elif event.kind == "finish":
            self.finish_reason, self.usage = event.value, event.usage
        return None

    def text(self, delta: str) -> str:
        text = self.held + delta
        cut = partial_marker_start(text)
        self.held, text = (text[cut:], text[:cut]) if cut >= 0 else ("", text)
        text = CITATION_MARKER_RE.sub(self._marker, self.citations.place(text))
        self.content.append(text)
        return text

    def _marker(self, match: re.Match) -> str:
        number = self.citations.number(match.group(1))
        return f"[{number}]" if number else ""

    def add_sources(self, sources: list[dict]) -> None:
        self.citations.add(sources)

    def finish(self) -> str:
        """The text that closes the reply: held-back text, images, and the Sources footer."""
        tail = CITATION_MARKER_RE.sub(self._marker, self.citations.place(self.held)) + self.citations.rest()
        self.held = ""
        body = "".join(self.content) + tail
        for url in self.images:
            tail += ("\n\n" if body or tail else "") + f"![image]({url})"
        sources = self.citations.titled()
        if sources:
            tail += SOURCES_HEADING
            offset = len(body) + len(tail)
            for number, (url, title) in enumerate(sources, 1):
                link = f"[{title}]({url})"
                line = f"{number}. {link}\n"
                start = offset + len(f"{number}. ")
                self.annotations.append({"type": "url_citation", "url_citation": {
                    "start_index": start, "end_index": start + len(link), "url": url, "title": title}})
                tail += line
                offset += len(line)
            tail = tail.rstrip("\n")
        self.content.append(tail)
        return tail

    @property
    def full_content(self) -> str:
        return "".join(self.content)


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


def openai_finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, "stop")


class ChunkEncoder:
    """Pre-renders the constant part of every `chat.completion.chunk`, so that relaying a delta costs one
    small json.dumps of the text: the hot path of a stream."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool):
        head = json_text({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                          "model": model})[:-1]
        self.head = "data: " + head + ',"choices":[{"index":0,"delta":'
        self.tail = ',"logprobs":null,"finish_reason":null}]' + (',"usage":null' if include_usage else "") + "}\n\n"
        self.bare = "data: " + head
        self.include_usage = include_usage

    def delta(self, **fields: Any) -> str:
        return self.head + json_text(fields) + self.tail

    def content(self, text: str) -> str:
        return self.head + '{"content":' + json_text(text) + "}" + self.tail

    def reasoning(self, text: str) -> str:
        return self.head + '{"reasoning_content":' + json_text(text) + "}" + self.tail

    def finish(self, reason: str) -> str:
        return (self.head + "{}" + ',"logprobs":null,"finish_reason":' + json.dumps(reason) + "}]"
                + (',"usage":null' if self.include_usage else "") + "}\n\n")

    def usage(self, usage: dict) -> str:
        return self.bare + ',"choices":[],"usage":' + json.dumps(usage) + "}\n\n"


def chat_tool_call(call: ToolCall, index: int | None = None) -> dict:
    """A call in OpenAI's shape: in `message.tool_calls`, or with its `index` in a streamed delta."""
    shaped = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return shaped if index is None else {"index": index, **shaped}


def sse_error(error: ApiError) -> str:
    return "data: " + json.dumps(error.body(), ensure_ascii=False) + "\n\ndata: [DONE]\n\n"


def completion_usage(prompt_text: str, builder: ReplyBuilder) -> dict:
    if builder.usage:
        prompt, completion = builder.usage["prompt_tokens"], builder.usage["completion_tokens"]
    else:
        prompt = estimate_tokens(prompt_text)
        completion = estimate_tokens(builder.full_content) + estimate_tokens("".join(builder.reasoning))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_object(completion_id: str, created: int, model: str, builder: ReplyBuilder, usage: dict,
                      content: str, calls: list[ToolCall], finish_reason: str) -> dict:
    """The whole reply; `content` is what the client sees of the text (tool-call blocks taken out), null
    beside calls when there is none, as OpenAI answers."""
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""),
                               "refusal": None, "annotations": builder.annotations}
    if calls:
        message["tool_calls"] = [chat_tool_call(call) for call in calls]
    if builder.reasoning:
        message["reasoning_content"] = "".join(builder.reasoning)
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


# =====================================================================================================
# Tool emulation: requests
# =====================================================================================================

# LM Arena has no tool calling (SPEC §7.1). The tools become instructions in the system part of the turn,
# the model writes <tool_call> blocks, and a streaming parser (the next section) turns them back into
# calls. The three client APIs share both sections; each maps only its own request fields in (to
# ToolSpec, ToolConfig, OutputFormat, Message) and its own events out.

TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
TOOL_CHOICES = ("auto", "none", "required", "function")
OUTPUT_KINDS_JSON = ("json_object", "json_schema")


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One function the model may call: its name, what it does, its parameters as a JSON Schema."""
    name: str
    description: str
    parameters: dict


@dataclasses.dataclass(frozen=True)
class ToolConfig:
    """A request's tools and how the model may use them, with the instructions that teach them to the
    model, rendered once when the config is made: a config the chat route keeps for an agent's next turn
    (parse_chat_tools) brings its rendering along.

    choice: auto | none | required | function (then `function` names the one it must call).
    parallel: several calls in one reply, or only the first."""
    tools: tuple[ToolSpec, ...] = ()
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True
    instructions: str = dataclasses.field(init=False, default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "instructions", tool_instructions(self))   # frozen: set once, here

    @property
    def callable(self) -> tuple[ToolSpec, ...]:
        """The tools a call may name: none with `none`, only the named one with a named choice."""
        if self.choice == "none":
            return ()
        if self.choice == "function":
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools

    @property
    def must_call(self) -> bool:
        return self.choice in ("required", "function") and bool(self.callable)


@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """What the reply's content must be: text | json_object | json_schema (with `schema`, named `name`)."""
    kind: str = "text"
    name: str = ""
    schema: dict | None = None

    @property
    def is_json(self) -> bool:
        return self.kind in OUTPUT_KINDS_JSON


def tool_spec(name: Any, description: Any, parameters: Any, param: str) -> ToolSpec:
    """A checked ToolSpec from any API's fields; `param` names the tool in error messages."""
    if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
        raise ApiError(400, f"{param}.name must be 1-128 letters, digits, '_', '-', '.' or ':'.", "invalid_value",
                       f"{param}.name")
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"{param}.description must be a string.", "invalid_type", f"{param}.description")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ApiError(400, f"{param}.parameters must be a JSON Schema object.", "invalid_type", f"{param}.parameters")
    return ToolSpec(name, description or "", parameters)


def tool_config(tools: list[ToolSpec], choice: str = "auto", function: str | None = None,
                parallel: bool = True, param: str = "tool_choice") -> ToolConfig:
    """A checked ToolConfig: names unique, the choice known, a named or required call possible."""
    names = [t.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ApiError(400, f"Two tools are named `{duplicate}`; tool names must be unique.", "invalid_value", "tools")
    problem = tool_choice_problem(choice, function, names)
    if problem:
        raise ApiError(400, f"`{param}` {problem}.", "invalid_value", param)
    return ToolConfig(tuple(tools), choice, function if choice == "function" else None, parallel)


def tool_choice_problem(choice: str, function: str | None, names: list[str]) -> str:
    if choice not in TOOL_CHOICES:
        return "must be auto, none, required or a named function"
    if choice in ("required", "function") and not names:
        return "asks for a tool call, but the request has no tools"
    if choice == "function" and function not in names:
        return f"names the function `{function}`, which is not among the tools"
    return ""


# An agent sends the same tools with every turn of its loop (Claude Code and Codex about 60 kB of them),
# and reading, checking and rendering them was most of a request's own CPU time. So what each API makes of
# a request's tool fields is kept by them, in memos of each app's own (BridgeState.chat_tools,
# anthropic_tools, responses_tools: two bridges in one process share none), for a few tool sets at once
# (several agents), none for fields over 128 kB, so that the memos hold a few MB at most whatever clients send.
TOOL_MEMO_ENTRIES, TOOL_MEMO_LONGEST = 8, 128 * 1024


def tool_memo() -> Memo:
    return Memo(TOOL_MEMO_ENTRIES, TOOL_MEMO_LONGEST)


def kept_tools(body: dict, fields: tuple[str, ...], read: Callable[[dict], Any], memo: Memo) -> Any:
    """`read(body)`, which reads only `fields` of the body, once per tool set: `memo` keeps it by the
    fields present (value_key), so a changed, added or removed field is a new key and no result is ever
    stale (a null is not a missing field, and 1 is not true). Fields nested deeper than pickle goes (two
    frames a level, json.loads one: past about 500) are read and not kept, rather than a RecursionError."""
    present = {field: body[field] for field in fields if field in body}
    try:
        key = value_key(present) if present else None
    except RecursionError:
        key = None
    return read(body) if key is None else memo.get(key, lambda: read(body))


def output_format(kind: Any, name: Any = None, schema: Any = None, param: str = "response_format") -> OutputFormat:
    """A checked OutputFormat. A schema is checked here, so that a broken one is the client's 400 and not
    the model's invalid_model_output later."""
    if kind in (None, "text"):
        return OutputFormat()
    if kind not in OUTPUT_KINDS_JSON:
        raise ApiError(400, f"`{param}.type` must be text, json_object or json_schema.", "invalid_value",
                       f"{param}.type")
    if kind == "json_object":
        return OutputFormat("json_object")
    if not isinstance(schema, dict):
        raise ApiError(400, f"`{param}` of type json_schema needs a `schema` object.", "invalid_value", param)
    import jsonschema  # lazily: see json_schema_validator

    try:
        json_schema_validator(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ApiError(400, f"`{param}` has an invalid JSON Schema: {error.message}", "invalid_value",
                       param) from None
    return OutputFormat("json_schema", name if isinstance(name, str) else "", schema)


def json_schema_validator(schema: dict) -> Any:
    """The validator class for a schema's draft. jsonschema is imported here, not at the top: it costs
    60 ms and 6 MB, and only requests with a schema need it."""
    import jsonschema

    return jsonschema.validators.validator_for(schema)


# Tools and tool history -> instructions and text for the model.

TRIM_LIMITS = {"description": 2_000, "tool_list": 40_000, "tool_result": 40_000}    # characters
TRIM_MARKER = "[… {count} characters {what} left out by the bridge …]"
TOOL_PROMPT = """# Tools

You can call the functions listed below. To call one, write a block in exactly this form, with the \
arguments as a JSON object that matches the function's parameters:
<tool_call>{{"name": "<function name>", "arguments": {{...}}}}</tool_call>
{parallel}
{choice}
After your call blocks, stop: the results come back in the next message as <tool_response> blocks. Never \
write a <tool_response> yourself.

Functions, one JSON object each:
{functions}"""
CHOICE_RULES = {
    "auto": "Call a function when it helps with the request; otherwise answer in plain text.",
    "required": "You must call at least one function in this reply.",
    "function": "You must call the function `{function}` in this reply.",
}
NONE_RULE = "# Tools\n\nDo not call any function in this reply and write no <tool_call> blocks; answer in text."
PARALLEL_RULES = {True: "You may write several blocks to call several functions at once.",
                  False: "Call at most one function per reply: write one block only."}
PREFILL_RULE = ("# Continue\n\nThe last assistant message is unfinished. Continue it exactly where it ends, "
                "without repeating any of it: your reply is appended to it as it is.")
FORMAT_RULES = {
    "json_object": "# Reply format\n\nReply with one JSON object and nothing else: no prose, no code fences.",
    "json_schema": "# Reply format\n\nReply with one JSON value and nothing else (no prose, no code fences); it "
                   "must validate against this JSON Schema{name}:\n{schema}",
}


def trimmed(text: str, limit: int, what: str) -> str:
    """`text` cut to about `limit` characters, head and tail kept, with a marker saying how much went."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    marker = TRIM_MARKER.format(count=f"{len(text) - head - tail:,}", what=what)
    return f"{text[:head]}\n{marker}\n{text[len(text) - tail:]}"


def function_lines(tools: tuple[ToolSpec, ...]) -> list[str]:
    """One JSON line per tool. Descriptions are cut at TRIM_LIMITS; past the tool list's budget, tools
    are listed without their parameters, and both say so."""
    lines: list[str] = []
    size = 0
    for tool in tools:
        entry: dict[str, Any] = {"name": tool.name,
                                 "description": trimmed(tool.description, TRIM_LIMITS["description"],
                                                        "of this description")}
        full = json_text({**entry, "parameters": tool.parameters})
        if size + len(full) > TRIM_LIMITS["tool_list"]:
            entry["parameters"] = "[left out by the bridge: the tool list is too long; ask for them in text]"
            full = json_text(entry)
        lines.append(full)
        size += len(full)
    return lines


def tool_instructions(config: ToolConfig) -> str:
    """The system-part text that teaches the model the tools (ToolConfig.instructions); empty when the
    request has none."""
    if not config.tools:
        return ""
    if not config.callable:
        return NONE_RULE
    return TOOL_PROMPT.format(parallel=PARALLEL_RULES[config.parallel],
                              choice=CHOICE_RULES[config.choice].format(function=config.function),
                              functions="\n".join(function_lines(config.callable)))


def format_instructions(output: OutputFormat) -> str:
    if not output.is_json:
        return ""
    schema = json.dumps(output.schema, ensure_ascii=False) if output.schema is not None else ""
    return FORMAT_RULES[output.kind].format(name=f" (named {output.name})" if output.name else "", schema=schema)


def call_block(call: ToolCall) -> str:
    """An earlier call as the model would have written it, with the id its result refers to."""
    try:
        arguments: Any = json.loads(call.arguments)
    except ValueError:
        arguments = call.arguments      # a client's own history may hold anything: shown as it came
    body = {"id": call.id, "name": call.name, "arguments": arguments}
    return f"<tool_call>{json_text(body)}</tool_call>"


def result_block(message: Message, names: dict[str, str]) -> str:
    """A tool result, tagged with its call's id and function; very long results are trimmed, visibly."""
    name = message.name or names.get(message.tool_call_id or "", "")
    text = trimmed(message.text, TRIM_LIMITS["tool_result"], "of this result")
    tag = f"<tool_response id={json.dumps(message.tool_call_id or '')} name={json.dumps(name)}>"
    return f"{tag}\n{text}\n</tool_response>"


def render_tool_history(messages: list[Message]) -> list[Message]:
    """The history with assistant calls and tool results as text, in the form the model is taught."""
    names = {call.id: call.name for m in messages for call in m.tool_calls}
    rendered = []
    for message in messages:
        if message.tool_calls:
            blocks = [call_block(call) for call in message.tool_calls]
            text = "\n".join([message.text, *blocks] if message.text else blocks)
            rendered.append(Message(message.role, text, message.images))
        elif message.role == "tool":
            rendered.append(Message("tool", result_block(message, names), message.images))
        else:
            rendered.append(message)
    return rendered


def agent_messages(messages: list[Message], config: ToolConfig, output: OutputFormat) -> list[Message]:
    """What render_transcript takes for an agent turn: the history as text and the bridge's instructions
    as the last system message (after the client's own, which they refine). A trailing assistant message
    is a prefill: the model is asked to continue it."""
    prefill = PREFILL_RULE if messages and messages[-1].role == "assistant" else ""
    parts = (config.instructions, format_instructions(output), prefill)
    instructions = "\n\n".join(part for part in parts if part)
    rendered = render_tool_history(messages)
    return [*rendered, Message("system", instructions, [])] if instructions else rendered


def new_turn_start(messages: list[Message]) -> int:
    """Where the turn a request adds begins: after the last assistant message, so a follow-up carries the
    tool results and user messages since (len(messages) for a prefill: there is no new turn to send)."""
    start = len(messages)
    while start > 0 and messages[start - 1].role in ("user", "tool"):
        start -= 1
    return start


def followup_text(messages: list[Message], start: int, config: ToolConfig, output: OutputFormat) -> str:
    """The new turn alone, for a follow-up: tool results as <tool_response> blocks, the user's words as
    they are, and what this request asks of the reply (a required call, a format) once more, since it may
    differ from the first turn's."""
    rendered = render_tool_history(messages)[start:]
    parts = [render_message(message, describe_images=False) for message in rendered]
    if config.must_call:
        parts.append(CHOICE_RULES[config.choice].format(function=config.function))
    parts.append(format_instructions(output))
    return "\n\n".join(part for part in parts if part)


# =====================================================================================================
# Tool emulation: replies
# =====================================================================================================

TAG_OPEN, TAG_CLOSE, FENCE = "<tool_call>", "</tool_call>", "```"
BLOCK_CLOSERS = {TAG_OPEN: TAG_CLOSE, FENCE: FENCE}
FENCE_HEAD_RE = re.compile(r"```([A-Za-z0-9_+-]*)(\s*)(.?)", re.DOTALL)
INNER_FENCE_RE = re.compile(r"```[A-Za-z0-9_+-]*\s*(.*?)\s*(?:```)?", re.DOTALL)
TRAILING_COMMA_RE = re.compile(r'("(?:[^"\\]|\\.)*")|,(\s*[}\]])', re.DOTALL)
HOLD_NONE, HOLD_UNTIL_CALL, HOLD_ALL = "none", "until_call", "all"


def loads_lenient(text: str) -> Any:
    """json.loads that also takes commas before a closing bracket, a near miss models often write
    (commas inside strings are left alone). Raises ValueError."""
    try:
        return json.loads(text)
    except ValueError:
        fixed = TRAILING_COMMA_RE.sub(lambda m: m.group(1) or m.group(2), text)
        if fixed == text:
            raise
        return json.loads(fixed)


def partial_start(text: str, words: tuple[str, ...]) -> int:
    """Where a trailing piece of `text` that may grow into one of `words` begins; len(text) when none."""
    longest = max(map(len, words)) - 1
    tail = text[-longest:]
    if not any(word[0] in tail for word in words):
        return len(text)                    # the common case, on every delta of a stream
    for size in range(min(len(text), longest), 0, -1):
        if any(word.startswith(text[-size:]) for word in words):
            return len(text) - size
    return len(text)


def fence_kind(text: str) -> str | None:
    """For text starting with ```: "block" when it opens a fenced JSON object (```json or a bare fence,
    then `{`), "text" when it cannot, None while the next characters decide."""
    match = FENCE_HEAD_RE.match(text)
    assert match is not None                # the caller found the fence at the start
    language, space, first = match.groups()
    if language.lower() not in ("", "json") and (space or first):
        return "text"
    if not first:
        return None
    return "block" if first == "{" else "text"


def block_body(raw: str, opener: str) -> str:
    """The JSON text of a block: without its tags or fence, a closer cut by the end of the reply, a
    language word, or a fence inside the tags."""
    body, closer = raw[len(opener):], BLOCK_CLOSERS[opener]
    body = body[:-len(closer)] if body.endswith(closer) else body[:partial_start(body, (closer,))]
    if opener == FENCE:
        return body.lstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    inner = INNER_FENCE_RE.fullmatch(body.strip())
    return (inner.group(1) if inner else body).strip()


def decode_call(body: str, names: set[str]) -> tuple[str, dict] | None:
    """(name, arguments) when `body` is a JSON object naming a callable function with an object of
    arguments (missing arguments are an empty object); None otherwise: the block stays text."""
    try:
        value = loads_lenient(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in names:
        return None
    arguments = value.get("arguments", {})
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def call_id(seed: str, index: int, prefix: str = "call_") -> str:
    """A call's id, the same whenever the same reply is read: from the reply's own id and the call's place."""
    return prefix + sha256_hex(f"{seed}:{index}")[:24]


def reply_hold(config: ToolConfig, output: OutputFormat) -> str:
    """How much text the parser holds back: all of it for a JSON format (the answer is the checked JSON
    alone), until the first call when a call is required (a reply without one is asked again), else none."""
    if output.is_json:
        return HOLD_ALL
    return HOLD_UNTIL_CALL if config.must_call else HOLD_NONE


@dataclasses.dataclass(slots=True)
class ToolEvent:
    """What the parser read: text to relay, a complete call, or the end of the reply."""
    kind: str                       # text | call | end
    text: str = ""
    call: ToolCall | None = None


class ToolCallParser:
    """Text deltas of a reply in, ToolEvents out.

    Text is relayed as soon as it cannot be the start of a block; only a possible opener at the end of
    the text, or an open block, waits. Blocks are `<tool_call>{...}</tool_call>` (SPEC §7.1; its JSON
    may be fenced) and a fenced JSON object (```json {...}```). A block is a call when it names a
    callable function and its arguments are an object; otherwise it is text (fail closed). Several
    blocks are parallel calls, or only the first with parallel calls off. A block cut by the end of the
    reply is a call when its JSON is complete, text otherwise. Text may be held back (see reply_hold):
    `held` is then what the caller has not been given."""

    def __init__(self, config: ToolConfig, output: OutputFormat, seed: str, id_prefix: str = "call_"):
        self.config, self.output = config, output
        self.names = {tool.name for tool in config.callable}
        self.hold = reply_hold(config, output)
        self.seed, self.id_prefix = seed, id_prefix
        self.pending = ""                   # undecided text, or the block being read
        self.opener: str | None = None      # the block being read: TAG_OPEN or FENCE
        self.scanned = 0                    # how much of the block was searched for its closer
        self.calls: list[ToolCall] = []
        self.kept: list[str] = []           # text held back (see reply_hold)
        self.gap = ""                       # trailing whitespace not yet relayed
        self.parts: list[str] = []          # all of the reply's text (blocks that became calls excluded)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def held(self) -> str:
        return "".join(self.kept)

    def passes(self, delta: str) -> bool:
        """True, with `delta` taken as the reply's text, when it goes to the client as it came: nothing can
        be a call and nothing is held back (a plain chat: the relay's hot path skips feed's events)."""
        if self.names or self.hold != HOLD_NONE:
            return False
        self.parts.append(delta)
        return True

    def feed(self, delta: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if not self.names:                  # nothing can be a call: the text passes as it came, delta by delta
            if delta:
                self.parts.append(delta)
                self._relay(delta, events)
            return events
        if not self.pending and "<" not in delta and "`" not in delta:
            self._text(delta, events)       # the common delta: plain text, nothing undecided before it
            return events
        self.pending += delta
        while self._step(events):
            pass
        return events

    def close(self) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if self.opener is not None:
            self._block(self.pending, self.opener, events)
        else:
            self._text(self.pending, events)
        if self.gap and not self.calls:
            self.gap, text = "", self.gap
            self.parts.append(text)
            self._relay(text, events)
        self.pending, self.opener, self.gap = "", None, ""
        events.append(ToolEvent("end"))
        return events

    def _step(self, events: list[ToolEvent]) -> bool:
        """Decide what can be decided of `pending`; True when a further step may decide more."""
        if self.opener is None:
            return self._outside(events)
        closer = BLOCK_CLOSERS[self.opener]
        end = self.pending.find(closer, max(len(self.opener), self.scanned - len(closer) + 1))
        if end < 0:
            self.scanned = len(self.pending)    # a long block is searched once, not once per delta
            return False
        end += len(closer)
        raw, self.pending = self.pending[:end], self.pending[end:]
        self._block(raw, self.opener, events)
        self.opener = None
        return True

    def _outside(self, events: list[ToolEvent]) -> bool:
        starts = [(at, opener) for opener in (TAG_OPEN, FENCE) if (at := self.pending.find(opener)) >= 0]
        if not starts:
            cut = partial_start(self.pending, (TAG_OPEN, FENCE))
            self._text(self.pending[:cut], events)
            self.pending = self.pending[cut:]
            return False
        start, opener = min(starts)
        self._text(self.pending[:start], events)
        self.pending = self.pending[start:]
        if opener == FENCE:
            kind = fence_kind(self.pending)
            if kind is None:
                return False
            if kind == "text":
                self._text(FENCE, events)
                self.pending = self.pending[len(FENCE):]
                return True
        self.opener, self.scanned = opener, 0
        return True

    def _block(self, raw: str, opener: str, events: list[ToolEvent]) -> None:
        decoded = decode_call(block_body(raw, opener), self.names)
        if decoded is None:
            self._text(raw, events)
            return
        if self.calls and not self.config.parallel:
            return                          # parallel calls are off: the first call is the reply's only one
        name, arguments = decoded
        call = ToolCall(call_id(self.seed, len(self.calls), self.id_prefix), name,
                        json.dumps(arguments, ensure_ascii=False))
        self.calls.append(call)
        if self.kept and self.hold == HOLD_UNTIL_CALL:
            events.append(ToolEvent("text", self.held))
            self.kept.clear()
        events.append(ToolEvent("call", call=call))

    def _text(self, text: str, events: list[ToolEvent]) -> None:
        if not text:
            return
        # Trailing whitespace waits for the text after it: whitespace after the last call is no content, and
        # however the stream is split, the same text comes out.
        kept = text.rstrip()
        if not kept:
            self.gap += text
            return
        text, self.gap = self.gap + kept, text[len(kept):]
        self.parts.append(text)
        self._relay(text, events)

    def _relay(self, text: str, events: list[ToolEvent]) -> None:
        if self.hold == HOLD_ALL or (self.hold == HOLD_UNTIL_CALL and not self.calls):
            self.kept.append(text)
        else:
            events.append(ToolEvent("text", text))


# After the reply: the loop guard, JSON answers, asking once more, usage.

TOOL_LOOP_LIMIT = 3                 # the same call this many times in a row is allowed; once more is a loop
REPLY_RETRIES = 1                   # requests for a missing call or a repaired JSON answer, per client request
JSON_FENCE_RE = re.compile(r"```[A-Za-z0-9_+-]*\s*(.*?)```", re.DOTALL)
JSON_START_RE = re.compile(r"[{\[]")
TOOL_RETRY_PROMPTS = {
    "required": "Your reply did not call a function, but this request needs a function call. Call the right "
                "function now, with a <tool_call> block.",
    "function": "Your reply did not call `{function}`, but this request needs that call. Call it now, with a "
                "<tool_call> block.",
}
REPAIR_PROMPT = ("Your reply was not valid: {problem}. Reply again with the corrected JSON value alone: no prose, "
                 "no code fences.")


class ToolLoopError(ApiError):
    """The history ends in the same call, with the same arguments, too many times in a row: answered with
    this error instead of one more upstream request."""

    def __init__(self, name: str, count: int):
        super().__init__(400, f"The model called `{name}` with the same arguments {count} times in a row; the "
                              "bridge stopped this tool loop instead of asking LM Arena again. Change the "
                              "conversation or the tool's result, then retry.", "tool_loop_detected", "messages")


class InvalidModelOutput(ApiError):
    """The model's answer did not have the requested format, also after one repair request."""

    def __init__(self, problem: str):
        super().__init__(502, f"The model's reply did not match the requested response format, also after one "
                              f"repair request: {problem}.", "invalid_model_output",
                         headers={"x-should-retry": "false"})


def call_key(call: ToolCall) -> tuple[str, str]:
    """What makes two calls the same: the function and its arguments, spelling aside."""
    return call.name, canonical_json(call.arguments)


def check_tool_loop(messages: list[Message], limit: int = TOOL_LOOP_LIMIT) -> None:
    """Raise ToolLoopError when the history's calls end in more than `limit` identical ones."""
    calls = [call for message in messages for call in message.tool_calls]
    if not calls:
        return
    last = call_key(calls[-1])
    run = next((i for i, call in enumerate(reversed(calls)) if call_key(call) != last), len(calls))
    if run > limit:
        raise ToolLoopError(calls[-1].name, run)


def schema_problem(value: Any, schema: dict) -> str | None:
    """Why `value` does not validate against `schema`, in one line; None when it does."""
    import jsonschema  # lazily, as in json_schema_validator

    validator = json_schema_validator(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"at `${where}`: {error.message}"


def output_problem(value: Any, output: OutputFormat) -> str | None:
    if output.kind == "json_object":
        return None if isinstance(value, dict) else "the JSON value is not an object"
    assert output.schema is not None
    return schema_problem(value, output.schema)


def json_values(text: str) -> Iterator[Any]:
    """The JSON values in a reply, best first: the whole reply, each fenced block, then each value that
    starts in the prose. Trailing commas are forgiven."""
    for candidate in (text, *(m.group(1) for m in JSON_FENCE_RE.finditer(text))):
        with contextlib.suppress(ValueError):
            yield loads_lenient(candidate.strip())
    fixed = TRAILING_COMMA_RE.sub(lambda m: m.group(1) or m.group(2), text)
    decoder = json.JSONDecoder()
    end = 0
    for match in JSON_START_RE.finditer(fixed):
        if match.start() < end:
            continue                    # inside a value already read: its parts are not answers of their own
        with contextlib.suppress(ValueError):
            value, end = decoder.raw_decode(fixed, match.start())
            yield value


def checked_json(text: str, output: OutputFormat) -> tuple[str | None, str]:
    """(the JSON answer alone, "") for the first value in `text` that fits `output`, else (None, why)."""
    problem = None
    for value in json_values(text):
        found = output_problem(value, output)
        if found is None:
            return json.dumps(value, ensure_ascii=False), ""
        problem = problem or found
    return None, problem or "the reply contains no JSON value"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do with a finished reply. answer: relay `content` (the text the parser held back, or the
    checked JSON that replaces it); ask_again: send `prompt` as the next user turn of the same
    conversation and read that reply instead; fail: raise InvalidModelOutput(problem)."""
    action: str
    content: str = ""
    prompt: str = ""
    problem: str = ""


def judge_reply(parser: ToolCallParser, attempt: int) -> Verdict:
    """The policy after a reply (after parser.close()): a required call that did not come is asked for
    once more, then the reply is the answer; a JSON answer is extracted and checked, asked for once more,
    then an error. `attempt` counts the requests already made for this client request, from 0."""
    config, output = parser.config, parser.output
    retry = attempt < REPLY_RETRIES
    if not parser.calls and config.must_call and retry:
        return Verdict("ask_again", prompt=TOOL_RETRY_PROMPTS[config.choice].format(function=config.function))
    if parser.calls or not output.is_json:
        return Verdict("answer", content=parser.held)
    content, problem = checked_json(parser.text, output)
    if content is not None:
        return Verdict("answer", content=content)
    if retry:
        return Verdict("ask_again", prompt=REPAIR_PROMPT.format(problem=problem), problem=problem)
    return Verdict("fail", problem=problem)


def calls_tokens(calls: list[ToolCall]) -> int:
    """The completion tokens of a reply's calls, estimated like its text."""
    return sum(estimate_tokens(call.name + call.arguments) for call in calls)


def agent_prompt_tokens(messages: list[Message], config: ToolConfig, output: OutputFormat, limit: int) -> int:
    """The prompt tokens of an agent turn, tool definitions and earlier calls included, without sending it
    (Anthropic's count_tokens)."""
    return estimate_tokens(render_transcript(agent_messages(messages, config, output), limit)[0])


# =====================================================================================================
# OpenAI chat tools
# =====================================================================================================

UNSUPPORTED_CHAT_FIELDS = (     # (field, whether a value is refused, why): a clear 400, never a silent drop
    ("logprobs", lambda value: value is True, "LM Arena does not return token log probabilities"),
    ("top_logprobs", lambda value: bool(value), "LM Arena does not return token log probabilities"),
    ("audio", lambda value: value is not None, "LM Arena's models give no audio output"),
    ("modalities", lambda value: isinstance(value, list) and "audio" in value,
     "LM Arena's models give no audio output"),
    ("functions", lambda value: bool(value), "the legacy `functions` field is not supported; send `tools`"),
    ("function_call", lambda value: value is not None,
     "the legacy `function_call` field is not supported; send `tool_choice`"),
)
OLLAMA_VERSION = "0.12.6"       # what the Ollama probes report: a version current clients accept


def refuse_unsupported(body: dict) -> None:
    for field, refused, why in UNSUPPORTED_CHAT_FIELDS:
        if field in body and refused(body[field]):
            raise ApiError(400, f"`{field}` cannot be served: {why}.", "unsupported_parameter", field)


def chat_tool_spec(raw: Any, index: int) -> ToolSpec:
    param = f"tools[{index}]"
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or raw.get("type", "function") != "function":
        raise ApiError(400, f"{param} must be {{\"type\": \"function\", \"function\": {{...}}}}: only function "
                            "tools can be emulated on LM Arena.", "invalid_value", param)
    return tool_spec(function.get("name"), function.get("description"), function.get("parameters"),
                     f"{param}.function")


def chat_tool_choice(raw: Any) -> tuple[str, str | None]:
    if raw is None:
        return "auto", None
    if raw in ("auto", "none", "required"):
        return raw, None
    function = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return "function", function["name"]
    raise ApiError(400, "`tool_choice` must be auto, none, required or {\"type\": \"function\", \"function\": "
                        "{\"name\": ...}}.", "invalid_value", "tool_choice")


CHAT_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


def parse_chat_tools(body: dict, memo: Memo) -> ToolConfig:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat request, read once per tool set (kept_tools):
    the ToolConfig, its rendering included."""
    return kept_tools(body, CHAT_TOOL_FIELDS, read_chat_tools, memo)


def read_chat_tools(body: dict) -> ToolConfig:
    raw = body.get("tools") or []
    if not isinstance(raw, list):
        raise ApiError(400, "`tools` must be an array.", "invalid_type", "tools")
    tools = [chat_tool_spec(tool, i) for i, tool in enumerate(raw)]
    choice, function = chat_tool_choice(body.get("tool_choice"))
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "`parallel_tool_calls` must be a boolean.", "invalid_type", "parallel_tool_calls")
    if not tools and choice == "none":
        return ToolConfig()
    return tool_config(tools, choice, function, parallel is not False)


def parse_response_format(raw: Any) -> OutputFormat:
    if raw is None:
        return OutputFormat()
    if not isinstance(raw, dict):
        raise ApiError(400, "`response_format` must be an object.", "invalid_type", "response_format")
    spec = raw.get("json_schema") if raw.get("type") == "json_schema" else {}
    if not isinstance(spec, dict):
        raise ApiError(400, "`response_format.json_schema` must be an object.", "invalid_type",
                       "response_format.json_schema")
    return output_format(raw.get("type"), spec.get("name"), spec.get("schema"))


def ollama_models(models: list[dict], at: float) -> dict:
    """The model list in the shape of Ollama's /api/tags (and /api/ps), for clients that probe for Ollama."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    names = list(dict.fromkeys(m["publicName"] for m in usable_models(models)))
    return {"models": [{"name": name, "model": name, "modified_at": stamp, "size": 0,
                        "digest": sha256_hex(name), "details": {"format": "", "family": "", "families": None,
                                                                "parameter_size": "", "quantization_level": ""}}
                       for name in names]}


# =====================================================================================================
# Chat jobs
# =====================================================================================================
# One chat request on the conversation engine, whatever API it came in: the turn planned (a follow-up
# when LM Arena holds the history), the reply read for tool calls and formats, asked once more when the
# policy says so (judge_reply), and the conversation remembered for the next turn. An API section turns
# the job's output items into its own events.

TRIMMED_HEADER = "x-bridge-history-trimmed"     # how many of the earliest turns were left out


@dataclasses.dataclass
class ChatJob:
    """One chat request from validation to the recorded result."""
    state: BridgeState
    key: dict
    chat: ChatRequest
    plan: TurnPlan
    started: float
    tools: ToolConfig = ToolConfig()
    output: OutputFormat = OutputFormat()
    completion_id: str = dataclasses.field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    call_prefix: str = "call_"          # the API's call ids: call_ (OpenAI), toolu_ (Anthropic)
    created: int = dataclasses.field(default_factory=lambda: int(now()))
    builder: ReplyBuilder = dataclasses.field(default_factory=ReplyBuilder)
    content: list[str] = dataclasses.field(default_factory=list)     # the content relayed
    calls: list[ToolCall] = dataclasses.field(default_factory=list)
    route: str = dataclasses.field(kw_only=True)      # the API route, as usage and metrics name it
    large: bool = dataclasses.field(default=False, kw_only=True)   # its steps that grow with it run off the loop
    # The client's ASGI receive, watched for a hang-up while nothing has been sent (unless_client_leaves).
    client: Callable[[], Awaitable[Any]] | None = dataclasses.field(default=None, kw_only=True)
    recorded: bool = dataclasses.field(default=False, init=False)    # its usage row is written

    def events(self) -> AsyncGenerator[Event, None]:
        return self.state.turns.events(self.plan, now() + self.state.settings.request_timeout)

    async def outputs(self) -> AsyncGenerator[tuple[str, Any], None]:
        """What to relay, in order: ("content" | "reasoning", text), ("call", (index, ToolCall)),
        ("annotated", (text, annotations)) and ("ping", ""). A reply the policy asks again for (judge_reply)
        is held back whole, so nothing of it was relayed; the next reply replaces it."""
        for attempt in range(REPLY_RETRIES + 1):
            self.builder = ReplyBuilder()
            parser = ToolCallParser(self.tools, self.output, f"{self.completion_id}:{attempt}", self.call_prefix)
            async with contextlib.aclosing(self.events()) as events:
                async for event in events:
                    for item in self.fold(parser, event):
                        yield item
            tail = parser.feed(self.builder.finish()) + parser.close()
            verdict = judge_reply(parser, attempt)
            if verdict.action == "ask_again":
                log.info("asking once more in the same conversation: %s", verdict.problem or "no tool call")
                self.ask_again(parser, verdict.prompt)
                continue
            if verdict.action == "fail":
                raise InvalidModelOutput(verdict.problem)
            for item in self.finish(tail, verdict.content):
                yield item
            return

    def fold(self, parser: ToolCallParser, event: Event) -> list[tuple[str, Any]]:
        if event.kind == "heartbeat":
            return [("ping", "")]
        delta = self.builder.add(event)
        if delta is None:
            return []
        if delta[0] == "reasoning":
            return [delta]
        if parser.passes(delta[1]):
            self.content.append(delta[1])
            return [delta]
        return self.relay(parser.feed(delta[1]))

    def relay(self, events: list[ToolEvent]) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []
        for event in events:
            if event.kind == "text":
                self.content.append(event.text)
                items.append(("content", event.text))
            elif event.call is not None:
                items.append(("call", (len(self.calls), event.call)))
                self.calls.append(event.call)
        return items

    def finish(self, tail: list[ToolEvent], held: str) -> list[tuple[str, Any]]:
        """The last items: the end of the reply, and the text held back (or the JSON answer replacing it);
        with citations, the closing text carries the annotations, as OpenAI streams them."""
        items = self.relay([*tail, ToolEvent("text", held)] if held else tail)
        if not self.builder.annotations:
            return items
        text = "".join(value for kind, value in items if kind == "content")
        return [item for item in items if item[0] != "content"] + [("annotated", (text, self.builder.annotations))]

    def ask_again(self, parser: ToolCallParser, prompt: str) -> None:
        """The next turn of the same evaluation asks again; the reply that failed stays in it (the model
        sees what it is corrected for), and a new evaluation, if one must be opened, carries it too."""
        opened = self.plan.opened
        history = [*self.chat.messages, Message("assistant", parser.text, [], tool_calls=parser.calls),
                   Message("user", prompt, [])]
        content, _ = render_transcript(agent_messages(history, self.tools, self.output),
                                       self.state.settings.max_prompt_chars)
        followup = None if opened is None else {"evaluation_id": opened.evaluation_id,
                                                "account_id": opened.account_id, "turns": opened.turns}
        self.plan = dataclasses.replace(self.plan, new_content=content, images=[], followup=followup,
                                        followup_content=prompt, opened=None)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.calls else openai_finish_reason(self.builder.finish_reason)

    def usage(self) -> dict:
        return completion_usage(self.plan.new_content, self.builder)

    def fingerprint_with(self, reply: Message) -> str:
        history = self.plan.history or [normalise_for_match(m) for m in self.chat.messages]
        return fingerprint_of(self.key["id"], self.chat.model, [*history, normalise_for_match(reply)])

    async def succeeded(self) -> None:
        """Remember which evaluation now holds this exact history, for the next turn's follow-up."""
        opened = self.plan.opened
        if opened is None:
            return
        reply = Message("assistant", "".join(self.content), [], tool_calls=self.calls)
        fingerprint = await off_loop(self.large, self.fingerprint_with, reply)
        self.state.store.remember_conversation(fingerprint, opened.evaluation_id, opened.account_id,
                                               self.plan.model["id"], self.key["id"], opened.turns)

    def fail(self, error: Exception) -> ApiError:
        """Record a failure of this job and turn it into the OpenAI error to answer with."""
        api_error = api_error_for(error)
        self.record(api_error.status, error=api_error.code, cause=api_error.cause)
        return api_error

    def record(self, status: int, usage: dict | None = None, error: str | None = None,
               cause: str | None = None) -> None:
        usage = usage or {}
        self.recorded = True
        self.state.usage.add(self.route, self.key["id"], self.chat.model, status, self.started,
                             usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), error, cause,
                             self.plan.routed_model)

    @property
    def headers(self) -> dict[str, str]:
        """A history trimmed to fit is said, never silent (the log has it too); the model LM Arena's
        router chose is named (the response's `model` stays the one asked for)."""
        trimmed = self.plan.dropped and self.plan.followup is None
        headers = {TRIMMED_HEADER: str(self.plan.dropped)} if trimmed else {}
        if self.plan.routed_model:
            headers[ROUTED_MODEL_HEADER] = self.plan.routed_model
        return headers


@dataclasses.dataclass
class TurnDraft:
    """The CPU-heavy part of planning a turn, without the store: run off the event loop for large requests."""
    content: str
    dropped: int
    followup_content: str
    history: list[list[str]]
    fingerprint: str | None             # of the history before the new turn, when there is one


def draft_turn(key_id: int, chat: ChatRequest, limit: int, tools: ToolConfig = ToolConfig(),
               output: OutputFormat = OutputFormat()) -> TurnDraft:
    newest = len(chat.messages[-1].text)
    if newest > limit:     # older turns can be dropped to fit, the newest one cannot
        raise ApiError(400, f"The newest message is {newest} characters; this bridge sends at most {limit} "
                            "(BRIDGE_MAX_PROMPT_CHARS).", "context_length_exceeded", "messages")
    content, dropped = render_transcript(agent_messages(chat.messages, tools, output), limit)
    start = new_turn_start(chat.messages)
    history = [normalise_for_match(m) for m in chat.messages]
    fingerprint = fingerprint_of(key_id, chat.model, history[:start]) if 0 < start < len(chat.messages) else None
    return TurnDraft(content, dropped, followup_text(chat.messages, start, tools, output), history, fingerprint)


def plan_turn(state: BridgeState, key: dict, chat: ChatRequest, model: dict, tools: ToolConfig = ToolConfig(),
              output: OutputFormat = OutputFormat(), draft: TurnDraft | None = None) -> TurnPlan:
    """A follow-up when the history before the new turn is held on LM Arena; else the whole history."""
    settings = state.settings
    draft = draft or draft_turn(key["id"], chat, settings.max_prompt_chars, tools, output)
    if draft.dropped:
        log.info("history longer than %d characters: the %d earliest turns were left out",
                 settings.max_prompt_chars, draft.dropped)
    followup = None
    if draft.fingerprint is not None:
        followup = state.store.conversation_for(draft.fingerprint, settings.conversation_ttl)
    return TurnPlan(model=model, modality=choose_modality(model) or "chat", new_content=draft.content, images=[],
                    followup=followup, followup_content=draft.followup_content, dropped=draft.dropped,
                    history=draft.history)


# =====================================================================================================
# OpenAI images
# =====================================================================================================

MAX_IMAGE_BYTES = 10 * 1024 * 1024
def sniff_image_type(data: bytes) -> str | None:
    """The image type from its first bytes; the declared type is not trusted."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


# A file whose first bytes are right can still be cut short (an interrupted download, a clipped data: URI);
# the site then fails with an unexplained "Invalid content", so each type's header and end are checked here.
IMAGE_IS_WHOLE: dict[str, Callable[[bytes], bool]] = {
    "image/png": lambda d: d[12:16] == b"IHDR" and d.rfind(b"IEND") > 16,
    "image/jpeg": lambda d: d.rfind(b"\xff\xd9") > 2,
    "image/webp": lambda d: len(d) >= 16 and int.from_bytes(d[4:8], "little") + 8 <= len(d),
    "image/gif": lambda d: len(d) > 13 and d.rstrip(b"\x00").endswith(b";"),
}


def check_image(data: bytes, where: str) -> ImageInput:
    if len(data) > MAX_IMAGE_BYTES:
        raise ApiError(400, f"{where}: the image is {len(data)} bytes; the limit is 10 MiB.", "image_too_large", where)
    mime = sniff_image_type(data)
    if mime is None:
        raise ApiError(400, f"{where}: not a PNG, JPEG, WebP or GIF image.", "invalid_image", where)
    if not IMAGE_IS_WHOLE[mime](data):
        raise ApiError(400, f"{where}: the {mime.split('/')[1].upper()} image is corrupt or truncated.",
                       "invalid_image", where)
    return ImageInput(data=data, mime=mime, where=where)


def decode_data_uri(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ApiError(400, f"{where}: a data: URI must be base64 encoded.", "invalid_image", where)
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 8:
        raise ApiError(400, f"{where}: the image is larger than 10 MiB.", "image_too_large", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data: URI is not valid base64.", "invalid_image", where) from None


# IPv6 forms that carry an IPv4 address, which is where they lead (through a NAT64 gateway, a 6to4 or
# Teredo relay, or the host's own stack): each is only as public as the IPv4 address in it.
NAT64_NETWORKS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if address in IPV4_COMPATIBLE or any(address in network for network in NAT64_NETWORKS):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [ip for ip in found if ip is not None]


def is_public(text: str) -> bool:
    """Whether an address (and any IPv4 address embedded in it) is globally routable."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    embedded = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else []
    return address.is_global and all(ip.is_global for ip in embedded)


def public_address(host: str) -> str:
    """An address of `host` that may be fetched on a client's behalf; ValueError saying why not when any of
    its addresses is private or loopback (that would let API users probe the bridge's own network)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        raise ValueError(f"the host {host} could not be resolved") from None
    if not infos or not all(is_public(str(info[4][0])) for info in infos):
        raise ValueError(f"the host {host} is a private or loopback address (allowed only with "
                         "BRIDGE_ALLOW_PRIVATE_URLS=1)")
    return str(infos[0][4][0])


def pinned_session(url: str, address: str, impersonate: str) -> AsyncSession:
    """A client that connects to `address` for the URL's host: the checked address is the one used, so a
    DNS name that answers differently the second time cannot lead to a private one."""
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    pin = f"{parsed.hostname}:{port}:{address if ':' not in address else f'[{address}]'}"
    return AsyncSession(impersonate=impersonate, curl_options={CurlOpt.RESOLVE: [pin]})


class FetchError(Exception):
    """Why a URL could not be read; `code` names it for the API error the caller builds."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


async def fetch_bytes(http: AsyncSession, url: str, timeout: float, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """GET a URL into memory, stopping as soon as it passes `limit` bytes. Redirects are not followed: a
    redirect could lead to an address that was never checked."""
    try:
        response = await traced(http.get(url, timeout=timeout, stream=True, discard_cookies=True,
                                         allow_redirects=False), "GET", url, None, " (an image)")
    except Exception as exc:  # noqa: BLE001 - any network failure: the URL could not be fetched
        raise FetchError(f"could not be fetched ({type(exc).__name__})", "image_url_unreachable") from None
    try:
        if response.status_code != 200:
            raise FetchError(f"answered HTTP {response.status_code}", "image_url_unreachable")
        data = bytearray()
        async for chunk in response.aiter_content():
            data += chunk
            if len(data) > limit:
                raise FetchError(f"is larger than {limit // 2 ** 20} MiB", "image_too_large")
        return bytes(data)
    except FetchError:
        raise
    except Exception as exc:  # noqa: BLE001 - any network failure: the download broke off
        raise FetchError(f"broke off while reading ({type(exc).__name__})", "image_url_unreachable") from None
    finally:
        await close_streamed(http, response)


def checked_url(url: str, where: str) -> urllib.parse.SplitResult:
    """The parts of an http(s) URL a client sent; a 400 for anything else, malformed ones too (a bad port,
    an unclosed IPv6 bracket)."""
    try:
        parsed = urllib.parse.urlsplit(url)
        valid = parsed.scheme in ("http", "https") and bool(parsed.hostname) and (parsed.port or 0) >= 0
    except ValueError:
        valid = False
    if not valid or any(c in url for c in "\x00\r\n\t "):
        raise ApiError(400, f"{where}: image URLs must be data:, http: or https:, and well-formed.",
                       "invalid_image_url", where)
    return parsed


async def fetch_image_url(url: str, where: str, settings: Settings, http: AsyncSession) -> bytes:
    parsed = checked_url(url, where)
    host = cast(str, parsed.hostname)
    try:
        if settings.allow_private_urls:
            return await fetch_bytes(http, url, timeout=10)
        try:
            address = await asyncio.to_thread(public_address, host)
        except ValueError as exc:
            raise ApiError(400, f"{where}: the image URL is refused: {exc}.", "invalid_image_url", where) from None
        async with pinned_session(url, address, settings.impersonate) as pinned:
            return await fetch_bytes(pinned, url, timeout=10)
    except FetchError as exc:
        raise ApiError(400, f"{where}: the image URL {exc}.", exc.code, where) from None


def takes_one_image(model: dict, newest: Message) -> bool | None:
    """Whether the model takes one image per message (None: no image input at all); refuses the newest
    message's images when the model cannot take them."""
    if not accepts_images(model):
        if newest.images:
            raise ApiError(400, f"The model `{model.get('publicName')}` does not accept image input.",
                           "model_without_vision", "messages")
        return None
    image_caps = model["capabilities"]["inputCapabilities"]["image"]
    single = isinstance(image_caps, dict) and image_caps.get("multipleImages") is False
    if single and len(newest.images) > 1:
        raise ApiError(400, f"The model `{model.get('publicName')}` takes one image per message.",
                       "too_many_images", "messages")
    return single


def history_images(messages: list[Message], room: int) -> list[tuple[int, int, str]]:
    """The newest `room` images of the user turns before the newest one: (message, image, URL)."""
    found = [(i, j, url) for i, m in enumerate(messages[:-1]) if m.role == "user" for j, url in enumerate(m.images)]
    return found[max(0, len(found) - room):]


async def load_images(messages: list[Message], model: dict, settings: Settings, http: AsyncSession,
                      with_history: bool = False, large: bool = False) -> list[ImageInput]:
    """The images to attach, checked and read into memory: the newest user turn's, where any refusal is a
    400 and nothing goes upstream. With `with_history` (a new evaluation carrying the history, on a model
    that takes several images) the earlier user turns' images come first; one of those that cannot be
    read stays an [image] mark in the transcript, as it would for a model without vision. The history is
    searched off the event loop when the request is `large`."""
    last = len(messages) - 1
    single = takes_one_image(model, messages[last])
    if single is None:
        return []
    cap = settings.max_images
    if len(messages[last].images) > cap:
        raise ApiError(400, f"The newest message has {len(messages[last].images)} images; this bridge attaches "
                            f"at most {cap} (BRIDGE_MAX_IMAGES).", "too_many_images", "messages")
    # the history's newest images, as many as the cap leaves room for; the others stay [image] marks
    room = 0 if single or not with_history else cap - len(messages[last].images)
    earlier = await off_loop(large, history_images, messages, room) if room > 0 else []
    images = []
    for i, j, url in earlier:
        with contextlib.suppress(ApiError):
            images.append(await load_image(url, f"messages[{i}] image {j + 1}", settings, http))
    for j, url in enumerate(messages[last].images):
        images.append(await load_image(url, f"messages[{last}] image {j + 1}", settings, http))
    return images


async def load_image(url: str, where: str, settings: Settings, http: AsyncSession) -> ImageInput:
    data = decode_data_uri(url, where) if url.startswith("data:") else await fetch_image_url(url, where, settings, http)
    return check_image(data, where)


IMAGE_SIZE_RE = re.compile(r"([1-9]\d{0,4})x([1-9]\d{0,4})")
ASPECT_RATIO_RE = re.compile(r"([1-9]\d*):([1-9]\d*)")
MAX_GENERATED_IMAGE_BYTES = 50 * 1024 * 1024    # generated images can be 4K PNGs, well above the input cap


@dataclasses.dataclass
class ImageRequest:
    model: str
    prompt: str
    response_format: str                        # "url" or "b64_json"
    size: tuple[int, int] | None                # None: "auto" or not given


def parse_image_request(body: Any) -> ImageRequest:
    """`model`, `prompt`, `n`, `response_format` and `size` are honoured; `quality`, `style`, `user` and the
    like are accepted and ignored, as in chat."""
    body = json_object(body)
    model, prompt = required_string(body, "model"), required_string(body, "prompt")
    require_one(body, "image")
    response_format = body.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise ApiError(400, "`response_format` must be `url` or `b64_json`.", "invalid_value", "response_format")
    return ImageRequest(model, prompt, response_format, parse_image_size(body.get("size")))


def parse_image_size(size: Any) -> tuple[int, int] | None:
    if size in (None, "auto"):
        return None
    match = IMAGE_SIZE_RE.fullmatch(size) if isinstance(size, str) else None
    if match is None:
        raise ApiError(400, "`size` must be `auto` or WIDTHxHEIGHT, e.g. 1024x1792.", "invalid_value", "size")
    return int(match.group(1)), int(match.group(2))


def closest_aspect_ratio(size: tuple[int, int], ratios: list[Any]) -> str | None:
    """The listed "W:H" ratio nearest to the requested size, compared on a log scale so that 2:1 and 1:2 are
    equally far from 1:1."""
    wanted = math.log(size[0] / size[1])
    valid = [(r, ASPECT_RATIO_RE.fullmatch(r)) for r in ratios if isinstance(r, str)]
    scored = [(abs(math.log(int(m.group(1)) / int(m.group(2))) - wanted), r) for r, m in valid if m]
    return min(scored)[1] if scored else None


def image_prompt(ask: ImageRequest, model: dict) -> str:
    """The prompt as sent. The site's request body has no field for an aspect ratio (arena-protocol §6.1
    lists every key), so when a size was asked for and the model lists the ratios it can make, the nearest
    of them is put in the prompt text, where the model reads it."""
    output = ((model.get("capabilities") or {}).get("outputCapabilities") or {}).get("image")
    ratios = output.get("aspectRatios") if isinstance(output, dict) else None
    ratio = closest_aspect_ratio(ask.size, ratios) if ask.size and isinstance(ratios, list) else None
    return f"{ask.prompt}\n\nAspect ratio: {ratio}" if ratio else ask.prompt


async def image_item(http: AsyncSession, url: str, response_format: str, origin: str) -> dict:
    """One entry of an images response. `url` passes on what LM Arena gave: a signed storage URL (valid for
    an hour) or, for images sent inline, a data: URL. `b64_json` carries the bytes themselves, so the
    image outlives the signed URL."""
    if response_format == "url":
        return {"url": url}
    return {"b64_json": base64.b64encode(await generated_image_bytes(http, url, origin)).decode()}


# Where the bridge downloads a generated image from (b64_json): LM Arena's R2 bucket, where its uploads and
# its image replies live (presigned URLs, arena-protocol §12), or its own origin. A reply naming any other
# URL is not followed: the bridge would fetch, from its own network, whatever the reply names.
STORAGE_HOST_SUFFIXES = (".r2.cloudflarestorage.com",)


def is_storage_url(url: str, origin: str) -> bool:
    try:
        parsed, home = urllib.parse.urlsplit(url), urllib.parse.urlsplit(origin)
        same_origin = (parsed.scheme, parsed.hostname, parsed.port) == (home.scheme, home.hostname, home.port)
        in_bucket = parsed.scheme == "https" and (parsed.hostname or "").endswith(STORAGE_HOST_SUFFIXES)
    except ValueError:
        return False
    return same_origin or in_bucket


async def generated_image_bytes(http: AsyncSession, url: str, origin: str) -> bytes:
    if url.startswith("data:"):
        try:
            return b64url_decode(url.partition(",")[2])
        except (binascii.Error, ValueError):
            raise ApiError(502, "LM Arena sent an image that is not valid base64", "image_download_failed") \
                from None
    if not is_storage_url(url, origin):
        raise ApiError(502, "LM Arena's reply names an image outside its storage; it was not downloaded.",
                       "image_download_failed")
    try:
        return await fetch_bytes(http, url, timeout=30, limit=MAX_GENERATED_IMAGE_BYTES)
    except FetchError as exc:
        raise ApiError(502, f"The generated image {exc}.", "image_download_failed") from None


# =====================================================================================================
# OpenAI routes
# =====================================================================================================

# Route names in usage and metrics: the same under /v1 and /api/v1.
CHAT_ROUTE, IMAGES_ROUTE = "/v1/chat/completions", "/v1/images/generations"


def model_created(model: dict, default: int) -> int:
    """A uuid7 id carries its creation time; older uuid4 ids get the discovery time."""
    with contextlib.suppress(ValueError, TypeError):
        parsed = uuid.UUID(model["id"])
        if parsed.version == 7:
            return (parsed.int >> 80) // 1000
    return default


async def list_models(request: Request) -> Response:
    key = authenticate(request)
    state = bridge(request)
    started = time.perf_counter()
    updated = int(state.store.site_params_updated() or now())
    seen: set[str] = set()
    data = []
    for model in usable_models(await state.models()):
        if model["publicName"] in seen:
            continue
        seen.add(model["publicName"])
        data.append({"id": model["publicName"], "object": "model", "created": model_created(model, updated),
                     "owned_by": model["organization"]})
    state.usage.add("/v1/models", key["id"], None, 200, started)  # no model: counted per key, not per model
    return JSONResponse({"object": "list", "data": data})


OUTPUT_ENCODERS: dict[str, Callable[[ChunkEncoder, Any], str]] = {
    "content": ChunkEncoder.content,
    "reasoning": ChunkEncoder.reasoning,
    "call": lambda encoder, value: encoder.delta(tool_calls=[chat_tool_call(value[1], value[0])]),
    "annotated": lambda encoder, value: encoder.delta(content=value[0], annotations=value[1]),
    "ping": lambda encoder, value: ": ping\n\n",
}


async def accepted_post(request: Request) -> tuple[BridgeState, dict, float, Any]:
    """What every OpenAI POST starts with: the key, its rate limit, then the JSON body."""
    state = bridge(request)
    key = authenticate(request)
    state.limiter.check(key)
    return state, key, time.perf_counter(), await read_json(request, state.settings.max_body)


@contextlib.contextmanager
def recorded_refusals(route: str, state: BridgeState, key: dict, model: str, started: float) -> Iterator[None]:
    """Input refused before a job exists is recorded as usage too (once a job runs, the job records)."""
    try:
        yield
    except ApiError as error:
        state.usage.add(route, key["id"], model, error.status, started, error=error.code, cause=error.cause)
        raise


def chat_inputs(body: dict, chat: ChatRequest, tool_memo: Memo) -> tuple[ToolConfig, OutputFormat]:
    """The checks of a chat body beside its messages: what is not supported, tools, the format, the loop guard."""
    refuse_unsupported(body)
    tools, output = parse_chat_tools(body, tool_memo), parse_response_format(body.get("response_format"))
    check_tool_loop(chat.messages)
    return tools, output


async def chat_completions(request: Request) -> Response:
    state, key, started, body = await accepted_post(request)
    large = large_body(request)
    chat = await off_loop(large, parse_chat_request, body)
    with recorded_refusals(CHAT_ROUTE, state, key, chat.model, started):
        tools, output = await off_loop(large, chat_inputs, body, chat, state.chat_tools)
        model = resolve_model(await state.models(), chat.model, with_images=bool(chat.messages[-1].images))
        draft = await off_loop(large, draft_turn, key["id"], chat, state.settings.max_prompt_chars, tools, output)
        plan = plan_turn(state, key, chat, model, tools, output, draft)
        plan.images = await load_images(chat.messages, model, state.settings, state.site.http,
                                        with_history=plan.followup is None, large=large)
    job = ChatJob(state, key, chat, plan, started, tools, output, route=CHAT_ROUTE, large=large,
                  client=request.receive)
    if chat.stream:
        return await stream_chat(job)
    return await complete_chat(job)


async def drain(job: ChatJob) -> None:
    async with contextlib.aclosing(job.outputs()) as outputs:
        async for _ in outputs:
            pass


async def run_to_end(job: ChatJob) -> ReplyBuilder:
    """A turn that is not streamed: the whole reply read, unless the client leaves first (its upstream
    request is then cancelled at once). A failure is recorded and raised as an API error."""
    try:
        await unless_client_leaves(drain(job), job.client)
    except Exception as error:  # noqa: BLE001 - the request's boundary: every failure becomes an API error
        raise job.fail(error) from None
    return job.builder


async def complete_chat(job: ChatJob) -> Response:
    builder = await run_to_end(job)
    usage = job.usage()
    await job.succeeded()
    job.record(200, usage)
    return JSONResponse(completion_object(job.completion_id, job.created, job.chat.model, builder, usage,
                                          "".join(job.content), job.calls, job.finish_reason), headers=job.headers)


async def image_generations(request: Request) -> Response:
    """OpenAI's images API on an image model: one LM Arena turn in the image modality, run by the chat
    machinery, with the images of the reply as the answer. The turn is not remembered as a conversation:
    this API has no history to continue."""
    state, key, started, body = await accepted_post(request)
    ask = parse_image_request(body)
    with recorded_refusals(IMAGES_ROUTE, state, key, ask.model, started):
        model = resolve_model(await state.models(), ask.model, modality="image")
        if choose_modality(model) != "image":
            raise ApiError(400, f"The model `{ask.model}` does not generate images; pick an image model from "
                                "/v1/models.", "model_without_image_output", "model")
    chat = ChatRequest(model=ask.model, messages=[Message("user", image_prompt(ask, model), [])], stream=False,
                       include_usage=False)
    job = ChatJob(state, key, chat, plan_turn(state, key, chat, model), started, route=IMAGES_ROUTE,
                  client=request.receive)
    builder = await run_to_end(job)
    try:
        if not builder.images:
            raise ApiError(502, f"LM Arena answered without an image: {builder.full_content[:300]!r}",
                                "no_image")
        data = [await image_item(state.site.http, url, ask.response_format, state.site.origin)
                for url in builder.images]
    except Exception as error:  # noqa: BLE001 - the request's boundary: every failure becomes an API error
        raise job.fail(error) from None
    job.record(200, job.usage())
    return JSONResponse({"created": job.created, "data": data})


async def first_output(job: ChatJob) -> tuple[Prefetcher, Any]:
    """Start a streamed job and wait (up to one ping interval) for its first item, so that a failure
    before any byte is a plain HTTP error (for every API that streams). Nothing is sent yet, so the
    client's hang-up is watched here (after, the streamed response watches it)."""
    pump = Prefetcher(job.outputs(), ahead=16)
    try:
        first = await unless_client_leaves(pump.next(job.state.settings.ping_interval), job.client)
    except Exception as error:  # noqa: BLE001 - the request's boundary: every failure becomes an API error
        await pump.aclose()
        raise job.fail(error) from None
    except BaseException:
        await pump.aclose()
        raise
    if isinstance(first, tuple) and first[0] != "ping":   # an output item (not a ping, the end, or a wait)
        job.state.metrics.first_token_after(job.route, time.perf_counter() - job.started)
    return pump, first


class EventStream(StreamingResponse):
    """A streamed job's SSE answer, which ends the job however the response ends: the pull of its items
    is closed (its upstream request with it) and a job that recorded nothing is recorded as its client's
    hang-up. The body's generator cannot do it: a client that leaves before the body begins has the
    generator dropped unstarted (its pull then ran on, orphaned), and one that leaves later has the
    generator's clean-up cancelled again half-way."""

    def __init__(self, body: AsyncIterator[str], job: ChatJob, pump: Prefetcher):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **job.headers})
        self.job, self.pump = job, pump

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.pump.aclose()
            if not self.job.recorded:
                self.job.record(499, error=CLIENT_LEFT)


async def stream_chat(job: ChatJob) -> Response:
    """After the first item, errors become an SSE error event followed by [DONE]."""
    pump, first = await first_output(job)
    return EventStream(sse_body(job, pump, first), job, pump)


def sse_burst(item: Any, pump: Prefetcher, encode: Callable[[Any], str]) -> tuple[str, Any, Exception | None]:
    """Every item already pulled, from `item` on, as one write (a write per item was most of a stream's
    cost), each written by `encode` (None: a keep-alive); then the next item (None: none pulled yet; or
    END) and a failure that came after them, for the caller to raise once the write is out."""
    parts: list[str] = []
    try:
        while item is not Prefetcher.END:
            parts.append(encode(item))
            item = pump.ready()
            if item is None:
                break
    except Exception as error:  # noqa: BLE001 - handed back, raised by the caller after the items before it
        return "".join(parts), None, error
    return "".join(parts), item, None


async def sse_items(pump: Prefetcher, first: Any, encode: Callable[[Any], str], interval: float) -> AsyncIterator[str]:
    """The writes of a stream's items from `first` to the end, a burst at a time (sse_burst), waiting up to
    `interval` for more (a keep-alive when none came); a failure is raised after the items before it."""
    item = first
    while item is not Prefetcher.END:
        text, item, error = sse_burst(item, pump, encode)
        if text:
            yield text
        if error is not None:
            raise error
        if item is None:
            item = await pump.next(interval)


def sse_ending(job: ChatJob, encoder: ChunkEncoder, usage: dict) -> Iterator[str]:
    """The chunks after the last item: the finish reason, usage, [DONE]."""
    yield encoder.finish(job.finish_reason)
    if job.chat.include_usage:
        yield encoder.usage(usage)
    yield "data: [DONE]\n\n"


async def sse_body(job: ChatJob, pump: Prefetcher, first: Any) -> AsyncIterator[str]:
    encoder = ChunkEncoder(job.completion_id, job.created, job.chat.model, job.chat.include_usage)

    def encode(item: Any) -> str:
        return ": ping\n\n" if item is None else OUTPUT_ENCODERS[item[0]](encoder, item[1])

    yield encoder.delta(role="assistant", content="")
    try:
        async for text in sse_items(pump, first, encode, job.state.settings.ping_interval):
            yield text
        usage = job.usage()
        for chunk in sse_ending(job, encoder, usage):
            yield chunk
        await job.succeeded()
        job.record(200, usage)
    except Exception as error:  # noqa: BLE001 - the stream's boundary: every failure becomes an SSE error
        yield sse_error(job.fail(error))


UNSUPPORTED_ENDPOINTS = {       # path under /v1 -> why LM Arena cannot serve it
    "embeddings": "LM Arena has no embedding models",
    "completions": "LM Arena serves chat models only: use /v1/chat/completions",
    "audio/{rest:path}": "LM Arena's models neither transcribe nor speak audio",
}


def unsupported_endpoint(why: str) -> Callable[[Request], Awaitable[Response]]:
    async def answer(request: Request) -> Response:
        authenticate(request)
        raise ApiError(400, f"{request.url.path} cannot be served: {why}.", "unsupported_endpoint")
    return answer


async def ollama_probe(request: Request) -> Response:
    """Ollama's /api/tags, /api/ps and /api/version, for clients that check for an Ollama server (OpenWebUI):
    the model list in its shape, without a key, as Ollama answers."""
    if request.url.path.endswith("/version"):
        return JSONResponse({"version": OLLAMA_VERSION})
    return JSONResponse(ollama_models(await bridge(request).models(), bridge(request).store.site_params_updated()
                                      or now()))


def openai_routes() -> list[Route]:
    """The OpenAI API, under /v1 and under /api/v1."""
    routes = []
    for prefix in ("/v1", "/api/v1"):
        routes += [Route(f"{prefix}/models", list_models),
                   Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
                   Route(f"{prefix}/images/generations", image_generations, methods=["POST"])]
        routes += [Route(f"{prefix}/{path}", unsupported_endpoint(why), methods=["GET", "POST"])
                   for path, why in UNSUPPORTED_ENDPOINTS.items()]
    for prefix in ("", "/api/v1"):
        routes += [Route(f"{prefix}/api/{probe}", ollama_probe) for probe in ("tags", "ps", "version")]
    return routes


# #####################################################################################################
# Part IV: Agent APIs (Anthropic Messages and OpenAI Responses, on the tool emulation and the chat engine)
# #####################################################################################################

# =====================================================================================================
# Anthropic requests
# =====================================================================================================

@dataclasses.dataclass
class AgentRequest:
    """A Messages or Responses request in the engine's terms: the history (calls and results included),
    the tools and how they may be used, and what the answer must look like."""
    model: str
    messages: list[Message]
    tools: ToolConfig
    output: OutputFormat
    stream: bool


ANTHROPIC_ROLES = ("user", "assistant", "system")   # system: Claude Code sends system messages mid-conversation
ANTHROPIC_TOOL_CHOICES = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}
# Blocks that carry nothing the model could be given: its own earlier thinking (the text is the model's,
# the signature the bridge's) and the traces of Anthropic's server tools, which the bridge never runs.
ANTHROPIC_SKIPPED_BLOCKS = frozenset({
    "thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
    "code_execution_tool_result", "bash_code_execution_tool_result", "text_editor_code_execution_tool_result",
    "tool_search_tool_result", "container_upload", "mcp_tool_use", "mcp_tool_result"})
# Claude Code's first system block is a line for Anthropic's billing (its version and a hash that differs
# between its kinds of request); it tells the model nothing, so it is left out of the prompt.
ANTHROPIC_BILLING_PREFIX = "x-anthropic-billing-header:"


@dataclasses.dataclass
class BlockParts:
    """What a message's content blocks hold, gathered in order: text, images, calls and tool results."""
    texts: list[str] = dataclasses.field(default_factory=list)
    images: list[str] = dataclasses.field(default_factory=list)
    calls: list[ToolCall] = dataclasses.field(default_factory=list)
    results: list[Message] = dataclasses.field(default_factory=list)


def typed_string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"`{param}` must be a string.", "invalid_type", param)
    return value


def anthropic_text(parts: BlockParts, block: dict, param: str) -> None:
    parts.texts.append(typed_string(block.get("text"), f"{param}.text"))


def anthropic_image(parts: BlockParts, block: dict, param: str) -> None:
    """An image source as the engine takes images: a data: URI for base64 data, else the URL."""
    source = block.get("source")
    source = source if isinstance(source, dict) else {}
    kind = source.get("type")
    if kind == "base64":
        media = typed_string(source.get("media_type"), f"{param}.source.media_type")
        parts.images.append(f"data:{media};base64,{typed_string(source.get('data'), f'{param}.source.data')}")
    elif kind == "url":
        parts.images.append(typed_string(source.get("url"), f"{param}.source.url"))
    else:
        raise ApiError(400, f"`{param}.source.type` must be base64 or url.", "unsupported_content", f"{param}.source")


def anthropic_document(parts: BlockParts, block: dict, param: str) -> None:
    """A document whose text is given; LM Arena takes no PDFs or files, so other sources are refused."""
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "text":
        raise ApiError(400, f"`{param}`: only documents with a text source can be sent to LM Arena.",
                       "unsupported_content", param)
    parts.texts.append(typed_string(source.get("data"), f"{param}.source.data"))


def anthropic_tool_use(parts: BlockParts, block: dict, param: str) -> None:
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise ApiError(400, f"`{param}.input` must be an object.", "invalid_type", f"{param}.input")
    parts.calls.append(ToolCall(typed_string(block.get("id"), f"{param}.id"),
                                typed_string(block.get("name"), f"{param}.name"),
                                json.dumps(arguments, ensure_ascii=False)))


def anthropic_tool_result(parts: BlockParts, block: dict, param: str) -> None:
    """A tool result becomes a tool message of its own; its content is a string or text and image blocks."""
    inner = BlockParts()
    content = block.get("content")
    if isinstance(content, str):
        inner.texts.append(content)
    elif isinstance(content, list):
        read_blocks(inner, content, f"{param}.content", ANTHROPIC_RESULT_BLOCKS)
    elif content is not None:
        raise ApiError(400, f"`{param}.content` must be a string or an array of blocks.", "invalid_type",
                       f"{param}.content")
    text = "\n".join(inner.texts)
    if block.get("is_error"):
        text = f"Error: {text}"
    parts.results.append(Message("tool", text, inner.images,
                                 tool_call_id=typed_string(block.get("tool_use_id"), f"{param}.tool_use_id")))


BlockReader = Callable[[BlockParts, dict, str], None]
ANTHROPIC_RESULT_BLOCKS: dict[str, BlockReader] = {
    "text": anthropic_text, "image": anthropic_image, "document": anthropic_document}
ANTHROPIC_BLOCKS: dict[str, BlockReader] = {
    **ANTHROPIC_RESULT_BLOCKS, "tool_use": anthropic_tool_use, "tool_result": anthropic_tool_result}


def read_blocks(parts: BlockParts, blocks: list, param: str, readers: dict[str, BlockReader]) -> None:
    for j, block in enumerate(blocks):
        where = f"{param}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ANTHROPIC_SKIPPED_BLOCKS:
            continue
        reader = readers.get(kind) if isinstance(kind, str) else None
        if reader is None:
            raise ApiError(400, f"`{where}` has an unsupported type {kind!r}; use {', '.join(readers)}.",
                           "unsupported_content", where)
        reader(parts, block, where)


def anthropic_input_message(raw: Any, index: int) -> list[Message]:
    """One Anthropic message as engine messages: its tool results first (Anthropic puts them first, and
    they answer the calls of the turn before), then its text, images and calls, if any."""
    param = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise ApiError(400, f"`{param}` must be an object.", "invalid_type", param)
    role = raw.get("role")
    if role not in ANTHROPIC_ROLES:
        raise ApiError(400, f"`{param}.role` must be user or assistant.", "invalid_value", f"{param}.role")
    content = raw.get("content")
    if isinstance(content, str):
        return [Message(role, content, [])]
    if not isinstance(content, list):
        raise ApiError(400, f"`{param}.content` must be a string or an array of content blocks.", "invalid_type",
                       f"{param}.content")
    parts = BlockParts()
    read_blocks(parts, content, f"{param}.content", ANTHROPIC_BLOCKS)
    if (parts.calls and role != "assistant") or (parts.results and role != "user"):
        raise ApiError(400, f"`{param}`: tool_use blocks belong in assistant messages, tool_result blocks in user "
                            "messages.", "invalid_value", f"{param}.content")
    messages = parts.results
    if parts.texts or parts.images or parts.calls or not parts.results:
        messages.append(Message(role, "\n".join(parts.texts), parts.images, tool_calls=parts.calls))
    return messages


def anthropic_system(raw: Any) -> list[Message]:
    """`system` as a string or text blocks (their cache_control ignored), as one system message."""
    if raw is None:
        return []
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list):
        parts = BlockParts()
        read_blocks(parts, raw, "system", {"text": anthropic_text})
        texts = [t for t in parts.texts if not t.startswith(ANTHROPIC_BILLING_PREFIX)]
    else:
        raise ApiError(400, "`system` must be a string or an array of text blocks.", "invalid_type", "system")
    text = "\n".join(t for t in texts if t)
    return [Message("system", text, [])] if text else []


def anthropic_tool_specs(raw: Any) -> list[ToolSpec]:
    """Custom tools (no `type`, or `custom`). Anthropic's own tools, server tools such as web search and
    code execution and schema-less ones such as bash_20250124, are left out: LM Arena cannot run them."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, "`tools` must be an array.", "invalid_type", "tools")
    specs = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise ApiError(400, f"`tools[{i}]` must be an object.", "invalid_type", f"tools[{i}]")
        if tool.get("type", "custom") in ("custom", None):
            specs.append(tool_spec(tool.get("name"), tool.get("description"), tool.get("input_schema"), f"tools[{i}]"))
    return specs


ANTHROPIC_TOOL_FIELDS = ("tools", "tool_choice")


def read_anthropic_tools(body: dict) -> ToolConfig:
    """`tools` and `tool_choice`, read once per tool set (parse_anthropic_request keeps them, kept_tools)."""
    tools = anthropic_tool_specs(body.get("tools"))
    raw = body.get("tool_choice")
    choice = raw if raw is not None else {"type": "auto"}
    if not isinstance(choice, dict) or choice.get("type") not in ANTHROPIC_TOOL_CHOICES:
        raise ApiError(400, "`tool_choice.type` must be auto, any, tool or none.", "invalid_value", "tool_choice")
    return tool_config(tools, ANTHROPIC_TOOL_CHOICES[choice["type"]], choice.get("name"),
                       not choice.get("disable_parallel_tool_use", False), "tool_choice")


def anthropic_output(body: dict) -> OutputFormat:
    """Structured output: `output_config.format` (as Claude Code sends it), or the earlier beta's
    `output_format`, with a json_schema."""
    config = body.get("output_config")
    raw = (config.get("format") if isinstance(config, dict) else None) or body.get("output_format")
    if raw is None:
        return OutputFormat()
    if not isinstance(raw, dict) or raw.get("type") != "json_schema":
        raise ApiError(400, "`output_config.format.type` must be json_schema.", "invalid_value",
                       "output_config.format")
    return output_format("json_schema", None, raw.get("schema"), "output_config.format")


def parse_anthropic_request(body: Any, tool_memo: Memo) -> AgentRequest:
    """A Messages (or count_tokens) body, its tools read once per tool set (`tool_memo`: the app's, an
    agent sends the same ones every turn). `thinking`, `max_tokens`, `metadata`, `cache_control`,
    `context_management` and other fields LM Arena cannot honour are accepted and ignored."""
    body = json_object(body)
    model = required_string(body, "model")
    messages = anthropic_system(body.get("system"))
    for index, message in enumerate(required_array(body, "messages")):
        messages += anthropic_input_message(message, index)
    if not any(m.role in ("user", "tool") for m in messages):
        raise ApiError(400, "`messages` must contain a user message.", "invalid_value", "messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be a boolean.", "invalid_type", "stream")
    tools = kept_tools(body, ANTHROPIC_TOOL_FIELDS, read_anthropic_tools, tool_memo)
    return AgentRequest(model, messages, tools, anthropic_output(body), stream)


# =====================================================================================================
# Anthropic replies
# =====================================================================================================

ANTHROPIC_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                          "content_filter": "refusal"}
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
# The text part of a delta event, pre-rendered per block kind: relaying text costs one encode of the text.
ANTHROPIC_DELTAS = {"thinking": ("thinking_delta", "thinking"), "text": ("text_delta", "text")}


# json.dumps with ensure_ascii=False builds an encoder per call; one kept encoder is several times cheaper.
EVENT_JSON = json.JSONEncoder(ensure_ascii=False).encode


def sse_event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {EVENT_JSON(data)}\n\n"


def anthropic_error_body(error: ApiError) -> dict:
    kind = ANTHROPIC_ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def anthropic_stop_reason(finish_reason: str) -> str:
    """The stop_reason for an engine finish reason (OpenAI's names: stop, length, tool_calls, ...)."""
    return ANTHROPIC_STOP_REASONS.get(finish_reason, "end_turn")


def thinking_signature(message_id: str, index: int) -> str:
    """The `signature` of a thinking block. Claude Code and the SDK want one and send it back; the bridge
    drops returned thinking blocks, so it only needs to be an opaque, non-empty string."""
    return base64.b64encode(f"lmarena-bridge:{message_id}:{index}".encode()).decode()


def anthropic_message_object(message_id: str, model: str, content: list[dict], stop_reason: str | None,
                             input_tokens: int, output_tokens: int) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def anthropic_message_body(message_id: str, model: str, reasoning: str, text: str, calls: list[ToolCall],
                           finish_reason: str, usage: dict) -> dict:
    """A whole reply as a message: thinking, then text (also when empty, unless there are calls), then one
    tool_use per call. `usage` is the engine's (prompt_tokens, completion_tokens)."""
    blocks: list[dict] = []
    if reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": thinking_signature(message_id, 0)})
    if text or not calls:
        blocks.append({"type": "text", "text": text})
    blocks += [{"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}
               for call in calls]
    return anthropic_message_object(message_id, model, blocks, anthropic_stop_reason(finish_reason),
                                    usage["prompt_tokens"], usage["completion_tokens"])


class AnthropicEncoder:
    """One message's SSE events in Anthropic's order: message_start; per content block
    content_block_start, its deltas, content_block_stop; message_delta (stop_reason, usage); message_stop.
    A block opens when the kind of content changes (thinking, text) and closes before the next; a thinking
    block ends with a signature_delta; each tool call is a tool_use block whose input comes as one
    input_json_delta (the engine sends a call once it is complete).

    The reply encoders of the agent APIs share these methods: start, reasoning, text, call, finish
    (with the engine's finish reason and usage), error, and KEEPALIVE while waiting."""

    KEEPALIVE = sse_event("ping", {"type": "ping"})
    def __init__(self, message_id: str, model: str, input_tokens: int):
        self.message_id, self.model, self.input_tokens = message_id, model, input_tokens
        self.index = -1
        self.open: str | None = None            # the kind of the open block: thinking | text
        self.head = ""                          # the open block's delta event up to its text

    def start(self) -> str:
        message = anthropic_message_object(self.message_id, self.model, [], None, self.input_tokens, 0)
        return sse_event("message_start", {"type": "message_start", "message": message})

    def reasoning(self, text: str) -> str:
        return self._delta("thinking", {"type": "thinking", "thinking": "", "signature": ""}, text)

    def text(self, text: str) -> str:
        return self._delta("text", {"type": "text", "text": ""}, text)

    def call(self, call: ToolCall) -> str:
        events = self._close() + self._open({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        delta = {"type": "input_json_delta", "partial_json": call.arguments}
        return (events + sse_event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                           "delta": delta})
                + sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))

    def finish(self, finish_reason: str, usage: dict) -> str:
        delta = {"type": "message_delta",
                 "delta": {"stop_reason": anthropic_stop_reason(finish_reason), "stop_sequence": None},
                 "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}}
        return self._close() + sse_event("message_delta", delta) + sse_event("message_stop", {"type": "message_stop"})

    @staticmethod
    def error(error: ApiError) -> str:
        return sse_event("error", anthropic_error_body(error))

    def _delta(self, kind: str, block: dict, text: str) -> str:
        events = ""
        if self.open != kind:
            events = self._close() + self._open(block)
            self.open = kind
            delta_type, field = ANTHROPIC_DELTAS[kind]
            self.head = ('event: content_block_delta\ndata: {"type":"content_block_delta",'
                         f'"index":{self.index},"delta":{{"type":"{delta_type}","{field}":')
        return events + self.head + json_text(text) + "}}\n\n"

    def _open(self, block: dict) -> str:
        self.index += 1
        return sse_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                 "content_block": block})

    def _close(self) -> str:
        if self.open is None:
            return ""
        events = ""
        if self.open == "thinking":
            delta = {"type": "signature_delta", "signature": thinking_signature(self.message_id, self.index)}
            events = sse_event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                       "delta": delta})
        self.open = None
        return events + sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})


# =====================================================================================================
# Responses requests
# =====================================================================================================

RESPONSES_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
RESPONSES_TOOL_CHOICES = {"auto": "auto", "none": "none", "required": "required"}
# Items a client sends back that carry nothing for the model: its earlier reasoning (Codex echoes our
# reasoning items) and the traces of OpenAI's hosted tools, which the bridge never runs.
RESPONSES_SKIPPED_ITEMS = frozenset({"reasoning", "web_search_call", "file_search_call", "image_generation_call",
                                     "code_interpreter_call", "mcp_list_tools"})


@dataclasses.dataclass
class ResponsesRequest:
    """A Responses body: the turn (its messages are the instructions, then the input), what it continues,
    and the request fields a response object repeats."""
    turn: AgentRequest
    instructions: int                   # how many of the turn's first messages are the instructions
    previous_response_id: str | None
    store: bool
    echo: dict

    @property
    def probe(self) -> bool:
        """No input at all: clients send this to check the endpoint, and it is answered without LM Arena."""
        return len(self.turn.messages) == self.instructions and self.previous_response_id is None

    @property
    def history(self) -> list[Message]:
        """What a later response that continues this one carries over: everything but the instructions,
        which OpenAI's API does not carry to a continuation."""
        return self.turn.messages[self.instructions:]

    def continuing(self, history: list[Message]) -> None:
        """Put the history of the response this one continues between the instructions and the input."""
        self.turn.messages[self.instructions:self.instructions] = history


def responses_part(part: Any, param: str, texts: list[str], images: list[str]) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):
        texts.append(typed_string(part.get("text"), f"{param}.text"))
    elif kind == "refusal":
        texts.append(typed_string(part.get("refusal"), f"{param}.refusal"))
    elif kind == "input_image" and isinstance(part.get("image_url"), str):
        images.append(part["image_url"])
    elif kind == "input_image":
        raise ApiError(400, f"`{param}` needs an `image_url` (a URL or a data: URI); files cannot be sent to "
                            "LM Arena.", "unsupported_content", param)
    else:
        raise ApiError(400, f"`{param}` has an unsupported type {kind!r}; use input_text, output_text or "
                            "input_image.", "unsupported_content", param)


def responses_content(content: Any, param: str) -> tuple[str, list[str]]:
    """A message's or a tool output's content: a string, or parts."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"`{param}` must be a string or an array of content parts.", "invalid_type", param)
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        responses_part(part, f"{param}[{j}]", texts, images)
    return "\n".join(texts), images


def responses_message(messages: list[Message], item: dict, param: str) -> None:
    raw = item.get("role")
    role = RESPONSES_ROLES.get(raw) if isinstance(raw, str) else None     # an object or array: 400, not 500
    if role is None:
        raise ApiError(400, f"`{param}.role` must be user, assistant, system or developer.", "invalid_value",
                       f"{param}.role")
    text, images = responses_content(item.get("content"), f"{param}.content")
    messages.append(Message(role, text, images))


def responses_function_call(messages: list[Message], item: dict, param: str) -> None:
    """A call the model made joins the assistant turn it belongs to: the message just before, if any."""
    call = ToolCall(typed_string(item.get("call_id"), f"{param}.call_id"),
                    typed_string(item.get("name"), f"{param}.name"),
                    typed_string(item.get("arguments"), f"{param}.arguments"))
    if messages and messages[-1].role == "assistant":
        messages[-1].tool_calls.append(call)
    else:
        messages.append(Message("assistant", "", [], tool_calls=[call]))


def responses_function_output(messages: list[Message], item: dict, param: str) -> None:
    text, images = responses_content(item.get("output"), f"{param}.output")
    messages.append(Message("tool", text, images, tool_call_id=typed_string(item.get("call_id"), f"{param}.call_id")))


RESPONSES_ITEMS: dict[str, Callable[[list[Message], dict, str], None]] = {
    "message": responses_message, "function_call": responses_function_call,
    "function_call_output": responses_function_output}


def responses_input(raw: Any, param: str) -> list[Message]:
    """`input` (or list-form `instructions`): a string is one user message; items are read in order."""
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        return [Message("user", raw, [])]
    if not isinstance(raw, list):
        raise ApiError(400, f"`{param}` must be a string or an array of items.", "invalid_type", param)
    messages: list[Message] = []
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"`{where}` must be an object.", "invalid_type", where)
        kind = item.get("type", "message")       # an easy input message has no type
        if kind in RESPONSES_SKIPPED_ITEMS:
            continue
        reader = RESPONSES_ITEMS.get(kind)
        if reader is None:
            raise ApiError(400, f"`{where}` has an unsupported type {kind!r}; use message, function_call or "
                                "function_call_output.", "unsupported_content", where)
        reader(messages, item, where)
    return messages


def responses_tool_specs(raw: Any) -> list[ToolSpec]:
    """Function tools. Hosted tools (web_search, file_search, ...), namespaces and custom tools are left
    out: LM Arena cannot run them, and Codex sends some with every request."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, "`tools` must be an array.", "invalid_type", "tools")
    return [tool_spec(tool.get("name"), tool.get("description"), tool.get("parameters"), f"tools[{i}]")
            for i, tool in enumerate(raw) if isinstance(tool, dict) and tool.get("type") == "function"]


def responses_tool_config(body: dict, tools: list[ToolSpec]) -> ToolConfig:
    raw = body.get("tool_choice", "auto")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError(400, "`parallel_tool_calls` must be a boolean.", "invalid_type", "parallel_tool_calls")
    if isinstance(raw, str) and raw in RESPONSES_TOOL_CHOICES:
        return tool_config(tools, RESPONSES_TOOL_CHOICES[raw], None, parallel)
    if isinstance(raw, dict) and raw.get("type") == "function":
        return tool_config(tools, "function", raw.get("name"), parallel)
    if isinstance(raw, dict) and raw.get("type") == "allowed_tools" and raw.get("mode") in RESPONSES_TOOL_CHOICES:
        allowed = {t.get("name") for t in raw.get("tools") or [] if isinstance(t, dict)}
        return tool_config([t for t in tools if t.name in allowed], raw["mode"], None, parallel)
    raise ApiError(400, "`tool_choice` must be auto, none, required, a function or allowed_tools.", "invalid_value",
                   "tool_choice")


RESPONSES_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


def read_responses_tools(body: dict) -> tuple[tuple[ToolSpec, ...], ToolConfig]:
    """The function tools (all of them, which a response repeats) and the config of a body's tool fields,
    read once per tool set (parse_responses_request keeps them, kept_tools)."""
    tools = responses_tool_specs(body.get("tools"))
    return tuple(tools), responses_tool_config(body, tools)


def responses_output(raw: Any) -> OutputFormat:
    text = raw if isinstance(raw, dict) else {}
    fmt = text.get("format") or {}
    if not isinstance(fmt, dict):
        raise ApiError(400, "`text.format` must be an object.", "invalid_type", "text.format")
    return output_format(fmt.get("type"), fmt.get("name"), fmt.get("schema"), "text.format")


def responses_text(output: OutputFormat) -> dict:
    """The `text` setting a response object repeats."""
    if output.kind == "json_schema":
        return {"format": {"type": "json_schema", "name": output.name or "output", "schema": output.schema}}
    return {"format": {"type": output.kind}}


def responses_tool_choice(config: ToolConfig) -> str | dict:
    """The tool_choice a response object repeats."""
    return {"type": "function", "name": config.function} if config.choice == "function" else config.choice


def parse_responses_request(body: Any, tool_memo: Memo) -> ResponsesRequest:
    """A Responses body, its tools read once per tool set (`tool_memo`: the app's, an agent sends the same
    ones every turn). `reasoning`, `include`, `max_output_tokens`, `prompt_cache_key` and other fields LM
    Arena cannot honour are accepted and ignored."""
    body = json_object(body)
    model = required_string(body, "model")
    instructions = body.get("instructions")
    system = ([Message("system", instructions, [])] if isinstance(instructions, str) and instructions
              else responses_input(instructions, "instructions"))
    messages = system + responses_input(body.get("input"), "input")
    stream, store = body.get("stream", False), body.get("store", True)
    previous = body.get("previous_response_id")
    for name, value, kind in (("stream", stream, bool), ("store", store, bool),
                              ("previous_response_id", previous, (str, type(None)))):
        if not isinstance(value, kind):
            raise ApiError(400, f"`{name}` has the wrong type.", "invalid_type", name)
    tools, config = kept_tools(body, RESPONSES_TOOL_FIELDS, read_responses_tools, tool_memo)
    output = responses_output(body.get("text"))
    echo = {"instructions": instructions if isinstance(instructions, str) else None,
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
            "tools": [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                       "strict": None} for t in tools],
            "tool_choice": responses_tool_choice(config), "parallel_tool_calls": config.parallel,
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "text": responses_text(output)}
    return ResponsesRequest(AgentRequest(model, messages, config, output, stream), len(system), previous, store,
                            echo)


# =====================================================================================================
# Responses replies
# =====================================================================================================

RESPONSES_ERROR_CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt"}   # else server_error
RESPONSES_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}   # by finish reason


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}] if text else []}


def output_text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [output_text_part(text)] if status == "completed" else []}


def function_call_item(call: ToolCall, status: str = "completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments if status == "completed" else "", "status": status}




def responses_usage(usage: dict, reasoning: str) -> dict:
    """The engine's usage (prompt_tokens, completion_tokens) in the Responses shape."""
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": estimate_tokens(reasoning)},
            "total_tokens": prompt + completion}


def responses_error(error: ApiError) -> dict:
    return {"code": RESPONSES_ERROR_CODES.get(error.status, "server_error"), "message": error.message}


def response_object(response_id: str, created_at: int, request: ResponsesRequest, status: str, output: list[dict],
                    usage: dict | None = None, error: dict | None = None, incomplete: str | None = None) -> dict:
    """The `response` object, alone or inside a lifecycle event; `output_text` is the SDK's convenience."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    body = {"id": response_id, "object": "response", "created_at": created_at, "status": status,
            "model": request.turn.model, "output": output, "output_text": text, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "previous_response_id": request.previous_response_id, "store": request.store, **request.echo}
    return body | ({"usage": usage} if usage is not None else {})


def responses_body(response_id: str, created_at: int, request: ResponsesRequest, reasoning: str, text: str,
                   calls: list[ToolCall], finish_reason: str, usage: dict) -> dict:
    """A whole reply as a response that was not streamed: its reasoning, message and function_call items."""
    items = [reasoning_item(new_item_id("rs"), reasoning)] if reasoning else []
    if text or not calls:
        items.append(message_item(new_item_id("msg"), text))
    items += [function_call_item(call) for call in calls]
    incomplete = RESPONSES_INCOMPLETE.get(finish_reason)
    return response_object(response_id, created_at, request, "incomplete" if incomplete else "completed", items,
                           usage=responses_usage(usage, reasoning), incomplete=incomplete)


class ResponsesEncoder:
    """One response's SSE events, each with the next sequence_number: response.created and .in_progress;
    per output item output_item.added, its parts and deltas, output_item.done; then response.completed
    (or .incomplete, or .failed). Items open when the kind of content changes: a reasoning item (summary
    text), a message (one output_text part), and one function_call per call (its arguments in one delta:
    the engine sends a call once it is complete). The finished items are kept for the final response.
    Its methods are those of AnthropicEncoder; the keep-alive is an SSE comment (the API has no ping event)."""

    KEEPALIVE = ": ping\n\n"
    def __init__(self, response_id: str, created_at: int, request: ResponsesRequest):
        self.response_id, self.created_at, self.request = response_id, created_at, request
        self.sequence = -1
        self.output: list[dict] = []
        self.open: str | None = None            # reasoning | message
        self.item_id = ""
        self.texts: list[str] = []              # the open item's text so far
        self.head = ("", "", "")                # the open item's delta event: around its sequence number, text
        self.reasoning_text = ""                # all of the reply's reasoning, for the usage

    def start(self) -> str:
        response = self.response("in_progress")
        return (self._event("response.created", response=response)
                + self._event("response.in_progress", response=response))

    def response(self, status: str, **fields: Any) -> dict:
        return response_object(self.response_id, self.created_at, self.request, status, self.output, **fields)

    def reasoning(self, text: str) -> str:
        return self._delta("reasoning", text)

    def text(self, text: str) -> str:
        return self._delta("message", text)

    def call(self, call: ToolCall) -> str:
        events = self._close()
        item = function_call_item(call)
        index = len(self.output)
        where = {"item_id": item["id"], "output_index": index}
        self.output.append(item)
        return (events
                + self._event("response.output_item.added", output_index=index,
                              item=function_call_item(call, "in_progress"))
                + self._event("response.function_call_arguments.delta", **where, delta=call.arguments)
                + self._event("response.function_call_arguments.done", **where, name=call.name,
                              arguments=call.arguments)
                + self._event("response.output_item.done", output_index=index, item=item))

    def finish(self, finish_reason: str, usage: dict) -> str:
        events = self._close()
        usage = responses_usage(usage, self.reasoning_text)
        incomplete = RESPONSES_INCOMPLETE.get(finish_reason)
        if incomplete:
            return events + self._event("response.incomplete",
                                        response=self.response("incomplete", usage=usage, incomplete=incomplete))
        return events + self._event("response.completed", response=self.response("completed", usage=usage))

    def error(self, error: ApiError) -> str:
        return self._close() + self._event("response.failed", response=self.response("failed",
                                                                                     error=responses_error(error)))

    def _event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        return sse_event(kind, {"type": kind, "sequence_number": self.sequence, **fields})

    def _delta(self, kind: str, text: str) -> str:
        events = "" if self.open == kind else self._close() + self._open(kind)
        self.texts.append(text)
        self.sequence += 1
        return f"{events}{self.head[0]}{self.sequence}{self.head[1]}{json_text(text)}{self.head[2]}"

    def _open(self, kind: str) -> str:
        """Open a reasoning item with its summary part, or a message with its output_text part."""
        self.open, self.texts = kind, []
        index = len(self.output)
        if kind == "reasoning":
            self.item_id = new_item_id("rs")
            item, event, part = reasoning_item(self.item_id, ""), "response.reasoning_summary_part.added", {
                "summary_index": 0, "part": {"type": "summary_text", "text": ""}}
            delta, tail = "response.reasoning_summary_text.delta", ',"summary_index":0,"delta":'
        else:
            self.item_id = new_item_id("msg")
            item, event, part = message_item(self.item_id, "", "in_progress"), "response.content_part.added", {
                "content_index": 0, "part": output_text_part("")}
            delta, tail = "response.output_text.delta", ',"content_index":0,"delta":'
        self.head = (f'event: {delta}\ndata: {{"type":"{delta}","sequence_number":',
                     f',"item_id":"{self.item_id}","output_index":{index}{tail}',
                     ',"logprobs":[]}\n\n' if kind == "message" else "}\n\n")
        return (self._event("response.output_item.added", output_index=index, item=item)
                + self._event(event, item_id=self.item_id, output_index=index, **part))

    def _close(self) -> str:
        """Close the open reasoning item or message: its .done events, then the item into the output."""
        if self.open is None:
            return ""
        text, index = "".join(self.texts), len(self.output)
        where = {"item_id": self.item_id, "output_index": index}
        if self.open == "reasoning":
            self.reasoning_text += text
            item = reasoning_item(self.item_id, text)
            summary = {"type": "summary_text", "text": text}
            events = (self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=text)
                      + self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=summary))
        else:
            item = message_item(self.item_id, text)
            events = (self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
                      + self._event("response.content_part.done", **where, content_index=0,
                                    part=output_text_part(text)))
        self.output.append(item)
        self.open = None
        return events + self._event("response.output_item.done", output_index=index, item=item)


# =====================================================================================================
# Agent routes
# =====================================================================================================
# /v1/messages, /v1/messages/count_tokens and /v1/responses: a request becomes a chat job (the same
# accounts, follow-ups, cool-downs, usage and key limits as chat completions), whose output items go
# out through the API's encoder.

# Route names in usage and metrics: the same under /v1 and /api/v1.
MESSAGES_ROUTE, COUNT_TOKENS_ROUTE, RESPONSES_ROUTE = "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"

# What each output item of a chat job is for an agent API's encoder (AnthropicEncoder, ResponsesEncoder);
# None is a keep-alive. A citation's annotations stay with chat completions: the text carries the sources.
AGENT_OUTPUTS: dict[str, Callable[[Any, Any], str]] = {
    "content": lambda encoder, text: encoder.text(text),
    "reasoning": lambda encoder, text: encoder.reasoning(text),
    "call": lambda encoder, value: encoder.call(value[1]),
    "annotated": lambda encoder, value: encoder.text(value[0]),
    "ping": lambda encoder, _: encoder.KEEPALIVE,
}


async def agent_job(state: BridgeState, key: dict, started: float, turn: AgentRequest, route: str,
                    call_prefix: str, job_id: str, request: Request) -> ChatJob:
    """The chat job for an accepted agent request: the loop guard, the model, the plan and its images; a
    refusal is recorded as usage, as on the chat route. The CPU-heavy steps of a large request run off
    the event loop, as for chat."""
    large = large_body(request)
    with recorded_refusals(route, state, key, turn.model, started):
        await off_loop(large, check_tool_loop, turn.messages)
        model = resolve_model(await state.models(), turn.model, with_images=bool(turn.messages[-1].images))
        chat = ChatRequest(model=turn.model, messages=turn.messages, stream=turn.stream, include_usage=False)
        draft = await off_loop(large, draft_turn, key["id"], chat, state.settings.max_prompt_chars, turn.tools,
                               turn.output)
        plan = plan_turn(state, key, chat, model, turn.tools, turn.output, draft)
        plan.images = await load_images(turn.messages, model, state.settings, state.site.http,
                                        with_history=plan.followup is None, large=large)
    return ChatJob(state, key, chat, plan, started, turn.tools, turn.output, completion_id=job_id,
                   call_prefix=call_prefix, route=route, large=large, client=request.receive)


def job_reply(job: ChatJob) -> tuple[str, str, list[ToolCall]]:
    """A finished job's reasoning, text and calls."""
    return "".join(job.builder.reasoning), "".join(job.content), job.calls


async def agent_sse(job: ChatJob, encoder: Any, pump: Prefetcher, first: Any,
                    done: Callable[[ChatJob], Awaitable[None]] | None) -> AsyncIterator[str]:
    """A streamed agent turn in the API's events; `done` runs once it has succeeded."""
    def encode(item: Any) -> str:
        return encoder.KEEPALIVE if item is None else AGENT_OUTPUTS[item[0]](encoder, item[1])

    interval = job.state.settings.ping_interval
    yield encoder.start()
    try:
        async for text in sse_items(pump, first, encode, interval):
            yield text
        usage = job.usage()
        yield encoder.finish(job.finish_reason, usage)
        await job.succeeded()
        job.record(200, usage)
        if done is not None:
            await done(job)
    except Exception as error:  # noqa: BLE001 - the stream's boundary: every failure becomes an error event
        yield encoder.error(job.fail(error))


async def answer_agent(job: ChatJob, encoder: Any, body: Callable[[ChatJob, dict], dict],
                       done: Callable[[ChatJob], Awaitable[None]] | None = None) -> Response:
    """The turn streamed through `encoder`, or run to its end and answered with `body(job, usage)`."""
    if job.chat.stream:
        pump, first = await first_output(job)
        return EventStream(agent_sse(job, encoder, pump, first, done), job, pump)
    await run_to_end(job)
    usage = job.usage()
    await job.succeeded()
    job.record(200, usage)
    if done is not None:
        await done(job)
    return JSONResponse(body(job, usage), headers=job.headers)


def anthropic_shaped(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every failure of an Anthropic route in Anthropic's error shape, with the same status and headers."""
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientLeft:
            return Unanswered()
        except Exception as error:  # noqa: BLE001 - the request's boundary: every failure becomes an API error
            api_error = api_error_for(error)
            return JSONResponse(anthropic_error_body(api_error), status_code=api_error.status,
                                headers=api_error.headers)
    return route


async def anthropic_messages(request: Request) -> Response:
    state, key, started, body = await accepted_post(request)
    turn = await off_loop(large_body(request), parse_anthropic_request, body, state.anthropic_tools)
    message_id = "msg_" + uuid.uuid4().hex
    job = await agent_job(state, key, started, turn, MESSAGES_ROUTE, "toolu_", message_id, request)

    def message(job: ChatJob, usage: dict) -> dict:
        return anthropic_message_body(message_id, turn.model, *job_reply(job), job.finish_reason, usage)

    encoder = AnthropicEncoder(message_id, turn.model, estimate_tokens(job.plan.new_content))
    return await answer_agent(job, encoder, message)


async def anthropic_count_tokens(request: Request) -> Response:
    """The prompt's tokens, estimated as for usage (tool definitions and earlier calls included), without
    a request to LM Arena."""
    state, key, started, body = await accepted_post(request)
    turn = await off_loop(large_body(request), parse_anthropic_request, body, state.anthropic_tools)
    tokens = await off_loop(large_body(request), agent_prompt_tokens, turn.messages, turn.tools, turn.output,
                            state.settings.max_prompt_chars)
    state.usage.add(COUNT_TOKENS_ROUTE, key["id"], turn.model, 200, started)
    return JSONResponse({"input_tokens": tokens})


def message_from_json(data: dict) -> Message:
    """A stored history's message (dataclasses.asdict of a Message) as a Message again."""
    return Message(**{**data, "tool_calls": [ToolCall(**call) for call in data.get("tool_calls", [])]})


async def responses_probe(state: BridgeState, key: dict, ask: ResponsesRequest, encoder: ResponsesEncoder,
                          started: float) -> Response:
    """A request with no input at all, as clients send to check the endpoint: a completed, empty
    response, without LM Arena."""
    state.usage.add(RESPONSES_ROUTE, key["id"], ask.turn.model, 200, started)
    empty = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if ask.turn.stream:
        return Response(encoder.start() + encoder.finish("stop", empty), media_type="text/event-stream")
    return JSONResponse(encoder.response("completed", usage=responses_usage(empty, "")))


def stored_messages(history: str) -> list[Message]:
    return [message_from_json(m) for m in loads_in_pieces(history.encode())]


async def continue_stored(store: Store, key: dict, ask: ResponsesRequest) -> None:
    """Put the history of the response `previous_response_id` names before the input; that response must
    be one this bridge stored for this key. A long one is decoded off the event loop."""
    if ask.previous_response_id is None:
        return
    history = store.response_history(ask.previous_response_id, key["id"])
    if history is None:
        raise ApiError(400, f"Previous response with id '{ask.previous_response_id}' not found.",
                       "previous_response_not_found", "previous_response_id")
    ask.continuing(await off_loop(len(history) > OFF_LOOP_BYTES, stored_messages, history))


def history_json(messages: list[Message]) -> str:
    return json.dumps([dataclasses.asdict(m) for m in messages], ensure_ascii=False)


async def responses(request: Request) -> Response:
    state, key, started, body = await accepted_post(request)
    ask = await off_loop(large_body(request), parse_responses_request, body, state.responses_tools)
    response_id, created = "resp_" + uuid.uuid4().hex, int(now())
    encoder = ResponsesEncoder(response_id, created, ask)
    if ask.probe:
        return await responses_probe(state, key, ask, encoder, started)
    with recorded_refusals(RESPONSES_ROUTE, state, key, ask.turn.model, started):
        await continue_stored(state.store, key, ask)
    job = await agent_job(state, key, started, ask.turn, RESPONSES_ROUTE, "call_", response_id, request)

    def response(job: ChatJob, usage: dict) -> dict:
        return responses_body(response_id, created, ask, *job_reply(job), job.finish_reason, usage)

    async def store(job: ChatJob) -> None:
        if ask.store:
            _, text, calls = job_reply(job)
            ended = [*ask.history, Message("assistant", text, [], tool_calls=calls)]
            state.store.remember_response(response_id, job.key["id"], await off_loop(job.large, history_json, ended))

    return await answer_agent(job, encoder, response, store)


async def root_probe(request: Request) -> Response:
    """Claude Code sends `HEAD /` before it starts: a plain 200, not the dashboard's redirect."""
    return Response(status_code=200)


def agent_routes() -> list[Route]:
    """Anthropic Messages and OpenAI Responses under /v1 and /api/v1 (Claude Code's `?beta=true` is a
    query, which routing ignores), and the root's HEAD probe."""
    routes = [Route("/", root_probe, methods=["HEAD"])]
    for prefix in ("/v1", "/api/v1"):
        routes += [Route(f"{prefix}/messages", anthropic_shaped(anthropic_messages), methods=["POST"]),
                   Route(f"{prefix}/messages/count_tokens", anthropic_shaped(anthropic_count_tokens),
                         methods=["POST"]),
                   Route(f"{prefix}/responses", responses, methods=["POST"])]
    return routes


# #####################################################################################################
# Part V: Operations
# #####################################################################################################

# =====================================================================================================
# Saved runs
# =====================================================================================================

# A saved run is attached to public bug reports, so redaction errs on the side of removing: every value
# of a secret-bearing field, cookie or header goes, whatever it looks like, and known secret values (the
# run's own sessions, tokens and keys) are replaced verbatim wherever they appear as a last net.

REDACTED = "REDACTED"
SECRET_FIELDS = ("access_token", "refresh_token", "provider_token", "provider_refresh_token", "id_token",
                 "recaptchaV3Token", "recaptchaV2Token", "recaptchaToken", "turnstileToken", "token",
                 "captchaToken", "api_key", "apikey", "password", "email", "phone", "code_verifier")
SECRET_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "apikey", "x-csrf-token")
COOKIE_HEADERS = ("cookie", "set-cookie")
SIGNATURE_PARAMS = ("X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature",
                    "X-Goog-Credential", "Signature", "Key-Pair-Id", "Policy", "sig", "token")
SECRET_COOKIES = r"(?:arena-auth-prod-v1(?:\.\d+)?|cf_clearance|__cf_bm|_cfuvid|cf_chl_\w+|provisional_user_id|arena-ctx|sb-[\w-]+)"
_FIELD_NAMES = "|".join(map(re.escape, SECRET_FIELDS))
# Ordered: the field and cookie rules run before the shape rules so that a value keeps its field name.
REDACTION_RULES: tuple[tuple[re.Pattern, str], ...] = (
    # "field": "value" in JSON, also inside a JSON string (flight data escapes the quotes once)
    (re.compile(r'(\\?"(?:' + _FIELD_NAMES + r')\\?"\s*:\s*\\?")((?:[^"\\]|\\.)*?)(\\?")', re.ASCII), r"\1" + REDACTED + r"\3"),
    # field=value in query strings and form bodies
    (re.compile(r'(?<![\w-])((?:' + _FIELD_NAMES + r')=)[^&\s"\'<>;]+', re.ASCII), r"\1" + REDACTED),
    (re.compile(r'(?<![\w-])(' + SECRET_COOKIES + r'=)[^;\s"\'&<>,]+', re.ASCII), r"\1" + REDACTED),
    (re.compile(r'((?:' + "|".join(SIGNATURE_PARAMS) + r')=)[^&\s"\'<>]+', re.ASCII), r"\1" + REDACTED),
    (re.compile(r'\bbase64-[A-Za-z0-9+/_=-]{8,}', re.ASCII), "base64-" + REDACTED),
    (re.compile(r'\b0[3c]A[\w-]{40,}', re.ASCII), "<recaptcha token " + REDACTED + ">"),
    (re.compile(r'(?<![\w.])0\.[\w.-]{80,}', re.ASCII), "<turnstile token " + REDACTED + ">"),
    (re.compile(r'\bsk-arena-[\w-]{6,}', re.ASCII), "sk-arena-" + REDACTED),
    (re.compile(r'\b(Bearer\s+)[\w.~+/=-]+', re.ASCII | re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(r'[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}', re.ASCII), "user@example.invalid"),
)
JWT_SHAPE = re.compile(r'\beyJ[\w-]*\.eyJ[\w-]*\.[\w-]*', re.ASCII)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def placeholder_jwt(token: str) -> str:
    """A JWT with the same shape and `role` claim and nothing else, so that a replayed page still offers
    an anon key where the real one did, and no claim (user id, email, session) survives."""
    claims: Any = None
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError, binascii.Error):
        pass
    kept = {"role": claims["role"]} if isinstance(claims, dict) and isinstance(claims.get("role"), str) else {}
    return "eyJhbGciOiJub25lIn0." + _b64url(json.dumps({**kept, "redacted": True}).encode()) + "." + REDACTED


def secret_variants(value: str) -> set[str]:
    """A secret as it may appear in a capture: verbatim, percent-encoded, JSON-escaped, and, for a
    session, every part of it (access and refresh token, each split-cookie chunk)."""
    if len(value) < 6:
        return set()   # too short to replace verbatim without mangling ordinary text
    found = {value, urllib.parse.quote(value, safe=""), json.dumps(value)[1:-1]}
    if value.startswith("base64-"):
        found |= session_parts(value)
    return {v for v in found if len(v) >= 6}


def session_parts(value: str) -> set[str]:
    body = value[len("base64-"):].replace("-", "+").replace("_", "/")
    try:
        session = json.loads(base64.b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return set()
    if not isinstance(session, dict):
        return set()
    parts = {str(session[k]) for k in ("access_token", "refresh_token", "provider_token") if session.get(k)}
    # The split cookies `arena-auth-prod-v1.0/.1`: the second chunk is a bare run of base64 text.
    parts |= {value[i:i + 3180] for i in range(0, len(value), 3180)}
    return parts


def redact_text(text: str, known: Iterable[str] = ()) -> str:
    """Every secret removed from a text (HTML, JS, JSON, a stream, a header value, a URL)."""
    for secret in sorted({v for value in known for v in secret_variants(value)}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = JWT_SHAPE.sub(lambda m: placeholder_jwt(m.group(0)), text)
    for pattern, replacement in REDACTION_RULES:
        text = pattern.sub(replacement, text)
    return text


def redact_bytes(data: bytes, known: Iterable[str] = ()) -> bytes:
    """Bytes through the text rules: latin-1 maps each byte to one character and back, so non-text
    bodies survive unchanged where no rule matches (the rules are ASCII-only)."""
    return redact_text(data.decode("latin-1"), known).encode("latin-1")


def redact_cookie_header(value: str, separator: str) -> str:
    """Cookie names stay (they say what was sent); every value goes."""
    pieces = []
    for piece in value.split(separator):
        name, sep, _ = piece.partition("=")
        pieces.append(f"{name}={REDACTED}" if sep else piece)
    return separator.join(pieces)


def redact_header(name: str, value: str, known: Iterable[str] = ()) -> str:
    lowered = name.lower()
    if lowered in SECRET_HEADERS:
        return REDACTED
    if lowered == "cookie":
        return redact_cookie_header(value, ";")
    if lowered == "set-cookie":
        head, sep, attributes = value.partition(";")
        return redact_cookie_header(head, ";") + sep + attributes
    return redact_text(value, known)


def redact_headers(headers: Iterable[tuple[str, str]], known: Iterable[str] = ()) -> list[list[str]]:
    known = tuple(known)
    return [[name, redact_header(name, value, known)] for name, value in headers]


@dataclasses.dataclass
class Exchange:
    """One request the doctor sent and what came back, as seen on the wire."""
    step: str
    method: str
    url: str
    status: int
    request_headers: list[tuple[str, str]]
    request_body: bytes
    response_headers: list[tuple[str, str]]
    body: bytes
    seconds: float = 0.0


def exchange_slug(index: int, exchange: Exchange) -> str:
    path = urllib.parse.urlsplit(exchange.url).path.strip("/") or "page"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{exchange.step}-{path}")
    return f"{index:03d}-{name[:80].strip('-.')}"


class Recorder:
    """What the doctor saw, held in memory until `--save` writes it out redacted. Every secret the run
    handles is registered here too (`secret`), so the saved folder can be checked for each of them."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.known: set[str] = set()
        self.step = ""                  # the doctor step the next exchanges belong to

    def add(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)

    def secret(self, *values: str | None) -> None:
        self.known.update(v for v in values if v)

    def files(self, manifest: dict[str, Any]) -> dict[str, bytes]:
        """The saved folder as file name -> bytes, in the layout of the real captures
        (`NAME.body` + `NAME.meta.json`) plus `manifest.json`, every secret removed."""
        files: dict[str, bytes] = {}
        entries = []
        for index, exchange in enumerate(self.exchanges):
            slug = exchange_slug(index, exchange)
            meta = {"step": exchange.step, "method": exchange.method,
                    "url": redact_text(exchange.url, self.known), "status": exchange.status,
                    "seconds": round(exchange.seconds, 3),
                    "request_headers": redact_headers(exchange.request_headers, self.known),
                    "request_body": redact_bytes(exchange.request_body, self.known).decode("utf-8", "replace"),
                    "response_headers": redact_headers(exchange.response_headers, self.known)}
            files[slug + ".body"] = redact_bytes(exchange.body, self.known)
            files[slug + ".meta.json"] = json.dumps(meta, indent=1, ensure_ascii=False).encode()
            entries.append({"file": slug + ".body", **{k: meta[k] for k in ("step", "method", "url", "status")}})
        whole = {**manifest, "entries": entries}
        files["manifest.json"] = redact_text(json.dumps(whole, indent=1, ensure_ascii=False), self.known).encode()
        return files


def header_pairs(headers: Any) -> list[tuple[str, str]]:
    """Headers as (name, value) pairs, a repeated header (Set-Cookie) once per value."""
    if hasattr(headers, "multi_items"):
        return list(headers.multi_items())
    return list((headers or {}).items())


def tap(response: Any, sink: bytearray) -> None:
    """Copy the bytes of a streamed answer into `sink` as they are read, whoever reads them (the saved
    run keeps the stream as the site sent it)."""
    read = response.aiter_content

    async def copying() -> AsyncIterator[bytes]:
        async for chunk in read():
            sink.extend(chunk)
            yield chunk

    response.aiter_content = copying


class RecordingHttp:
    """The upstream client's HTTP session during a saved doctor run: each request and its answer also go
    to the recorder. Only the doctor's own process uses it, so no client's request is ever recorded. A
    streamed answer (a chat) is recorded by the doctor, which knows when it has been read."""

    def __init__(self, http: AsyncSession, recorder: Recorder):
        self.http, self.recorder = http, recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.http, name)

    async def send(self, method: str, url: str, **options: Any) -> Any:
        started = time.monotonic()
        response = await getattr(self.http, method)(url, **options)
        if not options.get("stream"):
            sent = options.get("data") or b""
            self.recorder.add(Exchange(self.recorder.step, method.upper(), url, response.status_code,
                                       header_pairs(options.get("headers")), sent.encode() if isinstance(sent, str)
                                       else sent, header_pairs(response.headers), response.content,
                                       time.monotonic() - started))
        return response

    async def get(self, url: str, **options: Any) -> Any:
        return await self.send("get", url, **options)

    async def post(self, url: str, **options: Any) -> Any:
        return await self.send("post", url, **options)

    async def put(self, url: str, **options: Any) -> Any:
        return await self.send("put", url, **options)


# =====================================================================================================
# Doctor verdicts
# =====================================================================================================

@dataclasses.dataclass(frozen=True)
class Finding:
    """One line of the doctor's report: a step (and the account or path it was about), how it went,
    what was seen, and the README anchor that says what to do when it did not go well."""
    step: str
    status: str          # "ok", "failed" or "skipped"
    detail: str
    fix: str = ""
    subject: str = ""

    @property
    def label(self) -> str:
        return f"{self.step} ({self.subject})" if self.subject else self.step

    def line(self) -> str:
        text = f"{self.status:<8} {self.label:<24} {self.detail}"
        return text + (f"\n{'':33}what to do: README.md{self.fix}" if self.fix and self.status != "ok" else "")

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def ok(step: str, detail: str, subject: str = "") -> Finding:
    return Finding(step, "ok", detail, subject=subject)


def failed(step: str, detail: str, fix: str, subject: str = "") -> Finding:
    return Finding(step, "failed", detail, TROUBLESHOOTING[fix], subject)


def skipped(step: str, detail: str, fix: str | None = None, subject: str = "") -> Finding:
    return Finding(step, "skipped", detail, TROUBLESHOOTING[fix] if fix else "", subject)


@dataclasses.dataclass(frozen=True)
class Step:
    """One row of the doctor: what it checks, the steps that must have passed first, and the check
    (an async method of the probe object that runs it against the site, returning its lines)."""
    name: str
    needs: tuple[str, ...]
    run: Callable[[Any], Awaitable[list[Finding]]]
    option: str | None = None      # run only when asked (`--images`)


async def run_step(step: Step, probe: Any) -> list[Finding]:
    """One step's lines. A check that raises becomes a failed line: the doctor reports, it never crashes."""
    probe.begin(step.name)
    try:
        return await step.run(probe)
    except Exception as exc:  # noqa: BLE001 - any failure of a check is a line of the report
        return [failed(step.name, f"the check itself failed: {type(exc).__name__}: {exc}", "upstream")]


async def run_steps(steps: Iterable[Step], probe: Any, options: Iterable[str] = (),
                    emit: Callable[[Finding], None] = lambda finding: None) -> list[Finding]:
    """Each step in order, once, each line handed to `emit` as soon as it is known. A step whose
    prerequisite did not pass is skipped and says which; a step passes when one of its lines is ok (one
    working account is enough for the chats that need one). An optional step runs only when asked.
    `probe.begin(name)` is told which step runs (the recorder files what it sees under that name)."""
    asked = set(options)
    passed: dict[str, bool] = {}
    findings: list[Finding] = []
    for step in (step for step in steps if step.option in (None, *asked)):
        blocked = next((name for name in step.needs if not passed.get(name)), None)
        lines = [skipped(step.name, f"not tried: {blocked} did not pass")] if blocked else await run_step(step, probe)
        findings += lines
        for line in lines:
            emit(line)
        passed[step.name] = any(f.status == "ok" for f in lines)
    return findings


def exit_status(findings: Iterable[Finding]) -> int:
    """0 only when a chat worked and no step failed: everything else can look fine while the one thing
    users want fails, and a chat can work while an account or a path needs fixing."""
    findings = list(findings)
    chatted = any(f.step == "chat" and f.status == "ok" for f in findings)
    return 0 if chatted and not any(f.status == "failed" for f in findings) else 1


def verdict_text(findings: list[Finding]) -> str:
    """The run in one line, after its lines."""
    if exit_status(findings) == 0:
        return "a chat worked and every step passed"
    if any(f.step == "chat" and f.status == "ok" for f in findings):
        return "a chat worked, but a step failed: see the failed lines above"
    return f"no chat worked: see the {'failed' if any(f.status == 'failed' for f in findings) else 'skipped'} lines above"


def seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def until_text(stamp: float, at: float) -> str:
    left = stamp - at
    if left < 120:
        return f"{max(0, int(left))} s"
    return f"{int(left // 60)} min" if left < 7200 else f"{left / 3600:.1f} h"


# Judges: what a step observed, as one line (pure, so each verdict is unit-tested).

def judge_origin(url: str, hops: list[tuple[int, str]], status: int | None, error: str | None,
                 challenged: bool = False) -> Finding:
    route = "".join(f" -> {code} -> {location}" for code, location in hops)
    if error is not None:
        return failed("origin", f"{url}{route}: could not connect ({error})", "network")
    if status == 200 or challenged:
        moved = " (the bridge follows it and keeps the new origin)" if hops else ""
        what = " with a Cloudflare challenge" if challenged else ""
        return ok("origin", f"{url}{route} answered {status}{what}{moved}")
    return failed("origin", f"{url}{route} answered {status}; ARENA_URL must be the site's address", "network")


def judge_cloudflare(challenged: bool, sidecar: str, status_after: int | None, error: str | None) -> Finding:
    if not challenged:
        return ok("cloudflare", "no challenge")
    if sidecar == "off":
        return failed("cloudflare", "a challenge, and no browser to pass it (BRIDGE_SIDECAR=off)", "cloudflare")
    if error is not None:
        return failed("cloudflare", f"a challenge the browser could not pass: {error}", "cloudflare")
    if status_after != 200:
        return failed("cloudflare", f"challenge passed in the browser, but the page still answered "
                                    f"{status_after} to the bridge", "cloudflare")
    return ok("cloudflare", "a challenge, passed by the browser (its cookies and User-Agent are reused)")


def judge_page(path: str, status: int, models: list[dict] | None, usable: int) -> Finding:
    if status != 200:
        return failed("page", f"{path} answered {status}", "network")
    if not models:
        return failed("page", f"{path} has no model list (initialModels) in its flight data", "models")
    if not usable:
        return failed("page", f"{len(models)} models from {path}, none the API can serve", "models")
    return ok("page", f"{len(models)} models from {path}, {usable} served by the API")


def judge_discovery(sitekey: str | None, where: str | None, previous: str | None, actions: dict[str, str],
                    needed_actions: Iterable[str], anon_key: bool) -> Finding:
    missing = [name for name in needed_actions if name not in actions]
    anon = "anon key found" if anon_key else "no anon key (not needed: sessions refresh through the page)"
    if sitekey is None:
        return failed("discovery", f"no reCAPTCHA sitekey in the page or its scripts; {anon}", "discovery")
    rotated = f", changed from {previous}" if previous and previous != sitekey else ""
    seen = f"sitekey {sitekey} ({where}{rotated}); {len(actions)} server actions"
    if missing:
        return failed("discovery", f"{seen}, missing {', '.join(missing)} (image uploads need them); {anon}",
                      "discovery")
    return ok("discovery", f"{seen}; {anon}")


@dataclasses.dataclass(frozen=True)
class AccountView:
    """What the doctor knows about one account, read from the store and its session."""
    id: int
    decodes: bool
    guest: bool
    expires_at: float | None
    state: str
    cooldown_until: float | None = None
    reason: str | None = None
    refresh: str | None = None     # None: not tried; "ok"; else why it failed


def expiry_text(account: AccountView, at: float) -> str:
    if not account.expires_at:
        return "no expiry in the session (refreshed when the site answers 401)"
    refreshed = "refreshed, " if account.refresh == "ok" else ""
    due = "" if account.refresh else " (no refresh due yet)"
    return f"{refreshed}expires in {until_text(account.expires_at, at)}{due}"


# An account's line: the first row whose test holds gives its status, the troubleshooting entry and the
# text (after "guest" or "signed in").
ACCOUNT_VERDICTS: tuple[tuple[Callable[[AccountView, float], bool], str, str | None,
                              Callable[[AccountView, float], str]], ...] = (
    (lambda a, at: a.state == "cooling_down" and (a.cooldown_until or 0) > at, "skipped", "cooldown",
     lambda a, at: f"cooling down for {until_text(a.cooldown_until or at, at)} "
                   f"({a.reason or 'no reason given'}); the doctor leaves it alone"),
    (lambda a, at: a.state == "needs_login", "failed", "login_gate",
     lambda a, at: "behind the login gate: LM Arena wants a signed-in account here"),
    (lambda a, at: a.refresh not in (None, "ok"), "failed", "session",
     lambda a, at: f"session expired and refresh failed: {a.refresh}"),
    (lambda a, at: a.state in ("expired", "invalid"), "failed", "session",
     lambda a, at: f"marked {a.state}: {a.reason or 'add a fresh cookie'}"),
    (lambda a, at: True, "ok", None, expiry_text),
)


def judge_account(account: AccountView, at: float) -> Finding:
    subject = f"account {account.id}"
    if not account.decodes:
        return failed("account", "the stored session does not decode; paste the arena-auth-prod-v1 cookie again",
                      "session", subject)
    _, status, fix, text = next(row for row in ACCOUNT_VERDICTS if row[0](account, at))
    detail = f"{'guest' if account.guest else 'signed in'}, {text(account, at)}"
    return Finding("account", status, detail, TROUBLESHOOTING[fix] if fix else "", subject)


def judge_browser(sidecar: str, status: dict | None, launch_seconds: float | None, error: str | None) -> Finding:
    if sidecar == "off":
        return skipped("browser", "not used (BRIDGE_SIDECAR=off): no Cloudflare clearance, token mint or in-page chat")
    if error is not None or status is None:
        return failed("browser", f"the sidecar did not start: {error}", "browser")
    mode = "headful" if status.get("headful") else "headless"
    launched = f", started in {seconds_text(launch_seconds)}" if launch_seconds is not None else ""
    return ok("browser", f"{status.get('version') or 'Chromium'} {mode}{launched}; "
                         f"User-Agent {status.get('user_agent') or 'unknown'}")


def judge_mint(sidecar: str, action: str, token: str | None, seconds: float, error: str | None) -> Finding:
    if sidecar == "off":
        return skipped("token mint", "no browser (BRIDGE_SIDECAR=off): chats go without a reCAPTCHA token",
                       "recaptcha")
    if error is not None:
        return failed("token mint", f"the browser could not mint a {action} token: {error}", "recaptcha")
    if not token or len(token) < 100:
        return failed("token mint", f"the browser returned no token shaped like reCAPTCHA's ({len(token or '')} chars)",
                      "recaptcha")
    return ok("token mint", f"a {len(token):,}-char {action} token in {seconds_text(seconds)}")


@dataclasses.dataclass(frozen=True)
class ChatOutcome:
    """How one short chat went: the answer's status, its failure kind when it failed, and timings."""
    account_id: int
    status: int
    kind: str | None = None
    message: str = ""
    first_token: float | None = None
    seconds: float = 0.0
    text: str = ""
    label: str = ""     # a browser account's label: whose tab sent it


def judge_chat(path: str, outcome: ChatOutcome) -> Finding:
    where = f"account {outcome.account_id}" + (f" ({outcome.label})" if outcome.label else "")
    if outcome.kind is not None or outcome.status != 200:
        return failed("chat", f"{where}: LM Arena answered {outcome.status} ({outcome.kind}): {outcome.message}",
                      fix_for(outcome.kind), path)
    if not outcome.text.strip():
        return failed("chat", f"{where}: the stream ended without text", "upstream", path)
    first = seconds_text(outcome.first_token) if outcome.first_token is not None else "?"
    return ok("chat", f"{where}: first token after {first}, reply of {len(outcome.text)} chars in "
                      f"{seconds_text(outcome.seconds)}", path)


@dataclasses.dataclass(frozen=True)
class ExecutorView:
    """What the server knows about one browser account (a userscript tab): its record and live pages."""
    id: int
    label: str
    connected: bool
    state: str                      # as a request sees it (account_state)
    cooldown_until: float | None = None
    reason: str | None = None
    last_seen: float | None = None


def unseen_text(view: ExecutorView, at: float) -> str:
    seen = f", last seen {until_text(at, view.last_seen)} ago" if view.last_seen else ""
    return (f"its tab is not connected{seen} (closed, asleep, reloaded or signed out): open LM Arena in that "
            "browser until the userscript's badge says connected")


# Why the doctor sends no chat through an executor: the first row whose test holds gives the
# troubleshooting entry and the text. An executor no row stops gets its one chat.
EXECUTOR_SKIPS: tuple[tuple[Callable[[ExecutorView, float], bool], str,
                            Callable[[ExecutorView, float], str]], ...] = (
    (lambda v, at: not v.connected, "executor", unseen_text),
    (lambda v, at: v.state == "cooling_down", "cooldown",
     lambda v, at: f"cooling down for {until_text(v.cooldown_until or at, at)} ({v.reason or 'no reason given'}); "
                   "the doctor leaves it alone"),
    (lambda v, at: v.state == "needs_login", "login_gate",
     lambda v, at: "its tab is signed in as a guest, behind the login gate: sign in to LM Arena in that tab"),
    (lambda v, at: v.state not in ("ok", "refreshing"), "executor",
     lambda v, at: f"marked {v.state} ({v.reason or 'no reason given'}); the doctor leaves it alone"),
)


def judge_executor(view: ExecutorView, at: float) -> Finding | None:
    """The line of an executor the doctor does not chat through, or None when it may."""
    row = next((row for row in EXECUTOR_SKIPS if row[0](view, at)), None)
    if row is None:
        return None
    return skipped("chat", f"{view.label}: {row[2](view, at)}", row[1], f"executor {view.id}")


def no_executor() -> Finding:
    return skipped("chat", "no browser executor has connected to this server: install the userscript in a browser "
                           "signed in to LM Arena and keep an LM Arena tab open", "userscript", "executor")


def judge_server(url: str, status: int | None, error: str | None = None) -> Finding:
    """The executor line of the CLI's doctor, when the running server (which the tabs connect to) did not
    send its executors' chats: none runs (no status: the connection failed with `error`), it runs on
    another database, or it failed (`error` says how, or its status does)."""
    if status is None:
        return skipped("chat", f"no bridge server answers at {url} ({error}): browser executors connect to the "
                               "running server, not to this command; start the server and run the doctor again, or "
                               "run it from the dashboard's Diagnostics page", "executor", "executor")
    if status in (302, 303, 307, 401, 403):
        return skipped("chat", f"the bridge at {url} does not use this database (it refused a dashboard session made "
                               "in it): run the doctor with the server's --db (BRIDGE_DB), or from its Diagnostics "
                               "page", "executor", "executor")
    return failed("chat", f"the bridge at {url} could not run the executor check: {error or f'it answered {status}'}",
                  "upstream", "executor")


def judge_upload(account_id: int, signed_url: str | None, error: str | None) -> Finding:
    where = f"account {account_id}: "
    if error is not None or not signed_url:
        return failed("image upload", where + (error or "no signed URL came back"), "images")
    host = urllib.parse.urlsplit(signed_url).netloc
    return ok("image upload", f"{where}generateUploadUrl -> PUT -> getSignedUrl, the image is on {host}")


# =====================================================================================================
# Doctor
# =====================================================================================================

DOCTOR_PROMPT = "Reply with the single word OK."
CREATE_PATH = "/nextjs-api/stream/create-evaluation"
DOCTOR_ACTIONS = ("generateUploadUrl", "getSignedUrl")      # the server actions image uploads need
MODEL_PAGES = ("/?mode=direct", "/")                        # where the model list is (arena-protocol §0 U10)
HTML_ACCEPT = "text/html,application/xhtml+xml,*/*"
REDIRECTS = (301, 302, 303, 307, 308)
MAX_HOPS = 5
PACING_WAIT = 60.0          # the longest the doctor waits for an account's pacing interval


def doctor_png() -> bytes:
    """A 1x1 PNG for the upload check, built here so the doctor needs no file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\xff\xff")) + chunk(b"IEND", b""))


class Doctor:
    """The checks of DOCTOR_STEPS, run with the bridge's own parts: the upstream client, the account
    pool, the turn runner and the sidecar client. It sends at most one chat per request path, never uses
    an account in a cool-down, and changes nothing a request would not (it stores what discovery finds,
    refreshes a session that expired, keeps a session the site rotated, and cools down an account the
    site rate-limited)."""

    def __init__(self, state: BridgeState, recorder: Recorder | None = None,
                 server: Callable[[], Awaitable[list[Finding]]] | None = None):
        self.state, self.recorder = state, recorder
        # The CLI's doctor runs beside the server the browser executors connect to: `server` asks that
        # server for their lines. Without it, this process is the server and chats through them itself.
        self.server = server
        self.site, self.pool, self.turns, self.sidecar = state.site, state.pool, state.turns, state.sidecar
        self.mode = state.settings.sidecar
        self.page: Any = None
        self.page_text = ""
        # Accounts a chat failed on in this run are not asked again. Browser accounts never are: their
        # session lives in a tab connected to the server, not to this process.
        self.spent: set[int] = {a["id"] for a in state.store.accounts() if a["kind"] == "browser"}

    def begin(self, step: str) -> None:
        if self.recorder is not None:
            self.recorder.step = step

    # --- the site ----------------------------------------------------------------------------------
    async def origin(self) -> list[Finding]:
        start = self.site.origin
        url, hops = start + "/", []
        headers = self.site.request_headers(None, content_type=None, accept=HTML_ACCEPT)
        try:
            for _ in range(MAX_HOPS):
                response = await self.site.http.get(url, headers=headers, timeout=20, allow_redirects=False,
                                                    impersonate=self.site.identity(None)[0], discard_cookies=True)
                location = response.headers.get("location")
                if response.status_code not in REDIRECTS or not location:
                    break
                url = urllib.parse.urljoin(url, location)
                hops.append((response.status_code, url))
        except Exception as exc:  # noqa: BLE001 - any network failure is the finding
            return [judge_origin(start, hops, None, type(exc).__name__)]
        if hops:
            await self.site.follow_move("/", hops[0][1])
        self.page = response
        challenged = is_cloudflare_challenge(response.status_code, dict(response.headers), response.text)
        return [judge_origin(start, hops, response.status_code, None, challenged)]

    async def cloudflare(self) -> list[Finding]:
        page = self.page
        challenged = is_cloudflare_challenge(page.status_code, dict(page.headers), page.text)
        if not challenged or self.mode == "off":
            return [judge_cloudflare(challenged, self.mode, None, None)]
        try:
            await self.site.clear_cloudflare()
        except SidecarError as exc:
            return [judge_cloudflare(True, self.mode, None, str(exc))]
        self.page = await self.site.get("/")
        return [judge_cloudflare(True, self.mode, self.page.status_code, None)]

    async def model_page(self) -> list[Finding]:
        for path in MODEL_PAGES:
            response = await self.site.get(path)
            models = extract_models(response.text) if response.status_code == 200 else None
            if models:
                break
        self.page_text = response.text     # discovery reads it, and stores the models with what else it finds
        return [judge_page(path, response.status_code, models, len(usable_models(models or [])))]

    async def discovery(self) -> list[Finding]:
        chunk_paths = extract_chunk_urls(self.page_text)
        scripts = await self.site.scripts(chunk_paths)
        where = next((name for name, text in (("in the page", self.page_text), *zip(chunk_paths, scripts))
                      if extract_sitekey(text)), None)
        previous = self.site.params.get("sitekey")
        found = self.site.learn(self.page_text, scripts)
        return [judge_discovery(found.get("sitekey"), where, previous, found.get("server_actions") or {},
                                DOCTOR_ACTIONS, "anon_key" in found)]

    # --- accounts ----------------------------------------------------------------------------------
    async def accounts(self) -> list[Finding]:
        accounts = self.state.store.accounts()
        if not accounts:
            return [failed("account", "no LM Arena account is configured (`python bridge.py tokens add VALUE`)",
                           "session")]
        return [await self.account(account) for account in accounts]

    async def account(self, account: dict) -> Finding:
        if account["kind"] == "browser":
            return skipped("account", f"a browser tab (userscript): its session stays in the tab; the line chat "
                           f"(executor {account['id']}) checks it", subject=f"account {account['id']}")
        at = now()
        refresh = None
        state = account_state(account, at)
        if Session.of(account).expired(at) and state in ("ok", "expired"):
            fresh = await self.pool.refresh(account)
            account = self.state.store.account(account["id"]) or account
            refresh = "ok" if fresh is not None else (account["last_error"] or "the site gave no new session")
            state = account_state(account, at)
        session = Session.of(account)
        view = AccountView(account["id"], session.data is not None or bool(session.claims), session.anonymous,
                           session.expiry, state, account["cooldown_until"],
                           account["cooldown_reason"] or account["last_error"], refresh)
        return judge_account(view, at)

    async def usable_account(self, exclude: set[int] | None = None) -> dict | None:
        """An account that may serve now (not in `exclude`, by default those spent). When only pacing holds
        them back, wait for it (up to a minute): the doctor is paced as requests are."""
        exclude = self.spent if exclude is None else exclude
        account = self.pool.pick(exclude)
        if account is None:
            at = now()
            waits = [self.state.settings.account_min_interval - (at - (a["last_used"] or 0))
                     for a in self.state.store.accounts() if a["id"] not in exclude and is_usable(a, at)]
            wait = min(waits, default=0.0)
            if 0 < wait <= PACING_WAIT:
                await asyncio.sleep(wait)
                account = self.pool.pick(exclude)
        return account

    # --- the browser -------------------------------------------------------------------------------
    async def browser(self) -> list[Finding]:
        if self.mode == "off":
            return [judge_browser("off", None, None, None)]
        started = time.monotonic()
        launch = None
        try:
            status = await self.sidecar.status()
            if status.get("browser") != "running":
                await self.sidecar.token(self.site.sitekey, self.site.recaptcha_action)   # launches it
                launch = time.monotonic() - started
                status = await self.sidecar.status()
        except SidecarError as exc:
            return [judge_browser(self.mode, None, None, str(exc))]
        return [judge_browser(self.mode, status, status.get("launch_seconds") or launch, None)]

    async def mint(self) -> list[Finding]:
        action = self.site.recaptcha_action
        started = time.monotonic()
        try:
            token = await self.site.recaptcha_token(action)
        except SidecarError as exc:
            return [judge_mint(self.mode, action, None, 0.0, str(exc))]
        self.keep_secret(token)
        return [judge_mint(self.mode, action, token, time.monotonic() - started, None)]

    def keep_secret(self, *values: str | None) -> None:
        if self.recorder is not None:
            self.recorder.secret(*values)

    # --- chats ---------------------------------------------------------------------------------------
    def paths(self) -> list[str]:
        return ["direct"] + (["in-page"] if self.mode != "off" else [])

    def chat_model(self) -> dict | None:
        return next((m for m in usable_models(self.state.store.models()) if choose_modality(m) == "chat"), None)

    async def chats(self) -> list[Finding]:
        model = self.chat_model()
        if model is None:
            return [failed("chat", "no text model to chat with", "models")]
        return [await self.chat_by(path, model) for path in self.paths()]

    async def chat_by(self, path: str, model: dict, account: dict | None = None, subject: str = "") -> Finding:
        """One path's chat (on `account`, else one the pool picks); a failure to send it at all is that
        path's line, not the end of the step."""
        subject = subject or path
        try:
            return await self.chat(path, model, account, subject)
        except ArenaError as exc:
            return failed("chat", f"could not send it: {exc.message}", fix_for(exc.kind), subject)
        except SidecarError as exc:
            return failed("chat", f"the browser could not send it: {exc}", "browser", subject)

    async def send(self, path: str, body: dict, account: dict, action: str) -> tuple[Any, dict[str, str]]:
        """The chat request by `path`, and the headers it went with (for the saved run)."""
        deadline = now() + self.state.settings.request_timeout
        if path == "direct":
            return await self.site.post_stream(CREATE_PATH, body, account, deadline), self.site.request_headers(account)
        sent = {"Content-Type": "text/plain;charset=UTF-8"}
        if path == "executor":
            response = await self.site.post_by_executor(self.state.executors, CREATE_PATH, body, account, action,
                                                        deadline)
            return response, sent
        cookies = "; ".join(f"{name}=" for name in Session.of(account).cookies())
        return await self.site.post_in_page(CREATE_PATH, body, account, action, deadline), {**sent, "Cookie": cookies}

    async def chat(self, path: str, model: dict, account: dict | None, subject: str) -> Finding:
        account = account or await self.usable_account()
        if account is None:
            return skipped("chat", "no account can serve now (see the account lines)", "cooldown", subject)
        action = self.site.recaptcha_action
        evaluation_id = uuid7()
        token = await self.site.recaptcha_token(action) if path == "direct" else None   # else minted in the page
        self.keep_secret(token)
        body = chat_body(evaluation_id=evaluation_id, model_id=model["id"], content=DOCTOR_PROMPT,
                         modality="chat", attachments=[], mode=self.site.arena_mode(), token=token)
        started = time.monotonic()
        self.pool.spend(account)    # a request on the account like any other: within its hourly budget
        response, sent = await self.send(path, body, account, action)
        received = bytearray()
        tap(response, received)
        try:
            if response.status_code != 200:
                content = await response.acontent()
                await response.aclose()
                return self.refused(subject, account, response, content)
            opened = OpenedTurn(response, account["id"], evaluation_id, 1)
            return await self.read_reply(subject, opened, started, account["label"] if path == "executor" else "")
        finally:
            if self.recorder is not None:
                self.recorder.add(Exchange("chat", "POST", self.site.origin + CREATE_PATH, response.status_code,
                                           list(sent.items()), json.dumps(body).encode(),
                                           header_pairs(response.headers), bytes(received),
                                           time.monotonic() - started))

    def refused(self, path: str, account: dict, response: Any, content: bytes) -> Finding:
        answer = Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()},
                        content.decode("utf-8", "replace")[:4000])
        self.spent.add(account["id"])
        if answer.kind == "rate_limited":   # the site asked for a pause: honour it as a request would
            self.pool.cool_down(account, answer.retry_after or RATE_LIMIT_COOLDOWN,
                                f"rate limited by LM Arena: {answer.message}")
        return judge_chat(path, ChatOutcome(account["id"], answer.status, answer.kind, answer.message))

    async def read_reply(self, path: str, opened: OpenedTurn, started: float, label: str = "") -> Finding:
        """Model A's reply through the turn runner's own reader (which keeps a session the site rotated)."""
        first: float | None = None
        text: list[str] = []
        async for event in self.turns.stream(opened):
            if event.kind == "error":
                return judge_chat(path, ChatOutcome(opened.account_id, 200, "stream", str(event.value), label=label))
            if event.kind == "text":
                first = first if first is not None else time.monotonic() - started
                text.append(event.value)
        return judge_chat(path, ChatOutcome(opened.account_id, 200, None, "", first, time.monotonic() - started,
                                            "".join(text), label))

    # --- browser executors (SPEC §8) -------------------------------------------------------------------
    async def executor_chats(self) -> list[Finding]:
        """One chat through each browser account's connected tab. The tabs connect to the server, so the
        CLI's doctor has the running server send these (`server`), unless no tab ever connected."""
        browsers = [a for a in self.state.store.accounts() if a["kind"] == "browser"]
        if not browsers:
            return [no_executor()]
        if self.server is not None:
            return await self.server()
        model = self.chat_model()
        if model is None:
            return [failed("chat", "no text model to chat with", "models", "executor")]
        return [await self.executor_chat(account, model) for account in browsers]

    async def executor_chat(self, account: dict, model: dict) -> Finding:
        """A tab that is connected and not cooling down gets one chat, when pacing lets its account serve."""
        at, subject = now(), f"executor {account['id']}"
        executors = self.state.executors
        view = ExecutorView(account["id"], account["label"] or subject, executors.connection_for(account["id"]) is not None,
                            account_state(account, at), account["cooldown_until"],
                            account["cooldown_reason"] or account["last_error"],
                            executors.records.record(account["id"]).get("last_seen"))
        skip = judge_executor(view, at)
        if skip is not None:
            return skip
        chosen = await self.usable_account({a["id"] for a in self.state.store.accounts() if a["id"] != account["id"]})
        if chosen is None:
            return skipped("chat", f"{view.label}: busy with a request, or paced for over a minute; try again later",
                           "cooldown", subject)
        return await self.chat_by("executor", model, chosen, subject)

    async def upload(self) -> list[Finding]:
        account = await self.usable_account()
        if account is None:
            return [skipped("image upload", "no account can serve now (see the account lines)", "cooldown")]
        try:
            attachment = await self.turns.uploads.upload_image(account, ImageInput(doctor_png(), "image/png", "the test image"))
        except ArenaError as exc:
            return [judge_upload(account["id"], None, exc.message)]
        return [judge_upload(account["id"], attachment["url"], None)]


# A browser account needs no account line to pass (its session is in its tab, which the chat tries), nor
# the model page: the server knows the models, and its tabs may reach LM Arena when the server cannot.
EXECUTOR_STEP = Step("executor chat", (), Doctor.executor_chats, option="chat")
DOCTOR_STEPS = (
    Step("origin", (), Doctor.origin),
    Step("cloudflare", ("origin",), Doctor.cloudflare),
    Step("page", ("cloudflare",), Doctor.model_page),
    Step("discovery", ("page",), Doctor.discovery),
    Step("account", ("origin",), Doctor.accounts),
    Step("browser", ("origin",), Doctor.browser),
    Step("token mint", ("discovery",), Doctor.mint),
    Step("chat", ("page", "account"), Doctor.chats, option="chat"),
    EXECUTOR_STEP,
    Step("image upload", ("discovery", "account"), Doctor.upload, option="images"),
)


# =====================================================================================================
# Dashboard kit
# =====================================================================================================

class Html(str):
    """Markup that is safe as it is. Every other value is escaped on its way into a template."""


def esc(value: Any) -> Html:
    return value if isinstance(value, Html) else Html(html.escape("" if value is None else str(value)))


def fill(template: str, **values: Any) -> Html:
    return Html(template.format(**{name: esc(value) for name, value in values.items()}))


def join(parts: Iterable[Any]) -> Html:
    return Html("".join(esc(part) for part in parts))


@dataclasses.dataclass
class Admin:
    """A signed-in dashboard request: the session, on a POST the submitted form, and the pages of the
    navigation bar as (path, label)."""
    session: dict
    form: dict[str, str]
    nav: tuple[tuple[str, str], ...] = ()

    @property
    def csrf_field(self) -> Html:
        return fill('<input type="hidden" name="csrf" value="{csrf}">', csrf=self.session["csrf"])

    def number(self, name: str) -> int | None:
        with contextlib.suppress(ValueError):
            return int(self.form.get(name, ""))
        return None


STYLE = """
:root{--fg:#1c2230;--muted:#687086;--line:#e4e7ee;--bg:#f4f5f9;--accent:#3b5bdb;--ok:#2b8a3e;--warn:#d9480f;
--bad:#c92a2a;--info:#1971c2;--off:#868e96}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#1c2230;color:#fff;display:flex;align-items:center;gap:28px;padding:0 28px;height:54px}
header strong{font-size:15px;white-space:nowrap}
nav{display:flex;gap:2px;flex:1;overflow-x:auto}
nav a{color:#b9c0d0;text-decoration:none;padding:6px 12px;border-radius:6px;white-space:nowrap}
nav a:hover{color:#fff}nav a.on{background:#313a4d;color:#fff}
main{max-width:1180px;margin:28px auto;padding:0 28px}
h1{font-size:22px;margin:0 0 18px}h2{font-size:15px;margin:30px 0 10px}
a{color:var(--accent)}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin-bottom:16px}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:12px;margin-bottom:8px}
.stats div{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px 16px}
.stats small{color:var(--muted);font-size:12px}.stats b{display:block;font-size:22px;font-weight:600}
.scroll{overflow-x:auto;border-radius:10px}
table{width:100%;border-collapse:separate;border-spacing:0;background:#fff;border:1px solid var(--line);
border-radius:10px}
th,td{text-align:left;padding:8px 12px;border-bottom:1px solid var(--line);vertical-align:middle;white-space:nowrap}
th{color:var(--muted);font-weight:600;font-size:11px;text-transform:uppercase;letter-spacing:.04em}
tr:last-child td{border-bottom:0}tbody tr:hover{background:#fafbfd}
.num{text-align:right;font-variant-numeric:tabular-nums}
.text{white-space:normal;overflow-wrap:anywhere;min-width:8em}
.mono{white-space:pre-wrap;word-break:break-all;font:12px/1.5 ui-monospace,Menlo,Consolas,monospace}
.badge{display:inline-block;padding:1px 9px;border-radius:999px;font-size:12px;font-weight:600;color:#fff;
white-space:nowrap}
.ok{background:var(--ok)}.warn{background:var(--warn)}.bad{background:var(--bad)}.info{background:var(--info)}
.off{background:var(--off)}.cap{background:#edf2ff;color:#364fc7;margin-right:4px}
.muted{color:var(--muted)}.small{font-size:12px}
code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#eef0f5;padding:1px 6px;border-radius:4px;
white-space:nowrap}
form.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-end}
form.row label{display:flex;flex-direction:column;gap:3px;font-size:12px;color:var(--muted)}
form.inline{display:inline}label.grow{flex:1;min-width:320px}
.toolbar{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-end;justify-content:space-between}
input,textarea,button{font:inherit}
input,textarea{border:1px solid #cbd1dc;border-radius:6px;padding:6px 9px;background:#fff}
textarea{width:100%;min-height:74px;font:12px ui-monospace,Menlo,Consolas,monospace}
button{border:0;border-radius:6px;padding:6px 14px;background:var(--accent);color:#fff;cursor:pointer}
button.quiet{background:#e9ecf3;color:var(--fg)}button.danger{background:#fff;color:var(--bad);border:1px solid #efb5b5}
header button{background:transparent;border:1px solid #4a5468;color:#d0d5e0}
.note{border-radius:8px;padding:10px 14px;margin:0 0 16px;border:1px solid}
.note.ok{background:#ebfbee;border-color:#b2f2bb;color:#1b5e20}
.note.bad{background:#fff5f5;border-color:#ffc9c9;color:#8f1d1d}
.note input{width:100%;max-width:560px;font:13px ui-monospace,Menlo,Consolas,monospace;margin-right:8px}
.tabs a{margin-right:12px}.tabs a.on{font-weight:600;color:var(--fg);text-decoration:none}
.chart{width:100%;max-width:760px;height:auto}.chart .bar{fill:var(--accent)}.chart text{font-size:12px;fill:var(--fg)}
.login{max-width:340px;margin:14vh auto}.login input{width:100%;margin:6px 0 12px}
"""

# Enables the copy button (hidden without JavaScript, where the key can still be selected by hand). The
# clipboard API exists only on HTTPS or localhost; elsewhere the selected text is copied the old way.
COPY_SCRIPT = """for (const b of document.querySelectorAll("[data-copy]")) { b.hidden = false; b.onclick = () => {
const f = document.getElementById(b.dataset.copy); f.select();
(navigator.clipboard ? navigator.clipboard.writeText(f.value) : Promise.reject())
  .catch(() => document.execCommand("copy"));
b.textContent = "Copied"; }; }"""

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>{title} · LM Arena Bridge</title>
<style nonce="{nonce}">{style}</style></head><body>{header}<main>{body}</main>
<script nonce="{nonce}">{script}</script></body></html>"""

HEADER = """<header><strong>LM Arena Bridge</strong><nav>{links}</nav>
<form method="post" action="/logout" class="inline">{csrf}<button>Sign out</button></form></header>"""


def security_headers(nonce: str) -> dict[str, str]:
    """no-store too: a page that shows a new key must not be kept in any cache."""
    policy = (f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; img-src 'self' data:; "
              "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def render(title: str, body: Html, admin: Admin | None = None, status: int = 200,
           headers: dict[str, str] | None = None) -> HTMLResponse:
    """One page in the shared layout; with a signed-in admin, the nav bar and sign-out button."""
    nonce = secrets.token_urlsafe(16)
    header = Html("")
    if admin is not None:
        links = join(fill('<a href="{path}" class="{on}">{label}</a>', path=path, label=label,
                          on="on" if label == title else "") for path, label in admin.nav)
        header = fill(HEADER, links=links, csrf=admin.csrf_field)
    document = fill(PAGE, title=title, nonce=nonce, style=Html(STYLE), header=header, body=body,
                    script=Html(COPY_SCRIPT))
    return HTMLResponse(document, status, headers={**security_headers(nonce), **(headers or {})})


def redirect(path: str) -> Response:
    return RedirectResponse(path, 303, headers=security_headers(secrets.token_urlsafe(16)))


def note(text: Any, tone: str = "ok") -> Html:
    return fill('<div class="note {tone}">{text}</div>', tone=tone, text=text)


def badge(text: str, tone: str) -> Html:
    return fill('<span class="badge {tone}">{text}</span>', tone=tone, text=text)


def prose(value: Any) -> Html:
    """Free text in a table cell (names, errors, paths) may wrap; every other cell stays on one line."""
    return fill('<div class="text">{value}</div>', value=value)


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str) -> Html:
    """Numbers are right-aligned, and so is the heading above a column of them."""
    rows = [list(row) for row in rows]
    if not rows:
        return fill('<p class="muted">{empty}</p>', empty=empty)
    numeric = [isinstance(cell, (int, float)) for cell in rows[0]]
    head = join(fill('<th class="{cls}">{h}</th>', h=h, cls="num" if n else "") for h, n in zip(headers, numeric))
    body = join(fill("<tr>{cells}</tr>", cells=join(
        fill('<td class="{cls}">{cell}</td>', cell=cell, cls="num" if isinstance(cell, (int, float)) else "")
        for cell in row)) for row in rows)
    return fill('<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>',
                head=head, body=body)


def stats(items: Iterable[tuple[str, Any]]) -> Html:
    return fill('<div class="stats">{items}</div>', items=join(
        fill("<div><small>{label}</small><b>{value}</b></div>", label=label, value=value) for label, value in items))


def button(admin: Admin, action: str, label: str, tone: str = "quiet", **fields: Any) -> Html:
    """A one-button form for an action on a table row."""
    hidden = join(fill('<input type="hidden" name="{name}" value="{value}">', name=name, value=value)
                  for name, value in {"action": action, **fields}.items())
    return fill('<form method="post" class="inline">{csrf}{hidden}<button class="{tone}">{label}</button></form>',
                csrf=admin.csrf_field, hidden=hidden, tone=tone, label=label)


def form_card(admin: Admin, action: str, fields: Html, label: str) -> Html:
    """A page's main form for one action: its fields in a row, then the submit button."""
    return fill('<div class="card"><form method="post" class="row">{csrf}<input type="hidden" name="action" '
                'value="{action}">{fields}<button>{label}</button></form></div>',
                csrf=admin.csrf_field, action=action, fields=fields, label=label)


def top_models_chart(per_model: list[dict], count: int) -> Html:
    """Requests of the busiest models as horizontal bars in inline SVG: nothing to load, nothing to run."""
    shown = per_model[:count]
    if not shown:
        return Html('<div class="card muted">No chat requests in this period.</div>')
    top = max(m["requests"] for m in shown)

    def bar(row: int, model: str, requests: int) -> Html:
        width = max(2, round(440 * requests / top))
        return fill('<g><title>{model}: {requests}</title><text x="230" y="{text_y}" text-anchor="end">{short}</text>'
                    '<rect class="bar" x="240" y="{y}" width="{width}" height="18" rx="3"/>'
                    '<text x="{count_x}" y="{text_y}">{requests}</text></g>',
                    model=model, short=model if len(model) <= 34 else model[:33] + "…", requests=requests,
                    y=8 + row * 28, text_y=21 + row * 28, width=width, count_x=width + 246)

    bars = join(bar(row, m["model"], m["requests"]) for row, m in enumerate(shown))
    return fill('<div class="card"><svg class="chart" viewBox="0 0 760 {height}" role="img" '
                'aria-label="Requests per model">{bars}</svg></div>', height=16 + 28 * len(shown), bars=bars)


def duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.1f} s" if ms >= 1000 else f"{ms:.0f} ms"


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def masked(value: Any) -> Any:
    """What may be shown of a secret: its shape, never its content."""
    if isinstance(value, dict):
        return {name: masked(inner) for name, inner in value.items()}
    return f"({len(str(value))} characters, hidden)"


def param_text(value: Any) -> str:
    if isinstance(value, dict):
        return "\n".join(f"{name}: {param_text(inner)}" for name, inner in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(param_text(inner) for inner in value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)       # text, numbers, networks


SECRET_SITE_PARAMS = {"anon_key", "clearance"}


def site_param_text(key: str, stored: str) -> str:
    """The anon key and the Cloudflare clearance are secrets, all but the clearance's User-Agent: that one is
    public, and it is what one needs to see when Cloudflare misbehaves."""
    value = json.loads(stored)
    if key in SECRET_SITE_PARAMS:
        value = ({name: inner if name == "user_agent" else masked(inner) for name, inner in value.items()}
                 if isinstance(value, dict) else masked(value))
    return param_text(value)


# =====================================================================================================
# Dashboard sign-in
# =====================================================================================================

SCRYPT_COST = {"n": 2 ** 15, "r": 8, "p": 1}    # about 32 MiB and 70 ms per check
SCRYPT_MAXMEM = 64 * 1024 * 1024
SESSION_COOKIE = "bridge_session"
SESSION_TTL = 12 * 3600.0
FORM_LIMIT = 256 * 1024


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, maxmem=SCRYPT_MAXMEM, dklen=32, **SCRYPT_COST)
    return "scrypt${n}${r}${p}$".format(**SCRYPT_COST) + f"{salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """The cost parameters travel with each hash, so they can be raised later without locking anyone out."""
    try:
        _, n, r, p, salt, digest = (stored or "").split("$")
        expected = bytes.fromhex(digest)
        candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                                   maxmem=SCRYPT_MAXMEM, dklen=len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(candidate, expected)


def ensure_admin_password(store: Store, configured: str | None) -> None:
    """BRIDGE_ADMIN_PASSWORD is applied whenever its value changes, so that a password changed on the page
    survives restarts until the variable changes. Without it, a password is generated on the first start
    and printed this once; only hashes are kept."""
    if configured:
        if not verify_password(configured, store.meta("admin_password_env")):
            hashed = hash_password(configured)
            store.set_admin_password(hashed)
            store.set_meta("admin_password_env", hashed)
    elif store.meta("admin_password") is None:
        password = secrets.token_urlsafe(15)
        store.set_admin_password(hash_password(password))
        log.warning("generated dashboard password (shown only this once; set BRIDGE_ADMIN_PASSWORD or change "
                    "it on the settings page): %s", password)


def address_in(host: str, trusted: Iterable[Network]) -> bool:
    """Whether `host` (an address as the socket names it; IPv4 may come mapped into IPv6) is in one of them."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


def forwarded(request: Request, header: str) -> str:
    """A forwarded header (X-Forwarded-For, -Proto) only on a connection from a trusted proxy; else "": a
    client connecting directly could otherwise choose its own address (and with it its sign-in throttle)."""
    value = request.headers.get(header, "")
    peer = request.client.host if request.client else ""
    return value if value and address_in(peer, bridge(request).settings.trusted_proxy) else ""


def forwarding_client(hops: str, trusted: Iterable[Network]) -> str:
    """The client in an X-Forwarded-For: the last hop that is not itself a listed proxy. Each proxy appends
    the address it saw, so with a chain of listed proxies (a CDN, then nginx) the last hop is a proxy, and
    every client would share its sign-in throttle; hops before the client's are its own say, not believed."""
    addresses = [hop.strip() for hop in hops.split(",") if hop.strip()]
    return next((a for a in reversed(addresses) if not address_in(a, trusted)), addresses[0] if addresses else "")


def client_address(request: Request) -> str:
    """Behind a trusted proxy, the address the proxies saw (forwarding_client); else the connection's."""
    if hops := forwarded(request, "x-forwarded-for"):
        return forwarding_client(hops, bridge(request).settings.trusted_proxy) or "unknown"
    return request.client.host if request.client else "unknown"


def is_https(request: Request) -> bool:
    if proto := forwarded(request, "x-forwarded-proto"):
        return proto.split(",")[0].strip().lower() == "https"
    return request.url.scheme == "https"


def too_many_guesses(seconds: float, everyone: bool, what: str) -> str:
    whose = "on this bridge from all addresses together" if everyone else "from your address"
    return f"Too many {what} {whose}: try again in {int(seconds) + 1} s."


def current_session(request: Request) -> dict | None:
    token = request.cookies.get(SESSION_COOKIE)
    return bridge(request).store.admin_session(sha256_hex(token)) if token else None


def start_session(request: Request, response: Response) -> Response:
    """Only the token's hash is stored: a copy of the database cannot be replayed as a login."""
    token = secrets.token_urlsafe(32)
    bridge(request).store.create_admin_session(sha256_hex(token), secrets.token_urlsafe(32), now() + SESSION_TTL)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(SESSION_TTL), path="/", httponly=True,
                        samesite="strict", secure=is_https(request))
    return response


async def read_form(request: Request) -> dict[str, str]:
    fields = urllib.parse.parse_qs((await read_body(request, FORM_LIMIT)).decode("utf-8", "replace"),
                                   keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


LOGIN_FORM = """<div class="login card"><h1>LM Arena Bridge</h1>{message}<form method="post">
<label class="muted small" for="password">Dashboard password</label>
<input type="password" id="password" name="password" required autofocus autocomplete="current-password">
<button>Sign in</button></form></div>"""


def login_page(message: Html | None = None, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return render("Sign in", fill(LOGIN_FORM, message=message or Html("")), status=status, headers=headers)


async def home(request: Request) -> Response:
    return redirect("/dashboard" if current_session(request) else "/login")


async def login(request: Request) -> Response:
    if request.method == "GET":
        return redirect("/dashboard") if current_session(request) else login_page()
    state, address = bridge(request), client_address(request)
    wait, everyone = state.logins.wait(address)
    if wait:
        return login_page(note(too_many_guesses(wait, everyone, "sign-in attempts"), "bad"), 429,
                          {"Retry-After": str(int(wait) + 1)})
    state.logins.count(address)
    form = await read_form(request)
    if not await asyncio.to_thread(verify_password, form.get("password", ""), state.store.meta("admin_password")):
        log.warning("dashboard sign-in with a wrong password from %s", address)
        return login_page(note("Wrong password.", "bad"), 401)
    state.logins.forgive(address)
    return start_session(request, redirect("/dashboard"))


async def logout(request: Request, admin: Admin) -> Response:
    bridge(request).store.end_admin_session(admin.session["token_hash"])
    response = redirect("/login")
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=is_https(request))
    return response


def signed_in(handler: Callable[[Request, Admin], Any], nav: tuple[tuple[str, str], ...] = ()) -> Callable[[Request], Any]:
    """A dashboard endpoint: without a session, off to /login; a POST must carry its session's CSRF token.
    `nav` is the navigation bar its pages show."""
    async def endpoint(request: Request) -> Response:
        session = current_session(request)
        if session is None:
            return redirect("/login")
        form = await read_form(request) if request.method == "POST" else {}
        forged = not hmac.compare_digest(form.get("csrf", "").encode(), session["csrf"].encode())
        if request.method == "POST" and forged:
            return render("Forbidden", note("This form did not come from this dashboard session (or the session "
                                            "changed). Reload the page and try again.", "bad"), status=403)
        return await handler(request, Admin(session, form, nav))
    return endpoint


# =====================================================================================================
# Executor routes
# =====================================================================================================

EXECUTOR_BODY_LIMIT = 4 * 1024 * 1024
EXECUTOR_ID_RE = re.compile(r"[A-Za-z0-9-]{8,64}")


def cors_headers(request: Request) -> dict[str, str] | None:
    """CORS for the executor routes: an LM Arena page gets its origin back; a request without an Origin (the
    userscript manager's GM_xmlhttpRequest, curl) needs none; any other origin gets None (refused)."""
    origin = request.headers.get("origin")
    if origin is None:
        return {}
    if origin.lower() not in executor_origins(bridge(request).settings.arena_url):
        return None
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def executor_json(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store", **(headers or {})})


def executor_preflight(request: Request, cors: dict[str, str]) -> Response:
    """Chrome also asks before a public page (arena.ai) calls a bridge on a private address (Private
    Network Access): that is the point of a bridge at home, so it is allowed too."""
    headers = {**cors, "Access-Control-Allow-Methods": "POST", "Access-Control-Max-Age": "600",
               "Access-Control-Allow-Headers": f"Content-Type, {EXECUTOR_SECRET_HEADER}"}
    if request.headers.get("access-control-request-private-network") == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return Response(status_code=204, headers=headers)


def executor_pairing(request: Request, cors: dict[str, str]) -> int | Response:
    """The pairing of the secret in the header (never in the URL), or the refusal; wrong secrets are
    counted, and past the per-address or the shared budget refused outright like dashboard sign-ins."""
    state, address = bridge(request), client_address(request)
    wait, everyone = state.executor_auth.wait(address)
    if wait:
        seconds = int(wait) + 1
        return executor_json({"error": too_many_guesses(wait, everyone, "wrong pairing secrets"),
                              "retry_after": seconds}, 429, {**cors, "Retry-After": str(seconds)})
    pairing = state.executors.records.pairing_by_secret(request.headers.get(EXECUTOR_SECRET_HEADER, ""))
    if pairing is None:
        state.executor_auth.count(address)
        log.warning("browser executor with a wrong pairing secret from %s", address)
        return executor_json({"error": "unknown or revoked pairing secret"}, 401, cors)
    return pairing


def executor_route(handler: Callable[[Request, BridgeState, int, dict], Awaitable[dict]]) -> Callable[[Request], Any]:
    """An executor endpoint: CORS (preflight included), the pairing secret, a JSON body with a page id."""
    async def endpoint(request: Request) -> Response:
        cors = cors_headers(request)
        if cors is None:
            return executor_json({"error": "this origin may not use the browser executor"}, 403)
        if request.method == "OPTIONS":
            return executor_preflight(request, cors)
        pairing = executor_pairing(request, cors)
        if isinstance(pairing, Response):
            return pairing
        try:
            body = json.loads(await read_body(request, EXECUTOR_BODY_LIMIT))
        except (ValueError, ApiError):
            body = None
        if not isinstance(body, dict) or not EXECUTOR_ID_RE.fullmatch(str(body.get("executor", ""))):
            return executor_json({"error": "expected a JSON object with the page's executor id"}, 400, cors)
        return executor_json(await handler(request, bridge(request), pairing, body), headers=cors)
    return endpoint


async def executor_poll(request: Request, state: BridgeState, pairing: int, body: dict) -> dict:
    conn = state.executors.connect(str(body["executor"]), pairing, body.get("state"))
    return await state.executors.poll(conn, request.is_disconnected)


async def executor_events(request: Request, state: BridgeState, pairing: int, body: dict) -> dict:
    events = body["events"] if isinstance(body.get("events"), list) else []
    abort = await state.executors.deliver(str(body["executor"]), pairing, str(body.get("job", "")), events)
    return {"abort": abort}


def public_url(request: Request) -> str:
    """The bridge's URL as this request reached it (behind a trusted proxy, as the proxy was reached)."""
    scheme = "https" if is_https(request) else request.url.scheme
    return f"{scheme}://{request.headers.get('host') or request.url.netloc}"


def new_userscript(store: Store, bridge_url: str, arena_url: str, rotate: bool) -> str:
    """The userscript with a new pairing secret; `rotate` revokes every earlier one first."""
    if rotate:
        ExecutorRecords(store).revoke_pairings()
    _, secret = ExecutorRecords(store).create_pairing()
    return render_userscript(bridge_url, secret, arena_url)


async def download_userscript(request: Request, admin: Admin) -> Response:
    state = bridge(request)
    script = new_userscript(state.store, public_url(request), state.settings.arena_url,
                            rotate=admin.form.get("rotate") == "1")
    return Response(script, media_type="text/javascript; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="lmarena-bridge.user.js"',
                             "Cache-Control": "no-store"})


def executor_routes() -> list[Route]:
    return [Route("/executor/poll", executor_route(executor_poll), methods=["POST", "OPTIONS"]),
            Route("/executor/events", executor_route(executor_events), methods=["POST", "OPTIONS"]),
            Route("/dashboard/userscript", signed_in(download_userscript), methods=["POST"])]


# =====================================================================================================
# Dashboard pages
# =====================================================================================================

async def run_action(request: Request, admin: Admin, actions: dict[str, Callable]) -> Html:
    """On a POST, run the form's action and return its outcome as a notice; on a GET, nothing."""
    if request.method != "POST":
        return Html("")
    action = actions.get(admin.form.get("action", ""))
    return await action(bridge(request), admin) if action else note("Unknown action.", "bad")


def start_of_day(at: float) -> float:
    return time.mktime(time.localtime(at)[:3] + (0, 0, 0, 0, 0, -1))


SIDECAR_TONES = {"running": "ok", "ready": "ok", "starting": "info", "stopped": "off", "off": "off"}


async def overview_page(request: Request, admin: Admin) -> Response:
    state = bridge(request)
    at = now()
    today, week = state.store.usage_summary(start_of_day(at)), state.store.usage_summary(at - 7 * 86400)
    accounts = state.store.accounts()
    usable = sum(account_state(a, at) == "ok" for a in accounts)
    sidecar = await state.sidecar.status()  # local state only: never starts the browser
    sidecar_state = str(sidecar.get("state", "unknown"))
    details = [(name, prose(param_text(value))) for name, value in sidecar.items() if name != "state"]
    parts = [
        fill("<h1>Overview</h1>"),
        stats([("Requests today", today["requests"]), ("Requests, 7 days", week["requests"]),
               ("Error rate, 7 days", share(week["errors"], week["requests"])),
               ("Median latency, 7 days", duration(week["median_ms"]))]),
        stats([("Arena accounts usable", f"{usable} of {len(accounts)}"), ("Models known", len(state.store.models())),
               ("Browser sidecar", badge(sidecar_state, SIDECAR_TONES.get(sidecar_state, "warn")))]),
        fill("<h2>Top models, 7 days</h2>"), top_models_chart(state.store.usage_by_model(at - 7 * 86400), 5),
    ]
    if details:
        parts += [fill("<h2>Browser sidecar</h2>"), table(["Field", "Value"], details, "")]
    return render("Overview", join(parts), admin)


def account_badge(account: dict, at: float) -> Html:
    state = account_state(account, at)
    if state == "cooling_down":
        return fill('{badge}<div class="text small muted">until {until}<br>{reason}</div>',
                    badge=badge("cooling down", "warn"), until=format_time(account["cooldown_until"]),
                    reason=account["cooldown_reason"] or "")
    return badge(ACCOUNT_STATE_LABELS.get(state, state),
                 {"ok": "ok", "expired": "bad", "refreshing": "info", NEEDS_LOGIN: "bad"}.get(state, "off"))


def request_path(state: BridgeState, account: dict, at: float) -> Html:
    """How this account's next chat reaches LM Arena, as the turn runner will send it (account_path): through
    the user's own tab, the sidecar's page (with when the direct path is tried again, if the site refused it),
    or straight from the bridge."""
    if account["kind"] == "browser":
        return badge("your tab", "info")
    if account_path(state.settings, state.site.params, account, at) == "direct":
        return badge("direct", "off")
    if not in_browser_mode(account, at):
        return badge("in-page", "info")
    return fill('{badge}<div class="text small muted">direct again after {when}</div>',
                badge=badge("in-page", "info"), when=format_time(account["direct_retry_at"]))


async def add_account_action(state: BridgeState, admin: Admin) -> Html:
    try:
        parsed = parse_account_input(admin.form.get("value", ""))
    except ValueError as exc:
        return note(exc, "bad")
    account_id, outcome = add_account(state.store, parsed, label=admin.form.get("label", "").strip()[:100])
    return note(f"{ADD_OUTCOMES[outcome].format(id=account_id)} ({'anonymous' if parsed.anonymous else parsed.form}).")


async def remove_account_action(state: BridgeState, admin: Admin) -> Html:
    account_id = admin.number("id")
    if account_id is None or not state.store.remove_account(account_id):
        return note(f"No account {admin.form.get('id')}.", "bad")
    return note(f"Account {account_id} removed.")


async def refresh_account_action(state: BridgeState, admin: Admin) -> Html:
    account = state.store.account(admin.number("id") or 0)
    if account is None:
        return note(f"No account {admin.form.get('id')}.", "bad")
    try:
        fresh = await state.pool.refresh(account)
    except Exception as exc:  # noqa: BLE001 - the page reports it; the account keeps its state
        return note(f"Account {account['id']} could not be refreshed: {type(exc).__name__}: {exc}", "bad")
    if fresh is None:
        return note(f"Account {account['id']} could not be refreshed: the session expired; add a fresh one.", "bad")
    return note(f"Account {account['id']} refreshed; valid until {format_time(fresh['expires_at'])}.")


ACCOUNT_FIELDS = Html("""<label class="grow">Session: the arena-auth-prod-v1 cookie value, its .0/.1 chunks,
a Cookie: header, or a JWT <textarea name="value" required></textarea></label>
<label>Label <input name="label" maxlength="100" placeholder="optional"></label>""")


async def revoke_pairings_action(state: BridgeState, admin: Admin) -> Html:
    count = state.executors.records.revoke_pairings()
    state.executors.sweep()
    return note(f"{count} pairing secret(s) revoked: every userscript installed so far is refused and disconnected.")


USERSCRIPT_CARD = """<div class="card"><p><b>Your own browser as the executor</b> (for a bridge in a data centre):
install <a href="https://www.tampermonkey.net/">Tampermonkey</a> or <a href="https://violentmonkey.github.io/">
Violentmonkey</a>, download the userscript and open the file in that browser (or drop it on the manager's
dashboard) to install it, then keep an LM Arena tab open, signed in: its badge says <i>bridge connected</i> and
the tab appears below as an account of kind <code>browser</code>. Each download has a new pairing secret.</p>
<div class="row">{download} {rotate} {revoke}</div></div>"""


def userscript_card(admin: Admin) -> Html:
    def download(label: str, rotate: str) -> Html:
        return fill('<form method="post" action="/dashboard/userscript" class="inline">{csrf}<input type="hidden" '
                    'name="rotate" value="{rotate}"><button class="quiet">{label}</button></form>',
                    csrf=admin.csrf_field, rotate=rotate, label=label)
    return fill(USERSCRIPT_CARD, download=download("Download userscript", "0"),
                rotate=download("Rotate: revoke all, download a new one", "1"),
                revoke=button(admin, "revoke_pairings", "Revoke all pairings", "danger"))


def executor_rows(state: BridgeState) -> list[tuple]:
    return [(e["account_id"], prose(e["user"].get("email") or e["user"].get("id") or "-"),
             badge("connected", "ok") if e["connected"] else badge("disconnected", "off"), e["pages"],
             format_time(e["connected_since"]), format_time(e["last_job"]), e["jobs"], e["failures"],
             prose(e["last_error"] or "-")) for e in state.executors.status()]


async def accounts_page(request: Request, admin: Admin) -> Response:
    outcome = await run_action(request, admin, {"add": add_account_action, "remove": remove_account_action,
                                                "refresh": refresh_account_action,
                                                "revoke_pairings": revoke_pairings_action})
    at, state = now(), bridge(request)
    rows = [(a["id"], prose(a["label"] or "-"), a["kind"], account_badge(a, at), request_path(state, a, at),
             format_time(a["expires_at"]), format_time(a["last_used"]), prose(a["last_error"] or "-"),
             join([button(admin, "refresh", "Refresh now", id=a["id"]), " ",
                   button(admin, "remove", "Remove", "danger", id=a["id"])]))
            for a in state.store.accounts()]
    body = join([fill("<h1>Arena accounts</h1>"), outcome, form_card(admin, "add", ACCOUNT_FIELDS, "Add account"),
                 table(["ID", "Label", "Kind", "State", "Path", "Expires", "Last used", "Last error", ""], rows,
                       "No accounts yet: add one above."),
                 fill("<h2>Browser executors (userscript)</h2>"), userscript_card(admin),
                 table(["Account", "Signed in as", "State", "Tabs", "Connected since", "Last job", "Jobs", "Failures",
                        "Last error"], executor_rows(bridge(request)), "No browser has connected yet.")])
    return render("Accounts", body, admin)


NEW_KEY = """<div class="note ok"><p><b>Key “{name}” created.</b> Copy it now: it is shown only this once.</p>
<input id="new-key" readonly value="{key}"><button type="button" data-copy="new-key" hidden>Copy</button></div>"""


async def create_key_action(state: BridgeState, admin: Admin) -> Html:
    name, rpm = admin.form.get("name", "").strip(), admin.number("rpm")
    if not name or len(name) > 100:
        return note("A key needs a name of at most 100 characters.", "bad")
    if rpm is None or rpm < 0:
        return note("RPM must be a whole number, 0 for no limit.", "bad")
    _, key = state.store.create_key(name, rpm)
    return fill(NEW_KEY, name=name, key=key)


async def revoke_key_action(state: BridgeState, admin: Admin) -> Html:
    key_id = admin.number("id")
    if key_id is None or not state.store.revoke_key(key_id):
        return note(f"No active key {admin.form.get('id')}.", "bad")
    return note(f"Key {key_id} revoked: it is refused from now on.")


KEY_FIELDS = """<label>Name <input name="name" required maxlength="100" placeholder="e.g. laptop"></label>
<label>Requests per minute (0: no limit) <input name="rpm" type="number" min="0" value="{rpm}"></label>"""


async def keys_page(request: Request, admin: Admin) -> Response:
    state = bridge(request)
    outcome = await run_action(request, admin, {"create": create_key_action, "revoke": revoke_key_action})
    rows = [(k["id"], prose(k["name"]), fill("<code>{prefix}…</code>", prefix=k["prefix"]), k["rpm"] or "no limit",
             format_time(k["created"]), k["requests"], format_time(k["last_used"]),
             badge("revoked", "off") if k["revoked"] else badge("active", "ok"),
             "" if k["revoked"] else button(admin, "revoke", "Revoke", "danger", id=k["id"]))
            for k in state.store.usage_by_key(since=0)]
    body = join([fill("<h1>API keys</h1>"), outcome,
                 form_card(admin, "create", fill(KEY_FIELDS, rpm=state.settings.default_rpm), "Create key"),
                 table(["ID", "Name", "Key", "RPM", "Created", "Requests", "Last used", "State", ""],
                       rows, "No keys yet: create one above.")])
    return render("API keys", body, admin)


USAGE_PERIODS = {"1": "24 hours", "7": "7 days", "30": "30 days"}


async def usage_page(request: Request, admin: Admin) -> Response:
    store = bridge(request).store
    days = request.query_params.get("days", "7")
    days = days if days in USAGE_PERIODS else "7"
    since = now() - int(days) * 86400
    summary, models = store.usage_summary(since), store.usage_by_model(since)
    tabs = join(fill('<a href="?days={d}" class="{on}">{label}</a>', d=d, label=label, on="on" if d == days else "")
                for d, label in USAGE_PERIODS.items())
    body = join([
        fill('<h1>Usage</h1><p class="tabs">{tabs}</p>', tabs=tabs),
        stats([("Requests", summary["requests"]), ("Errors", summary["errors"]),
               ("Error rate", share(summary["errors"], summary["requests"])),
               ("Median latency", duration(summary["median_ms"]))]),
        fill("<h2>Top models</h2>"), top_models_chart(models, 10),
        fill("<h2>Per model</h2>"),
        table(["Model", "Requests", "Errors", "Median latency", "Tokens"],
              [(m["model"], m["requests"], m["errors"], duration(m["median_ms"]), m["tokens"]) for m in models],
              "No chat requests in this period."),
        fill("<h2>Per key</h2>"),
        table(["Key", "", "Requests", "Errors", "Tokens", "Last used"],
              [(prose(k["name"]), fill("<code>{prefix}…</code>", prefix=k["prefix"]), k["requests"], k["errors"],
                k["tokens"], format_time(k["last_used"]))
               for k in store.usage_by_key(since) if k["requests"]], "No requests in this period."),
        fill("<h2>Routed by LM Arena</h2>"),
        table(["Model asked for", "Model LM Arena chose", "Requests"],
              [(r["model"], r["routed_model"], r["requests"]) for r in store.usage_routed(since)],
              "No routed requests in this period."),
        fill("<h2>Errors by type</h2>"),
        table(["Error", "Status", "Count", "Last seen"],
              [(e["error"], e["status"], e["count"], format_time(e["last"])) for e in store.usage_errors(since)],
              "No errors in this period."),
    ])
    return render("Usage", body, admin)


def model_capabilities(model: dict) -> list[str]:
    output = (model.get("capabilities") or {}).get("outputCapabilities") or {}
    name = model.get("publicName", "").lower()
    found = {"vision": accepts_images(model), "image out": output.get("image"), "search": output.get("search"),
             "reasoning": "thinking" in name or "reasoning" in name}
    return [capability for capability, present in found.items() if present]


async def refresh_models_action(state: BridgeState, admin: Admin) -> Html:
    try:
        await state.site.discover(min_age=0)
    except Exception as exc:  # noqa: BLE001 - shown on the page; the stored list stays as it was
        return note(f"LM Arena could not be reached: {type(exc).__name__}: {exc}", "bad")
    return note(f"Model list refreshed: {len(state.store.models())} models.")


MODEL_TOOLBAR = """<div class="card toolbar"><form method="get" class="row"><label>Search name, organization or
capability <input name="q" value="{q}" size="36" autofocus></label><button class="quiet">Search</button></form>
<span class="muted">{shown} of {total} models</span>{refresh}</div>"""


async def models_page(request: Request, admin: Admin) -> Response:
    state = bridge(request)
    outcome = await run_action(request, admin, {"refresh": refresh_models_action})
    query = request.query_params.get("q", "").strip()
    models = state.store.models()
    usable = {m["id"] for m in usable_models(models)}
    rows = []
    for model in models:
        capabilities = model_capabilities(model)
        haystack = " ".join([model.get("publicName", ""), model.get("organization") or "", *capabilities]).lower()
        if all(word in haystack for word in query.lower().split()):
            rows.append((model.get("publicName"), model.get("organization") or "(stealth)",
                         join(badge(c, "cap") for c in capabilities) or "-",
                         badge("usable", "ok") if model["id"] in usable else badge("not usable", "off")))
    body = join([fill("<h1>Models</h1>"), outcome,
                 fill(MODEL_TOOLBAR, q=query, shown=len(rows), total=len(models),
                      refresh=button(admin, "refresh", "Refresh from LM Arena")),
                 table(["Model", "Organization", "Capabilities", "API"], rows, "No model matches.")])
    return render("Models", body, admin)


async def change_password_action(state: BridgeState, admin: Admin) -> Html:
    form = admin.form
    if not await asyncio.to_thread(verify_password, form.get("current", ""), state.store.meta("admin_password")):
        return note("The current password is wrong.", "bad")
    if len(form.get("new", "")) < 10:
        return note("The new password needs at least 10 characters.", "bad")
    if form.get("new") != form.get("repeat"):
        return note("The two new passwords differ.", "bad")
    state.store.set_admin_password(await asyncio.to_thread(hash_password, form["new"]),
                                   keep_session=admin.session["token_hash"])
    return note("Password changed; every other session was signed out.")


PASSWORD_FIELDS = Html("""
<label>Current password <input type="password" name="current" required autocomplete="current-password"></label>
<label>New password <input type="password" name="new" required minlength="10" autocomplete="new-password"></label>
<label>Repeat <input type="password" name="repeat" required minlength="10" autocomplete="new-password"></label>""")


async def settings_page(request: Request, admin: Admin) -> Response:
    state = bridge(request)
    outcome = await run_action(request, admin, {"password": change_password_action})
    params = [(p["key"], fill('<div class="mono">{v}</div>', v=site_param_text(p["key"], p["value"])),
               format_time(p["updated"])) for p in state.store.site_params_with_times()]
    values = dataclasses.asdict(state.settings)
    options = [(opt.name, prose("-" if values[opt.name] in (None, "", ()) else param_text(values[opt.name])),
                prose(opt.help)) for opt in OPTIONS if opt.flag]  # options without a flag are secrets
    body = join([fill("<h1>Settings</h1>"), outcome,
                 fill("<h2>Site parameters discovered on LM Arena</h2>"),
                 table(["Parameter", "Value", "Discovered"], params, "Nothing discovered yet."),
                 fill("<h2>Dashboard password</h2>"),
                 form_card(admin, "password", PASSWORD_FIELDS, "Change password"),
                 fill("<h2>Configuration (flags and environment)</h2>"),
                 table(["Setting", "Value", "Meaning"], options, "")])
    return render("Settings", body, admin)


DOCTOR_FIELDS = Html("""<label><input type="checkbox" name="chat" value="1"> also send one short chat
by each request path and through each connected browser executor (it uses an account's quota)</label>
<label><input type="checkbox" name="images" value="1"> and upload a test image</label>""")
FINDING_TONES = {"ok": "ok", "failed": "bad", "skipped": "off"}


async def run_doctor_action(state: BridgeState, admin: Admin) -> Html:
    options = [name for name in ("chat", "images") if admin.form.get(name)]
    findings = await run_steps(DOCTOR_STEPS, Doctor(state), options)
    rows = [(badge(f.status, FINDING_TONES[f.status]), f.label, prose(f.detail),
             prose(f"README.md{f.fix}" if f.fix else "-")) for f in findings]
    verdict = verdict_text(findings) if "chat" in options else "no chat was sent (tick the box to send one)"
    return join([note(verdict[0].upper() + verdict[1:] + ".", "ok" if exit_status(findings) == 0 else "bad"),
                 table(["", "Step", "What the doctor saw", "What to do"], rows, "")])


async def diagnostics_page(request: Request, admin: Admin) -> Response:
    outcome = await run_action(request, admin, {"doctor": run_doctor_action})
    failures = [(account_id, format_time(at), kind, prose(message))
                for account_id, at, kind, message in bridge(request).failures.recent()]
    body = join([fill("<h1>Diagnostics</h1><p class=\"muted\">The doctor checks each step of LM Arena's "
                      "protocol once, as <code>python bridge.py doctor</code> does.</p>"),
                 form_card(admin, "doctor", DOCTOR_FIELDS, "Run the doctor"), outcome,
                 fill("<h2>Last failures per account</h2>"),
                 table(["Account", "When", "Cause", "What LM Arena said"], failures,
                       "No failed attempt since the bridge started.")])
    return render("Diagnostics", body, admin)


DOCTOR_EXECUTORS_PATH = "/dashboard/diagnostics/executors"


async def doctor_executors(request: Request, admin: Admin) -> Response:
    """The doctor's executor step for `python bridge.py doctor`, which runs in another process: the tabs
    connect to this server, so only it can chat through them. The CLI signs in with a short-lived
    dashboard session it makes in the database, so a server on another database refuses it."""
    findings = await run_steps([EXECUTOR_STEP], Doctor(bridge(request)), ["chat"])
    return JSONResponse({"findings": [f.as_dict() for f in findings]})


DASHBOARD = (("/dashboard", "Overview", overview_page), ("/dashboard/accounts", "Accounts", accounts_page),
             ("/dashboard/keys", "API keys", keys_page), ("/dashboard/usage", "Usage", usage_page),
             ("/dashboard/models", "Models", models_page), ("/dashboard/diagnostics", "Diagnostics", diagnostics_page),
             ("/dashboard/settings", "Settings", settings_page))


def dashboard_routes() -> list[Route]:
    nav = tuple((path, label) for path, label, _ in DASHBOARD)
    return [Route("/", home), Route("/login", login, methods=["GET", "POST"]),
            Route("/logout", signed_in(logout), methods=["POST"]),
            *(Route(path, signed_in(page, nav), methods=["GET", "POST"]) for path, _, page in DASHBOARD),
            Route(DOCTOR_EXECUTORS_PATH, signed_in(doctor_executors), methods=["POST"])]


# =====================================================================================================
# App
# =====================================================================================================

def may_see_details(request: Request) -> bool:
    """An API key or a dashboard session. The health route is public (a platform's checks call it without
    credentials, and on Fly anyone can), so without either it shows no account's label or error."""
    if current_session(request) is not None:
        return True
    try:
        authenticate(request)
    except ApiError:
        return False
    return True


async def health(request: Request) -> Response:
    """Liveness and readiness from local state only: never calls LM Arena, never starts a browser. Without
    credentials only the status and counts; with them each account and the sidecar too."""
    state = bridge(request)
    at = now()
    accounts = state.store.accounts()
    usable = [a for a in accounts if is_usable(a, at)]
    models = state.store.model_count()
    checks: dict[str, Any] = {"accounts": {"usable": len(usable), "total": len(accounts)}, "models": {"known": models},
                              "browser_executors": {"connected": len(state.executors.connections)}}
    if may_see_details(request):
        checks["accounts"]["items"] = [{f: a[f] for f in ACCOUNT_PUBLIC_FIELDS} | {"state": account_state(a, at)}
                                       for a in accounts]
        checks["sidecar"] = await state.sidecar.status()
        checks["browser_executors"]["items"] = state.executors.status()
    status = "ok" if usable and models else "degraded"
    return JSONResponse({"status": status, "checks": checks})


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format, for an admin session or an API key (401 in OpenAI's shape otherwise)."""
    if current_session(request) is None:
        authenticate(request)
    return Response(bridge(request).metrics.exposition(), media_type=PROMETHEUS_TYPE)


async def api_error_handler(request: Request, error: Exception) -> Response:
    if isinstance(error, ClientLeft):
        return Unanswered()
    api_error = api_error_for(error)
    return JSONResponse(api_error.body(), status_code=api_error.status, headers=api_error.headers)


def other_slash(request: Request) -> str | None:
    """The path with its trailing slash removed or added, when a route serves that form."""
    path = request.url.path
    other = path.rstrip("/") if path.endswith("/") else path + "/"
    scope = {**request.scope, "path": other}
    if other and any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes):
        return other
    return None


async def not_found_handler(request: Request, error: Exception) -> Response:
    status = getattr(error, "status_code", 404)
    # Starlette's own slash redirect is absolute, built from the Host header the client sent: a relative
    # one cannot send anybody elsewhere.
    if status == 404 and (other := other_slash(request)) is not None:
        query = request.url.query
        return RedirectResponse(other + ("?" + query if query else ""), 307)
    message = "Method not allowed." if status == 405 else f"No route {request.url.path}."
    # Starlette's 405 names the route's methods in its Allow header (RFC 9110 §15.5.6 requires it).
    return JSONResponse(ApiError(status, message, "not_found" if status == 404 else "method_not_allowed").body(),
                        status_code=status, headers=getattr(error, "headers", None))


async def every(seconds: float, job: Callable[[], Any], first_delay: float = 0.0) -> None:
    """Run `job` forever, `seconds` apart; a failing run is logged and the loop goes on."""
    await asyncio.sleep(first_delay)
    while True:
        try:
            result = job()
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:  # noqa: BLE001 - a failing run is logged and the loop goes on
            log.warning("background job %s failed: %s", getattr(job, "__name__", job), exc)
        await asyncio.sleep(seconds)


async def discover_and_trim(site: ArenaSite) -> None:
    """Discovery, then hand the memory it freed back to the system. Parsing the page and its chunks peaks
    at several MB that glibc would otherwise keep for good, and idle memory is what a small VM pays for."""
    await site.discover(min_age=0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def metrics_snapshot(settings: Settings, store: Store, sidecar: SidecarClient, executors: BrowserExecutors,
                     http: UpstreamSession) -> Snapshot:
    at = now()
    accounts = [AccountGauge(a["id"], a["kind"] or "", account_state(a, at), a["cooldown_until"])
                for a in store.accounts()]
    # "failed: <why>" would make a label per message
    return Snapshot(accounts, sidecar.state.split(":")[0], executors.counts(),
                    store.conversation_count(settings.conversation_ttl), len(asyncio.all_tasks()), len(http.owners))


def bridge_state(settings: Settings, store: Store) -> BridgeState:
    """The parts of a bridge, wired together: what the server and the doctor run on."""
    sidecar = SidecarClient.from_settings(settings, current_origin(settings, store))
    executors = BrowserExecutors(store, settings.sidecar_timeout)
    metrics = Metrics(lambda: metrics_snapshot(settings, store, sidecar, executors, site.http),
                      lambda: (m["publicName"] for m in store.models()))
    site = ArenaSite(settings, store, sidecar, on_mint=metrics.token_minted)
    pool = AccountPool(settings, store, site, sidecar)
    failures = FailureLog()
    return BridgeState(settings=settings, store=store, sidecar=sidecar, site=site, pool=pool,
                       turns=TurnRunner(settings, store, site, pool, sidecar, failures, executors),
                       limiter=RateLimiter(), usage=UsageRecorder(store, metrics),
                       logins=GuessThrottle(settings.login_attempts, settings.login_budget), metrics=metrics,
                       failures=failures, executors=executors,
                       executor_auth=GuessThrottle(settings.login_attempts, settings.login_budget),
                       bodies=BodyBudget(settings.max_inflight_body_mb * 2 ** 20),
                       chat_tools=tool_memo(), anthropic_tools=tool_memo(), responses_tools=tool_memo())


def create_app(settings: Settings) -> Starlette:
    store = Store(settings.db)
    state = bridge_state(settings, store)
    sidecar = state.sidecar

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ensure_admin_password(store, settings.admin_password)
        state.executors.start()
        if settings.auth_tokens:
            import_env_accounts(store, settings.auth_tokens)
        state.tasks = [
            asyncio.create_task(every(settings.discovery_interval, lambda: discover_and_trim(state.site))),
            asyncio.create_task(every(2.0, state.usage.flush, first_delay=2.0)),
            asyncio.create_task(every(3600.0, lambda: store.forget_old_conversations(settings.conversation_ttl))),
            asyncio.create_task(every(3600.0, lambda: store.prune_usage(settings.usage_days))),
            asyncio.create_task(every(1.0, state.executors.sweep, first_delay=1.0)),
        ]
        # Everything made so far (modules, classes, settings) lives as long as the server: out of the cyclic
        # collector's way, so that a full collection, which runs inside whatever request step triggers it,
        # walks only what requests made (a 50k-message request's full collection held the loop for ~100 ms).
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()   # back to the collector: a process may run several apps in turn (the tests do)
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            state.usage.flush()
            await sidecar.aclose()
            await state.site.aclose()
            store.close()

    # Each API section and the dashboard define their own routes; a new API adds its table here.
    routes = [Route("/health", health), Route("/api/v1/health", health), Route("/metrics", metrics_endpoint),
              *openai_routes(), *agent_routes(), *dashboard_routes(), *executor_routes()]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error_handler, Exception: api_error_handler,
                                        404: not_found_handler, 405: not_found_handler})
    app.router.redirect_slashes = False      # not_found_handler redirects, relatively
    app.state.bridge = state
    app.add_middleware(cast(Any, state.bodies.middleware))
    app.add_middleware(cast(Any, request_trace))
    return app


# =====================================================================================================
# CLI
# =====================================================================================================

def configure_logging(level: str) -> None:
    logging.basicConfig(level=logging.DEBUG if level == "debug" else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Third-party debug logs can print headers (cookies, tokens): keep them quiet at every level.
    for noisy in ("hpack", "httpx", "httpcore", "curl_cffi", "asyncio", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    for opt in OPTIONS:
        if opt.flag is None:
            continue
        env = ", ".join(opt.env)
        default = "" if opt.default in (None, "") else f"; default {opt.default}"
        kwargs: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS,
                                  "help": f"{opt.help} (env {env}{default})"}
        if opt.kind in (_bool, _bool_or_auto):
            kwargs.update(action="store_const", const=True)
        else:
            kwargs.update(type=opt.kind, metavar=opt.name.upper())
        if opt.bare is not None:
            kwargs.update(nargs="?", const=opt.bare)
        common.add_argument(opt.flag, **kwargs)
    env_only = "\n".join(f"  {', '.join(o.env)}: {o.help}" for o in OPTIONS if o.flag is None)
    parser = argparse.ArgumentParser(prog="bridge.py", parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="OpenAI-compatible bridge to LM Arena. Without a command: serve.",
                                     epilog=f"environment only (secrets never go on the command line):\n{env_only}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", parents=[common], help="serve the API and dashboard (the default)")
    keys = commands.add_parser("keys", parents=[common], help="manage API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", parents=[common], help="create a key; prints it alone on the last line")
    create.add_argument("name")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute (default BRIDGE_DEFAULT_RPM)")
    keys.add_parser("list", parents=[common], help="list keys (never the secret)")
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("id", type=int)
    tokens = commands.add_parser("tokens", parents=[common], help="manage arena accounts").add_subparsers(dest="action", required=True)
    add = tokens.add_parser("add", parents=[common], help="add an account: cookie value, .0/.1 chunks, Cookie: header or JWT")
    add.add_argument("value", nargs="+")
    tokens.add_parser("list", parents=[common], help="list accounts with their state (never the secret)")
    remove = tokens.add_parser("remove", parents=[common], help="remove an account")
    remove.add_argument("id", type=int)
    script = commands.add_parser("userscript", parents=[common],
                                 help="print the browser executor's userscript, with a new pairing secret")
    script.set_defaults(action="print")
    script.add_argument("--url", help="the bridge URL the script connects to (default http://HOST:PORT)")
    script.add_argument("--rotate", action="store_true", help="revoke every earlier pairing secret first")
    script.add_argument("--revoke", action="store_true", help="only revoke every pairing secret (prints no script)")
    models = commands.add_parser("models", parents=[common], help="the LM Arena model list").add_subparsers(dest="action", required=True)
    models.add_parser("refresh", parents=[common], help="fetch the model list and site parameters now")
    models.add_parser("list", parents=[common], help="list the usable models")
    doctor = commands.add_parser("doctor", parents=[common], help="check each step against LM Arena once, "
                                 "with the configured accounts and browser; exit status 0 when a chat worked")
    doctor.add_argument("--images", action="store_true", help="also upload a test image")
    doctor.add_argument("--save", metavar="DIR", help="write what the doctor saw, every secret removed, to DIR")
    doctor.set_defaults(action="run")
    return parser


def print_error(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


Command = Callable[[Settings, Store, argparse.Namespace], int]


def create_key_command(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    key_id, key = store.create_key(args.name, args.rpm if args.rpm is not None else settings.default_rpm)
    print(f"created key {key_id} ({args.name}); it is shown only now:")
    print(key)
    return 0


def list_keys_command(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    for key in store.api_keys():
        state = f"revoked {format_time(key['revoked'])}" if key["revoked"] else "active"
        print(f"{key['id']}\t{key['name']}\t{key['prefix']}…\t{key['rpm']} rpm\t{state}")
    return 0


def removal_command(remove: Callable[[Store, int], bool], missing: str, done: str) -> Command:
    """A command that ends one stored thing by its id: `remove` says whether there was one."""
    def run(settings: Settings, store: Store, args: argparse.Namespace) -> int:
        if not remove(store, args.id):
            return print_error(f"no {missing} {args.id}", 1)
        print(f"{done} {args.id}")
        return 0
    return run


def add_token_command(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    try:
        parsed = parse_account_input(" ".join(args.value) if len(args.value) > 1 else args.value[0])
    except ValueError as exc:
        return print_error(f"error: {exc}", 2)
    account_id, outcome = add_account(store, parsed, label="added from the CLI")
    held = store.account(account_id) or {}
    print(f"{ADD_OUTCOMES[outcome].format(id=account_id)} ({'anonymous' if parsed.anonymous else parsed.form}), "
          f"expires {format_time(held.get('expires_at'))}")
    return 0


def list_tokens_command(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    at = now()
    for a in store.accounts():
        state = account_state(a, at)
        if state == "cooling_down":
            state = f"cooling down until {format_time(a['cooldown_until'])} ({a['cooldown_reason']})"
        state = ACCOUNT_STATE_LABELS.get(state, state)
        print(f"{a['id']}\t{a['kind']}\t{state}\texpires {format_time(a['expires_at'])}\t"
              f"last error: {a['last_error'] or '-'}{executor_line(store, a)}")
    return 0


def executor_line(store: Store, account: dict) -> str:
    """A browser account's record: who its tab is signed in as, since when, its jobs (a browser holds no expiry)."""
    if account["kind"] != "browser":
        return ""
    record = ExecutorRecords(store).record(account["id"])
    user = json.loads(record.get("user") or "{}")
    return (f"\tsigned in as {user.get('email') or user.get('id') or '-'}\tconnected since "
            f"{format_time(record.get('connected_since'))}\tlast seen {format_time(record.get('last_seen'))}\t"
            f"last job {format_time(record.get('last_job'))}\tjobs {record.get('jobs') or 0}\t"
            f"failures {record.get('failures') or 0}")


def local_url(settings: Settings) -> str:
    """The server's address from this machine: HOST:PORT, a wildcard address read as loopback."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def userscript_command(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    if args.revoke:
        print(f"revoked {ExecutorRecords(store).revoke_pairings()} pairing secret(s); connected browsers are dropped within seconds",
              file=sys.stderr)
        return 0
    url = args.url or local_url(settings)
    if not url.startswith(("http://", "https://")):
        return print_error("error: --url must be an http:// or https:// URL", 2)
    print(new_userscript(store, url, settings.arena_url, rotate=args.rotate), end="")
    return 0


async def discover_once(settings: Settings, store: Store) -> dict:
    sidecar = SidecarClient.from_settings(settings, current_origin(settings, store))
    site = ArenaSite(settings, store, sidecar)
    try:
        return await site.discover(min_age=0)
    finally:
        await site.aclose()
        await sidecar.aclose()


def refresh_models_command(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    try:
        asyncio.run(discover_once(settings, store))
    except Exception as exc:  # noqa: BLE001 - whatever failed, the command reports it in one line
        return print_error(f"error: could not refresh from {settings.arena_url}: {exc}", 1)
    print(f"{len(store.models())} models stored ({len(usable_models(store.models()))} usable)")
    return 0


def list_models_command(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    for m in usable_models(store.models()):
        print(f"{m['publicName']}\t{m['organization']}\t{choose_modality(m)}\t"
              f"{'vision' if accepts_images(m) else '-'}")
    return 0


def account_secrets(account: dict) -> list[str]:
    """An account's session, its tokens and the cookies that came with it."""
    data = Session.of(account).data or {}
    return [account["auth"], *json.loads(account["cookies"] or "{}").values(),
            *(str(v) for v in data.values() if isinstance(v, str))]


def run_secrets(state: BridgeState) -> list[str]:
    """Every secret the bridge holds that a saved run could show: sessions, the cookies that came with
    them, Cloudflare clearance, and the secrets from the environment."""
    clearance = (state.site.params.get("clearance") or {}).get("cookies") or {}
    values = [state.settings.admin_password, state.settings.auth_tokens, *clearance.values()]
    values += [secret for account in state.store.accounts() for secret in account_secrets(account)]
    return [v for v in values if v]


def save_run(folder: str, recorder: Recorder, state: BridgeState, findings: list[Finding]) -> None:
    recorder.secret(*run_secrets(state))   # again: the run may have refreshed or rotated sessions
    files = recorder.files({"origin": state.site.origin, "saved": format_time(now()),
                            "doctor": [f.as_dict() for f in findings]})
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


async def executor_chats_on_server(settings: Settings, store: Store) -> list[Finding]:
    """The executor lines from the running server at HOST:PORT, which the tabs connect to. It is asked
    with a dashboard session made in this database for the length of the check, and ended after it."""
    url = local_url(settings)
    browsers = sum(a["kind"] == "browser" for a in store.accounts())
    wait = (settings.request_timeout + PACING_WAIT) * max(1, browsers) + 10.0
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    store.create_admin_session(sha256_hex(token), csrf, now() + wait)
    try:
        async with httpx.AsyncClient(timeout=wait, trust_env=False) as client:
            response = await client.post(url + DOCTOR_EXECUTORS_PATH, data={"csrf": csrf},
                                         headers={"Cookie": f"{SESSION_COOKIE}={token}"})
        names = [field.name for field in dataclasses.fields(Finding)]
        findings = [Finding(**{name: str(item.get(name) or "") for name in names})
                    for item in response.json()["findings"]] if response.status_code == 200 else None
    except httpx.ConnectError as exc:
        return [judge_server(url, None, str(exc) or type(exc).__name__)]
    except httpx.HTTPError as exc:
        return [judge_server(url, 0, f"{type(exc).__name__} after up to {wait:.0f} s")]
    except (ValueError, KeyError, TypeError, AttributeError):
        return [judge_server(url, 200, "its answer is not a bridge's (another program on that port?)")]
    finally:
        store.end_admin_session(sha256_hex(token))
    return findings if findings is not None else [judge_server(url, response.status_code)]


async def run_doctor(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    state = bridge_state(settings, store)
    recorder = Recorder() if args.save else None
    if recorder is not None:
        recorder.secret(*run_secrets(state))
        # A stand-in with the same methods: only this process records, and only the doctor runs in it.
        state.site.http = RecordingHttp(state.site.http, recorder)  # type: ignore[assignment]
    print(f"doctor: {state.site.origin}, {len(store.accounts())} account(s), sidecar {settings.sidecar}", flush=True)
    try:
        doctor = Doctor(state, recorder, server=lambda: executor_chats_on_server(settings, store))
        findings = await run_steps(DOCTOR_STEPS, doctor, ["chat", *(["images"] if args.images else [])],
                                   emit=lambda finding: print(finding.line(), flush=True))
    finally:
        await state.sidecar.aclose()
        await state.site.aclose()
    if recorder is not None:
        save_run(args.save, recorder, state, findings)
        print(f"saved what the doctor saw to {args.save} (secrets removed; look before you share it)")
    status = exit_status(findings)
    print(verdict_text(findings))
    return status


def doctor_command(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    return asyncio.run(run_doctor(settings, store, args))


# Every CLI command but serve: (command, action) -> what runs it, with the settings, the store and the
# parsed arguments; it returns the exit status.
COMMANDS: dict[tuple[str, str], Command] = {
    ("keys", "create"): create_key_command,
    ("keys", "list"): list_keys_command,
    ("keys", "revoke"): removal_command(Store.revoke_key, "active key", "revoked key"),
    ("tokens", "add"): add_token_command,
    ("tokens", "list"): list_tokens_command,
    ("tokens", "remove"): removal_command(Store.remove_account, "account", "removed account"),
    ("userscript", "print"): userscript_command,
    ("models", "refresh"): refresh_models_command,
    ("models", "list"): list_models_command,
    ("doctor", "run"): doctor_command,
}


def run_cli(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.db)
    try:
        return COMMANDS[(args.command, args.action)](settings, store, args)
    finally:
        store.close()


def database_folder_problem(db: str) -> str | None:
    """Why the database's folder cannot be made or written, saying what to do; None when it can. The usual
    cause is a bind mount owned by another uid than the container's."""
    existing = os.path.dirname(os.path.abspath(db))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder; choose another --db (BRIDGE_DB)"
    if not os.access(existing, os.W_OK | os.X_OK):
        uid, gid = os.getuid(), os.getgid()
        return (f"uid {uid} may not write to {existing}: make it writable for that uid (a Docker bind mount: "
                f"chown {uid}:{gid} DIR on the host) or choose another --db (BRIDGE_DB)")
    return None


def plain_http_warning(settings: Settings) -> str | None:
    """Listening beyond this machine with no proxy in front to add TLS: keys, the dashboard password and
    its cookie would cross the network in clear text. None when the listener is loopback or a proxy is set."""
    host = settings.host.strip("[]")
    with contextlib.suppress(ValueError):
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    if settings.trusted_proxy:
        return None
    return (f"listening on {settings.host}, beyond this machine, without TLS in front: API keys and the dashboard "
            "password cross the network in clear text. Put a reverse proxy with TLS in front and set "
            "BRIDGE_TRUSTED_PROXY to its address, or listen on 127.0.0.1 (README.md#tls-and-trusted-proxies)")


def serve(settings: Settings) -> None:
    import errno

    import hypercorn.asyncio
    import hypercorn.config

    config = hypercorn.config.Config()
    config.bind = [f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_timeout
    # Hypercorn's own 5 s: it also holds a connection its client closed until this runs out, so a long
    # value costs a socket and memory per closed connection under churn.
    config.keep_alive_timeout = 5.0
    # Hypercorn's default accept queue (100) overflowed when hundreds of clients connected at once: the
    # kernel dropped their SYNs and each such client waited a 1 s retransmit before being served.
    config.backlog = 2048
    try:  # a busy port is a one-line error, before the app starts (and not a page of tracebacks after)
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    except OSError as exc:
        hint = ("; another program uses it: stop that one or choose another port with --port (BRIDGE_PORT)"
                if exc.errno == errno.EADDRINUSE else "")
        log.error("cannot listen on %s port %d: %s%s", settings.host, settings.port, exc.strerror or exc, hint)
        raise SystemExit(1) from None
    problem = database_folder_problem(settings.db)
    if problem:  # like the port: one line before the app starts, not a traceback from sqlite
        log.error("cannot keep the database %s: %s", settings.db, problem)
        raise SystemExit(1)
    app = create_app(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(name: str) -> None:
            if not stop.is_set():
                log.info("%s: no new connections; open requests get up to %.0fs to finish",
                         name, settings.shutdown_timeout)
            stop.set()

        def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
            # Connections still open when the shutdown bound runs out are cancelled; asyncio would log
            # each one with a traceback although nothing went wrong.
            if not (stop.is_set() and isinstance(context.get("exception"), asyncio.CancelledError)):
                loop.default_exception_handler(context)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        loop.set_exception_handler(on_loop_error)
        log.info("serving on http://%s:%d (LM Arena at %s)", settings.host, settings.port, settings.arena_url)
        if warning := plain_http_warning(settings):
            log.warning(warning)
        await hypercorn.asyncio.serve(cast("ASGIFramework", app), config, shutdown_trigger=stop.wait)
        log.info("stopped")

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(args)
    configure_logging(settings.log_level)
    if args.command in (None, "serve"):
        serve(settings)
        return 0
    return run_cli(settings, args)


if __name__ == "__main__":
    # Serve with `python -m bridge`: CPython keeps the syntax tree of a script (`python bridge.py`) until the
    # script returns, that is for the server's life, about 20 MB for this file; a module is loaded from
    # cached bytecode, or compiled with its tree dropped at once. Both run this same line.
    sys.exit(main())
