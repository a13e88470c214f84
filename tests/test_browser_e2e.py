"""Through the real bridge with its real sidecar and a real headless Chromium: reCAPTCHA tokens,
Cloudflare clearance, anonymous accounts and in-page fetch (issues: sidecar, accounts, zero setup)."""
import os
import shutil
import signal
import stat
import time

import httpx
import pytest
from harness import BridgeProcess, upstream_aborted

BROWSER = os.environ.get("BRIDGE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium binary found")

GOOD = {"model": "gemini-3-pro", "messages": [{"role": "user", "content": "x"}]}


def post(proc, key, body=GOOD, timeout=60):
    return httpx.post(proc.url + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"})


def content(response):
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def start_bridge(arena, folder, site_params=None, **env):
    """A bridge with its sidecar; `site_params` are what it knows of the site before it starts."""
    proc = BridgeProcess(arena.url, str(folder), sidecar="auto",
                         env={"BRIDGE_BROWSER": BROWSER, "BRIDGE_SIDECAR_SOCKET": str(folder / "s.sock"), **env},
                         args=("--ping-interval", "0.5"))
    if site_params:
        proc.store.set_site_params(**site_params)
    proc.start()
    proc.wait_for_models()
    return proc


@pytest.fixture(scope="module")
def browser_bridge(arena, tmp_path_factory):
    proc = start_bridge(arena, tmp_path_factory.mktemp("browser"))
    yield proc
    proc.stop()


@pytest.fixture
def bb(arena, browser_bridge):
    """The browser bridge with default emulator knobs (reCAPTCHA required) and one fresh account. The knobs
    are reset afterwards too: a bridge started by a later test (a Cloudflare challenge left on would stop
    its discovery) must not depend on the order the tests ran in."""
    arena.reset()
    browser_bridge.set_accounts(arena.new_session())
    yield browser_bridge
    arena.reset()


@pytest.fixture
def key(bb):
    return bb.create_key()


def sidecar_pid(proc):
    return proc.health()["checks"]["sidecar"].get("pid")


def test_models_and_health_never_start_the_browser(arena, tmp_path):
    proc = start_bridge(arena, tmp_path)
    try:
        key = proc.create_key()
        assert httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert proc.health()["checks"]["sidecar"]["state"] == "stopped"
        assert not os.path.exists(tmp_path / "s.sock")
    finally:
        proc.stop()


def test_chat_needing_a_token_starts_the_sidecar_and_succeeds(bb, key, arena):
    assert content(post(bb, key)) == "turn 1: x"
    token = arena.chat_requests()[0]["json"]["recaptchaV3Token"]
    assert token.startswith("0cAFcWeA")
    assert bb.health()["checks"]["sidecar"]["state"] == "running"
    assert stat.S_IMODE(os.stat(bb.folder + "/s.sock").st_mode) == 0o600


def test_a_recaptcha_failure_is_retried_on_another_account_with_a_different_token(bb, key, arena):
    """The refused account is not asked again: during a penalty every attempt would extend it (U2)."""
    refused, other = bb.set_accounts(arena.new_session(), arena.new_session())
    arena.configure(recaptcha_fail_next=1)
    assert content(post(bb, key)) == "turn 1: x"
    first, second = arena.chat_requests()
    assert first["status"] == 403 and second["status"] == 200
    assert first["json"]["recaptchaV3Token"] != second["json"]["recaptchaV3Token"]
    assert bb.store.account(refused)["state"] == "cooling_down" and bb.store.account(other)["state"] == "ok"


def test_repeated_recaptcha_failure_cools_the_account_down_and_answers_fast(bb, key, arena):
    arena.configure(recaptcha_fail_always=True)
    first = post(bb, key)
    assert first.status_code == 503 and int(first.headers["retry-after"]) >= 1100
    assert first.headers["x-should-retry"] == "false"
    assert len(arena.chat_requests()) <= 3
    arena.clear_log()
    started = time.perf_counter()
    second = post(bb, key)
    assert time.perf_counter() - started < 1.0 and second.status_code == 503 and arena.chat_requests() == []
    [account] = bb.store.accounts()
    assert account["state"] == "cooling_down" and "reCAPTCHA" in account["cooldown_reason"]


def test_sitekey_rotation_heals_without_a_restart(bb, key, arena):
    assert content(post(bb, key)) == "turn 1: x"
    arena.rotate_sitekey()
    time.sleep(2.1)   # discovery is rate-limited to one page load per 2 s while failures come in
    arena.clear_log()
    assert content(post(bb, key)) == "turn 1: x"
    assert bb.store.site_params()["sitekey"] == arena.sitekey
    assert len(arena.chat_requests()) <= 2


def challenge_the_next_chat(bb, key, arena, **knobs):
    """The sidecar's page loaded before the challenge is switched on, so that the chat itself meets it first
    (a page loaded behind it would clear it before the chat is sent, as when this test runs alone)."""
    assert content(post(bb, key)) == "turn 1: x"
    arena.configure(cloudflare=True, **knobs)
    arena.clear_log()


def test_cloudflare_interstitial_is_passed_and_the_chat_retried_with_its_user_agent(bb, key, arena):
    challenge_the_next_chat(bb, key, arena)
    assert content(post(bb, key)) == "turn 1: x"
    blocked, passed = [r for r in arena.chat_requests()][-2:]
    assert blocked["status"] == 403 and passed["status"] == 200
    assert "cf_clearance" in passed["cookies"] and "Headless" not in passed["headers"]["user-agent"]


def test_an_interactive_cloudflare_challenge_is_clicked_through_and_the_chat_retried(bb, key, arena):
    challenge_the_next_chat(bb, key, arena, cloudflare_interactive=True)
    assert content(post(bb, key)) == "turn 1: x"
    blocked, passed = arena.chat_requests()
    assert blocked["status"] == 403 and passed["status"] == 200 and "cf_clearance" in passed["cookies"]
    [solve] = [e for e in arena.requests if e["path"] == "/cdn-cgi/challenge-platform/solve"]
    assert solve["status"] == 200 and solve["headers"]["user-agent"] == passed["headers"]["user-agent"]


def test_killing_the_sidecar_mid_run_restarts_it_on_the_next_request(bb, key, arena):
    assert content(post(bb, key)) == "turn 1: x"
    killed = sidecar_pid(bb)
    os.kill(killed, signal.SIGKILL)
    time.sleep(0.5)
    for _ in range(3):      # the first ones may still be served from the token pool
        assert content(post(bb, key)) == "turn 1: x"
    assert bb.health()["checks"]["sidecar"]["state"] == "running"
    assert sidecar_pid(bb) not in (None, killed)


def test_a_sidecar_that_never_answers_becomes_a_503_within_the_timeout(arena, tmp_path):
    hang = tmp_path / "hang-browser"
    hang.write_text("#!/bin/sh\nsleep 600\n")
    hang.chmod(0o755)
    arena.reset()
    proc = start_bridge(arena, tmp_path, BRIDGE_BROWSER=str(hang), BRIDGE_SIDECAR_TIMEOUT="3")
    try:
        proc.set_accounts(arena.new_session())
        started = time.perf_counter()
        response = post(proc, proc.create_key())
        assert response.status_code == 503 and response.json()["error"]["code"] == "sidecar_unavailable"
        assert time.perf_counter() - started < 8
    finally:
        proc.stop()


def test_sidecar_off_explains_that_a_token_was_needed(fresh, api_key, arena):
    arena.configure(recaptcha="required")
    response = post(fresh, api_key)
    assert response.status_code in (502, 503)
    assert "reCAPTCHA" in response.json()["error"]["message"] or "recaptcha" in response.json()["error"]["message"]


def test_a_bridge_with_no_account_answers_through_an_anonymous_account(arena, tmp_path):
    arena.reset()
    proc = start_bridge(arena, tmp_path)
    try:
        assert content(post(proc, proc.create_key())) == "turn 1: x"
        [account] = proc.store.accounts()
        assert account["kind"] == "anonymous"
        assert any(r["path"] == "/nextjs-api/sign-up" and r["status"] == 200 for r in arena.requests)
    finally:
        proc.stop()


def test_a_failed_sign_up_is_a_clear_503_and_is_not_retried_in_a_loop(arena, tmp_path):
    arena.reset()
    arena.configure(signup_fail=500)
    proc = start_bridge(arena, tmp_path)
    try:
        key = proc.create_key()
        first = post(proc, key)
        assert first.status_code == 503 and "anonymous" in first.json()["error"]["message"]
        second = post(proc, key)
        assert second.status_code == 503 and int(second.headers["retry-after"]) > 60
        assert len([r for r in arena.requests if r["path"] == "/nextjs-api/sign-up"]) == 1
    finally:
        proc.stop()


def test_context_bound_tokens_switch_to_in_page_fetch_which_streams_line_by_line(arena, tmp_path):
    """A bridge that has seen the direct path work meets tokens bound to the page (U1): one refused direct
    attempt cools that account down (U2) and moves every chat into the page, for good."""
    bb = start_bridge(arena, tmp_path, site_params={"request_path": "direct"})
    try:
        arena.reset()
        bb.set_accounts(arena.new_session(), arena.new_session())
        key = bb.create_key()
        arena.configure(context_bound_tokens=True, lines=30, line_delay=0.1)
        started = time.perf_counter()
        arrivals = []
        with httpx.stream("POST", bb.url + "/v1/chat/completions", json={**GOOD, "stream": True}, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if '"content":"line' in line:
                    arrivals.append((time.perf_counter() - started, line))
        assert len(arrivals) == 30 and "line 30" in arrivals[-1][1]
        assert arrivals[-1][0] - arrivals[0][0] > 2.0      # the first lines came long before the last was produced
        refused, served = bb.store.accounts()
        assert refused["state"] == "cooling_down" and refused["needs_browser"] == 1 and served["needs_browser"] == 0
        assert bb.store.site_params()["request_path"] == "page"
        assert bb.health()["checks"]["accounts"]["items"][0]["needs_browser"] == 1
        arena.clear_log()
        arena.configure(lines=0, line_delay=0)
        assert content(post(bb, key)) == "turn 1: x"
        assert len(arena.chat_requests()) == 1           # remembered: straight to the page, no failed direct try
    finally:
        bb.stop()


def test_a_browser_model_goes_in_page_without_moving_its_account_to_the_page(arena, tmp_path):
    proc = start_bridge(arena, tmp_path, BRIDGE_BROWSER_MODELS="gemini-3-pro")
    try:
        arena.reset()
        [account_id] = proc.set_accounts(arena.new_session())
        key = proc.create_key()
        arena.configure(context_bound_tokens=True)      # only the page's own tokens pass: a direct try would fail
        assert content(post(proc, key)) == "turn 1: x"
        assert [r["status"] for r in arena.chat_requests()] == [200]
        assert proc.store.account(account_id)["needs_browser"] == 0
        arena.configure(context_bound_tokens=False)
        assert content(post(proc, key, {**GOOD, "model": "grok-4.1"})) == "turn 1: x"
        assert proc.store.account(account_id)["needs_browser"] == 0
    finally:
        proc.stop()


def test_client_disconnect_aborts_the_in_page_request(bb, key, arena):
    arena.configure(context_bound_tokens=True)
    assert content(post(bb, key)) == "turn 1: x"            # learn that this account needs the page
    arena.configure(lines=400, line_delay=0.05)
    arena.clear_log()
    bb.abandon_stream(key, GOOD, after="line 3")
    assert upstream_aborted(arena, timeout=8)


def test_a_client_that_leaves_before_the_first_byte_aborts_the_in_page_request(bb, key, arena):
    arena.configure(context_bound_tokens=True)
    assert content(post(bb, key)) == "turn 1: x"            # learn that this account needs the page
    arena.configure(first_byte_delay=60)
    arena.clear_log()
    received, closed = bb.hang_up(key, "/v1/chat/completions", {**GOOD, "stream": True}, after=0.2)
    assert received == b"" and upstream_aborted(arena, timeout=8)
    [aborted] = [r for r in arena.chat_requests() if r.get("aborted")]
    assert aborted["aborted_at"] - closed < 3


def test_concurrent_in_page_requests_each_carry_their_own_account(bb, key, arena):
    import concurrent.futures
    ids = bb.set_accounts(arena.new_session(), arena.new_session())
    for account_id in ids:
        bb.store.update_account(account_id, needs_browser=1, direct_retry_at=time.time() + 600)
    arena.configure(context_bound_tokens=True, line_delay=0.02)

    def conversation(n):
        first = [{"role": "user", "content": f"chat {n}"}]
        reply = content(post(bb, key, {**GOOD, "messages": first}))
        second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
        return content(post(bb, key, {**GOOD, "messages": second}))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(conversation, range(4))) == ["turn 2: again"] * 4
    follow_ups = [r for r in arena.chat_requests() if "post-to-evaluation" in r["path"]]
    assert len(follow_ups) == 4 and all(r["status"] == 200 for r in follow_ups)
    owners = {arena.session_user(r["cookies"]["arena-auth-prod-v1"]) for r in arena.chat_requests()}
    assert len(owners) == 2


def test_a_session_rotated_during_an_in_page_fetch_is_kept(bb, key, arena):
    [account_id] = bb.set_accounts(value := arena.new_session())
    bb.store.update_account(account_id, needs_browser=1, direct_retry_at=time.time() + 600)
    arena.configure(context_bound_tokens=True, rotate_on_chat=True)
    assert content(post(bb, key)) == "turn 1: x"
    rotated = bb.store.account(account_id)["auth"]
    assert rotated != value and arena.session_user(rotated) == arena.session_user(value)
