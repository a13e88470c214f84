"""`python bridge.py doctor` against the emulator (SPEC §9): a clean run, one run per fault the emulator can
make, `--save` folders that hold no secret and replay to the same result."""
import json
import os
import re
import shutil
import subprocess
import sys

import httpx
import pytest
from fake_arena import FakeArena
from harness import ROOT, BridgeProcess, free_port

import bridge

BROWSER = os.environ.get("BRIDGE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium binary found")


@pytest.fixture
def arena():
    emulator = FakeArena().start()
    yield emulator
    emulator.stop()


def add_accounts(folder, *values: str) -> None:
    store = bridge.Store(str(folder / "bridge.db"))
    try:
        for value in values:
            bridge.add_account(store, bridge.parse_account_input(value))
    finally:
        store.close()


def doctor(url: str, folder, *args: str, sidecar: str = "off") -> subprocess.CompletedProcess:
    """The CLI doctor with no bridge server running (a free port): what it asks a server is not in play."""
    env = {**os.environ, "BRIDGE_SIDECAR": sidecar, "BRIDGE_BROWSER": BROWSER or "",
           "BRIDGE_SIDECAR_SOCKET": str(folder / "s.sock")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "bridge.py"), "--db", str(folder / "bridge.db"),
                           "--arena-url", url, "--port", str(free_port()), "doctor", *args], env=env, cwd=folder,
                          capture_output=True, text=True, timeout=180, check=False)


def verdicts(result: subprocess.CompletedProcess) -> dict[str, str]:
    """label -> status for each line of the report (continuation lines start with spaces)."""
    found = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("ok", "failed", "skipped"):
            found[rest.strip()[:24].strip()] = status
    return found


def test_a_clean_run_says_ok_on_every_line_and_exits_0(arena, tmp_path):
    arena.configure(recaptcha="off")
    add_accounts(tmp_path, arena.new_session())
    result = doctor(arena.url, tmp_path, "--images")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = verdicts(result)
    assert lines == {"origin": "ok", "cloudflare": "ok", "page": "ok", "discovery": "ok",
                     "account (account 1)": "ok", "browser": "skipped", "token mint": "skipped",
                     "chat (direct)": "ok", "chat (executor)": "skipped", "image upload": "ok"}, result.stdout
    assert "no browser executor has connected" in result.stdout


@needs_browser
def test_a_clean_run_with_the_browser_checks_every_path(arena, tmp_path):
    add_accounts(tmp_path, arena.new_session())
    result = doctor(arena.url, tmp_path, "--images", sidecar="auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {status for label, status in verdicts(result).items() if label != "chat (executor)"} == {"ok"}, result.stdout
    assert {"browser", "token mint", "chat (direct)", "chat (in-page)"} <= set(verdicts(result))


def assert_fails_at(result: subprocess.CompletedProcess, step: str, anchor: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdicts(result)[step] == "failed", result.stdout
    assert f"README.md{anchor}" in result.stdout


def test_cloudflare_without_a_browser_names_the_cloudflare_step(arena, tmp_path):
    arena.configure(recaptcha="off", cloudflare=True)
    add_accounts(tmp_path, arena.new_session())
    result = doctor(arena.url, tmp_path)
    assert_fails_at(result, "cloudflare", "#cloudflare-challenge")
    assert verdicts(result)["page"] == "skipped"


def test_an_expired_session_whose_refresh_fails_names_the_account(arena, tmp_path):
    arena.configure(recaptcha="off")
    value = arena.new_session(lifetime=-60)
    add_accounts(tmp_path, value)
    user = arena.session_user(value)
    arena.fault(times=5, path="page", status=500, user=user)
    arena.fault(times=5, path="refresh", status=400, body={"error_code": "refresh_token_not_found"})
    result = doctor(arena.url, tmp_path)
    assert_fails_at(result, "account (account 1)", "#expired-sessions-and-401")
    assert verdicts(result)["chat"] == "skipped"


def test_recaptcha_enforced_with_the_sidecar_off_names_the_chat(arena, tmp_path):
    add_accounts(tmp_path, arena.new_session())
    result = doctor(arena.url, tmp_path)
    assert_fails_at(result, "chat (direct)", "#recaptcha-failures")
    assert verdicts(result)["token mint"] == "skipped"


def test_no_network_names_the_origin_and_skips_the_rest(tmp_path):
    result = doctor(f"http://127.0.0.1:{free_port()}", tmp_path)
    assert_fails_at(result, "origin", "#cannot-reach-lm-arena")
    assert {status for label, status in verdicts(result).items() if label != "origin"} == {"skipped"}


def test_an_account_in_cool_down_is_left_alone(arena, tmp_path):
    arena.configure(recaptcha="off")
    values = [arena.new_session(), arena.new_session()]
    add_accounts(tmp_path, *values)
    store = bridge.Store(str(tmp_path / "bridge.db"))
    store.update_account(1, state="cooling_down", cooldown_until=bridge.now() + 600, cooldown_reason="rate limited")
    store.close()
    result = doctor(arena.url, tmp_path)
    assert result.returncode == 0, result.stdout
    assert verdicts(result)["account (account 1)"] == "skipped" and "cooling down" in result.stdout
    [chat] = arena.chat_requests()
    assert arena.session_user(chat["cookies"][bridge.AUTH_COOKIE]) == arena.session_user(values[1])


# --- saved runs ---------------------------------------------------------------------------------------

def secrets_of_run(arena, values: list[str]) -> list[str]:
    """Every cookie, token and key of the run: the sessions given and those the emulator issued since,
    their tokens, and every reCAPTCHA token and cookie the emulator received."""
    found: set = set(values)
    for value in values:
        session = arena.decode_session(value) or {}
        found |= {session.get("access_token"), session.get("refresh_token")}
    for request in arena.requests:
        found |= set(request["cookies"].values())
        body = request["json"] if isinstance(request["json"], dict) else {}
        found |= {body.get("recaptchaV3Token"), body.get("refresh_token")}
    return sorted(v for v in found if isinstance(v, str) and len(v) >= 8)


def saved_bytes(folder) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.iterdir()))


@needs_browser
def test_a_saved_run_holds_no_secret_of_the_run(arena, tmp_path):
    arena.configure(cloudflare=True)
    values = [arena.new_session(anonymous=False), arena.new_session(big=True)]
    add_accounts(tmp_path, values[0], "; ".join(f"arena-auth-prod-v1.{i}={chunk}"
                                                for i, chunk in enumerate(arena.split_session(values[1]))))
    saved = tmp_path / "saved"
    result = doctor(arena.url, tmp_path, "--images", "--save", str(saved), sidecar="auto")
    assert result.returncode == 0, result.stdout + result.stderr
    blob = saved_bytes(saved)
    secrets = secrets_of_run(arena, values)
    assert any(s.startswith("0cAFcWeA") for s in secrets) and len(secrets) > 8
    assert [s for s in secrets if s.encode() in blob] == []
    manifest = json.loads((saved / "manifest.json").read_text())
    assert {e["step"] for e in manifest["entries"]} >= {"origin", "page", "discovery", "chat", "image upload"}


def test_a_saved_run_replays_through_the_emulator_to_the_same_result(arena, tmp_path):
    arena.configure(recaptcha="off")
    add_accounts(tmp_path, arena.new_session())
    saved = tmp_path / "saved"
    first = doctor(arena.url, tmp_path, "--images", "--save", str(saved))
    replaying = FakeArena().start()
    try:
        replaying.configure(recaptcha="off")
        replaying.replay(str(saved))
        again = tmp_path / "again"
        again.mkdir()
        add_accounts(again, replaying.new_session())
        second = doctor(replaying.url, again, "--images")
    finally:
        replaying.stop()
    assert verdicts(second) == verdicts(first) and second.returncode == first.returncode == 0, second.stdout


SAVED_RUNS = os.path.join(ROOT, "tests", "fixtures", "saved-runs")


@pytest.mark.parametrize("name", sorted(os.listdir(SAVED_RUNS)))
def test_a_saved_run_in_the_repository_replays_to_its_recorded_result(name, tmp_path):
    folder = os.path.join(SAVED_RUNS, name)
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        recorded = json.load(f)["doctor"]
    expected = {bridge.Finding(**line).label[:24]: line["status"] for line in recorded}
    replaying = FakeArena().start()
    try:
        replaying.configure(recaptcha="off")
        replaying.replay(folder)
        add_accounts(tmp_path, replaying.new_session())
        result = doctor(replaying.url, tmp_path, *(["--images"] if "image upload" in expected else []))
    finally:
        replaying.stop()
    assert verdicts(result) == expected, result.stdout


def test_a_saved_fault_replays_to_the_same_failure(arena, tmp_path):
    arena.configure(recaptcha="off", cloudflare=True)
    add_accounts(tmp_path, arena.new_session())
    saved = tmp_path / "saved"
    first = doctor(arena.url, tmp_path, "--save", str(saved))
    replaying = FakeArena().start()
    try:
        replaying.replay(str(saved))
        again = tmp_path / "again"
        again.mkdir()
        add_accounts(again, replaying.new_session())
        second = doctor(replaying.url, again)
    finally:
        replaying.stop()
    assert verdicts(second) == verdicts(first) and second.returncode == first.returncode == 1, second.stdout


# --- the dashboard's Diagnostics page and /metrics for an admin -------------------------------------------

PASSWORD = "diagnostics-test-password"


@pytest.fixture
def dash(arena, tmp_path):
    arena.configure(recaptcha="off")
    proc = BridgeProcess(arena.url, str(tmp_path), env={"BRIDGE_ADMIN_PASSWORD": PASSWORD}).start()
    proc.wait_for_models()
    proc.set_accounts(arena.new_session())
    yield proc
    proc.stop()


def signed_in(proc) -> httpx.Client:
    client = httpx.Client(base_url=proc.url, timeout=60)
    assert client.post("/login", data={"password": PASSWORD}).status_code == 303
    return client


def run_from_page(client: httpx.Client, **fields: str) -> str:
    page = client.get("/dashboard/diagnostics").text
    csrf = re.findall(r'name="csrf" value="([^"]+)"', page)[0]
    return client.post("/dashboard/diagnostics", data={"action": "doctor", "csrf": csrf, **fields}).text


def test_the_diagnostics_page_runs_the_doctor_without_a_chat_unless_asked(dash, arena):
    client = signed_in(dash)
    page = run_from_page(client)
    assert "discovery" in page and "No chat was sent" in page and arena.chat_requests() == []
    page = run_from_page(client, chat="1")
    assert "A chat worked and every step passed." in page and len(arena.chat_requests()) == 1


def test_the_diagnostics_page_shows_the_last_failures_per_account_with_their_cause(dash, arena):
    key = dash.create_key()
    arena.fault(times=3, status=429, body={"error": "Too Many Requests"})
    httpx.post(dash.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
               json={"model": "gemini-3-pro", "messages": [{"role": "user", "content": "x"}]}, timeout=30)
    page = signed_in(dash).get("/dashboard/diagnostics").text
    assert "rate_limited" in page and "429: Too Many Requests" in page


def test_metrics_are_open_to_an_admin_session(dash):
    response = signed_in(dash).get("/metrics")
    assert response.status_code == 200 and "# TYPE bridge_requests_total counter" in response.text


@needs_browser
def test_token_mints_are_counted_in_the_metrics(arena, tmp_path):
    # The direct path: its token is minted by the sidecar for the bridge (in-page chats mint inside the page).
    proc = BridgeProcess(arena.url, str(tmp_path), sidecar="auto",
                         env={"BRIDGE_BROWSER": BROWSER, "BRIDGE_SIDECAR_SOCKET": str(tmp_path / "s.sock"),
                              "BRIDGE_REQUEST_PATH": "direct"}).start()
    try:
        proc.wait_for_models()
        proc.set_accounts(arena.new_session())
        key = proc.create_key()
        answer = httpx.post(proc.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": "gemini-3-pro", "messages": [{"role": "user", "content": "x"}]}, timeout=90)
        assert answer.status_code == 200, answer.text
        text = httpx.get(proc.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
        assert 'bridge_token_mints_total{result="ok"}' in text and 'bridge_sidecar_state{state="running"} 1.0' in text
    finally:
        proc.stop()


# --- faults that need a late-2026 emulator switch or bridge failure kind ------------------------------------

def test_a_rotated_sitekey_the_page_still_shows_is_stored_and_reported(arena, tmp_path):
    arena.configure(recaptcha="off")
    add_accounts(tmp_path, arena.new_session())
    assert doctor(arena.url, tmp_path).returncode == 0
    old = arena.sitekey
    arena.rotate_sitekey()
    result = doctor(arena.url, tmp_path)
    assert result.returncode == 0 and f"sitekey {arena.sitekey} (" in result.stdout
    assert f"changed from {old}" in result.stdout


def test_a_sitekey_rotated_to_a_variable_call_site_heals_and_says_what_changed(arena, tmp_path):
    arena.configure(recaptcha="off")
    add_accounts(tmp_path, arena.new_session())
    assert doctor(arena.url, tmp_path).returncode == 0
    old = arena.sitekey
    arena.rotate_sitekey()
    arena.configure(sitekey_in_page="none", sitekey_call_site="variable")
    result = doctor(arena.url, tmp_path)
    assert verdicts(result)["discovery"] == "ok", result.stdout
    assert arena.sitekey in result.stdout and f"changed from {old}" in result.stdout


def test_a_guest_behind_the_login_gate_names_the_gate(arena, tmp_path):
    arena.configure(recaptcha="off", login_gate=True)
    add_accounts(tmp_path, arena.new_session(anonymous=True))
    result = doctor(arena.url, tmp_path)
    assert result.returncode == 1 and "#guest-accounts-behind-the-login-gate" in result.stdout, result.stdout


def test_a_browser_account_is_reported_and_never_chatted_on_from_the_doctor(arena, tmp_path):
    arena.configure(recaptcha="off")
    store = bridge.Store(str(tmp_path / "bridge.db"))
    try:
        browser = store.add_account(label="browser: me@example.com", kind="browser", auth="user-1", form="browser",
                                    cookies="{}", state="ok", failures=0, last_used=0.0)
    finally:
        store.close()
    add_accounts(tmp_path, arena.new_session())
    result = doctor(arena.url, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = verdicts(result)
    assert lines[f"account (account {browser})"] == "skipped" and lines["chat (direct)"] == "ok", result.stdout
    store = bridge.Store(str(tmp_path / "bridge.db"))
    try:
        assert store.account(browser)["state"] == "ok" and not store.account(browser)["last_error"]
    finally:
        store.close()


def test_a_chat_from_the_diagnostics_page_counts_against_the_accounts_hourly_budget(arena, tmp_path):
    arena.configure(recaptcha="off")
    proc = BridgeProcess(arena.url, str(tmp_path), env={"BRIDGE_ADMIN_PASSWORD": PASSWORD,
                                                         "BRIDGE_ACCOUNT_RPH": "1"}).start()
    try:
        proc.wait_for_models()
        proc.set_accounts(arena.new_session())
        assert "A chat worked" in run_from_page(signed_in(proc), chat="1")
        answer = httpx.post(proc.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {proc.create_key()}"},
                            json={"model": "gemini-3-pro", "messages": [{"role": "user", "content": "x"}]}, timeout=60)
        assert answer.status_code == 429 and answer.json()["error"]["code"] == "accounts_paced"
        assert len(arena.chat_requests()) == 1
    finally:
        proc.stop()
