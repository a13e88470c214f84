"""The admin dashboard in a real browser (Playwright + Chromium) against the real bridge and the emulator."""
import glob
import os
import pathlib
import re
import shutil
import time
import uuid

import httpx
import pytest
from harness import BridgeProcess

CHROMIUM = next(filter(os.path.exists, ["/usr/bin/chromium"]), None) or shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium binary found (looked at /usr/bin/chromium and PATH)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

PASSWORD = "dashboard-test-password"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = {"overview": "/dashboard", "accounts": "/dashboard/accounts", "keys": "/dashboard/keys",
         "usage": "/dashboard/usage", "models": "/dashboard/models", "settings": "/dashboard/settings"}
GENERATED = re.compile(r"generated dashboard password \(.*\): (\S+)")


@pytest.fixture(scope="module")
def dash(arena, tmp_path_factory):
    """A bridge with a configured password, behind a 'trusted proxy' so tests can vary the client address."""
    proc = BridgeProcess(arena.url, str(tmp_path_factory.mktemp("dash")), args=("--trusted-proxy",),
                         env={"BRIDGE_ADMIN_PASSWORD": PASSWORD}).start()
    proc.wait_for_models()
    arena.configure(recaptcha="off")
    proc.set_accounts(arena.new_session())
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def generated(arena, tmp_path_factory):
    """A bridge without BRIDGE_ADMIN_PASSWORD, with the sidecar allowed to start if anything asked for it."""
    proc = BridgeProcess(arena.url, str(tmp_path_factory.mktemp("generated")), sidecar="auto",
                         env={"BRIDGE_ADMIN_PASSWORD": "", "BRIDGE_ANONYMOUS": "off",
                              "ARENA_AUTH_TOKENS": arena.new_session()}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    tab.on("dialog", lambda dialog: pytest.fail(f"a script ran: {dialog.message}"))
    yield tab
    context.close()


@pytest.fixture(scope="module")
def session_cookies():
    return []


@pytest.fixture
def admin(page, dash, session_cookies):
    """A signed-in page. The session is shared across tests (signing in costs a deliberately slow hash) and
    renewed when a test ended it."""
    page.context.add_cookies(session_cookies)
    page.goto(dash.url + "/dashboard")
    if page.url.endswith("/login"):
        sign_in(page, dash.url)
        page.wait_for_url("**/dashboard")
        session_cookies[:] = page.context.cookies()
    return page


def sign_in(page, url, password=PASSWORD):
    page.goto(url + "/login")
    page.fill("#password", password)
    page.click("button:text('Sign in')")


def create_key(page, url, name, rpm=100):
    page.goto(url + "/dashboard/keys")
    page.fill("input[name=name]", name)
    page.fill("input[name=rpm]", str(rpm))
    page.click("button:text('Create key')")
    return page.input_value("#new-key")


def poll(page, url, check, timeout=8.0):
    """Reload until `check(page)` holds: usage rows reach SQLite in batches every 2 s."""
    deadline = time.time() + timeout
    while True:
        page.goto(url)
        if check(page) or time.time() > deadline:
            return check(page)
        time.sleep(0.3)


def key_row(page, name):
    return page.locator("tr", has_text=name)


def generated_password(proc) -> str:
    found = GENERATED.findall(proc.log())
    assert len(found) == 1, proc.log()
    return found[0]


def test_sign_in_lands_on_the_overview_with_a_strict_session_cookie(admin, dash):
    assert admin.locator("h1").inner_text() == "Overview"
    assert "Requests today" in admin.content()
    cookie = next(c for c in admin.context.cookies() if c["name"] == "bridge_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_root_redirects_to_login_without_a_session(page, dash):
    page.goto(dash.url + "/")
    assert page.url.endswith("/login")
    page.goto(dash.url + "/dashboard/keys")
    assert page.url.endswith("/login")


def test_wrong_password_is_rejected(page, dash):
    sign_in(page, dash.url, "not-the-password")
    assert page.url.endswith("/login")
    assert "Wrong password." in page.locator(".note").inner_text()


def test_repeated_failed_sign_ins_are_throttled_per_address(dash):
    address = {"X-Forwarded-For": f"203.0.113.{uuid.uuid4().int % 250}"}
    statuses = [httpx.post(dash.url + "/login", data={"password": "guess"}, headers=address).status_code
                for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    blocked = httpx.post(dash.url + "/login", data={"password": PASSWORD}, headers=address)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
    assert "Too many sign-in attempts" in blocked.text
    elsewhere = httpx.post(dash.url + "/login", data={"password": PASSWORD}, headers={"X-Forwarded-For": "198.51.100.7"})
    assert elsewhere.status_code == 303


def test_session_cookie_is_secure_only_behind_a_trusted_https_proxy(dash, generated):
    https = {"X-Forwarded-Proto": "https"}
    trusted = httpx.post(dash.url + "/login", data={"password": PASSWORD}, headers=https)
    assert trusted.status_code == 303 and "secure" in trusted.headers["set-cookie"].lower()
    untrusted = httpx.post(generated.url + "/login", data={"password": generated_password(generated)}, headers=https)
    assert untrusted.status_code == 303 and "secure" not in untrusted.headers["set-cookie"].lower()


def test_sign_out_ends_the_session(page, dash):
    sign_in(page, dash.url)
    page.click("button:text('Sign out')")
    assert page.url.endswith("/login")
    page.goto(dash.url + "/dashboard")
    assert page.url.endswith("/login")


def test_created_key_is_shown_once_then_only_its_prefix(admin, dash):
    key = create_key(admin, dash.url, "shown-once")
    assert key.startswith("sk-arena-") and len(key) > 40
    assert "shown only this once" in admin.content()
    admin.screenshot(path="/tmp/dashboard-key-created.png")
    admin.goto(dash.url + "/dashboard/keys")
    assert key not in admin.content()
    assert key_row(admin, "shown-once").locator("code").inner_text() == key[:13] + "…"


def test_key_use_is_counted_in_usage(admin, dash):
    name = "counted-" + uuid.uuid4().hex[:6]
    key = create_key(admin, dash.url, name)
    assert httpx.get(dash.base_url + "/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    requests_cell = lambda page: key_row(page, name).locator("td").nth(5).inner_text() == "1"
    assert poll(admin, dash.url + "/dashboard/keys", requests_cell)
    assert poll(admin, dash.url + "/dashboard/usage?days=1", lambda page: key_row(page, name).count() == 1)


def test_revoked_key_is_refused(admin, dash):
    key = create_key(admin, dash.url, "to-revoke")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(dash.base_url + "/models", headers=headers).status_code == 200
    key_row(admin, "to-revoke").locator("button:text('Revoke')").click()
    assert "revoked" in admin.locator(".note").inner_text()
    assert key_row(admin, "to-revoke").locator(".badge").inner_text() == "revoked"
    assert httpx.get(dash.base_url + "/models", headers=headers).status_code == 401


def test_account_can_be_added_and_removed(admin, dash, arena):
    admin.goto(dash.url + "/dashboard/accounts")
    admin.fill("textarea[name=value]", "certainly not a session")
    admin.click("button:text('Add account')")
    assert "not a valid LM Arena session" in admin.locator(".note.bad").inner_text()
    admin.fill("textarea[name=value]", arena.new_session())
    admin.fill("input[name=label]", "pasted in the browser")
    admin.click("button:text('Add account')")
    added = re.search(r"Account (\d+) added", admin.locator(".note.ok").inner_text()).group(1)
    row = admin.locator("tr", has_text="pasted in the browser")
    assert row.locator("td:nth-child(4) .badge").inner_text() == "ok"
    assert row.locator("td").first.inner_text() == added
    row.locator("button:text('Remove')").click()
    assert f"Account {added} removed." in admin.locator(".note.ok").inner_text()
    assert admin.locator("tr", has_text="pasted in the browser").count() == 0
    assert dash.store.account(int(added)) is None


def test_adding_an_account_of_a_stored_user_updates_it_and_says_so(admin, dash, arena):
    value = arena.new_session()
    admin.goto(dash.url + "/dashboard/accounts")
    for _ in range(2):
        admin.fill("textarea[name=value]", value)
        admin.click("button:text('Add account')")
    added = re.search(r"Account (\d+) already holds this LM Arena user's session",
                      admin.locator(".note.ok").inner_text()).group(1)
    assert [a["id"] for a in dash.store.accounts() if a["auth"] == value] == [int(added)]


def test_usage_page_draws_the_top_models_as_an_svg_chart(admin, dash):
    key = create_key(admin, dash.url, "charted")
    reply = httpx.post(dash.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "gemini-3-pro", "messages": [{"role": "user", "content": "chart me"}]})
    assert reply.status_code == 200, reply.text
    charted = lambda page: page.locator("svg.chart text", has_text="gemini-3-pro").count() > 0
    assert poll(admin, dash.url + "/dashboard/usage", charted)
    assert admin.locator("svg.chart rect.bar").count() >= 1
    assert "<script src" not in admin.content() and "http" not in admin.locator("svg.chart").inner_html()


def test_usage_page_counts_errors_by_type(admin, dash):
    key = create_key(admin, dash.url, "erring")
    reply = httpx.post(dash.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404
    code = reply.json()["error"]["code"]
    errors_table = lambda page: page.locator("tr", has_text=code).count() == 1
    assert poll(admin, dash.url + "/dashboard/usage?days=1", errors_table)
    assert "404" in admin.locator("tr", has_text=code).inner_text()


def test_form_post_without_the_csrf_token_is_refused(admin, dash):
    for form in ({"action": "create", "name": "forged", "rpm": "5"},
                 {"action": "create", "name": "forged", "rpm": "5", "csrf": "guessed"}):
        assert admin.request.post(dash.url + "/dashboard/keys", form=form).status == 403
    admin.goto(dash.url + "/dashboard/keys")
    assert key_row(admin, "forged").count() == 0


def test_key_name_with_markup_is_rendered_as_text(admin, dash):
    name = "<script>alert(1)</script>"
    create_key(admin, dash.url, name)
    admin.goto(dash.url + "/dashboard/keys")
    assert key_row(admin, name).locator("td").nth(1).inner_text() == name
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in admin.content()
    assert admin.locator("script").count() == 1  # only the page's own, nonce-protected one


def test_dashboard_responses_carry_security_headers(admin, dash):
    response = admin.goto(dash.url + "/dashboard/settings")
    headers = response.headers
    csp = headers["content-security-policy"]
    for directive in ("default-src 'none'", "img-src 'self' data:", "form-action 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"


def test_database_holds_no_plaintext_key_password_or_session(admin, dash):
    key = create_key(admin, dash.url, "at-rest")
    session = next(c["value"] for c in admin.context.cookies() if c["name"] == "bridge_session")
    stored = b"".join(pathlib.Path(path).read_bytes() for path in glob.glob(dash.db + "*"))
    for secret in (key, key[13:], PASSWORD, session):
        assert secret.encode() not in stored


def test_settings_never_show_clearance_cookies_or_the_anon_key(admin, dash):
    dash.store.set_site_params(clearance={"cookies": {"cf_clearance": "CLEARANCE-SECRET-VALUE-123"}, "user_agent": "UA"},
                               anon_key="eyJhbGciOiJIUzI1NiJ9.ANON-SECRET-PAYLOAD.signature")
    admin.goto(dash.url + "/dashboard/settings")
    content = admin.content()
    assert "CLEARANCE-SECRET" not in content and "ANON-SECRET" not in content
    assert "cf_clearance" in content and "characters, hidden" in content and "user_agent: UA" in content


def test_account_states_have_their_badges(admin, dash, arena):
    cooling = dash.set_accounts(arena.new_session(), arena.new_session(), arena.new_session())[1:]
    dash.store.update_account(cooling[0], state="cooling_down", cooldown_until=time.time() + 600,
                              cooldown_reason="reCAPTCHA refused <b>twice</b>", last_error="reCAPTCHA refused")
    dash.store.update_account(cooling[1], state="expired", last_error="session expired and could not be refreshed")
    admin.goto(dash.url + "/dashboard/accounts")
    badges = admin.locator("td:nth-child(4) .badge").all_inner_texts()
    assert badges == ["ok", "cooling down", "expired"]
    assert "until " in admin.locator("tr", has_text="cooling down").inner_text()
    assert "reCAPTCHA refused <b>twice</b>" in admin.locator("tr", has_text="cooling down").inner_text()


def test_without_a_browser_every_account_shows_the_direct_path(admin, dash, arena):
    _plain, refused = dash.set_accounts(arena.new_session(), arena.new_session())
    dash.store.update_account(refused, needs_browser=1, direct_retry_at=time.time() + 1800)
    admin.goto(dash.url + "/dashboard/accounts")
    assert admin.locator("td:nth-child(5) .badge").all_inner_texts() == ["direct", "direct"]


@pytest.mark.parametrize("site_said, paths", [("direct", ["direct", "in-page"]), ("page", ["in-page", "in-page"])])
def test_with_a_sidecar_the_path_column_shows_where_each_account_s_next_chat_goes(arena, tmp_path, page,
                                                                                   site_said, paths):
    """Direct where the site served a direct chat, except for an account it refused (in-page until its daily
    retry); in-page for all once the site refused the deployment's direct chat (REQUEST_PATHS)."""
    proc = BridgeProcess(arena.url, str(tmp_path), sidecar="auto", env={"BRIDGE_ADMIN_PASSWORD": PASSWORD})
    _plain, refused = proc.set_accounts(arena.new_session(), arena.new_session())
    proc.store.update_account(refused, needs_browser=1, direct_retry_at=time.time() + 1800)
    proc.store.set_site_params(request_path=site_said)
    proc.start()
    try:
        sign_in(page, proc.url)
        page.goto(proc.url + "/dashboard/accounts")
        assert page.locator("td:nth-child(5) .badge").all_inner_texts() == paths
        refused_row = page.locator("tr", has=page.locator("td")).nth(1)
        assert "direct again after" in refused_row.inner_text()
    finally:
        proc.stop()


def test_password_can_be_changed_on_the_settings_page(admin, dash, browser):
    def change(old, new):
        admin.goto(dash.url + "/dashboard/settings")
        admin.fill("input[name=current]", old)
        admin.fill("input[name=new]", new)
        admin.fill("input[name=repeat]", new)
        admin.click("button:text('Change password')")
        assert "Password changed" in admin.locator(".note.ok").inner_text()

    change(PASSWORD, "a-brand-new-password")
    try:
        other = browser.new_context().new_page()
        sign_in(other, dash.url, PASSWORD)
        assert "Wrong password." in other.content()
        sign_in(other, dash.url, "a-brand-new-password")
        other.wait_for_url("**/dashboard")
        other.context.close()
    finally:
        change("a-brand-new-password", PASSWORD)


def test_every_page_renders_in_the_layout(admin, dash):
    for name, path in PAGES.items():
        admin.goto(dash.url + path)
        assert admin.locator("nav a.on").count() == 1
        admin.screenshot(path=f"/tmp/dashboard-{name}.png", full_page=name != "models")
    admin.goto(dash.url + "/dashboard/models?q=vision+reasoning")
    assert admin.locator("tbody tr").count() >= 1
    assert all("vision" in row and "reasoning" in row for row in admin.locator("tbody tr").all_inner_texts())


def test_generated_password_is_printed_once_and_works(generated, page):
    password = generated_password(generated)
    generated.restart()
    assert generated_password(generated) == password
    sign_in(page, generated.url, password)
    page.wait_for_url("**/dashboard")
    page.context.clear_cookies()
    page.goto(generated.url + "/login")
    page.screenshot(path="/tmp/dashboard-login.png")


def test_dashboard_never_starts_the_sidecar(generated, page):
    sign_in(page, generated.url, generated_password(generated))
    page.wait_for_url("**/dashboard")
    for path in PAGES.values():
        assert page.goto(generated.url + path).status == 200
    pid = generated.process.pid
    children = [c for task in os.listdir(f"/proc/{pid}/task")
                for c in pathlib.Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    assert children == []
    assert not os.path.exists(os.path.join(generated.folder, "bridge-sidecar.sock"))
