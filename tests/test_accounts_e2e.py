"""Arena accounts through the real bridge and emulator: rotation, refresh, cool-downs, site changes."""
import concurrent.futures
import subprocess
import sys
import time

import httpx
import pytest
from harness import ROOT, BridgeProcess

import bridge

GOOD = {"model": "gemini-3-pro", "messages": [{"role": "user", "content": "x"}]}


def post(proc, key, body=GOOD):
    return httpx.post(proc.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"})


def content(response):
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def account_row(proc, account_id):
    return proc.store.account(account_id)


def test_rate_limited_account_hands_the_request_to_the_other(fresh, api_key, arena):
    limited, spare = arena.new_session(), arena.new_session()
    ids = fresh.set_accounts(limited, spare)
    arena.fault(times=5, status=429, headers={"retry-after": "30"}, body={"error": "Too Many Requests"},
                user=arena.session_user(limited))
    assert content(post(fresh, api_key)) == "turn 1: x"
    row = account_row(fresh, ids[0])
    assert row["state"] == "cooling_down" and 25 < row["cooldown_until"] - time.time() <= 30
    assert len(arena.chat_requests()) == 2


def test_cooled_down_account_is_skipped_without_an_upstream_request(fresh, api_key, arena):
    limited, spare = arena.new_session(), arena.new_session()
    fresh.set_accounts(limited, spare)
    arena.fault(times=1, status=429, headers={"retry-after": "30"}, user=arena.session_user(limited))
    post(fresh, api_key)
    arena.clear_log()
    assert content(post(fresh, api_key)) == "turn 1: x"
    assert [r["cookies"]["arena-auth-prod-v1"] for r in arena.chat_requests()] == [spare]


def test_when_every_account_cools_down_the_answer_is_fast_with_retry_after(fresh, api_key, arena):
    arena.fault(times=1, status=429, headers={"retry-after": "600"}, body={"error": "Too Many Requests"})
    first = post(fresh, api_key)
    assert first.status_code == 503 and int(first.headers["retry-after"]) >= 590
    assert first.headers["x-should-retry"] == "false"
    arena.clear_log()
    started = time.perf_counter()
    second = post(fresh, api_key)
    assert time.perf_counter() - started < 1.0
    assert second.status_code == 503 and second.json()["error"]["code"] == "accounts_cooling_down"
    assert 590 <= int(second.headers["retry-after"]) <= 600 and arena.chat_requests() == []


def test_short_cool_down_allows_client_retries(fresh, api_key, arena):
    arena.fault(times=1, status=429, headers={"retry-after": "5"})
    response = post(fresh, api_key)
    assert response.status_code == 503 and int(response.headers["retry-after"]) <= 5
    assert "x-should-retry" not in response.headers


def test_a_429_with_retry_after_zero_cools_down_briefly_not_for_the_default_minute(fresh, api_key, arena):
    [account_id] = fresh.set_accounts(arena.new_session())
    arena.fault(times=1, status=429, headers={"retry-after": "0"}, body={"error": "Too Many Requests"})
    assert post(fresh, api_key).status_code == 503
    assert 0 < account_row(fresh, account_id)["cooldown_until"] - time.time() <= bridge.RETRY_AFTER_LEAST


def test_expired_session_is_refreshed_by_the_page_before_sending(fresh, api_key, arena):
    expired = arena.new_session(lifetime=-60)
    [account_id] = fresh.set_accounts(expired)
    assert content(post(fresh, api_key)) == "turn 1: x"
    stored = account_row(fresh, account_id)["auth"]
    assert stored != expired and not bridge.Session(stored).expired()
    assert arena.session_user(stored) == arena.session_user(expired)
    assert len(arena.chat_requests()) == 1


def test_refreshed_session_may_come_back_chunked(fresh, api_key, arena):
    arena.configure(refresh_cookie_form="chunks")
    [account_id] = fresh.set_accounts(arena.new_session(lifetime=-60))
    assert content(post(fresh, api_key)) == "turn 1: x"
    assert account_row(fresh, account_id)["form"] == "chunks"
    assert "arena-auth-prod-v1.0" in arena.chat_requests()[0]["cookies"]


def test_401_is_refreshed_through_the_supabase_grant_when_the_page_cannot(fresh, api_key, arena):
    value = arena.new_session()
    [account_id] = fresh.set_accounts(value)
    arena.expire_session(value)
    arena.fault(times=1, path="page", status=500)
    assert content(post(fresh, api_key)) == "turn 1: x"
    assert any(r["path"].startswith("/auth/v1/token") for r in arena.requests)
    assert account_row(fresh, account_id)["auth"] != value


def test_account_whose_refresh_fails_is_marked_expired(fresh, api_key, arena):
    value = arena.new_session()
    [account_id] = fresh.set_accounts(value)
    arena.expire_session(value)
    arena.fault(times=1, path="page", status=500)
    arena.fault(times=1, path="refresh", status=400, body={"error_code": "refresh_token_not_found"})
    response = post(fresh, api_key)
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_usable_account"
    row = account_row(fresh, account_id)
    assert row["state"] == "expired" and "refresh" in row["last_error"]


def test_concurrent_requests_during_a_refresh_keep_one_valid_session(fresh, api_key, arena):
    expired = arena.new_session(lifetime=-60)
    [account_id] = fresh.set_accounts(expired)
    arena.fault(times=100, path="page", status=500)   # force the refresh grant, which rotates refresh tokens
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: post(fresh, api_key), range(8)))
    assert [r.status_code for r in replies] == [200] * 8
    refreshes = [r for r in arena.requests if r["path"].startswith("/auth/v1/token")]
    assert len(refreshes) == 1
    stored = account_row(fresh, account_id)["auth"]
    assert arena.session_user(stored) and not bridge.Session(stored).expired()
    assert content(post(fresh, api_key)) == "turn 1: x"


def test_split_cookie_input_is_sent_back_as_chunks(fresh, api_key, arena):
    value = arena.new_session(big=True)
    chunks = arena.split_session(value)
    fresh.set_accounts("; ".join(f"arena-auth-prod-v1.{i}={c}" for i, c in enumerate(chunks)))
    assert content(post(fresh, api_key)) == "turn 1: x"
    cookies = arena.chat_requests()[0]["cookies"]
    assert "arena-auth-prod-v1" not in cookies and "".join(cookies[f"arena-auth-prod-v1.{i}"] for i in range(len(chunks))) == value


def test_cookie_header_input_sends_its_cloudflare_cookies(fresh, api_key, arena):
    value = arena.new_session()
    fresh.set_accounts(f"Cookie: _cfuvid=visitor; arena-auth-prod-v1={value}; sidebar_state=true")
    assert content(post(fresh, api_key)) == "turn 1: x"
    cookies = arena.chat_requests()[0]["cookies"]
    assert cookies["_cfuvid"] == "visitor" and cookies["arena-auth-prod-v1"] == value and "sidebar_state" not in cookies


def test_tokens_list_and_health_show_state_without_secrets(fresh, api_key, arena):
    value = arena.new_session()
    fresh.set_accounts(value)
    arena.fault(times=1, status=429, headers={"retry-after": "900"})
    post(fresh, api_key)
    listing = subprocess.run([sys.executable, f"{ROOT}/bridge.py", "--db", fresh.db, "tokens", "list"],
                             capture_output=True, text=True, check=True).stdout
    assert "cooling down until" in listing and value[:30] not in listing
    health = httpx.get(fresh.url + "/api/v1/health", headers={"Authorization": f"Bearer {api_key}"}).json()
    item = health["checks"]["accounts"]["items"][0]
    assert health["status"] == "degraded" and item["state"] == "cooling_down" and item["cooldown_until"] > time.time()
    assert value[:30] not in str(health)


def test_health_without_credentials_says_only_the_status_and_counts(fresh, arena):
    [account_id] = fresh.set_accounts(arena.new_session())
    fresh.store.update_account(account_id, label="alice's work account", last_error="reCAPTCHA failed")
    health = httpx.get(fresh.url + "/api/v1/health").json()
    assert health == {"status": health["status"], "checks": {"accounts": {"usable": 1, "total": 1},
                                                             "models": {"known": health["checks"]["models"]["known"]},
                                                             "browser_executors": {"connected": 0}}}
    assert "alice" not in str(health) and "reCAPTCHA" not in str(health)


def test_health_shows_each_account_with_an_api_key_or_a_dashboard_session(fresh, api_key, arena):
    [account_id] = fresh.set_accounts(arena.new_session())
    fresh.store.update_account(account_id, label="alice's work account")
    fresh.store.create_admin_session(bridge.sha256_hex("signed-in"), "csrf", time.time() + 60)
    for credentials in ({"headers": {"Authorization": f"Bearer {api_key}"}},
                        {"cookies": {bridge.SESSION_COOKIE: "signed-in"}}):
        checks = httpx.get(fresh.url + "/health", **credentials).json()["checks"]
        assert checks["accounts"]["items"][0]["label"] == "alice's work account" and "state" in checks["sidecar"]
    assert "items" not in httpx.get(fresh.url + "/health", headers={"Authorization": "Bearer sk-wrong"}).json()["checks"]["accounts"]


@pytest.fixture
def direct_mode_bridge(arena, tmp_path):
    proc = BridgeProcess(arena.url, str(tmp_path), args=("--arena-mode", "direct")).start()
    try:
        proc.wait_for_models()
        arena.reset()
        arena.configure(recaptcha="off", mode_policy="no_direct")
        proc.set_accounts(arena.new_session())
        yield proc
    finally:
        proc.stop()


def test_mode_rejection_switches_mode_and_remembers_it(direct_mode_bridge, arena):
    key = direct_mode_bridge.create_key()
    assert content(post(direct_mode_bridge, key)) == "turn 1: x"
    assert [r["json"]["mode"] for r in arena.chat_requests()] == ["direct", "direct-battle"]
    arena.clear_log()
    assert content(post(direct_mode_bridge, key)) == "turn 1: x"
    assert [r["json"]["mode"] for r in arena.chat_requests()] == ["direct-battle"]


def test_a_301_from_the_legacy_host_switches_the_origin_and_resends(arena, tmp_path):
    arena.reset()
    arena.configure(recaptcha="off", legacy_redirect=True)
    proc = BridgeProcess(arena.url + "/__legacy", str(tmp_path)).start()
    try:
        proc.wait_for_models()
        proc.set_accounts(arena.new_session())
        arena.clear_log()
        assert content(post(proc, proc.create_key())) == "turn 1: x"
        [chat] = arena.chat_requests()
        assert chat["path"] == "/nextjs-api/stream/create-evaluation" and chat["method"] == "POST"
        assert proc.store.site_params()["moved_origin"] == {"from": arena.url + "/__legacy", "to": arena.url}
    finally:
        proc.stop()


def test_a_session_the_site_rotates_in_a_reply_is_kept(fresh, api_key, arena):
    value = arena.new_session()
    [account_id] = fresh.set_accounts(value)
    arena.configure(rotate_on_chat=True)
    assert content(post(fresh, api_key)) == "turn 1: x"
    rotated = account_row(fresh, account_id)["auth"]
    assert rotated != value and arena.session_user(rotated) == arena.session_user(value)
    arena.configure(rotate_on_chat=False)
    arena.expire_session(rotated)
    arena.fault(times=1, path="page", status=500)        # the rotated refresh token must still work
    assert content(post(fresh, api_key)) == "turn 1: x"
