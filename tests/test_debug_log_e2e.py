"""End to end: BRIDGE_LOG_LEVEL=debug traces each client request and each request to LM Arena, and never
a secret (issue 19, #8). reCAPTCHA is on, so the sidecar's Chromium mints a real token for the chat."""
import os
import re
import shutil

import httpx
import pytest
from emulator.accounts import decode_session
from harness import BridgeProcess

BROWSER = os.environ.get("BRIDGE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium binary found")

PASSWORD = "debug-log-admin-password"


@pytest.fixture(scope="module")
def traced(arena, tmp_path_factory):
    """A debug bridge after one dashboard sign-in and one chat: its log, and every secret the test made."""
    arena.reset()
    folder = tmp_path_factory.mktemp("debug")
    proc = BridgeProcess(arena.url, str(folder), sidecar="auto",
                         env={"BRIDGE_LOG_LEVEL": "debug", "BRIDGE_BROWSER": BROWSER,
                              "BRIDGE_SIDECAR_SOCKET": str(folder / "s.sock"), "BRIDGE_ADMIN_PASSWORD": PASSWORD})
    proc.start()
    try:
        proc.wait_for_models()
        cookie = arena.new_session()
        [account] = proc.set_accounts(cookie)
        key = proc.store.create_key("tracer", 100)
        assert httpx.post(proc.url + "/login", data={"password": PASSWORD}, timeout=30).status_code == 303
        chat = httpx.post(proc.url + "/v1/chat/completions", timeout=90, headers={"Authorization": f"Bearer {key[1]}"},
                          json={"model": "gemini-3-pro", "messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 200, chat.text
        token = arena.chat_requests()[-1]["json"]["recaptchaV3Token"]
    finally:
        proc.stop()
    session = decode_session(cookie)
    assert session is not None
    secrets = {"API key": key[1], "account cookie": cookie, "access token": session["access_token"],
               "refresh token": session["refresh_token"], "admin password": PASSWORD, "reCAPTCHA token": token}
    return {"log": proc.log(), "account": account, "key_id": key[0], "secrets": secrets}


def test_debug_logs_one_line_per_client_request_with_status_time_and_key_name(traced):
    lines = [line for line in traced["log"].splitlines() if "client POST /v1/chat/completions" in line]
    assert len(lines) == 1 and "DEBUG" in lines[0]
    assert re.search(rf"-> 200 in \d+ ms, key {traced['key_id']} \(tracer\)$", lines[0]), lines[0]


def test_debug_logs_one_line_per_upstream_request_with_status_time_and_account(traced):
    lines = [line for line in traced["log"].splitlines() if "upstream POST /nextjs-api/stream/create-evaluation" in line]
    assert len(lines) == 1 and "DEBUG" in lines[0]
    assert re.search(rf"-> 200 in \d+ ms, account {traced['account']} \(", lines[0]), lines[0]


def test_debug_logs_hold_no_secret(traced):
    assert len(traced["secrets"]["reCAPTCHA token"]) > 20
    leaked = [name for name, secret in traced["secrets"].items() if secret in traced["log"]]
    assert leaked == []
