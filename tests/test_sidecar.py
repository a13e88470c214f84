"""The browser sidecar (sidecar.py) and the bridge's client for it, against the LM Arena emulator.

These run a real headless Chromium (Debian's /usr/bin/chromium or BRIDGE_BROWSER); they are skipped when
none is found. One sidecar serves the whole module; the SidecarClient tests start their own children.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import httpx
import pytest
from fake_arena import AUTH_COOKIE, make_uuid7
from harness import upstream_aborted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDECAR = os.path.join(ROOT, "sidecar.py")
TEXT_MODEL = "019a98f7-afcd-779f-8dcb-856cc3b3f078"  # gemini-3-pro in the fixture list


def _find_browser() -> str:
    explicit = os.environ.get("BRIDGE_BROWSER")
    if explicit:
        return explicit
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), "")


BROWSER = _find_browser()
pytestmark = pytest.mark.skipif(not BROWSER, reason="no Chromium/Chrome binary found")

import bridge
from bridge import PAGE_AGENT_JS, SidecarClient, SidecarError

# --- fixtures -------------------------------------------------------------------------------------


def sidecar_argv(socket_path: str, arena_url: str, *extra: str) -> list[str]:
    """sidecar.py's command line as the bridge builds it, the page agent in a file beside the socket."""
    agent = socket_path + ".agent.js"
    with open(agent, "w", encoding="utf-8") as f:
        f.write(PAGE_AGENT_JS)
    return [sys.executable, SIDECAR, "--socket", socket_path, "--arena-url", arena_url, "--page-agent", agent,
            "--browser", BROWSER, *extra]


class Sidecar:
    """A sidecar.py child plus an HTTP client on its Unix socket."""

    def __init__(self, arena_url: str, folder: str, *extra: str) -> None:
        self.socket = os.path.join(folder, "sidecar.sock")
        self.log_path = os.path.join(folder, "sidecar.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(sidecar_argv(self.socket, arena_url, *extra), stdout=subprocess.DEVNULL,
                                         stderr=log)
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), base_url="http://sidecar",
                                 timeout=60)
        deadline = time.time() + 15
        while not self.answers():  # the socket exists a moment before it is listened on
            assert self.proc.poll() is None and time.time() < deadline, self.log()
            time.sleep(0.05)

    def answers(self) -> bool:
        try:
            return os.path.exists(self.socket) and self.http.get("/status", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.http.post(path, json=body)

    def stop(self) -> None:
        self.proc.terminate()  # as the bridge stops it: the browser closed, exit 0
        try:
            assert self.proc.wait(10) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.http.close()


@pytest.fixture(scope="module")
def sidecar(arena, tmp_path_factory):
    s = Sidecar(arena.url, str(tmp_path_factory.mktemp("sidecar")))
    yield s
    s.stop()
    assert not os.path.exists(s.socket)


@pytest.fixture(autouse=True)
def _reset(arena):
    arena.reset()
    yield


def create_body(content: str = "hi", token: str | None = None) -> dict:
    body = {"id": make_uuid7(), "mode": "direct-battle", "modelAId": TEXT_MODEL, "userMessageId": make_uuid7(),
            "modelAMessageId": make_uuid7(), "modality": "chat",
            "userMessage": {"content": content, "experimental_attachments": [], "metadata": {}}}
    if token is not None:
        body["recaptchaV3Token"] = token
    return body


def post_chat(arena, session: str, token: str, ua: str = "Mozilla/5.0 test") -> httpx.Response:
    """A direct (non-browser) create-evaluation call carrying a token: the emulator's verdict on it."""
    return httpx.post(arena.url + "/nextjs-api/stream/create-evaluation",
                      content=json.dumps(create_body("check", token)),
                      headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": arena.url, "User-Agent": ua,
                               "Cookie": f"{AUTH_COOKIE}={session}"}, timeout=10)


def read_ndjson(response: httpx.Response) -> tuple[list[dict], list[float]]:
    items, times = [], []
    for line in response.iter_lines():
        if line:
            items.append(json.loads(line))
            times.append(time.monotonic())
    return items, times


# --- the sidecar process --------------------------------------------------------------------------


def test_socket_is_private_and_status_does_not_start_the_browser(sidecar):
    assert stat.S_IMODE(os.stat(sidecar.socket).st_mode) == 0o600
    for _ in range(2):
        status = sidecar.http.get("/status").json()
        assert status["ok"] is True and status["browser"] == "not started"
        assert status["pid"] == sidecar.proc.pid and "page_url" not in status
    assert not [p for p in _descendants(sidecar.proc.pid) if "chrom" in _cmdline(p)]


def test_token_is_minted_in_the_page_and_accepted(arena, sidecar):
    started = time.monotonic()
    r = sidecar.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit", "v2": False})
    cold = time.monotonic() - started
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    assert token.startswith("0cAFcWeA") and len(token) > 1000

    started = time.monotonic()
    warm_token = sidecar.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"}).json()["token"]
    warm = time.monotonic() - started
    print(f"\ntoken mint: cold {cold:.2f}s (browser launch + page load), warm {warm * 1000:.0f}ms")

    session = arena.new_session()
    assert post_chat(arena, session, token).status_code == 200
    assert post_chat(arena, session, warm_token).status_code == 200
    assert post_chat(arena, session, token).status_code == 403  # single use: the emulator checks it
    assert token[:40] not in sidecar.log()  # secrets never reach the log

    status = sidecar.http.get("/status").json()
    assert status["browser"] == "running" and status["page_url"].startswith(arena.url)
    assert "Headless" not in status["user_agent"] and status["webdriver"] is False
    assert status["version"][0].isdigit() and status["headful"] is False and 0 < status["launch_seconds"] < 60
    # The page the site saw: a normal browser UA on every request.
    page_loads = [e for e in arena.requests if e["path"].startswith("/recaptcha/")]
    assert page_loads and all("Headless" not in e["headers"].get("user-agent", "") for e in page_loads)


def test_token_errors_are_json_and_a_failing_page_is_reloaded(arena, sidecar):
    arena.configure(grecaptcha_execute_rejects=True)
    assert sidecar.post("/clearance", {}).status_code == 200  # reloads the page: it gets the broken script
    r = sidecar.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"})
    assert r.status_code == 502 and "reCAPTCHA execute failed" in r.json()["error"]
    assert sidecar.post("/token", {}).status_code == 400
    arena.reset()  # the page still holds the broken script: the first try fails, a reload fixes it
    r = sidecar.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"})
    assert r.status_code == 200 and "reloading the page" in sidecar.log()


def test_clearance_passes_the_cloudflare_interstitial(arena, sidecar):
    arena.configure(cloudflare=True, cloudflare_delay=0.3)
    r = sidecar.post("/clearance", {})
    assert r.status_code == 200, r.text
    cookies, ua = r.json()["cookies"], r.json()["user_agent"]
    assert cookies.get("cf_clearance") and "Headless" not in ua and ua.startswith("Mozilla/5.0")
    # The clearance works for a plain HTTP client sending the same UA (and not for another UA).
    jar = "; ".join(f"{k}={v}" for k, v in cookies.items())
    assert httpx.get(arena.url + "/", headers={"Cookie": jar, "User-Agent": ua}).status_code == 200
    assert httpx.get(arena.url + "/", headers={"Cookie": jar, "User-Agent": "curl/8"}).status_code == 403
    # And the page behind it mints tokens again.
    assert sidecar.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"}).status_code == 200


def test_clearance_passes_the_interactive_challenge_by_clicking_its_checkbox(arena, sidecar):
    """The challenge clears only on a click of its widget (test_fake_arena: never by waiting); the reset before
    this test voided any clearance the browser already held."""
    arena.configure(cloudflare=True, cloudflare_interactive=True)
    r = sidecar.post("/clearance", {})
    assert r.status_code == 200, r.text
    cookies, ua = r.json()["cookies"], r.json()["user_agent"]
    [solve] = [e for e in arena.requests if e["path"] == "/cdn-cgi/challenge-platform/solve"]
    assert solve["status"] == 200 and solve["json"]["widget"] and solve["headers"]["user-agent"] == ua
    jar = "; ".join(f"{k}={v}" for k, v in cookies.items())
    assert httpx.get(arena.url + "/", headers={"Cookie": jar, "User-Agent": ua}).status_code == 200
    assert httpx.get(arena.url + "/", headers={"Cookie": jar, "User-Agent": "curl/8"}).status_code == 403
    assert sidecar.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"}).status_code == 200


def test_fetch_relays_the_stream_as_it_arrives(arena, sidecar):
    arena.configure(lines=6, line_delay=0.25)
    request = {"url": "/nextjs-api/stream/create-evaluation", "method": "POST",
               "headers": {"Content-Type": "text/plain;charset=UTF-8", "User-Agent": "ignored"},
               "body": json.dumps(create_body("streamed")), "cookies": {AUTH_COOKIE: arena.new_session()},
               "action": "chat_submit", "sitekey": arena.sitekey}
    started = time.monotonic()
    with sidecar.http.stream("POST", "/fetch", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        items, times = read_ndjson(response)
    head, chunks, last = items[0], items[1:-1], items[-1]
    assert head["status"] == 200 and head["headers"]["content-type"].startswith("text/event-stream")
    assert head["type"] == "head" and {c["type"] for c in chunks} == {"chunk"}
    assert last["type"] == "done" and AUTH_COOKIE in last["cookies"]  # the context's cookies after the call
    text = "".join(c["text"] for c in chunks)
    assert all(f'a0:"line {i}\\n"' in text for i in range(1, 7)) and "ad:" in text
    first_chunk_at = times[1] - started
    total = times[-1] - started
    assert total - first_chunk_at > 1.0, (first_chunk_at, total)  # chunks came one by one, not at the end
    assert len(chunks) >= 4


def test_fetch_errors_before_the_status_are_the_last_event_and_http_errors_pass_through(arena, sidecar):
    r = sidecar.post("/fetch", {"url": "/nowhere", "method": "GET"})
    assert r.status_code == 200 and json.loads(r.text.splitlines()[0])["status"] == 404  # not the sidecar's error
    # The page agent runs requests on the page's own origin only.
    r = sidecar.post("/fetch", {"url": "http://127.0.0.1:9/nowhere", "method": "GET"})
    [event] = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and event["type"] == "error" and "is not this page's origin" in event["message"]
    # A token the page cannot mint fails the fetch before it is sent, the same way.
    arena.configure(grecaptcha_execute_rejects=True)
    sidecar.post("/clearance", {})  # reloads the page: it gets the broken script
    r = sidecar.post("/fetch", {"url": "/nextjs-api/stream/create-evaluation", "method": "POST", "body": "{}",
                                "sitekey": arena.sitekey, "action": "chat_submit"})
    [event] = [json.loads(line) for line in r.text.splitlines()]
    assert event["type"] == "error" and "reCAPTCHA execute failed" in event["message"], event
    assert not arena.chat_requests()
    arena.reset()
    assert sidecar.post("/fetch", {"url": "/", "headers": "Accept: */*"}).status_code == 400
    with sidecar.http.stream("POST", "/fetch", json={"url": "/nextjs-api/stream/create-evaluation",
                                                      "method": "POST", "body": json.dumps(create_body()),
                                                      "cookies": {AUTH_COOKIE: arena.new_session()}}) as resp:
        items, _ = read_ndjson(resp)
    # No token was asked for: the site's own error comes back as a normal response.
    assert items[0]["status"] == 403 and items[-1]["type"] == "done"
    assert "recaptcha validation failed" in "".join(i.get("text", "") for i in items)


def test_an_unexpected_fetch_failure_is_its_error_event_not_a_cut_stream(arena, sidecar):
    # A cut stream reads to the bridge like a dead sidecar: it would restart it and send the request again.
    r = sidecar.post("/fetch", {"url": "/nowhere", "method": 5})
    [event] = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and event["type"] == "error", r.text


def test_fetch_client_disconnect_aborts_the_page_fetch(arena, sidecar):
    arena.configure(lines=12, line_delay=0.2)
    body = create_body("abandoned")
    request = {"url": "/nextjs-api/stream/create-evaluation", "method": "POST", "body": json.dumps(body),
               "cookies": {AUTH_COOKIE: arena.new_session()}, "sitekey": arena.sitekey, "action": "chat_submit"}
    with sidecar.http.stream("POST", "/fetch", json=request) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["status"] == 200
        assert json.loads(next(lines))["type"] == "chunk"
    # The reply would take 2.4 s. The emulator only records a turn whose stream completed: if the page's
    # fetch was aborted, its writes fail and the evaluation stays empty.
    time.sleep(3.0)
    assert arena.evaluations[body["id"]]["messages"] == []
    assert "aborting it in the page" in sidecar.log()


def test_in_page_chats_on_two_accounts_overlap_at_the_emulator(arena, sidecar):
    # Each reply waits 1.5 s before its first byte. The session lock covers only setting an account's
    # cookies until its request has left (the mint happens before it): the second chat must not wait
    # for the first one's answer, nor for its token.
    arena.configure(context_bound_tokens=True, first_byte_delay=1.5)
    sessions = [arena.new_session(), arena.new_session()]
    sidecar.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"})  # the page is up

    def chat(session: str) -> list[dict]:
        request = {"url": "/nextjs-api/stream/create-evaluation", "method": "POST",
                   "body": json.dumps(create_body("overlap")), "cookies": {AUTH_COOKIE: session},
                   "sitekey": arena.sitekey, "action": "chat_submit"}
        with sidecar.http.stream("POST", "/fetch", json=request) as response:
            return read_ndjson(response)[0]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(chat, sessions))
    assert all(a[0]["status"] == 200 and a[-1]["type"] == "done" for a in answers), answers
    first, second = sorted(arena.chat_requests(), key=lambda r: r["time"])
    assert second["time"] - first["time"] < 1.0, (first["time"], second["time"])
    owners = {arena.session_user(r["cookies"][AUTH_COOKIE]) for r in (first, second)}
    assert owners == {arena.session_user(s) for s in sessions}


def test_signup_creates_an_account_the_emulator_accepts(arena, sidecar):
    r = sidecar.post("/signup", {"turnstile_sitekey": arena.turnstile_sitekey,
                                 "recaptcha_sitekey": arena.sitekey, "recaptcha_action": "sign_up"})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["status"] == 200 and result["bodies"][0] == "2026"
    session = bridge.Session.from_signup(result["cookies"], result["text"]).value
    assert session.startswith("base64-") and arena.session_user(session)
    assert "provisional_user_id" in result["cookies"]
    assert "Headless" not in result["user_agent"]
    token = sidecar.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"}).json()["token"]
    assert post_chat(arena, session, token).status_code == 200
    # Behind Cloudflare: the fresh context reuses the browser's clearance (or passes the challenge itself).
    arena.configure(cloudflare=True, cloudflare_delay=0.3)
    r = sidecar.post("/signup", {"turnstile_sitekey": arena.turnstile_sitekey, "recaptcha_sitekey": arena.sitekey})
    assert r.status_code == 200, r.text
    assert arena.session_user(bridge.Session.from_signup(r.json()["cookies"], r.json()["text"]).value)
    assert "cf_clearance" in r.json()["cookies"]
    arena.configure(cloudflare=False)
    # Without the required reCAPTCHA token the emulator refuses: the sidecar relays the refusal as it is.
    r = sidecar.post("/signup", {"turnstile_sitekey": arena.turnstile_sitekey, "recaptcha_sitekey": None})
    assert r.status_code == 200 and r.json()["status"] == 403 and "recaptcha" in r.json()["text"].lower()


@pytest.mark.skipif(not shutil.which("xvfb-run"), reason="xvfb-run is not installed (apt-get install xvfb)")
def test_headful_under_xvfb(arena, tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    s = Sidecar(arena.url, str(tmp_path), "--headful")
    try:
        r = s.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"})
        assert r.status_code == 200, r.text
        assert post_chat(arena, arena.new_session(), r.json()["token"]).status_code == 200
        xvfb = [p for p in _descendants(s.proc.pid) if _cmdline(p).startswith("Xvfb")]
        assert len(xvfb) == 1 and "started by xvfb-run" in s.log()
        assert s.http.get("/status").json()["webdriver"] is False
    finally:
        s.stop()
    assert _pid_gone(xvfb[0])


PARENT = """
import subprocess, sys, time
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("headful", [False, True], ids=["headless", "headful"])
def test_the_sidecar_its_browser_and_display_end_when_the_bridge_is_killed(arena, tmp_path, headful):
    if headful and not shutil.which("xvfb-run"):
        pytest.skip("xvfb-run is not installed (apt-get install xvfb)")
    socket_path = str(tmp_path / "s.sock")
    argv = sidecar_argv(socket_path, arena.url, *(["--headful"] if headful else []))
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *argv], stdout=subprocess.PIPE, env=env)
    try:
        pid = int(parent.stdout.readline())
        http = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://sidecar", timeout=60)
        for _ in range(150):
            if os.path.exists(socket_path):
                break
            time.sleep(0.1)
        assert http.post("/token", json={"sitekey": arena.sitekey, "action": "chat_submit"}).status_code == 200
        family = _descendants(pid)
        assert any("chrom" in _cmdline(p) for p in family)
        assert any(_cmdline(p).startswith("Xvfb") for p in family) is headful
        parent.kill()  # SIGKILL: the bridge cannot clean up; the kernel tells the sidecar
        parent.wait()
        assert _pid_gone(pid) and all(_pid_gone(p) for p in family)
        assert not os.path.exists(socket_path)  # it shut down in order
    finally:
        parent.kill()


@pytest.mark.skipif(not shutil.which("xvfb-run"), reason="xvfb-run is not installed (apt-get install xvfb)")
def test_a_killed_headful_sidecar_leaves_no_display_behind(arena, tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    s = Sidecar(arena.url, str(tmp_path), "--headful")
    try:
        assert s.post("/token", {"sitekey": arena.sitekey, "action": "chat_submit"}).status_code == 200
        family = _descendants(s.proc.pid)
        assert any(_cmdline(p).startswith("Xvfb") for p in family)
        s.proc.kill()
        assert all(_pid_gone(p) for p in family)
    finally:
        s.proc.kill()
        s.http.close()


# --- the page agent, as a userscript runs it: injected into a plain page, a JavaScript transport ------------


@pytest.fixture
def agent_page(arena):
    """A plain Chromium page on the emulator with the page agent injected at document start (one browser
    per test: Playwright's sync API holds an event loop while it runs)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        context = browser.new_context()
        context.add_init_script(PAGE_AGENT_JS)
        page = context.new_page()
        yield context, page
        browser.close()


# The transport of these tests: events collected in the page, as a userscript would forward them.
RUN_CHAT_JS = """async ([id, request]) => {
  const events = [];
  await window.__arenaBridge.chat(id, request, async e => { events.push(e); });
  return events;
}"""


def test_the_page_agent_reports_the_signed_in_user_the_sitekeys_and_the_origin(arena, agent_page):
    context, page = agent_page
    session = arena.new_session(anonymous=False, big=True)
    context.add_cookies([{"name": f"{AUTH_COOKIE}.{i}", "value": part, "url": arena.url + "/"}
                         for i, part in enumerate(arena.split_session(session))])  # the chunked form
    page.goto(arena.url)
    state = page.evaluate("() => window.__arenaBridge.state()")
    user = arena.decode_session(session)["user"]
    assert state["user"] == {"id": user["id"], "email": user["email"], "anonymous": False}
    assert state["origin"] == arena.url and state["url"].startswith(arena.url)
    assert arena.sitekey in state["sitekeys"] and state["grecaptcha"] and not state["interstitial"]
    # The live reCAPTCHA configuration names keys no script URL shows (the real site's clients).
    page.evaluate("() => { window.___grecaptcha_cfg = {clients: {0: {x: {y: {sitekey: '6LcfgOnlyKey'}}}}}; }")
    assert "6LcfgOnlyKey" in page.evaluate("() => window.__arenaBridge.state().sitekeys")
    # Not enumerable, and not in frames: the agent adds as little as it can to what the site sees.
    assert page.evaluate("() => Object.keys(window).includes('__arenaBridge')") is False


def test_the_page_agent_mints_runs_a_chat_and_streams_its_events_in_order(arena, agent_page):
    context, page = agent_page
    arena.configure(context_bound_tokens=True, lines=4)  # only a token minted in this page is accepted
    context.add_cookies([{"name": AUTH_COOKIE, "value": arena.new_session(), "url": arena.url + "/"}])
    page.goto(arena.url)
    request = {"url": "/nextjs-api/stream/create-evaluation", "method": "POST",
               "headers": {"Content-Type": "text/plain;charset=UTF-8"}, "body": json.dumps(create_body("agent")),
               "recaptcha": {"action": "chat_submit", "sitekey": arena.sitekey}}
    events = page.evaluate(RUN_CHAT_JS, ["job-1", request])
    kinds = [e["type"] for e in events]
    assert kinds[0] == "head" and kinds[-1] == "done" and set(kinds[1:-1]) == {"chunk"}
    assert events[0]["status"] == 200 and events[0]["headers"]["content-type"].startswith("text/event-stream")
    text = "".join(e["text"] for e in events[1:-1])
    assert all(f'a0:"line {i}\\n"' in text for i in range(1, 5))
    [sent] = arena.chat_requests()
    assert sent["json"]["recaptchaV3Token"].startswith("0cAFcWeA")


def test_the_page_agent_aborts_a_job_and_reports_it_last(arena, agent_page):
    context, page = agent_page
    arena.configure(recaptcha="off", lines=40, line_delay=0.1)
    context.add_cookies([{"name": AUTH_COOKIE, "value": arena.new_session(), "url": arena.url + "/"}])
    page.goto(arena.url)
    request = {"url": "/nextjs-api/stream/create-evaluation", "method": "POST", "body": json.dumps(create_body())}
    events = page.evaluate("""async ([id, request]) => {
      const events = [];
      await window.__arenaBridge.chat(id, request, async e => {
        events.push(e);
        if (e.type === 'chunk' && events.length === 3) window.__arenaBridge.abort(id);
      });
      return [events, window.__arenaBridge.abort(id)];
    }""", ["job-2", request])
    events, known_after = events
    assert [e["type"] for e in events[:3]] == ["head", "chunk", "chunk"]
    assert events[-1] == {"type": "error", "message": "aborted", "aborted": True} and len(events) < 10
    assert known_after is False  # a finished job is forgotten
    assert upstream_aborted(arena, timeout=5)


# --- the bridge's SidecarClient -------------------------------------------------------------------


def make_client(arena, tmp_path, **kw) -> SidecarClient:
    options = {"socket_path": str(tmp_path / "client.sock"), "arena_url": arena.url, "browser": BROWSER,
               "sidecar_script": SIDECAR, "request_timeout": 30.0}
    options.update(kw)
    return SidecarClient(**options)


def test_client_off_mode_never_starts_anything(arena, tmp_path):
    async def run():
        client = make_client(arena, tmp_path, mode="off")
        with pytest.raises(SidecarError, match="disabled"):
            await client.token(arena.sitekey, "chat_submit")
        with pytest.raises(SidecarError, match="disabled"):
            await client.clearance()
        assert client.state == "off" and (await client.status())["state"] == "off"
        assert client._proc is None and not os.path.exists(tmp_path / "client.sock")
        await client.aclose()
    asyncio.run(run())


def test_client_lazy_start_pool_restart_and_stop(arena, tmp_path):
    async def run():
        client = make_client(arena, tmp_path)
        try:
            assert (await client.status()) == {"state": "stopped"}
            assert client._proc is None
            started = time.monotonic()
            token = await client.token(arena.sitekey, "chat_submit")  # starts sidecar + browser
            print(f"\nclient cold token (python + browser start + page + mint): {time.monotonic() - started:.2f}s")
            status = await client.status()
            assert status["state"] == "running" and status["browser"] == "running"
            first_pid = status["pid"]
            # Its memory, as the bridge measures its child: the sidecar, Playwright's driver and Chromium.
            print(f"sidecar memory (PSS, sidecar + driver + Chromium): {status['memory_mb']:.0f} MiB")
            assert status["memory_mb"] > 100
            # The page agent the sidecar runs is the bridge's, in a file as private as the socket.
            agent = tmp_path / "client.sock.agent.js"
            assert agent.read_text() == PAGE_AGENT_JS and stat.S_IMODE(agent.stat().st_mode) == 0o600
            # The pool refills in the background: the next call does not wait for a mint.
            for _ in range(50):
                if len(client._pool.get((arena.sitekey, "chat_submit"), ())) >= 2:
                    break
                await asyncio.sleep(0.1)
            started = time.monotonic()
            pooled = await client.token(arena.sitekey, "chat_submit")
            assert time.monotonic() - started < 0.05 and pooled != token
            session = arena.new_session()
            assert post_chat(arena, session, token).status_code == 200
            assert post_chat(arena, session, pooled).status_code == 200

            os.kill(first_pid, signal.SIGKILL)  # a crash: the next call restarts it
            await asyncio.sleep(0.2)
            cookies, ua = await client.clearance()
            assert "provisional_user_id" in cookies and "Headless" not in ua
            status = await client.status()
            assert status["state"] == "running" and status["pid"] != first_pid

            chunks = []
            stream = client.fetch_stream({"url": "/", "method": "GET"})
            async for item in stream:
                chunks.append(item)
            assert chunks[0][0] == 200 and "LMArena" in "".join(c for c in chunks[1:] if isinstance(c, str))
            assert isinstance(chunks[-1], dict) and "provisional_user_id" in chunks[-1]    # the page's jar, last

            # Closing the iterator early aborts the page's fetch (the emulator then never completes the turn).
            arena.configure(lines=8, line_delay=0.2)
            body = create_body("closed early")
            stream = client.fetch_stream({"url": "/nextjs-api/stream/create-evaluation", "method": "POST",
                                          "body": json.dumps(body), "cookies": {AUTH_COOKIE: session},
                                          "sitekey": arena.sitekey, "action": "chat_submit"})
            assert (await stream.__anext__())[0] == 200
            assert "a0:" in await stream.__anext__()
            await stream.aclose()
            await asyncio.sleep(2.0)
            assert arena.evaluations[body["id"]]["messages"] == []
        finally:
            await client.aclose()
        assert client.state == "stopped" and not os.path.exists(tmp_path / "client.sock")
        assert _pid_gone(status["pid"])
    asyncio.run(run())


def test_client_idle_stop(arena, tmp_path):
    async def run():
        client = make_client(arena, tmp_path, idle_timeout=0.5)
        try:
            await client.clearance()
            pid = (await client.status())["pid"]
            for _ in range(60):
                if client.state == "stopped":
                    break
                await asyncio.sleep(0.1)
            assert client.state == "stopped" and _pid_gone(pid)
        finally:
            await client.aclose()
    asyncio.run(run())


def test_client_never_resends_an_in_page_chat_once_the_sidecar_took_it(arena, tmp_path):
    """A sidecar that dies while LM Arena has not answered yet: its page may have sent the chat, so the call
    fails as broken off instead of running the chat again on a restarted sidecar."""
    arena.configure(first_byte_delay=3.0)

    async def run():
        client = make_client(arena, tmp_path)
        try:
            await client.token(arena.sitekey, "chat_submit")  # the sidecar and its page are up
            pid = (await client.status())["pid"]
            stream = client.fetch_stream({"url": "/nextjs-api/stream/create-evaluation", "method": "POST",
                                          "body": json.dumps(create_body("once")), "sitekey": arena.sitekey,
                                          "cookies": {AUTH_COOKIE: arena.new_session()}, "action": "chat_submit"})
            head = asyncio.ensure_future(stream.__anext__())
            for _ in range(100):
                if arena.chat_requests():
                    break
                await asyncio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(SidecarError, match="broke off"):
                await head
            await asyncio.sleep(3.5)
            assert len(arena.chat_requests()) == 1 and client._proc is not None and client._proc.pid == pid
        finally:
            await client.aclose()
    asyncio.run(run())


HUNG_SIDECAR = """
import socket, sys, time
path = sys.argv[sys.argv.index("--socket") + 1]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(16)
held = []
while True:
    held.append(s.accept()[0])  # accept and never answer
"""


def test_client_gives_up_on_a_sidecar_that_never_answers(arena, tmp_path):
    script = tmp_path / "hung.py"
    script.write_text(HUNG_SIDECAR)

    async def run():
        client = make_client(arena, tmp_path, sidecar_script=str(script), request_timeout=2.0)
        started = time.monotonic()
        with pytest.raises(SidecarError, match="did not answer within 2s"):
            await client.token(arena.sitekey, "chat_submit")
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, elapsed
        assert client.state.startswith("failed") and client._proc is None
        await client.aclose()
    asyncio.run(run())


# --- helpers --------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError):
                pass
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pid_gone(pid: int) -> bool:
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
