"""Browser sidecar for the LM Arena bridge.

One process, one Chromium (Playwright, async API), one page open on ARENA_URL. The bridge starts it
lazily as a child process and talks to it over HTTP/1.1 on a Unix socket (mode 0600). It does the
few things that need a real browser on the site's origin:

    GET  /status      process and browser state; never launches the browser
    POST /token       mint a reCAPTCHA v3 Enterprise token with the site's own script
    POST /clearance   pass a Cloudflare interstitial; return the host's cookies + the exact User-Agent
    POST /signup      create an anonymous LM Arena account (Turnstile + reCAPTCHA sign_up) in a fresh context
    POST /fetch       run one request with the page's own fetch(); relay the response as NDJSON lines
    POST /shutdown    close the browser and exit 0

Errors are ``{"error": "<message>"}`` with status 502 (browser/page failure), 504 (timeout) or 400
(bad request). A /fetch answer is ``application/x-ndjson``, one JSON object a line, written as soon as
the page reads it: ``{"status", "headers"}``, then ``{"chunk": "<text>"}``…, then
``{"done": true, "cookies": {…the host's cookies after the call…}}`` or ``{"error": "…"}``. Closing the
connection early aborts the page's fetch (AbortController).

Usage::

    python sidecar.py --socket PATH --arena-url URL [--browser PATH] [--headful] [--log-level info]
                      [--recaptcha-url URL] [--turnstile-url URL]

Environment fallbacks: BRIDGE_SIDECAR_SOCKET, ARENA_URL, BRIDGE_BROWSER, BRIDGE_HEADFUL=1,
ARENA_RECAPTCHA_URL, ARENA_TURNSTILE_URL, BRIDGE_LOG_LEVEL.

Browser binary: --browser / BRIDGE_BROWSER, else Playwright's own Chromium when installed, else the
first of chromium, chromium-browser, google-chrome on PATH.

Headful mode (--headful or BRIDGE_HEADFUL=1): a visible browser scores better with reCAPTCHA and
Cloudflare. When DISPLAY is unset and an ``Xvfb`` binary is on PATH, the sidecar starts Xvfb on the
first free display number, uses it, and stops it on exit.

The process exits by itself when its parent dies (it polls os.getppid()), so a crashed bridge never
leaves an orphan browser. Secrets (tokens, cookies) are never logged: only their lengths.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("sidecar")

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

# Without these Chromium phones home (updates, sync, QUIC probes) and floods a closed network with
# refused connections; --no-sandbox because containers usually run as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-dev-shm-usage",
    "--disable-blink-features=AutomationControlled",
    "--metrics-recording-only",
    "--password-store=basic",
    "--disable-breakpad",
    "--disable-crash-reporter",
]

# Only needed if a browser still reports webdriver despite the Blink flag above.
WEBDRIVER_INIT_SCRIPT = """
if (navigator.webdriver) {
  Object.defineProperty(Navigator.prototype, 'webdriver', {get: () => false, configurable: true});
}
"""

PAGE_MAX_AGE = 20 * 60  # reload the page after this long: reCAPTCHA clients go stale
OP_TIMEOUT = 30.0  # default bound for one browser operation
LAUNCH_TIMEOUT = 45.0
CLEARANCE_TIMEOUT = 30.0
REAL_SITE_HOSTS = ("arena.ai", "lmarena.ai")
CLOUDFLARE_COOKIES = ("cf_clearance", "__cf_bm", "_cfuvid")

# Headers a page's fetch() may not set (the browser owns them); dropped instead of failing.
FORBIDDEN_HEADERS = {
    "accept-charset", "accept-encoding", "connection", "content-length", "cookie", "cookie2", "date",
    "dnt", "expect", "host", "keep-alive", "origin", "referer", "te", "trailer", "transfer-encoding",
    "upgrade", "user-agent", "via",
}


class Settings:
    def __init__(self, args: argparse.Namespace) -> None:
        self.socket: str = args.socket or os.environ.get("BRIDGE_SIDECAR_SOCKET") or ""
        self.arena_url: str = (args.arena_url or os.environ.get("ARENA_URL") or "https://arena.ai").rstrip("/")
        self.browser: str | None = args.browser or os.environ.get("BRIDGE_BROWSER") or None
        self.headful: bool = args.headful or os.environ.get("BRIDGE_HEADFUL", "") in ("1", "true", "yes")
        self.recaptcha_url: str | None = args.recaptcha_url or os.environ.get("ARENA_RECAPTCHA_URL") or None
        self.turnstile_url: str | None = args.turnstile_url or os.environ.get("ARENA_TURNSTILE_URL") or None
        parts = urlsplit(self.arena_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.hostname or ""

    @property
    def is_real_site(self) -> bool:
        return any(self.host == h or self.host.endswith("." + h) for h in REAL_SITE_HOSTS)


class OpError(Exception):
    """A browser or page failure; answered as 502."""


class BadRequest(Exception):
    """A malformed request to the sidecar; answered as 400."""


def need(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key!r} is required")
    return value


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def rss_mb(root_pid: int) -> float:
    """Memory of a process and all its descendants (Linux /proc), in MiB.

    Uses PSS (proportional set size) where readable, because Chromium's processes share most of
    their pages and summing plain RSS would count them several times; falls back to RSS."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total_kb, stack, seen = 0, [root_pid], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, []))
        total_kb += _process_kb(pid)
    return round(total_kb / 1024, 1)


def _process_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    return 0


def find_browser(explicit: str | None, playwright_path: str | None) -> str:
    if explicit:
        found = shutil.which(explicit) or (explicit if os.path.exists(explicit) else None)
        if not found:
            raise OpError(f"browser not found: {explicit}")
        return found
    if playwright_path and os.path.exists(playwright_path):
        return playwright_path
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    raise OpError("no Chromium found: set BRIDGE_BROWSER to a Chromium/Chrome binary")


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the sidecar dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_xvfb() -> subprocess.Popen | None:
    """Start Xvfb on a free display when headful mode has no DISPLAY; None if not possible."""
    if os.environ.get("DISPLAY") or not shutil.which("Xvfb"):
        return None
    for n in range(99, 200):
        if os.path.exists(f"/tmp/.X{n}-lock") or os.path.exists(f"/tmp/.X11-unix/X{n}"):
            continue
        proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "1366x768x24", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        for _ in range(50):
            if os.path.exists(f"/tmp/.X11-unix/X{n}"):
                os.environ["DISPLAY"] = f":{n}"
                log.info("started Xvfb on :%d", n)
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.kill()
    log.warning("could not start Xvfb; headful launch may fail")
    return None


# ---------------------------------------------------------------------------------------------
# In-page scripts
# ---------------------------------------------------------------------------------------------

# Wait for the site's grecaptcha, prefer the Enterprise API, mint one token.
MINT_JS = """
async ({sitekey, action, timeoutMs}) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const deadline = Date.now() + timeoutMs;
  const api = () => {
    const g = window.grecaptcha;
    if (!g) return null;
    if (g.enterprise && typeof g.enterprise.ready === 'function' && typeof g.enterprise.execute === 'function')
      return g.enterprise;
    if (!g.enterprise && typeof g.ready === 'function' && typeof g.execute === 'function') return g;
    return null;
  };
  while (!api()) {
    if (Date.now() > deadline) throw new Error('grecaptcha did not load');
    await sleep(50);
  }
  const g = api();
  await new Promise(resolve => g.ready(resolve));
  const token = await g.execute(sitekey, {action});
  if (typeof token !== 'string' || !token) throw new Error('grecaptcha returned no token');
  return token;
}
"""

# v2 (checkbox/invisible) widget: render it in a hidden container and wait for its callback.
MINT_V2_JS = """
async ({sitekey, timeoutMs}) => {
  const g = window.grecaptcha && (window.grecaptcha.enterprise || window.grecaptcha);
  if (!g || typeof g.render !== 'function') throw new Error('grecaptcha v2 API missing');
  let el = document.getElementById('recaptcha-v2-container');
  if (!el) { el = document.createElement('div'); el.id = 'recaptcha-v2-container'; document.body.appendChild(el); }
  el.innerHTML = '';
  return await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('v2 widget timed out')), timeoutMs);
    const done = f => v => { clearTimeout(timer); f(v); };
    const id = g.render(el, {sitekey, size: 'invisible', callback: done(resolve),
                             'error-callback': done(() => reject(new Error('v2 widget error')))});
    if (typeof g.execute === 'function') { try { g.execute(id); } catch (e) {} }
  });
}
"""

OTHER_SITEKEY_JS = """
(key) => {
  const keyed = [...document.scripts].filter(s => /[?&]render=6L/.test(s.src));
  return keyed.length > 0 && !keyed.some(s => s.src.includes('render=' + key));
}
"""

INJECT_SCRIPT_JS = """
(src) => new Promise((resolve, reject) => {
  const s = document.createElement('script');
  s.src = src; s.async = true;
  s.onload = () => resolve(true);
  s.onerror = () => reject(new Error('could not load ' + src.split('?')[0]));
  document.head.appendChild(s);
})
"""

# Origin of a helper script the page already loads (e.g. recaptcha/enterprise.js), or null.
SCRIPT_ORIGIN_JS = """
(needle) => {
  for (const s of document.querySelectorAll('script[src]')) {
    if (s.src.includes(needle)) return new URL(s.src).origin;
  }
  return null;
}
"""

TURNSTILE_JS = """
async ({sitekey, timeoutMs}) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const deadline = Date.now() + timeoutMs;
  while (!(window.turnstile && typeof window.turnstile.render === 'function')) {
    if (Date.now() > deadline) throw new Error('turnstile did not load');
    await sleep(50);
  }
  const el = document.createElement('div');
  el.id = 'sidecar-turnstile';
  document.body.appendChild(el);
  return await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('turnstile timed out')), Math.max(0, deadline - Date.now()));
    window.turnstile.render(el, {
      sitekey,
      callback: t => { clearTimeout(timer); resolve(t); },
      'error-callback': e => { clearTimeout(timer); reject(new Error('turnstile error ' + e)); },
    });
  });
}
"""

SIGNUP_JS = """
async (payload) => {
  const r = await fetch('/nextjs-api/sign-up', {
    method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(payload),
    credentials: 'include'});
  return {status: r.status, text: await r.text()};
}
"""

# Runs one request with the page's fetch and pushes status, chunks and the end through the
# exposed binding as they come; the AbortController lets the sidecar cancel it.
FETCH_JS = """
async ({id, url, method, headers, body}) => {
  const push = window.__sidecarPush;
  const ctl = new AbortController();
  (window.__sidecarAborts = window.__sidecarAborts || {})[id] = ctl;
  try {
    const init = {method, headers, credentials: 'include', signal: ctl.signal};
    if (body !== null && method !== 'GET' && method !== 'HEAD') init.body = body;
    const r = await fetch(url, init);
    const h = {};
    r.headers.forEach((v, k) => { h[k] = v; });
    await push(id, {status: r.status, headers: h});
    if (r.body) {
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        const text = dec.decode(value, {stream: true});
        if (text) await push(id, {chunk: text});
      }
      const tail = dec.decode();
      if (tail) await push(id, {chunk: tail});
    }
    await push(id, {done: true});
  } catch (e) {
    await push(id, {error: ctl.signal.aborted ? 'aborted' : String(e && e.message || e)});
  } finally {
    delete window.__sidecarAborts[id];
  }
}
"""

ABORT_JS = "(id) => { const c = (window.__sidecarAborts || {})[id]; if (c) { c.abort(); return true; } return false; }"


# ---------------------------------------------------------------------------------------------
# Browser: one Chromium, one page on ARENA_URL, launched lazily
# ---------------------------------------------------------------------------------------------


class Browser:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._pw: Any = None
        self._browser: Any = None
        self._context: Any = None
        self._page: Any = None
        self._page_loaded_at = 0.0
        self._page_broken = False
        self._lock = asyncio.Lock()  # launch and (re)load happen one at a time
        self._queues: dict[str, asyncio.Queue] = {}  # /fetch request id -> pushed items
        self._inflight = 0  # /fetch streams using the page; no age-reload under them
        # The page's fetch reads the context's cookie jar when it sends: one account's session in the jar
        # at a time, from setting it until that request is on its way.
        self._session_lock = asyncio.Lock()
        self._xvfb: subprocess.Popen | None = None
        self.user_agent: str | None = None
        self.webdriver: bool | None = None  # navigator.webdriver as the site sees it (must be false)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._browser is not None and self._browser.is_connected()

    @property
    def page_url(self) -> str | None:
        return self._page.url if self._page is not None and not self._page.is_closed() else None

    async def _launch(self) -> None:
        from playwright.async_api import async_playwright

        if self.s.headful:
            self._xvfb = self._xvfb or await asyncio.to_thread(start_xvfb)
            if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
                raise OpError("headful mode needs a display: set DISPLAY, or install Xvfb")
        self._pw = self._pw or await async_playwright().start()
        path = find_browser(self.s.browser, self._pw.chromium.executable_path)
        started = time.monotonic()
        self._browser = await self._pw.chromium.launch(
            executable_path=path, headless=not self.s.headful, args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT * 1000)
        try:
            # The real UA minus "Headless": sites (and Cloudflare) reject HeadlessChrome.
            probe = await self._browser.new_page()
            self.user_agent = (await probe.evaluate("navigator.userAgent")).replace("HeadlessChrome", "Chrome")
            await probe.close()
            self._context = await self.new_context()
        except BaseException:
            await self.close()  # half a launch would look "running" to the next call
            raise
        log.info("browser %s launched in %.1fs (%s)", self._browser.version, time.monotonic() - started, path)

    async def new_context(self) -> Any:
        ctx = await self._browser.new_context(user_agent=self.user_agent, locale="en-US",
                                              viewport={"width": 1366, "height": 768})
        await ctx.add_init_script(WEBDRIVER_INIT_SCRIPT)
        return ctx

    async def _open_page(self) -> None:
        if self._page is not None and not self._page.is_closed():
            with contextlib.suppress(Exception):
                await self._page.close()
        page = await self._context.new_page()
        page.on("crash", lambda _p: self._mark_broken("page crashed"))
        page.on("pageerror", lambda err: log.debug("page error: %s", str(err)[:200]))
        await page.expose_binding("__sidecarPush", self._on_push)
        self._page = page
        await self._goto(page)
        self.webdriver = await page.evaluate("() => navigator.webdriver === true")

    async def _goto(self, page: Any) -> Any:
        response = await page.goto(self.s.arena_url, wait_until="load", timeout=OP_TIMEOUT * 1000)
        self._page_loaded_at = time.monotonic()
        self._page_broken = False
        return response

    def _mark_broken(self, why: str) -> None:
        log.warning("%s; the page will be reopened", why)
        self._page_broken = True

    async def page(self, *, fresh: bool = False) -> Any:
        """The arena page, launching the browser and (re)loading the page when needed."""
        async with self._lock:
            if not self.running:
                await self._launch()
                await self._open_page()
            elif self._page is None or self._page.is_closed() or self._page_broken or fresh:
                # A fresh page also ends /fetch streams still running in the old one: only asked for
                # after the page failed (a mint error), when they are unlikely to be healthy anyway.
                await self._open_page()
            elif time.monotonic() - self._page_loaded_at > PAGE_MAX_AGE and self._inflight == 0:
                log.info("page older than %ds; reloading", PAGE_MAX_AGE)
                await self._goto(self._page)
            return self._page

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._browser is not None:
                await self._browser.close()
        with contextlib.suppress(Exception):
            if self._pw is not None:
                await self._pw.stop()
        self._browser = self._pw = self._page = self._context = None
        if self._xvfb is not None:
            self._xvfb.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._xvfb.wait, 3)
            self._xvfb = None

    # -- helper scripts (reCAPTCHA, Turnstile) ------------------------------------------------

    async def _helper_base(self, page: Any, override: str | None, needle: str, real_host: str) -> str:
        """Where to load a helper script from: the override, else the host the page already uses,
        else the real third-party host for arena.ai, else the emulator's own origin."""
        if override:
            return override.rstrip("/")
        found = await page.evaluate(SCRIPT_ORIGIN_JS, needle)
        if found:
            return found
        return real_host if self.s.is_real_site else self.s.origin

    async def ensure_grecaptcha(self, page: Any, sitekey: str) -> None:
        if await page.evaluate("() => !!window.grecaptcha"):
            return
        # The site's own tag may still be loading: give it a moment before injecting ours.
        with contextlib.suppress(Exception):
            await page.wait_for_function("() => !!window.grecaptcha", timeout=1500)
            return
        base = await self._helper_base(page, self.s.recaptcha_url, "/recaptcha/", "https://www.google.com")
        log.info("page has no grecaptcha; injecting %s/recaptcha/enterprise.js", base)
        await page.evaluate(INJECT_SCRIPT_JS, f"{base}/recaptcha/enterprise.js?render={sitekey}")

    async def mint(self, page: Any, sitekey: str, action: str, v2: bool = False,
                   timeout: float = OP_TIMEOUT) -> str:
        await self.ensure_grecaptcha(page, sitekey)
        if v2:
            return await page.evaluate(MINT_V2_JS, {"sitekey": sitekey, "timeoutMs": int(timeout * 1000)})
        return await page.evaluate(MINT_JS, {"sitekey": sitekey, "action": action, "timeoutMs": int(timeout * 1000)})

    async def token(self, sitekey: str, action: str, v2: bool = False) -> str:
        page = await self.page()
        if await self.is_interstitial(page):  # no grecaptcha behind a Cloudflare challenge
            await self.clearance()
        if not v2 and await page.evaluate(OTHER_SITEKEY_JS, sitekey):
            # The site rotated its key since this page loaded: only a fresh page loads the new script.
            log.info("page was loaded with another reCAPTCHA sitekey; reloading it")
            page = await self.page(fresh=True)
        try:
            return await self.mint(page, sitekey, action, v2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a stale or broken page: reload once and retry
            log.warning("token mint failed (%s); reloading the page and retrying", str(exc)[:200])
            page = await self.page(fresh=True)
            return await self.mint(page, sitekey, action, v2)

    # -- cookies ----------------------------------------------------------------------------------

    async def host_cookies(self, context: Any) -> dict[str, str]:
        return {c["name"]: c["value"] for c in await context.cookies(self.s.arena_url)}

    async def set_cookies(self, cookies: dict[str, str]) -> None:
        if any(name.startswith("arena-auth-prod-v1") for name in cookies):
            # Another account's session (whole or .N chunks) must not linger beside this one.
            await self._context.clear_cookies(name=re.compile(r"^arena-auth-prod-v1"))
        if cookies:
            await self._context.add_cookies(
                [{"name": k, "value": str(v), "url": self.s.origin + "/"} for k, v in cookies.items()])

    # -- Cloudflare clearance -----------------------------------------------------------------

    @staticmethod
    async def is_interstitial(page: Any) -> bool:
        with contextlib.suppress(Exception):
            return await page.evaluate(
                "() => document.title.includes('Just a moment...') || "
                "(document.body ? document.body.innerText : '').includes('Enable JavaScript and cookies to continue')")
        return True  # mid-navigation: treat as still challenged

    async def clearance(self, timeout: float = CLEARANCE_TIMEOUT) -> tuple[dict[str, str], str]:
        page = await self.page()
        async with self._lock:
            # Reloading the page would end the /fetch streams running in it: pass the challenge in a page of
            # its own then (same context, so the clearance cookie is shared).
            target = await self._context.new_page() if self._inflight else page
            try:
                if target is page:
                    await self._goto(page)
                else:
                    await target.goto(self.s.arena_url, wait_until="load", timeout=OP_TIMEOUT * 1000)
                await self.pass_interstitial(target, self._context, timeout)
                ua = await target.evaluate("navigator.userAgent")
                cookies = await self.host_cookies(self._context)
            finally:
                if target is not page:
                    with contextlib.suppress(Exception):
                        await target.close()
        log.info("clearance: %d cookies (cf_clearance %s)", len(cookies),
                 f"{len(cookies['cf_clearance'])} chars" if "cf_clearance" in cookies else "absent")
        return cookies, ua

    async def pass_interstitial(self, page: Any, context: Any, timeout: float) -> None:
        """Wait (bounded) until a Cloudflare interstitial on page clears; a no-op when there is none."""
        deadline = time.monotonic() + timeout
        challenged = await self.is_interstitial(page)
        if challenged:
            log.info("Cloudflare interstitial on %s; waiting up to %.0fs", self.s.host, timeout)
        while challenged:
            if time.monotonic() > deadline:
                raise asyncio.TimeoutError("the Cloudflare challenge did not clear")
            await self._click_turnstile(page)
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):
                await page.wait_for_load_state("load", timeout=5000)
            challenged = await self.is_interstitial(page)
            if challenged and "cf_clearance" in await self.host_cookies(context):
                # The cookie is set but the page script has not reloaded yet: do it ourselves.
                await asyncio.sleep(1.0)
                if await self.is_interstitial(page):
                    await page.goto(self.s.arena_url, wait_until="load", timeout=OP_TIMEOUT * 1000)
                    challenged = await self.is_interstitial(page)

    @staticmethod
    async def _click_turnstile(page: Any) -> None:
        """Click the Turnstile checkbox if the challenge shows one (interactive mode)."""
        for frame in page.frames:
            if "challenges.cloudflare.com" not in frame.url and "turnstile" not in frame.url:
                continue
            for selector in ("input[type=checkbox]", "label", "body"):
                with contextlib.suppress(Exception):
                    el = await frame.query_selector(selector)
                    if el is not None and await el.is_visible():
                        await el.click(timeout=1000)
                        return

    # -- anonymous sign-up --------------------------------------------------------------------

    async def signup(self, turnstile_sitekey: str, recaptcha_sitekey: str | None,
                     recaptcha_action: str, timeout: float = OP_TIMEOUT) -> dict:
        await self.page()  # make sure the browser runs
        ctx = await self.new_context()  # a fresh visitor: no session or provisional id of the main page
        try:
            # ...but the same browser, UA and IP, so the main page's Cloudflare clearance is valid here too.
            cf = [c for c in await self._context.cookies(self.s.arena_url) if c["name"] in CLOUDFLARE_COOKIES]
            if cf:
                await ctx.add_cookies(cf)
            page = await ctx.new_page()
            await page.goto(self.s.arena_url, wait_until="load", timeout=timeout * 1000)
            await self.pass_interstitial(page, ctx, CLEARANCE_TIMEOUT)
            provisional = (await self.host_cookies(ctx)).get("provisional_user_id")
            if not provisional:
                raise OpError("the arena page set no provisional_user_id cookie")
            if not await page.evaluate("() => !!window.turnstile"):
                base = await self._helper_base(page, self.s.turnstile_url, "/turnstile/",
                                               "https://challenges.cloudflare.com")
                await page.evaluate(INJECT_SCRIPT_JS, f"{base}/turnstile/v0/api.js?render=explicit")
            turnstile_token = await page.evaluate(
                TURNSTILE_JS, {"sitekey": turnstile_sitekey, "timeoutMs": int(timeout * 1000)})
            payload: dict[str, Any] = {"turnstileToken": turnstile_token, "provisionalUserId": provisional}
            if recaptcha_sitekey:
                payload["recaptchaToken"] = await self.mint(page, recaptcha_sitekey, recaptcha_action)
            result = await page.evaluate(SIGNUP_JS, payload)
            if result["status"] >= 400:
                raise OpError(f"sign-up answered {result['status']}: {result['text'][:200]}")
            try:
                body: Any = json.loads(result["text"]) if result["text"].strip() else None
            except ValueError:
                body = result["text"].strip()
            # The session may come as cookies (whole or chunked) or in the body, in several shapes: the
            # bridge reads it from both, so that one piece of code knows the session formats.
            cookies = await self.host_cookies(ctx)
            ua = await page.evaluate("navigator.userAgent")
            log.info("sign-up answered %s with %d cookies", result["status"], len(cookies))
            return {"cookies": cookies, "body": body, "user_agent": ua}
        finally:
            with contextlib.suppress(Exception):
                await ctx.close()

    # -- in-page fetch ------------------------------------------------------------------------

    async def _on_push(self, _source: Any, request_id: str, item: dict) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    async def fetch(self, spec: dict) -> AsyncIterator[dict]:
        """Run spec's request with the page's fetch(); yield pushed items until done/error."""
        await self.page()  # the browser and its context must exist before cookies can be set
        await self._session_lock.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._session_lock.release()

        try:
            async for item in self._fetch_holding_session(spec, release):
                yield item
        finally:
            release()

    async def _fetch_holding_session(self, spec: dict, release: Callable[[], None]) -> AsyncIterator[dict]:
        """fetch(), entered with the session lock held; `release` it once the response has started."""
        await self.set_cookies(spec.get("cookies") or {})
        body = spec.get("body")
        if spec.get("sitekey") and isinstance(body, str):
            token = await self.token(spec["sitekey"], spec.get("action") or "chat_submit")
            try:
                parsed = json.loads(body)
            except ValueError as exc:
                raise OpError("a token was asked for but the body is not JSON") from exc
            parsed["recaptchaV3Token"] = token
            body = json.dumps(parsed, separators=(",", ":"))
        headers = {k: v for k, v in (spec.get("headers") or {}).items() if k.lower() not in FORBIDDEN_HEADERS
                   and not k.lower().startswith(("sec-", "proxy-"))}
        page = await self.page()  # after the mint, which may have replaced a broken page
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._inflight += 1
        args = {"id": request_id, "url": spec.get("url") or self.s.arena_url,
                "method": (spec.get("method") or "GET").upper(), "headers": headers, "body": body}
        runner = asyncio.ensure_future(page.evaluate(FETCH_JS, args))
        # If the page itself fails (navigation, crash), the in-page catch never runs: report that.
        runner.add_done_callback(
            lambda t: queue.put_nowait({"error": f"page failure: {t.exception()}"[:300]})
            if not t.cancelled() and t.exception() is not None else None)
        finished = False
        try:
            while True:
                item = await queue.get()
                release()
                if "done" in item or "error" in item:
                    finished = True
                    if "done" in item:  # the site may have refreshed cookies (Set-Cookie is not visible to JS)
                        with contextlib.suppress(Exception):
                            item["cookies"] = await self.host_cookies(self._context)
                    yield item
                    return
                yield item
        finally:
            self._inflight -= 1
            self._queues.pop(request_id, None)
            if not finished:
                # The /fetch client went away (or we were cancelled): abort the page's fetch. A new
                # task, because awaiting in a cancelled generator would be cancelled again.
                log.info("fetch %s abandoned by its client; aborting it in the page", request_id[:8])
                asyncio.ensure_future(self._abort(page, request_id))

    @staticmethod
    async def _abort(page: Any, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await page.evaluate(ABORT_JS, request_id)


# ---------------------------------------------------------------------------------------------
# HTTP surface (Starlette on a Unix socket)
# ---------------------------------------------------------------------------------------------


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def guarded(coro: Any, timeout: float, what: str) -> Any:
    """Bound a browser operation; map failures to OpError / TimeoutError with a clear message."""
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError as exc:
        raise asyncio.TimeoutError(f"{what} timed out after {timeout:.0f}s") from exc


def build_app(browser: Browser, shutdown: asyncio.Event) -> Starlette:
    def handler(fn: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            try:
                payload = json.loads(raw) if raw.strip() else {}
            except ValueError:
                payload = None
            if request.method == "POST" and not isinstance(payload, dict):
                return error("the request body must be a JSON object", 400)
            try:
                return await fn(payload)
            except BadRequest as exc:
                return error(str(exc), 400)
            except Exception as exc:  # Playwright errors, OpError, page failures, timeouts
                if isinstance(exc, asyncio.TimeoutError) or type(exc).__name__ == "TimeoutError":
                    # ours (asyncio) or Playwright's own (a subclass of its Error, not of asyncio's)
                    message = str(exc).splitlines()[0][:300] if str(exc) else "timed out"
                    log.warning("%s: %s", request.url.path, message)
                    return error(message, 504)
                message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                log.warning("%s failed: %s", request.url.path, message)
                return error(message, 502)
        return endpoint

    async def status(_: dict) -> Response:
        return JSONResponse({
            "ok": True,
            "browser": "running" if browser.running else "not started",
            "pid": os.getpid(),
            "user_agent": browser.user_agent if browser.running else None,
            "page_url": browser.page_url if browser.running else None,
            "webdriver": browser.webdriver if browser.running else None,
            "rss_mb": rss_mb(os.getpid()),
        })

    async def token(body: dict) -> Response:
        value = await guarded(browser.token(need(body, "sitekey"), body.get("action") or "chat_submit",
                                            bool(body.get("v2"))), LAUNCH_TIMEOUT + OP_TIMEOUT, "token mint")
        log.info("minted a %s token (%d chars)", body.get("action") or "chat_submit", len(value))
        return JSONResponse({"token": value})

    async def clearance(body: dict) -> Response:
        wait = float(body.get("timeout") or CLEARANCE_TIMEOUT)
        cookies, ua = await guarded(browser.clearance(wait), LAUNCH_TIMEOUT + wait + 10, "clearance")
        return JSONResponse({"cookies": cookies, "user_agent": ua})

    async def signup(body: dict) -> Response:
        result = await guarded(
            browser.signup(body.get("turnstile_sitekey") or "0x4AAAAAAA65vWDmG-O_lPtT",
                           body.get("recaptcha_sitekey"), body.get("recaptcha_action") or "sign_up"),
            LAUNCH_TIMEOUT + 2 * OP_TIMEOUT, "sign-up")
        return JSONResponse(result)

    async def fetch(body: dict) -> Response:
        need(body, "url")
        if not isinstance(body.get("cookies") or {}, dict) or not isinstance(body.get("headers") or {}, dict):
            raise BadRequest("'cookies' and 'headers' must be objects")
        stream = browser.fetch(body)
        # Wait (bounded) for the status line so that a failure before it is a plain HTTP error.
        first = await guarded(stream.__anext__(), LAUNCH_TIMEOUT + OP_TIMEOUT, "in-page fetch")
        if "error" in first:
            await stream.aclose()
            return error(first["error"], 502)

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield (json.dumps(first) + "\n").encode()
                async for item in stream:
                    yield (json.dumps(item) + "\n").encode()
            finally:
                await stream.aclose()  # runs the abort when the client disconnected

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={"cache-control": "no-cache"})

    async def stop(_: dict) -> Response:
        log.info("shutdown requested")
        asyncio.get_running_loop().call_later(0.1, shutdown.set)
        return JSONResponse({"ok": True})

    routes = [
        Route("/status", handler(status), methods=["GET"]),
        Route("/token", handler(token), methods=["POST"]),
        Route("/clearance", handler(clearance), methods=["POST"]),
        Route("/signup", handler(signup), methods=["POST"]),
        Route("/fetch", handler(fetch), methods=["POST"]),
        Route("/shutdown", handler(stop), methods=["POST"]),
    ]
    return Starlette(routes=routes)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


async def watch_parent(shutdown: asyncio.Event) -> None:
    """Exit when the parent dies (we get re-parented), so no browser is left orphaned."""
    parent = os.getppid()
    while not shutdown.is_set():
        if os.getppid() != parent:
            log.info("parent process %d is gone; exiting", parent)
            shutdown.set()
            return
        await asyncio.sleep(1.0)


async def main_async(settings: Settings) -> None:
    shutdown = asyncio.Event()
    browser = Browser(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)

    with contextlib.suppress(FileNotFoundError):
        os.unlink(settings.socket)  # a stale socket from a previous run
    config = HypercornConfig()
    config.bind = [f"unix:{settings.socket}"]
    config.umask = 0o177  # the socket is created 0600: only our user may talk to the browser
    config.accesslog = None
    config.errorlog = logging.getLogger("sidecar.server")
    config.graceful_timeout = 2.0

    watcher = asyncio.ensure_future(watch_parent(shutdown))
    try:
        await serve(build_app(browser, shutdown), config, shutdown_trigger=shutdown.wait)
    finally:
        watcher.cancel()
        await browser.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(settings.socket)
        log.info("sidecar stopped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Playwright browser sidecar for the LM Arena bridge")
    p.add_argument("--socket", help="Unix socket path (env BRIDGE_SIDECAR_SOCKET)")
    p.add_argument("--arena-url", help="LM Arena base URL (env ARENA_URL, default https://arena.ai)")
    p.add_argument("--browser", help="Chromium/Chrome binary (env BRIDGE_BROWSER)")
    p.add_argument("--headful", action="store_true", help="visible browser, under Xvfb if no DISPLAY (env BRIDGE_HEADFUL=1)")
    p.add_argument("--recaptcha-url", help="host serving recaptcha/enterprise.js (env ARENA_RECAPTCHA_URL)")
    p.add_argument("--turnstile-url", help="host serving turnstile/v0/api.js (env ARENA_TURNSTILE_URL)")
    p.add_argument("--log-level", default=os.environ.get("BRIDGE_LOG_LEVEL", "info"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s sidecar %(levelname)s %(message)s")
    settings = Settings(args)
    if not settings.socket:
        print("sidecar: --socket (or BRIDGE_SIDECAR_SOCKET) is required", file=sys.stderr)
        return 2
    asyncio.run(main_async(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
