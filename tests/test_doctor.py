"""The doctor's pure parts (SPEC §9): redaction of saved runs, the step table and its runner, the verdict
of each step, and the README anchors its lines point to."""
import asyncio
import base64
import json
import os
import re
import time

import pytest

import bridge as dx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(claims: dict) -> str:
    return "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9." + b64(json.dumps(claims).encode()) + "." + b64(b"s" * 64)


ACCESS = jwt({"sub": "1f0c-user", "email": "jane@example.com", "exp": 1900000000, "role": "authenticated"})
ANON_KEY = jwt({"iss": "supabase", "ref": "projectref", "role": "anon"})
REFRESH = "m4x2kq9r7ztp"
SESSION = "base64-" + b64(json.dumps({"access_token": ACCESS, "refresh_token": REFRESH, "expires_at": 1900000000,
                                      "user": {"email": "jane@example.com"}, "pad": "x" * 4000}).encode())
CHUNK0, CHUNK1 = SESSION[:3180], SESSION[3180:]
RECAPTCHA = "0cAFcWeA" + "Q" * 1500
TURNSTILE = "0." + "T" * 60 + "." + "m" * 43 + "." + "f" * 64
API_KEY = "sk-arena-0123456789abcdefABCDEF"
CLEARANCE = "Zt4.kq_9-1764600000-1.2.1.1-abcDEF"
PRESIGNED = ("https://bucket.r2.cloudflarestorage.com/u/x.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE%2F20251201%2Fauto%2Fs3%2Faws4_request&X-Amz-Date=20251201T000000Z"
             "&X-Amz-Expires=3600&X-Amz-Signature=9f86d081884c7d659a2feaa0c55ad015&X-Amz-SignedHeaders=host")


def assert_gone(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


# --- redaction, one kind of secret per test ------------------------------------------------------------

def test_whole_session_cookie_is_removed_from_cookie_headers_and_bodies():
    header = dx.redact_header("Cookie", f"sidebar=1; arena-auth-prod-v1={SESSION}; theme=dark")
    assert header == "sidebar=REDACTED; arena-auth-prod-v1=REDACTED; theme=REDACTED"
    body = dx.redact_text(f'<script>document.cookie="arena-auth-prod-v1={SESSION}; path=/"</script>')
    assert_gone(body, SESSION, CHUNK1, ACCESS, REFRESH)


def test_split_session_cookies_are_removed_including_the_bare_second_chunk():
    text = dx.redact_text(f"arena-auth-prod-v1.0={CHUNK0}; arena-auth-prod-v1.1={CHUNK1}")
    assert text == "arena-auth-prod-v1.0=REDACTED; arena-auth-prod-v1.1=REDACTED"
    set_cookie = dx.redact_header("set-cookie", f"arena-auth-prod-v1.1={CHUNK1}; Path=/; Max-Age=34560000")
    assert set_cookie == "arena-auth-prod-v1.1=REDACTED; Path=/; Max-Age=34560000"


def test_a_session_value_anywhere_in_a_text_is_removed():
    assert_gone(dx.redact_text(json.dumps({"value": SESSION})), SESSION, CHUNK0, CHUNK1)


def test_jwts_lose_every_claim_but_their_role():
    text = dx.redact_text(f'{{"anon":"{ANON_KEY}","user":"{ACCESS}"}}')
    assert_gone(text, ANON_KEY, ACCESS, "1f0c-user", "jane@example.com", "projectref")
    tokens = re.findall(r"eyJ[\w-]*\.eyJ[\w-]*\.[\w-]*", text)
    roles = [json.loads(base64.urlsafe_b64decode(t.split(".")[1] + "==")).get("role") for t in tokens]
    assert roles == ["anon", "authenticated"]


def test_refresh_tokens_are_removed_from_json_and_forms():
    assert REFRESH not in dx.redact_text(json.dumps({"refresh_token": REFRESH, "grant_type": "refresh_token"}))
    assert REFRESH not in dx.redact_text(f"grant_type=refresh_token&refresh_token={REFRESH}")


def test_escaped_fields_inside_flight_data_are_removed():
    flight = json.dumps(json.dumps({"refresh_token": REFRESH, "email": "jane@example.com"}))
    assert_gone(dx.redact_text(flight), REFRESH, "jane@example.com")


def test_recaptcha_and_turnstile_tokens_are_removed_by_field_and_by_shape():
    body = json.dumps({"recaptchaV3Token": "short-but-secret", "turnstileToken": "tt-secret-value"})
    assert_gone(dx.redact_text(body), "short-but-secret", "tt-secret-value")
    assert_gone(dx.redact_text(f"minted {RECAPTCHA} and {TURNSTILE}"), RECAPTCHA, TURNSTILE, "Q" * 40)


def test_api_keys_are_removed_from_headers_and_text():
    assert dx.redact_header("Authorization", f"Bearer {API_KEY}") == "REDACTED"
    assert_gone(dx.redact_text(f"curl -H 'Authorization: Bearer {API_KEY}' and key {API_KEY}"), API_KEY)


def test_presigned_urls_keep_their_expiry_and_lose_signature_and_credential():
    url = dx.redact_text(PRESIGNED)
    assert_gone(url, "9f86d081884c7d659a2feaa0c55ad015", "AKIAEXAMPLE")
    assert "X-Amz-Expires=3600" in url and "X-Amz-Date=20251201T000000Z" in url


def test_emails_are_removed():
    text = dx.redact_text('{"email":"jane@example.com","note":"write to j.doe+arena@mail.example.co.uk"}')
    assert_gone(text, "jane@example.com", "j.doe+arena@mail.example.co.uk")


def test_cloudflare_clearance_is_removed_from_cookies_and_text():
    assert CLEARANCE not in dx.redact_header("Cookie", f"cf_clearance={CLEARANCE}; __cf_bm=bm-value")
    assert CLEARANCE not in dx.redact_header("Set-Cookie", f"cf_clearance={CLEARANCE}; Domain=.arena.ai")
    assert CLEARANCE not in dx.redact_text(json.dumps({"cookies": f"cf_clearance={CLEARANCE}"}))


def test_registered_secrets_of_any_shape_are_removed_verbatim_and_percent_encoded():
    opaque = "opaque/secret value+42"
    text = dx.redact_text(f"a={opaque} b={opaque.replace('/', '%2F').replace(' ', '%20').replace('+', '%2B')}",
                          known=[opaque])
    assert "secret" not in text


def test_binary_bodies_pass_unchanged():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    assert dx.redact_bytes(png) == png


def test_ordinary_page_text_is_left_alone():
    page = ('<script src="/_next/static/chunks/app-4f3a.js?dpl=dpl_X"></script>'
            '<script src="/recaptcha/enterprise.js?render=6LeTGMcsAAAAALuIlkVwIxaAuZA8VledA6d3Nnb0"></script>'
            'createServerReference)("7f1d2c3b4a59687766554433221100ffeeddccbbaa",s.callServer,void 0,'
            's.findSourceMapURL,"generateUploadUrl")')
    assert dx.redact_text(page) == page


# --- the recorder -------------------------------------------------------------------------------------

def recorded_run() -> dx.Recorder:
    recorder = dx.Recorder()
    recorder.secret(SESSION, API_KEY, RECAPTCHA, CLEARANCE)
    recorder.add(dx.Exchange(
        "chat", "POST", "https://arena.ai/nextjs-api/stream/create-evaluation", 200,
        [("Cookie", f"arena-auth-prod-v1.0={CHUNK0}; arena-auth-prod-v1.1={CHUNK1}; cf_clearance={CLEARANCE}"),
         ("Content-Type", "text/plain;charset=UTF-8")],
        json.dumps({"modelAId": "m", "recaptchaV3Token": RECAPTCHA}).encode(),
        [("set-cookie", f"arena-auth-prod-v1={SESSION}; Path=/"), ("content-type", "text/event-stream")],
        b'a0:"Hello"\nad:{"finishReason":"stop"}\n', 0.25))
    recorder.add(dx.Exchange("images", "PUT", PRESIGNED, 200, [], b"\x89PNG\r\n\x1a\n", [], b""))
    return recorder


def test_a_saved_run_holds_no_secret_it_was_given():
    files = recorded_run().files({"doctor": [], "secret_note": f"key {API_KEY}"})
    blob = b"\n".join(files.values())
    for secret in (SESSION, CHUNK0, CHUNK1, ACCESS, REFRESH, API_KEY, RECAPTCHA, CLEARANCE,
                   "9f86d081884c7d659a2feaa0c55ad015", "jane@example.com"):
        assert secret.encode() not in blob


def test_a_saved_run_keeps_the_layout_of_the_real_captures_and_a_manifest():
    files = recorded_run().files({"doctor": [{"step": "chat", "status": "ok"}]})
    manifest = json.loads(files["manifest.json"])
    assert [e["file"] for e in manifest["entries"]] == ["000-chat-nextjs-api-stream-create-evaluation.body",
                                                         "001-images-u-x.png.body"]
    assert dx.exchange_slug(8, dx.Exchange("image upload", "POST", "https://arena.ai/?mode=direct", 200, [], b"", [],
                                           b"")) == "008-image-upload-page"
    meta = json.loads(files["000-chat-nextjs-api-stream-create-evaluation.meta.json"])
    assert meta["status"] == 200 and meta["method"] == "POST"
    assert ["content-type", "text/event-stream"] in meta["response_headers"]
    assert files["000-chat-nextjs-api-stream-create-evaluation.body"] == b'a0:"Hello"\nad:{"finishReason":"stop"}\n'
    assert files["001-images-u-x.png.body"] == b""


# --- the runner -----------------------------------------------------------------------------------------

class Probe:
    """Steps whose outcome a test sets, recording the order they ran in."""

    def __init__(self, outcomes: dict[str, str]):
        self.outcomes = outcomes
        self.ran: list[str] = []
        self.begun: list[str] = []

    def begin(self, name: str) -> None:
        self.begun.append(name)

    def step(self, name: str):
        async def run(probe: "Probe") -> list[dx.Finding]:
            probe.ran.append(name)
            outcome = probe.outcomes.get(name, "ok")
            if outcome == "raise":
                raise RuntimeError("boom")
            return [dx.Finding(name, status, name) for status in outcome.split(",")]
        return run


def table(probe: Probe) -> list[dx.Step]:
    return [dx.Step("origin", (), probe.step("origin")),
            dx.Step("page", ("origin",), probe.step("page")),
            dx.Step("account", ("origin",), probe.step("account")),
            dx.Step("chat", ("page", "account"), probe.step("chat")),
            dx.Step("image upload", ("account",), probe.step("image upload"), option="images")]


def run(outcomes: dict[str, str], options=()) -> tuple[Probe, list[dx.Finding]]:
    probe = Probe(outcomes)
    return probe, asyncio.run(dx.run_steps(table(probe), probe, options))


def test_steps_run_once_each_in_table_order():
    probe, findings = run({})
    assert probe.ran == probe.begun == ["origin", "page", "account", "chat"]
    assert [f.status for f in findings] == ["ok"] * 4


def test_each_line_is_handed_on_as_soon_as_its_step_ends():
    probe, seen = Probe({"account": "ok,skipped"}), []

    def emit(finding):
        seen.append((finding.step, list(probe.ran)))

    asyncio.run(dx.run_steps(table(probe), probe, (), emit))
    assert seen[1:3] == [("page", ["origin", "page"]), ("account", ["origin", "page", "account"])]
    assert len(seen) == 5


def test_a_failed_origin_skips_every_step_that_needs_it_and_says_why():
    probe, findings = run({"origin": "failed"})
    assert probe.ran == ["origin"]
    assert [(f.step, f.status) for f in findings[1:]] == [("page", "skipped"), ("account", "skipped"),
                                                          ("chat", "skipped")]
    assert findings[1].detail == "not tried: origin did not pass"


def test_one_ok_line_is_enough_for_a_multi_line_step_to_pass():
    assert "chat" in run({"account": "skipped,failed,ok"})[0].ran


def test_a_step_with_no_ok_line_blocks_its_dependents():
    probe, findings = run({"account": "skipped,failed"})
    assert "chat" not in probe.ran and findings[-1].detail == "not tried: account did not pass"


def test_optional_steps_run_only_when_asked():
    assert "image upload" not in run({})[0].ran
    assert "image upload" in run({}, options=["images"])[0].ran


def test_a_check_that_raises_becomes_a_failed_line_and_the_run_goes_on():
    probe, findings = run({"page": "raise"})
    assert findings[1].status == "failed" and "RuntimeError: boom" in findings[1].detail
    assert probe.ran == ["origin", "page", "account"]


def test_exit_status_is_zero_only_when_a_chat_worked():
    assert dx.exit_status(run({})[1]) == 0
    assert dx.exit_status(run({"chat": "skipped,ok"})[1]) == 0
    assert dx.exit_status(run({"chat": "failed"})[1]) == 1
    assert dx.exit_status(run({"image upload": "ok", "chat": "skipped"}, options=["images"])[1]) == 1


def test_exit_status_is_not_zero_when_a_step_failed_although_a_chat_worked():
    assert dx.exit_status(run({"chat": "failed,ok"})[1]) == 1
    assert dx.exit_status(run({"account": "failed,ok"})[1]) == 1


def test_the_closing_line_says_whether_a_chat_worked_and_whether_a_step_failed():
    assert dx.verdict_text(run({})[1]) == "a chat worked and every step passed"
    assert dx.verdict_text(run({"account": "failed,ok"})[1]).startswith("a chat worked, but a step failed")
    assert dx.verdict_text(run({"chat": "failed"})[1]).startswith("no chat worked")


def test_a_line_that_did_not_go_well_points_to_the_readme():
    line = dx.failed("cloudflare", "a challenge", "cloudflare").line()
    assert line.startswith("failed   cloudflare") and "README.md#cloudflare-challenge" in line
    assert "README" not in dx.ok("origin", "fine").line()


def github_anchor(heading: str) -> str:
    return "#" + re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_anchor_the_doctor_points_to_is_a_readme_heading():
    with open(os.path.join(ROOT, "README.md")) as f:
        anchors = {github_anchor(line.lstrip("#")) for line in f if line.startswith("#")}
    assert set(dx.TROUBLESHOOTING.values()) <= anchors


def test_every_failure_cause_points_to_a_known_troubleshooting_entry():
    assert {fix for _, fix in dx.FAILURE_CAUSES.values()} <= set(dx.TROUBLESHOOTING)


# --- verdicts of the steps ------------------------------------------------------------------------------

def test_origin_reports_redirects_and_a_connection_failure():
    moved = dx.judge_origin("https://lmarena.ai", [(301, "https://arena.ai/")], 200, None)
    assert moved.status == "ok" and "-> 301 -> https://arena.ai/" in moved.detail
    down = dx.judge_origin("https://arena.ai", [], None, "ConnectError")
    assert down.status == "failed" and down.fix == "#cannot-reach-lm-arena"
    assert dx.judge_origin("https://arena.ai", [], 403, None, challenged=True).status == "ok"
    assert dx.judge_origin("https://example.org", [], 404, None).status == "failed"


def test_cloudflare_without_a_browser_fails_and_with_one_passes():
    assert dx.judge_cloudflare(False, "off", None, None).status == "ok"
    off = dx.judge_cloudflare(True, "off", None, None)
    assert off.status == "failed" and "BRIDGE_SIDECAR=off" in off.detail
    assert dx.judge_cloudflare(True, "auto", 200, None).status == "ok"
    assert dx.judge_cloudflare(True, "auto", 403, None).status == "failed"
    assert dx.judge_cloudflare(True, "auto", None, "timed out").status == "failed"


def test_page_needs_a_model_list_with_servable_models():
    assert dx.judge_page("/?mode=direct", 200, [{}] * 3, 2).detail == "3 models from /?mode=direct, 2 served by the API"
    assert dx.judge_page("/", 200, None, 0).fix == "#models-missing"
    assert dx.judge_page("/", 500, None, 0).status == "failed"


def test_discovery_names_where_the_sitekey_was_and_a_rotation():
    found = dx.judge_discovery("6Lnew", "chunk /_next/x.js", "6Lold", {"generateUploadUrl": "7f", "getSignedUrl": "60"},
                               ("generateUploadUrl", "getSignedUrl"), False)
    assert found.status == "ok" and "changed from 6Lold" in found.detail and "chunk /_next/x.js" in found.detail
    assert dx.judge_discovery(None, None, None, {}, (), True).status == "failed"
    missing = dx.judge_discovery("6Lk", "page", None, {}, ("getSignedUrl",), True)
    assert missing.status == "failed" and "getSignedUrl" in missing.detail


def account(**fields) -> dx.AccountView:
    return dx.AccountView(**{"id": 1, "decodes": True, "guest": False, "expires_at": time.time() + 3000,
                             "state": "ok", **fields})


def test_an_account_in_cool_down_is_skipped_and_left_alone():
    at = time.time()
    finding = dx.judge_account(account(state="cooling_down", cooldown_until=at + 600, reason="rate limited"), at)
    assert finding.status == "skipped" and "10 min" in finding.detail and "rate limited" in finding.detail
    assert dx.judge_account(account(state="cooling_down", cooldown_until=at - 1), at).status == "ok"


def test_an_expired_session_whose_refresh_fails_names_the_session():
    finding = dx.judge_account(account(expires_at=time.time() - 60, refresh="refresh_token_not_found"), time.time())
    assert finding.status == "failed" and finding.fix == "#expired-sessions-and-401"
    assert "refreshed" in dx.judge_account(account(refresh="ok"), time.time()).detail


def test_a_guest_behind_the_login_gate_fails_with_its_own_advice():
    finding = dx.judge_account(account(guest=True, state="needs_login"), time.time())
    assert finding.status == "failed" and finding.fix == "#guest-accounts-behind-the-login-gate"
    assert finding.detail.startswith("guest")


def test_a_session_that_does_not_decode_fails():
    assert dx.judge_account(account(decodes=False), time.time()).status == "failed"


def test_browser_and_mint_are_skipped_without_a_sidecar():
    assert dx.judge_browser("off", None, None, None).status == "skipped"
    assert dx.judge_mint("off", "chat_submit", None, 0, None).status == "skipped"


def test_browser_reports_version_mode_launch_time_and_user_agent():
    finding = dx.judge_browser("auto", {"version": "142.0", "headful": True, "user_agent": "Mozilla/5.0 X"}, 1.84, None)
    assert finding.detail == "142.0 headful, started in 1.8 s; User-Agent Mozilla/5.0 X"
    assert dx.judge_browser("auto", None, None, "no Chromium").fix == "#browser-sidecar-unavailable"


def test_mint_wants_a_token_shaped_like_recaptchas():
    assert dx.judge_mint("auto", "chat_submit", RECAPTCHA, 0.4, None).detail == \
        "a 1,508-char chat_submit token in 400 ms"
    assert dx.judge_mint("auto", "chat_submit", "short", 0.4, None).status == "failed"
    assert dx.judge_mint("auto", "chat_submit", None, 0.4, "timed out").fix == "#recaptcha-failures"


@pytest.mark.parametrize("kind,anchor", [("recaptcha", "#recaptcha-failures"), ("cloudflare", "#cloudflare-challenge"),
                                         ("login_gate", "#guest-accounts-behind-the-login-gate"),
                                         ("rate_limited", "#429-and-cool-downs"), ("server", "#lm-arena-errors"),
                                         ("something new", "#lm-arena-errors")])
def test_a_failed_chat_points_to_the_advice_for_its_failure_kind(kind, anchor):
    finding = dx.judge_chat("direct", dx.ChatOutcome(3, 403, kind, "recaptcha validation failed"))
    assert finding.status == "failed" and finding.fix == anchor and finding.subject == "direct"


def test_a_chat_reports_time_to_first_token():
    finding = dx.judge_chat("in-page", dx.ChatOutcome(2, 200, first_token=0.42, seconds=1.5, text="OK"))
    assert finding.status == "ok" and finding.label == "chat (in-page)"
    assert finding.detail == "account 2: first token after 420 ms, reply of 2 chars in 1.5 s"
    assert dx.judge_chat("direct", dx.ChatOutcome(2, 200, text="")).status == "failed"


def test_image_upload_reports_where_the_image_went_or_what_failed():
    assert dx.judge_upload(1, "https://bucket.r2.example/x.png?X-Amz-Signature=s", None).detail == \
        "account 1: generateUploadUrl -> PUT -> getSignedUrl, the image is on bucket.r2.example"
    failed = dx.judge_upload(1, None, "LM Arena's storage answered 403 to the image upload")
    assert failed.status == "failed" and failed.fix == "#image-uploads-fail" and "403" in failed.detail


# --- browser executors (a line per browser account, sent by the server its tabs connect to) ---------------

def executor(**fields) -> dx.ExecutorView:
    return dx.ExecutorView(**{"id": 4, "label": "browser: jane@example.com", "connected": True, "state": "ok", **fields})


def test_a_connected_executor_that_may_serve_gets_its_chat():
    assert dx.judge_executor(executor(), time.time()) is None
    assert dx.judge_executor(executor(state="refreshing"), time.time()) is None


def test_an_executor_whose_tab_is_not_connected_is_skipped_with_when_it_was_last_seen():
    at = time.time()
    finding = dx.judge_executor(executor(connected=False, state="disconnected", last_seen=at - 300), at)
    assert finding.status == "skipped" and finding.label == "chat (executor 4)"
    assert finding.detail.startswith("browser: jane@example.com: its tab is not connected, last seen 5 min ago")
    assert finding.fix == "#browser-executor-not-connected"


def test_an_executor_in_cool_down_is_skipped_and_left_alone():
    at = time.time()
    finding = dx.judge_executor(executor(state="cooling_down", cooldown_until=at + 90, reason="rate limited"), at)
    assert finding.status == "skipped" and finding.fix == "#429-and-cool-downs"
    assert "cooling down for 90 s (rate limited)" in finding.detail and "leaves it alone" in finding.detail


def test_an_executor_whose_tab_is_a_guest_behind_the_login_gate_is_told_to_sign_in():
    finding = dx.judge_executor(executor(state="needs_login", reason="LOGIN_GATE"), time.time())
    assert finding.status == "skipped" and finding.fix == "#guest-accounts-behind-the-login-gate"
    assert "sign in to LM Arena in that tab" in finding.detail


def test_an_executor_marked_unusable_is_skipped_with_its_state():
    finding = dx.judge_executor(executor(state="invalid", reason="removed upstream"), time.time())
    assert finding.status == "skipped" and "marked invalid (removed upstream)" in finding.detail


def test_no_executor_at_all_says_to_install_the_userscript():
    finding = dx.no_executor()
    assert finding.status == "skipped" and finding.label == "chat (executor)"
    assert finding.fix == "#bridge-on-a-server-browser-at-home" and "userscript" in finding.detail


def test_an_executor_chat_names_the_tab_and_its_time_to_first_token():
    finding = dx.judge_chat("executor 4", dx.ChatOutcome(4, 200, first_token=0.31, seconds=0.9, text="OK",
                                                         label="browser: jane@example.com"))
    assert finding.status == "ok" and finding.label == "chat (executor 4)"
    assert finding.detail == "account 4 (browser: jane@example.com): first token after 310 ms, reply of 2 chars in 900 ms"


def test_a_chat_through_an_executor_alone_is_a_chat_that_worked():
    lines = [dx.skipped("chat", "not tried: account did not pass", subject="direct"),
             dx.judge_chat("executor 4", dx.ChatOutcome(4, 200, first_token=0.3, seconds=0.5, text="OK"))]
    assert dx.exit_status(lines) == 0
    assert dx.exit_status([*lines, dx.failed("chat", "the page failed", "executor", "executor 5")]) == 1


def test_the_cli_doctor_with_no_server_running_skips_the_executors_and_says_why():
    finding = dx.judge_server("http://127.0.0.1:8000", None, "connection refused")
    assert finding.status == "skipped" and finding.label == "chat (executor)"
    assert "no bridge server answers at http://127.0.0.1:8000" in finding.detail
    assert "executors connect to the running server" in finding.detail
    assert finding.fix == "#browser-executor-not-connected"


def test_a_server_on_another_database_is_named_and_a_broken_one_fails():
    other = dx.judge_server("http://127.0.0.1:8000", 303)
    assert other.status == "skipped" and "does not use this database" in other.detail
    broken = dx.judge_server("http://127.0.0.1:8000", 500)
    assert broken.status == "failed" and "answered 500" in broken.detail
    slow = dx.judge_server("http://127.0.0.1:8000", 0, "ReadTimeout after up to 190 s")
    assert slow.status == "failed" and "ReadTimeout" in slow.detail


def test_with_no_chat_and_no_failure_the_closing_line_points_to_the_skipped_lines():
    lines = [dx.ok("origin", "fine"), dx.skipped("chat", "its tab is not connected", "executor", "executor 4")]
    assert dx.verdict_text(lines) == "no chat worked: see the skipped lines above"


# --- the server's executor step, on the bridge's own parts (no tab connected, so nothing is sent) ------------

def test_the_server_side_executor_step_has_a_line_per_browser_account_and_sends_nothing_it_may_not(tmp_path):
    state = dx.bridge_state(dx.Settings.load(env={"BRIDGE_DB": str(tmp_path / "bridge.db"), "BRIDGE_SIDECAR": "off"}),
                            dx.Store(str(tmp_path / "bridge.db")))
    store = state.store
    store.replace_models([{"id": "m-1", "publicName": "m", "organization": "o",
                           "capabilities": {"outputCapabilities": {"text": True}}}])
    gone = store.add_account(label="browser: a@example.com", kind="browser", auth="browser:a", form="browser",
                             cookies="{}", state="disconnected", failures=0, last_used=0.0)
    cooling = store.add_account(label="browser: b@example.com", kind="browser", auth="browser:b", form="browser",
                                cookies="{}", state="cooling_down", failures=0, last_used=0.0)
    store.update_account(cooling, cooldown_until=time.time() + 600, cooldown_reason="rate limited")
    state.executors.connect("tab-of-b-000", state.executors.records.create_pairing()[0], {"user": {"id": "b"}})
    lines = asyncio.run(dx.run_steps([dx.EXECUTOR_STEP], dx.Doctor(state), ["chat"]))
    assert [(f.label, f.status, f.fix) for f in lines] == [
        (f"chat (executor {gone})", "skipped", "#browser-executor-not-connected"),
        (f"chat (executor {cooling})", "skipped", "#429-and-cool-downs")]
    assert state.executors.jobs == {} and store.account(cooling)["last_used"] == 0.0
    store.close()


def test_no_browser_account_is_one_line_that_says_to_install_the_userscript_and_asks_no_server(tmp_path):
    state = dx.bridge_state(dx.Settings.load(env={"BRIDGE_DB": str(tmp_path / "bridge.db"), "BRIDGE_SIDECAR": "off"}),
                            dx.Store(str(tmp_path / "bridge.db")))
    asked = []

    async def server() -> list[dx.Finding]:
        asked.append(True)
        return []

    lines = asyncio.run(dx.run_steps([dx.EXECUTOR_STEP], dx.Doctor(state, server=server), ["chat"]))
    assert [(f.label, f.status, f.fix) for f in lines] == [("chat (executor)", "skipped",
                                                            "#bridge-on-a-server-browser-at-home")]
    assert asked == []
    state.store.close()
