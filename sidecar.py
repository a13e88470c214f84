"""Browser sidecar for the LM Arena bridge: one Chromium (Playwright) with one page on the arena URL, started
lazily by the bridge as a child process, serving HTTP/1.1 on a Unix socket (mode 0600):

    GET  /status      process and browser state; never launches the browser
    POST /token       {"sitekey", "action"}: a reCAPTCHA v3 token minted with the site's own script
    POST /clearance   pass a Cloudflare interstitial; the host's cookies + the browser's exact User-Agent
    POST /signup      {"turnstile_sitekey"?, "recaptcha_sitekey", "recaptcha_action"}: the page agent's sign-up
                      in a fresh context, as the site answered it; {"status", "text", "bodies", "cookies", "user_agent"}
    POST /sitekeys    the reCAPTCHA sitekeys a freshly loaded page uses (its live ___grecaptcha_cfg)
    POST /fetch       {"url", "method", "headers", "body", "cookies", "sitekey", "action"}: one request run
                      by the page agent's chat(), its events relayed as NDJSON lines as the page emits them

Errors are ``{"error": "<message>"}`` with status 400 (bad request), 502 (browser or page failure) or 504
(timeout). /fetch's NDJSON lines are the page agent's chat() events, "done" with "cookies" (the host's jar after the
call), a failure before the page's answer began an "error" event too; closing the connection aborts the fetch.

In-page code is the bridge's page agent (``window.__arenaBridge``, the userscript's too) from --page-agent's
file; its events come back through a Playwright binding. SIGTERM closes the browser and exits 0; the kernel
sends it when the bridge dies (PR_SET_PDEATHSIG); the driver, Chromium and Xvfb end with us as their pipes
close. Secrets are never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urljoin

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM from the kernel when the bridge dies, even by SIGKILL (it watches the thread that started us)."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None or prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        print("sidecar: PR_SET_PDEATHSIG is not available: it may outlive a crashed bridge", file=sys.stderr)


if __name__ == "__main__":
    die_with_parent()  # before the imports below, which take up to a second: the bridge may die meanwhile

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeout
from playwright.async_api import async_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("sidecar")

# ---------------------------------------------------------------------------------------------
# Settings and the process: errors, the browser binary, a virtual display
# ---------------------------------------------------------------------------------------------

# --no-sandbox: the sandbox needs user namespaces or a setuid helper, which root (CI) and Docker's seccomp
# profile lack; the page only ever loads LM Arena and our socket is private to our user. No phoning home
# (updates, sync, QUIC probes: refused connections on a closed network, memory). navigator.webdriver must
# read false, as in a browser a person uses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-dev-shm-usage", "--metrics-recording-only", "--password-store=basic", "--disable-breakpad",
    "--disable-crash-reporter", "--disable-blink-features=AutomationControlled"]

PAGE_MAX_AGE = 20 * 60  # reload the page after this long: reCAPTCHA clients go stale
OP_TIMEOUT = 30.0  # default bound for one browser operation
LAUNCH_TIMEOUT = 45.0
CLEARANCE_TIMEOUT = 30.0
CLOUDFLARE_COOKIES = ("cf_clearance", "__cf_bm", "_cfuvid")
XVFB_SCREEN = "-screen 0 1920x1080x24"


@dataclasses.dataclass(frozen=True)
class Settings:
    socket: str
    arena_url: str  # LM Arena's origin
    page_agent: str  # the page agent's JavaScript source
    browser: str | None = None
    headful: bool = False


class OpError(Exception):
    """A failure answered with its status: 502 (the browser or the page), 400 (a malformed request)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else ""


def need(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise OpError(f"{key!r} is required", 400)
    return value


def find_browser(explicit: str | None, playwright_path: str | None) -> str:
    names = [explicit] if explicit else [playwright_path, "chromium", "chromium-browser", "google-chrome"]
    for name in filter(None, names):
        if found := shutil.which(name) or (name if os.path.exists(name) else None):
            return found
    raise OpError(f"browser not found: {explicit}" if explicit else
                  "no Chromium found: set BRIDGE_BROWSER to a Chromium/Chrome binary")


# xvfb-run runs this holder, which prints the display, then reads its stdin: a pipe only we hold. When we
# exit, however (SIGKILL too), the pipe closes, the holder ends and xvfb-run's clean-up stops Xvfb. (Run
# by the bridge around us, a signal that killed xvfb-run would skip that clean-up.)
XVFB_HOLDER = 'echo "$DISPLAY $XAUTHORITY"; exec cat >/dev/null'


async def start_xvfb() -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """An Xvfb display from ``xvfb-run -a`` and the environment a browser needs to use it."""
    proc = await asyncio.create_subprocess_exec(
        "xvfb-run", "-a", "-s", XVFB_SCREEN, "sh", "-c", XVFB_HOLDER,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), OP_TIMEOUT)).decode().split()
    if len(line) != 2:
        proc.stdin.close()
        raise OpError("xvfb-run did not start a display")
    log.info("virtual display %s started by xvfb-run", line[0])
    return proc, {"DISPLAY": line[0], "XAUTHORITY": line[1]}


# ---------------------------------------------------------------------------------------------
# Page jobs: requests run by the page agent, their events relayed through a page binding
# ---------------------------------------------------------------------------------------------

# The page agent's contract is documented in bridge.py (PAGE_AGENT_JS).
AGENT_JS = "([name, ...args]) => window.__arenaBridge[name](...args)"  # state, mint, abort, signup
CHAT_JS = "([id, req]) => window.__arenaBridge.chat(id, req, event => window.__arenaBridgeEmit(id, event))"
GRECAPTCHA_JS = "() => window.__arenaBridge.state().grecaptcha"
SITEKEYS_JS = "() => window.__arenaBridge.state().sitekeys.length > 0"
PASSED_JS = "() => !window.__arenaBridge.state().interstitial"
# requestWillBeSent names a request; its requestWillBeSentExtraInfo (the headers sent) says it left.
NETWORK_EVENTS = ("Network.requestWillBeSent", "Network.requestWillBeSentExtraInfo")


class PageJob:
    """One agent chat() in a page; its events arrive through the binding into a queue. `sent` is set once
    the request has left with its cookies, after which the jar may change: Chromium's
    requestWillBeSentExtraInfo (on `cdp`, a CDP session with Network enabled) carries the headers it sent,
    long before any response. If nothing matched, the first event does."""

    def __init__(self, page: Any, request: dict, registry: dict[str, PageJob], cdp: Any) -> None:
        self.id, self.page, self.registry = uuid.uuid4().hex, page, registry
        self.url, self.method = urljoin(page.url, request["url"]), (request.get("method") or "GET").upper()
        self.request_id: str | None = None
        self._left: set[str] = set()  # ids of requests that left; may be reported before they are named
        self.queue: asyncio.Queue[dict] = asyncio.Queue()
        self.sent = asyncio.Event()
        self.finished = False
        registry[self.id] = self
        self._cdp: Any = cdp  # None once the request has left
        for name in NETWORK_EVENTS:
            cdp.on(name, self._on_network)
        self.runner = asyncio.ensure_future(page.evaluate(CHAT_JS, [self.id, request]))
        self.runner.add_done_callback(self._ended)

    def _on_network(self, event: dict) -> None:
        request = event.get("request")  # only in requestWillBeSent; either event may come first
        if request is None:
            self._left.add(event["requestId"])
        elif self.request_id is None and (request["url"], request["method"]) == (self.url, self.method):
            self.request_id = event["requestId"]
        if self.request_id in self._left:
            self._mark_sent()

    def _mark_sent(self) -> None:
        self.sent.set()
        for name in NETWORK_EVENTS if self._cdp is not None else ():
            self._cdp.remove_listener(name, self._on_network)
        self._cdp = None

    def _ended(self, task: asyncio.Future) -> None:
        # The agent reports its own failures; this catches a page that died under it (crash, navigation).
        if not task.cancelled() and task.exception() is not None:
            self.push({"type": "error", "message": f"page failure: {task.exception()}"[:300]})

    def push(self, event: dict) -> None:
        self._mark_sent()
        self.queue.put_nowait(event)

    async def events(self) -> AsyncGenerator[dict, None]:
        """The job's events up to its last (done or error). Leaving early aborts the page's fetch."""
        try:
            while not self.finished:
                event = await self.queue.get()
                self.finished = event.get("type") in ("done", "error")
                yield event
        finally:
            self.close()

    def close(self) -> None:
        """Forget the job; one that has not finished is aborted in the page."""
        if self.registry.pop(self.id, None) is None:
            return
        self._mark_sent()
        if not self.finished:
            # A new task: awaiting in a generator being closed by cancellation would be cancelled too.
            log.info("page job %s abandoned by its client; aborting it in the page", self.id[:8])
            asyncio.ensure_future(self._abort())

    async def _abort(self) -> None:
        with contextlib.suppress(PlaywrightError):
            await self.page.evaluate(AGENT_JS, ["abort", self.id])


# ---------------------------------------------------------------------------------------------
# Browser: Chromium and its contexts (launched lazily); the arena page and the jobs run in it
# ---------------------------------------------------------------------------------------------


class Chromium:
    """One Chromium (headful on a display or under xvfb-run, else headless) and its contexts, each with the
    page agent and the binding that hands its events to `jobs`; the main one holds the arena page."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._pw: Any = None
        self.browser: Any = None
        self.context: Any = None
        self._xvfb: tuple[asyncio.subprocess.Process, dict[str, str]] | None = None  # kept across launches
        self.jobs: dict[str, PageJob] = {}
        self.user_agent: str | None = None
        self.headful = False
        self.launch_seconds: float | None = None   # how long the last launch took (the doctor reports it)

    @property
    def running(self) -> bool:
        return self.browser is not None and self.browser.is_connected()

    async def _display_env(self) -> dict[str, str] | None:
        """Headful: the display we have, else one from xvfb-run; None: run headless."""
        if not self.s.headful or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
            return {} if self.s.headful else None
        if self._xvfb is None or self._xvfb[0].returncode is not None:
            self._xvfb = await start_xvfb()
        return self._xvfb[1]

    async def launch(self) -> None:
        display = await self._display_env()
        self._pw = self._pw or await async_playwright().start()
        path = find_browser(self.s.browser, self._pw.chromium.executable_path)
        started = time.monotonic()
        self.browser = await self._pw.chromium.launch(
            executable_path=path, headless=display is None, args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT * 1000,
            env={**os.environ, **(display or {})})
        try:
            # The real UA minus "Headless": sites (and Cloudflare) reject HeadlessChrome.
            version = await (await self.browser.new_browser_cdp_session()).send("Browser.getVersion")
            self.user_agent = version["userAgent"].replace("HeadlessChrome", "Chrome")
            self.context = await self.new_context()
        except BaseException:
            await self.close()  # half a launch would look "running" to the next call
            raise
        self.headful, self.launch_seconds = display is not None, time.monotonic() - started
        log.info("browser %s launched in %.1fs (%s, %s)", self.browser.version, self.launch_seconds,
                 path, "headful" if self.headful else "headless")

    async def new_context(self) -> Any:
        ctx = await self.browser.new_context(user_agent=self.user_agent, locale="en-US",
                                             viewport={"width": 1366, "height": 768})
        await ctx.add_init_script(self.s.page_agent)
        await ctx.expose_binding("__arenaBridgeEmit", self._on_emit)
        return ctx

    async def _on_emit(self, _source: Any, job_id: str, event: dict) -> None:
        if (job := self.jobs.get(job_id)) is not None:
            job.push(event)

    async def cookies(self, context: Any = None) -> dict[str, str]:
        return {c["name"]: c["value"] for c in await (context or self.context).cookies(self.s.arena_url)}

    async def set_cookies(self, cookies: dict[str, str]) -> None:
        if any(name.startswith("arena-auth-prod-v1") for name in cookies):
            # Another account's session (whole or .N chunks) must not linger beside this one.
            await self.context.clear_cookies(name=re.compile(r"^arena-auth-prod-v1"))
        if cookies:
            await self.context.add_cookies(
                [{"name": k, "value": str(v), "url": self.s.arena_url + "/"} for k, v in cookies.items()])

    async def close(self) -> None:
        with contextlib.suppress(PlaywrightError):
            if self.browser is not None:
                await self.browser.close()
        with contextlib.suppress(PlaywrightError):
            if self._pw is not None:
                await self._pw.stop()
        self.browser = self._pw = self.context = None  # Xvfb ends with us (start_xvfb)


class ArenaPage:
    """The page the jobs run in, (re)loaded when needed; side pages for those that must not reload it."""

    def __init__(self, chromium: Chromium) -> None:
        self.chromium, self.s = chromium, chromium.s
        self._page: Any = None
        self._loaded_at = 0.0
        self._broken = False
        self._lock = asyncio.Lock()  # launch and (re)load happen one at a time
        # The page's fetch reads the cookie jar as its request leaves: one account's session in the jar at a
        # time, from setting it until its request is on its way (PageJob.sent, learnt on the CDP session).
        self._session_lock = asyncio.Lock()
        self._cdp: Any = None
        self.webdriver: bool | None = None  # navigator.webdriver as the site sees it (must be false)

    async def status(self) -> dict[str, Any]:
        """/status: the process and the browser; never launches it."""
        c, page, process = self.chromium, self._page, {"ok": True, "pid": os.getpid()}
        if not c.running:
            return {**process, "browser": "not started"}
        return {**process, "browser": "running", "user_agent": c.user_agent, "version": c.browser.version,
                "page_url": page.url if page and not page.is_closed() else None, "webdriver": self.webdriver,
                "headful": c.headful, "launch_seconds": c.launch_seconds}

    async def _open(self) -> None:
        if self._page is not None and not self._page.is_closed():
            with contextlib.suppress(PlaywrightError):
                await self._page.close()
        page = self._page = await self.chromium.context.new_page()
        page.on("crash", lambda _p: self._mark_broken("page crashed"))
        self._cdp = await self.chromium.context.new_cdp_session(page)
        await self._cdp.send("Network.enable")
        await self._goto(page)
        self.webdriver = await page.evaluate("() => navigator.webdriver === true")

    async def _goto(self, page: Any) -> None:
        await page.goto(self.s.arena_url, wait_until="load", timeout=OP_TIMEOUT * 1000)
        if page is self._page:
            self._loaded_at, self._broken = time.monotonic(), False

    def _mark_broken(self, why: str) -> None:
        log.warning("%s; the page will be reopened", why)
        self._broken = True

    def _busy(self) -> bool:
        return any(job.page is self._page for job in self.chromium.jobs.values())

    async def page(self, *, fresh: bool = False) -> Any:
        """The arena page, launching the browser and (re)loading the page when needed."""
        async with self._lock:
            if not self.chromium.running:
                await self.chromium.launch()
                await self._open()
            elif self._page is None or self._page.is_closed() or self._broken or fresh:
                # A fresh page also ends the jobs still running in the old one: only asked for after the
                # page failed (a mint error), when they are unlikely to be healthy anyway.
                await self._open()
            elif time.monotonic() - self._loaded_at > PAGE_MAX_AGE and not self._busy():
                log.info("page older than %ds; reloading", PAGE_MAX_AGE)
                await self._goto(self._page)
            return self._page

    @contextlib.asynccontextmanager
    async def _side_page(self, context: Any = None) -> AsyncIterator[Any]:
        """A page of its own on the arena URL past any interstitial, in `context` (default: the main one)."""
        context = context or self.chromium.context
        page = await context.new_page()
        try:
            await self._goto(page)
            await self.pass_interstitial(page)
            yield page
        finally:
            with contextlib.suppress(PlaywrightError):
                await page.close()

    # -- reCAPTCHA ----------------------------------------------------------------------------------

    async def recaptcha_ready(self, page: Any, sitekey: str) -> None:
        """Wait for the page's grecaptcha; a page that loads none gets the script from where the page agent
        says the page's comes from (its state's recaptchaOrigin)."""
        with contextlib.suppress(PlaywrightTimeout):  # the site's own tag may still be loading
            await page.wait_for_function(GRECAPTCHA_JS, timeout=1500)
            return
        base = (await page.evaluate(AGENT_JS, ["state"]))["recaptchaOrigin"]
        log.info("page has no recaptcha script; adding %s/recaptcha/enterprise.js", base)
        await page.add_script_tag(url=f"{base}/recaptcha/enterprise.js?render={sitekey}")
        await page.wait_for_function(GRECAPTCHA_JS, timeout=OP_TIMEOUT * 1000)

    async def mint(self, page: Any, sitekey: str, action: str) -> dict[str, str]:
        """{"token"}: /token's answer, and the page agent's chat() request's "recaptcha"."""
        await self.recaptcha_ready(page, sitekey)
        token = await page.evaluate(AGENT_JS, ["mint", action, sitekey, int(OP_TIMEOUT * 1000)])
        log.info("minted a %s token (%d chars)", action, len(token))
        return {"token": token}

    async def token(self, sitekey: str, action: str) -> dict[str, str]:
        page = await self.page()
        if await self.is_interstitial(page):  # no grecaptcha behind a Cloudflare challenge
            await self.clearance()
        known = (await page.evaluate(AGENT_JS, ["state"]))["sitekeys"]
        if known and sitekey not in known:
            # The site rotated its key since this page loaded: only a fresh page loads the new script.
            log.info("page was loaded with another reCAPTCHA sitekey; reloading it")
            page = await self.page(fresh=True)
        try:
            return await self.mint(page, sitekey, action)
        except PlaywrightError as exc:  # a stale or broken page: reload once and retry
            log.warning("token mint failed (%s); reloading the page and retrying", first_line(exc))
            return await self.mint(await self.page(fresh=True), sitekey, action)

    async def sitekeys(self) -> dict[str, list[str]]:
        """The sitekeys a newly loaded page runs with, from its live reCAPTCHA configuration (U8)."""
        await self.page()
        async with self._side_page() as page:
            with contextlib.suppress(PlaywrightTimeout):
                await page.wait_for_function(SITEKEYS_JS, timeout=5000)
            return {"sitekeys": (await page.evaluate(AGENT_JS, ["state"]))["sitekeys"]}

    # -- Cloudflare clearance -----------------------------------------------------------------

    @staticmethod
    async def is_interstitial(page: Any) -> bool:
        with contextlib.suppress(PlaywrightError):
            return (await page.evaluate(AGENT_JS, ["state"]))["interstitial"]
        return True  # mid-navigation: treat as still challenged

    async def clearance(self) -> dict[str, Any]:
        """The arena page reloaded past any challenge (or a page of its own while jobs run in it): the host's
        cookies and the User-Agent they are bound to (every context sends it)."""
        page = await self.page()
        async with self._lock:
            if self._busy():
                async with self._side_page():
                    pass
            else:
                await self._goto(page)
                await self.pass_interstitial(page)
            cookies = await self.chromium.cookies()
        log.info("clearance: %d cookies (cf_clearance %s)", len(cookies),
                 f"{len(cookies['cf_clearance'])} chars" if "cf_clearance" in cookies else "absent")
        return {"cookies": cookies, "user_agent": self.chromium.user_agent}

    async def pass_interstitial(self, page: Any) -> None:
        """Wait (bounded) until a Cloudflare interstitial on page clears; a no-op without one. The
        challenge reloads the page once passed (wait_for_function waits across that navigation)."""
        deadline = time.monotonic() + CLEARANCE_TIMEOUT
        while await self.is_interstitial(page):
            if time.monotonic() > deadline:
                raise TimeoutError("the Cloudflare challenge did not clear")
            log.info("Cloudflare interstitial on %s; waiting for it to clear", self.s.arena_url)
            await self._click_turnstile(page)
            with contextlib.suppress(PlaywrightError):
                await page.wait_for_function(PASSED_JS, timeout=2000)
                await page.wait_for_load_state("load", timeout=5000)
            if await self.is_interstitial(page) and "cf_clearance" in await self.chromium.cookies(page.context):
                await self._goto(page)  # the cookie is set but the challenge has not reloaded the page yet

    @staticmethod
    async def _click_turnstile(page: Any) -> None:
        """Click the Turnstile checkbox if the challenge shows one (interactive mode)."""
        for frame in [f for f in page.frames if "challenges.cloudflare.com" in f.url or "turnstile" in f.url]:
            for selector in ("input[type=checkbox]", "label", "body"):
                with contextlib.suppress(PlaywrightError):
                    el = await frame.query_selector(selector)
                    if el is not None and await el.is_visible():
                        await el.click(timeout=1000)
                        return

    # -- anonymous sign-up and in-page fetch --------------------------------------------------

    async def signup(self, turnstile_sitekey: str | None, recaptcha_sitekey: str | None, action: str) -> dict:
        """An account made by the page agent in a fresh visitor's context (no session or provisional id of
        the main page), with the main page's Cloudflare clearance (same browser, UA and IP)."""
        await self.page()
        ctx = await self.chromium.new_context()
        try:
            cf = [c for c in await self.chromium.context.cookies(self.s.arena_url) if c["name"] in CLOUDFLARE_COOKIES]
            await ctx.add_cookies(cf)
            async with self._side_page(ctx) as page:
                if recaptcha_sitekey:
                    await self.recaptcha_ready(page, recaptcha_sitekey)
                result = await page.evaluate(AGENT_JS, ["signup", {
                    "sitekey": recaptcha_sitekey, "action": action, "turnstileSitekey": turnstile_sitekey,
                    "timeoutMs": int(OP_TIMEOUT * 1000)}])
                cookies = await self.chromium.cookies(ctx)
        finally:
            with contextlib.suppress(PlaywrightError):
                await ctx.close()
        log.info("sign-up (%s body) answered %s with %d cookies", "+".join(result["bodies"]), result["status"],
                 len(cookies))
        return {**result, "cookies": cookies, "user_agent": self.chromium.user_agent}

    async def fetch(self, spec: dict) -> AsyncGenerator[dict, None]:
        """Run spec's request with the page agent's chat(); yield its events up to done or error."""
        request = {k: spec.get(k) for k in ("url", "method", "headers", "body")}
        if spec.get("sitekey") and isinstance(spec.get("body"), str):
            # Minted before taking the session lock: chats on other accounts need not wait for it.
            request["recaptcha"] = await self.token(spec["sitekey"], spec.get("action") or "chat_submit")
        page = await self.page()  # after the mint, which may have replaced a broken page
        async with self._session_lock:
            await self.chromium.set_cookies(spec.get("cookies") or {})
            job = PageJob(page, request, self.chromium.jobs, self._cdp)
            try:
                with contextlib.suppress(TimeoutError):  # then the first event back tells
                    await asyncio.wait_for(job.sent.wait(), OP_TIMEOUT)
            except BaseException:
                job.close()  # cancelled: the client left before the request did
                raise
        async for event in job.events():
            if event["type"] == "done":  # the site may have rotated cookies while answering (JS sees no Set-Cookie)
                event = {**event, "cookies": await self.chromium.cookies()}
            yield event


# ---------------------------------------------------------------------------------------------
# HTTP surface (Starlette on a Unix socket) and main
# ---------------------------------------------------------------------------------------------


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def unless_client_leaves(call: Awaitable[Any], receive: Any) -> Any:
    """`call`'s answer, unless the bridge hangs up first (its own client left): `call` is then cancelled at
    once, so a mint or a sign-up in the page ends with it, and nothing is answered."""
    async def hang_up() -> None:  # the request body was read whole before: only a disconnect comes now
        while (await receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(call), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if not gone.done():         # a watch that ended took the hang-up: nobody else would see it
        return work.result()
    work.cancel()
    await asyncio.wait({work})
    return Response(status_code=499)


def handler(fn: Callable[[dict], Awaitable[Any]], timeout: float | None) -> Any:
    """A JSON endpoint bounded by `timeout`: the body parsed, the answer (a Response, or JSON) sent,
    failures answered as 504, or with their status (OpError's) or 502."""
    async def endpoint(request: Request) -> Response:
        try:
            payload = json.loads((await request.body()).strip() or b"{}")
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return error("the request body must be a JSON object", 400)
        try:
            answer = await unless_client_leaves(asyncio.wait_for(fn(payload), timeout), request.receive)
        except (TimeoutError, PlaywrightTimeout) as exc:
            message = first_line(exc) or f"{request.url.path[1:]} timed out after {timeout:.0f}s"
            log.warning("%s: %s", request.url.path, message)
            return error(message, 504)
        except (OpError, PlaywrightError, OSError) as exc:
            log.warning("%s failed: %s", request.url.path, first_line(exc))
            return error(first_line(exc) or type(exc).__name__, getattr(exc, "status", 502))
        return answer if isinstance(answer, Response) else JSONResponse(answer)
    return endpoint


async def fetch_events(page: ArenaPage, body: dict, bound: float) -> AsyncIterator[dict]:
    """POST /fetch's body, all of its work: the page agent's chat() events; a failure before the page's
    answer began (no page, no token, `bound` passed) is the error event the agent would send. Starlette
    cancels it when the bridge hangs up, which aborts the page's fetch (a body not begun has run nothing)."""
    events = page.fetch(body)
    try:
        async with asyncio.timeout(bound):  # until the answer begins; then as long as LM Arena streams
            first = await anext(events)
        yield first
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - a stream cut before its first line reads as a dead sidecar
        log.warning("/fetch failed: %s", first_line(exc) or type(exc).__name__)
        timed_out = isinstance(exc, TimeoutError) and f"no answer within {bound:.0f}s"
        yield {"type": "error", "message": first_line(exc) or timed_out or type(exc).__name__}
    finally:
        await events.aclose()


async def fetch(page: ArenaPage, body: dict, bound: float) -> StreamingResponse:
    need(body, "url")
    if not isinstance(body.get("cookies") or {}, dict) or not isinstance(body.get("headers") or {}, dict):
        raise OpError("'cookies' and 'headers' must be objects", 400)
    return StreamingResponse((json.dumps(event) + "\n" async for event in fetch_events(page, body, bound)),
                             media_type="application/x-ndjson", headers={"cache-control": "no-cache"})


def build_app(page: ArenaPage) -> Starlette:
    bound = LAUNCH_TIMEOUT + OP_TIMEOUT  # a first call also launches the browser
    routes: list[tuple[str, str, Callable[[dict], Awaitable[Any]], float | None]] = [
        ("/status", "GET", lambda _: page.status(), None),
        ("/token", "POST", lambda b: page.token(need(b, "sitekey"), b.get("action") or "chat_submit"), bound),
        ("/clearance", "POST", lambda _: page.clearance(), bound + CLEARANCE_TIMEOUT),
        ("/signup", "POST", lambda b: page.signup(b.get("turnstile_sitekey"), b.get("recaptcha_sitekey"),
                                                  b.get("recaptcha_action") or "sign_up"), bound + OP_TIMEOUT),
        ("/sitekeys", "POST", lambda _: page.sitekeys(), bound),
        ("/fetch", "POST", lambda b: fetch(page, b, bound), None)]
    return Starlette(routes=[Route(path, handler(fn, timeout), methods=[method])
                             for path, method, fn, timeout in routes])


async def serve_until_shutdown(settings: Settings) -> None:
    shutdown = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, shutdown.set)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(settings.socket)  # a stale socket from a previous run
    # umask: the socket is created 0600, only our user may talk to the browser.
    config = HypercornConfig.from_mapping(bind=[f"unix:{settings.socket}"], umask=0o177, accesslog=None,
                                          errorlog=logging.getLogger("sidecar.server"), graceful_timeout=2.0)
    chromium = Chromium(settings)
    app: Any = build_app(ArenaPage(chromium))
    try:
        await serve(app, config, shutdown_trigger=shutdown.wait)
    finally:
        await chromium.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(settings.socket)
        log.info("sidecar stopped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Playwright browser sidecar for the LM Arena bridge")
    p.add_argument("--socket", required=True, help="Unix socket path")
    p.add_argument("--arena-url", required=True, help="LM Arena's origin (scheme://host[:port])")
    p.add_argument("--page-agent", required=True, type=argparse.FileType(encoding="utf-8"),
                   help="file with the page agent's JavaScript (written by the bridge)")
    p.add_argument("--browser", help="Chromium/Chrome binary (default: Playwright's, else one on PATH)")
    p.add_argument("--headful", action="store_true", help="a browser with a window (needs a display or xvfb-run)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s sidecar %(levelname)s %(message)s")
    with args.page_agent as f:
        settings = Settings(args.socket, args.arena_url.rstrip("/"), f.read(), args.browser, args.headful)
    asyncio.run(serve_until_shutdown(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
