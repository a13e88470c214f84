"""The user's own browser as the executor (issue 16, SPEC §8): the userscript that `python bridge.py userscript`
prints, injected into a real headless Chromium page on the emulator signed in as an emulator account, serves
the bridge's chats with the page's own fetch while no other account can (context-bound tokens)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from fake_arena import AUTH_COOKIE
from harness import ROOT, BridgeProcess, free_port, upstream_aborted, validate

import bridge

BROWSER = os.environ.get("BRIDGE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium binary found")

GOOD = {"model": "gemini-3-pro", "messages": [{"role": "user", "content": "x"}]}
SECRET = bridge.EXECUTOR_SECRET_HEADER
PASSWORD = "userscript-admin-password"


def userscript(proc, *extra):
    """`python bridge.py userscript` with the running bridge's settings (its database), as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "bridge.py"), "userscript", *proc.args,
                           "--url", proc.url, *extra], capture_output=True, text=True, check=True, cwd=proc.folder)


def secret_of(script):
    return json.loads(script.split("SECRET = ", 1)[1].split(",", 1)[0])


def executors(proc):
    return proc.health()["checks"]["browser_executors"]["items"]


def wait_for(test, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if test():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def post(proc, key, body=GOOD, timeout=60):
    return httpx.post(proc.url + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def ub(arena, tmp_path_factory):
    """A bridge without a sidecar (nothing but the user's page can mint a token that passes), behind a
    trusted proxy so that a test can speak from another address."""
    proc = BridgeProcess(arena.url, str(tmp_path_factory.mktemp("userscript")), env={"BRIDGE_ADMIN_PASSWORD": PASSWORD},
                         args=("--ping-interval", "0.5", "--sidecar-timeout", "10", "--trusted-proxy")).start()
    proc.wait_for_models()
    yield proc
    proc.stop()


@pytest.fixture
def key(ub):
    return ub.create_key()


@pytest.fixture
def tab(arena, ub):
    """A signed-in LM Arena tab (the emulator's page, the session cookie in its context) with the userscript
    injected at document start, connected; context-bound tokens on and no other account."""
    from playwright.sync_api import sync_playwright
    arena.reset()
    arena.configure(context_bound_tokens=True)
    for account in ub.store.accounts():
        ub.store.remove_account(account["id"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        context = browser.new_context()
        session = arena.new_session(anonymous=False)
        context.add_cookies([{"name": AUTH_COOKIE, "value": session, "url": arena.url + "/"}])
        context.add_init_script(userscript(ub).stdout)
        page = context.new_page()
        page.goto(arena.url)
        wait_for(lambda: any(e["connected"] for e in executors(ub)), 15, "the page to connect")
        yield page, session
        browser.close()
    wait_for(lambda: not any(e["connected"] for e in executors(ub)), 15, "the closed page to be dropped")
    arena.reset()


def test_the_userscript_has_a_proper_header_and_embeds_the_one_page_agent(ub, arena):
    script = userscript(ub, "--url", "https://bridge.example.net:8443").stdout
    header = script.split("// ==/UserScript==", 1)[0]
    assert header.startswith("// ==UserScript==")
    for line in ("@match        https://arena.ai/*", "@match        https://lmarena.ai/*", f"@match        {arena.url}/*",
                 "@connect      bridge.example.net", "@grant        GM_xmlhttpRequest", "@version      ",
                 "@run-at       document-start", "@inject-into  page", "@name         "):
        assert line in header
    assert bridge.PAGE_AGENT_JS.strip() in script and script.count("window.__arenaBridge (version 1)") == 1
    assert '"https://bridge.example.net:8443"' in script
    secret = secret_of(script)
    assert secret.startswith("bx-") and bridge.ExecutorRecords(ub.store).pairing_by_secret(secret) is not None
    with open(ub.db, "rb") as db:
        assert secret.encode() not in db.read()          # only its hash is stored


def test_a_non_streamed_chat_runs_in_the_signed_in_page(tab, ub, key, arena):
    _, session = tab
    response = post(ub, key)
    assert response.status_code == 200, response.text
    validate("CreateChatCompletionResponse", response.json())
    assert response.json()["choices"][0]["message"]["content"] == "turn 1: x"
    [sent] = arena.chat_requests()
    assert sent["status"] == 200 and sent["headers"].get("x-arena-page")    # the page's own fetch, its context
    assert sent["cookies"][AUTH_COOKIE] == session
    [account] = ub.store.accounts()
    assert account["kind"] == "browser" and session not in json.dumps(account)   # the bridge never sees the cookie


def test_a_streamed_chat_reaches_the_client_line_by_line(tab, ub, key, arena):
    arena.configure(lines=30, line_delay=0.1)
    started = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", ub.url + "/v1/chat/completions", json={**GOOD, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            if '"content":"line' in line:
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) == 30 and [line for line in lines if line][-1] == "data: [DONE]"
    assert arrivals[-1] - arrivals[0] > 2.0          # the first lines came long before the last was produced
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in lines if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert text == "".join(f"line {i}\n" for i in range(1, 31))
    assert arena.chat_requests()[0]["headers"].get("x-arena-page")


def test_the_page_state_is_in_health_and_tokens_list(tab, ub, key, arena):
    _, session = tab
    assert post(ub, key).status_code == 200
    [item] = executors(ub)
    email = arena.decode_session(session)["user"]["email"]
    assert item["connected"] and item["user"]["email"] == email and item["jobs"] == 1 and item["failures"] == 0
    assert item["connected_since"] and item["last_job"]
    assert httpx.get(ub.url + "/health").json()["checks"]["browser_executors"] == {"connected": 1}  # no details
    listed = subprocess.run([sys.executable, os.path.join(ROOT, "bridge.py"), "tokens", "list", "--db", ub.db],
                            capture_output=True, text=True, check=True).stdout
    assert "\tbrowser\tok\t" in listed and f"signed in as {email}" in listed and "jobs 1" in listed


def test_the_client_leaving_aborts_the_page_fetch(tab, ub, key, arena):
    arena.configure(lines=400, line_delay=0.05)
    ub.abandon_stream(key, GOOD, after="line 3")
    assert upstream_aborted(arena, timeout=8)
    page, _ = tab
    page.wait_for_function("() => document.getElementById('arena-bridge-badge').dataset.state === 'connected'",
                           timeout=10_000)


def test_a_page_closing_mid_stream_ends_in_an_error_then_done_and_the_next_chat_fails_over(tab, ub, key, arena):
    page, _ = tab
    arena.configure(lines=400, line_delay=0.05)
    bridge.add_account(ub.store, bridge.parse_account_input(arena.new_session()))   # the other account
    lines = []
    with httpx.stream("POST", ub.url + "/v1/chat/completions", json={**GOOD, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        for line in response.iter_lines():
            lines.append(line)
            if "line 3" in line and not page.is_closed():
                page.close()
                closed = time.perf_counter()
        ended = time.perf_counter()
    assert ended - closed < 10                                # the page's grace, not a hang or a long timeout
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2] and "browser executor" in events[-2]
    arena.configure(context_bound_tokens=False, recaptcha="off", lines=0, line_delay=0)
    arena.clear_log()
    response = post(ub, key)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "turn 1: x"
    [sent] = arena.chat_requests()
    assert not sent["headers"].get("x-arena-page")           # from the bridge, with the other account


def test_a_wrong_secret_is_refused_and_throttled_like_a_sign_in(tab, ub):
    headers = {"Origin": "https://arena.ai", "X-Forwarded-For": "203.0.113.7"}
    body = {"executor": "a" * 16, "state": {}}
    answers = [httpx.post(ub.url + "/executor/poll", json=body, headers={**headers, SECRET: f"bx-wrong-{i}"},
                          timeout=10) for i in range(6)]
    assert [a.status_code for a in answers] == [401] * 5 + [429]
    assert int(answers[-1].headers["retry-after"]) > 60
    assert answers[0].headers["access-control-allow-origin"] == "https://arena.ai"
    right = secret_of(userscript(ub).stdout)
    assert httpx.post(ub.url + "/executor/poll", json=body, headers={**headers, SECRET: right},
                      timeout=10).status_code == 429             # throttled: not even the right one is tried
    assert "bx-wrong" not in ub.log()


def test_another_origin_is_refused_by_cors(ub):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": f"content-type,{SECRET}"}
    evil = httpx.options(ub.url + "/executor/poll", headers={"Origin": "https://evil.example", **preflight})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
    for origin in ("https://arena.ai", "https://lmarena.ai"):
        ok = httpx.options(ub.url + "/executor/poll", headers={"Origin": origin, **preflight,
                                                               "Access-Control-Request-Private-Network": "true"})
        assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == origin
        assert SECRET.lower() in ok.headers["access-control-allow-headers"].lower()
        assert ok.headers["access-control-allow-private-network"] == "true"
    right = secret_of(userscript(ub).stdout)
    posted = httpx.post(ub.url + "/executor/events", json={"executor": "b" * 16, "job": "x", "events": []},
                        headers={"Origin": "https://evil.example", SECRET: right})
    assert posted.status_code == 403 and "access-control-allow-origin" not in posted.headers


def test_revoking_the_secret_disconnects_the_page(tab, ub, key):
    page, _ = tab
    page.wait_for_function("() => document.getElementById('arena-bridge-badge').dataset.state === 'connected'",
                           timeout=10_000)
    assert "revoked" in userscript(ub, "--revoke").stderr
    wait_for(lambda: not any(e["connected"] for e in executors(ub)), 10, "the page to be dropped")
    page.wait_for_function("() => document.getElementById('arena-bridge-badge').dataset.state === 'disconnected'",
                           timeout=10_000)
    assert post(ub, key).status_code == 503


def test_the_dashboard_offers_the_userscript_and_rotates_its_secret(ub, arena):
    earlier = secret_of(userscript(ub).stdout)
    records = bridge.ExecutorRecords(ub.store)
    with httpx.Client(base_url=ub.url, timeout=10) as admin:
        assert admin.post("/login", data={"password": PASSWORD}).status_code in (200, 303)
        page = admin.get("/dashboard/accounts").text
        assert "Download userscript" in page and "Tampermonkey" in page and "Violentmonkey" in page
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        download = admin.post("/dashboard/userscript", data={"csrf": csrf, "rotate": "0"})
        assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
        assert f"@match        {arena.url}/*" in download.text and f'"{ub.url}"' in download.text
        assert records.pairing_by_secret(earlier) is not None            # a download adds a pairing
        rotated = admin.post("/dashboard/userscript", data={"csrf": csrf, "rotate": "1"})
        assert records.pairing_by_secret(earlier) is None and records.pairing_by_secret(secret_of(download.text)) is None
        assert records.pairing_by_secret(secret_of(rotated.text)) is not None
        assert admin.post("/dashboard/userscript", data={"csrf": "forged"}).status_code == 403


# --- the doctor's chat through each connected executor (SPEC §9) -----------------------------------------

def run_diagnostics_with_chats(proc) -> str:
    """The Diagnostics page's doctor run, chats asked for, by a signed-in admin: the page it answers."""
    with httpx.Client(base_url=proc.url, timeout=120) as admin:
        assert admin.post("/login", data={"password": PASSWORD}).status_code == 303
        csrf = re.findall(r'name="csrf" value="([^"]+)"', admin.get("/dashboard/diagnostics").text)[0]
        return admin.post("/dashboard/diagnostics", data={"action": "doctor", "csrf": csrf, "chat": "1"}).text


def diagnostics_rows(page: str) -> dict[str, tuple[str, str]]:
    """label -> (status, what the doctor saw) for each row of the Diagnostics page's report."""
    rows = re.findall(r'<span class="badge \w+">(\w+)</span></td><td[^>]*>([^<]+)</td><td[^>]*>(.*?)</td>', page)
    return {label: (status, re.sub(r"<[^>]+>", "", seen)) for status, label, seen in rows}


def cli_doctor(proc, **changed: str) -> subprocess.CompletedProcess:
    """`python bridge.py doctor` with the running bridge's settings (but the flags `changed`, e.g. port=...),
    from another process as a user runs it."""
    args = list(proc.args)
    for name, value in changed.items():
        args[args.index(f"--{name}") + 1] = value
    return subprocess.run([sys.executable, os.path.join(ROOT, "bridge.py"), "doctor", *args], capture_output=True,
                          text=True, timeout=240, check=False, cwd=proc.folder, env=proc.env)


def cli_verdicts(result: subprocess.CompletedProcess) -> dict[str, tuple[str, str]]:
    """label -> (status, what the doctor saw) for each line of the CLI doctor's report."""
    found = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("ok", "failed", "skipped"):
            found[rest.strip()[:24].strip()] = (status, rest[24:].strip())
    return found


def test_the_diagnostics_page_sends_exactly_one_chat_through_the_connected_tab(tab, ub, arena):
    [account] = ub.store.accounts()
    page = run_diagnostics_with_chats(ub)
    status, seen = diagnostics_rows(page)[f"chat (executor {account['id']})"]
    assert status == "ok" and re.search(r"first token after \d+ ms", seen), page
    assert account["label"] in seen
    [sent] = arena.chat_requests()                           # one chat, and the tab's own fetch sent it
    assert sent["status"] == 200 and sent["headers"].get("x-arena-page")
    assert "A chat worked and every step passed." in page


def test_the_cli_doctor_has_the_running_server_chat_through_the_tab_and_exits_0(tab, ub, arena):
    [account] = ub.store.accounts()
    sessions = ub.store.rows("SELECT token_hash FROM admin_sessions")
    result = cli_doctor(ub)
    assert result.returncode == 0, result.stdout + result.stderr
    status, seen = cli_verdicts(result)[f"chat (executor {account['id']})"]
    assert status == "ok" and re.search(r"first token after \d+ ms", seen), result.stdout
    [sent] = arena.chat_requests()
    assert sent["headers"].get("x-arena-page")
    assert ub.store.rows("SELECT token_hash FROM admin_sessions") == sessions     # its session ended with it


def test_a_closed_tab_is_a_skipped_executor_line_that_says_why(tab, ub, arena):
    page, _ = tab
    [account] = ub.store.accounts()
    page.close()
    wait_for(lambda: not any(e["connected"] for e in executors(ub)), 15, "the closed page to be dropped")
    result = cli_doctor(ub)
    status, seen = cli_verdicts(result)[f"chat (executor {account['id']})"]
    assert status == "skipped" and "its tab is not connected, last seen" in seen, result.stdout
    assert "README.md#browser-executor-not-connected" in result.stdout
    assert result.returncode == 1 and arena.chat_requests() == []


def test_the_cli_doctor_without_a_server_says_executors_connect_to_the_running_one(tab, ub, arena):
    result = cli_doctor(ub, port=str(free_port()))        # the same database, no server at that port
    status, seen = cli_verdicts(result)["chat (executor)"]
    assert status == "skipped" and "no bridge server answers at http://127.0.0.1:" in seen, result.stdout
    assert "executors connect to the running server" in result.stdout
    assert result.returncode == 1 and arena.chat_requests() == []


def test_the_cli_doctor_on_another_database_is_refused_by_the_server_and_says_so(ub, tmp_path):
    other = bridge.Store(str(tmp_path / "other.db"))
    other.add_account(label="browser: someone", kind="browser", auth="browser:x", form="browser", cookies="{}",
                      state="disconnected", failures=0, last_used=0.0)
    other.close()
    result = cli_doctor(ub, db=str(tmp_path / "other.db"))    # the running server's port, another database
    status, seen = cli_verdicts(result)["chat (executor)"]
    assert status == "skipped" and f"the bridge at {ub.url} does not use this database" in seen, result.stdout
