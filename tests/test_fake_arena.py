"""Quick self-tests of the LM Arena emulator (tests/fake_arena.py).

They check the emulator against the protocol document, so that bridge tests can trust it.  Fast: one emulator
per module, ``reset()`` between tests.
"""

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from emulator_client import (
    IMAGE_MODEL,
    SEARCH_MODEL,
    STEALTH_MODEL,
    TEXT_MODEL,
    UA,
    cookie_header,
    create_body,
    parse_stream,
    post_chat,
)
from fake_arena import AUTH_COOKIE, FakeArena

BROWSER = os.environ.get("BRIDGE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")
SOLVE = "/cdn-cgi/challenge-platform/solve"


@pytest.fixture(scope="module")
def arena():
    a = FakeArena(seed=1).start()
    yield a
    a.stop()


@pytest.fixture(autouse=True)
def _reset(arena):
    arena.reset()
    yield


@pytest.fixture
def client():
    with httpx.Client(timeout=10) as c:
        yield c


# ---------------------------------------------------------------------------------------------------------------------


def test_page_has_models_sitekey_chunks_and_cookies(arena, client):
    r = client.get(arena.url + "/?mode=direct")
    assert r.status_code == 200 and "Just a moment" not in r.text
    assert f"/recaptcha/enterprise.js?render={arena.sitekey}" in r.text
    pushes = re.findall(r"self\.__next_f\.push\(\[1,(\".*?\")\]\)</script>", r.text, re.DOTALL)
    assert len(pushes) == 2
    flight = "".join(json.loads(p) for p in pushes)
    start = flight.index('"initialModels":') + len('"initialModels":')
    models, _ = json.JSONDecoder().raw_decode(flight[start:])
    assert len(models) == len(arena.models) == 320
    for name in ("__cf_bm", "_cfuvid", "provisional_user_id"):
        assert name in r.cookies
    chunks = re.findall(r'<script src="(/_next/static/chunks/[^"]+\.js[^"]*)"', r.text)
    js = "".join(client.get(arena.url + c).text for c in chunks)
    assert arena.action_ids["generateUploadUrl"] in js and arena.anon_key in js
    assert f'grecaptcha.enterprise.execute("{arena.sitekey}",{{action:"chat_submit"}})' in js
    assert '"chat_retry"' in js and '"sign_up"' in js
    assert "static/chunks/" in flight and "?dpl=dpl_" in flight


def test_create_and_follow_up(arena, client):
    s = arena.new_session()
    body = create_body(arena, "hi")
    r = post_chat(client, arena, "/nextjs-api/stream/create-evaluation", body, s)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/event-stream" and "ratelimit" in r.headers
    content, lines = parse_stream(r.text)
    assert content == "turn 1: hi"
    assert lines[-1].startswith('ad:{"finishReason":"stop","usage":')
    eid = body["id"]
    follow = create_body(arena, "again")
    follow["id"] = eid
    del follow["mode"]
    r = post_chat(client, arena, f"/nextjs-api/stream/post-to-evaluation/{eid}", follow, s)
    assert r.status_code == 200, r.text
    assert parse_stream(r.text)[0] == "turn 2: again"
    ev = arena.evaluations[eid]
    assert [m["role"] for m in ev["messages"]] == ["user", "assistant", "user", "assistant"]
    # Another account may not post to it.
    other = create_body(arena, "x", id=eid)
    del other["mode"]
    r = post_chat(client, arena, f"/nextjs-api/stream/post-to-evaluation/{eid}", other, arena.new_session())
    assert r.status_code == 401 and "does not have access" in r.json()["error"]


def test_bad_token_missing_cookie_reused_id_stealth_mode(arena, client):
    s = arena.new_session()
    path = "/nextjs-api/stream/create-evaluation"
    r = post_chat(client, arena, path, create_body(arena, token="0cAFcWeAbogus"), s)
    assert r.status_code == 403 and r.json() == {"error": "recaptcha validation failed"}
    r = post_chat(client, arena, path, create_body(arena, token=arena.mint_token("chat_retry")), s)
    assert r.status_code == 403
    r = post_chat(client, arena, path, create_body(arena), None)
    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
    body = create_body(arena)
    assert post_chat(client, arena, path, body, s).status_code == 200
    body["recaptchaV3Token"] = arena.mint_token()
    r = post_chat(client, arena, path, body, s)
    assert r.status_code == 400 and r.json()["error"] == f"Evaluation session {body['id']} already exists"
    r = post_chat(client, arena, path, create_body(arena, model=STEALTH_MODEL, modality="search"), s)
    assert r.status_code == 400 and r.json()["error"] == "Cannot select private models in non-battle mode"
    r = post_chat(client, arena, path, create_body(arena, id="not-a-uuid"), s)
    assert r.status_code == 400
    arena.configure(mode_policy="no_direct")
    r = post_chat(client, arena, path, create_body(arena, mode="direct"), s)
    assert r.status_code == 400 and "'direct' mode is not allowed" in r.json()["error"]
    # token reuse is rejected
    tok = arena.mint_token()
    assert post_chat(client, arena, path, create_body(arena, token=tok), s).status_code == 200
    assert post_chat(client, arena, path, create_body(arena, token=tok), s).status_code == 403
    # old token
    assert post_chat(client, arena, path, create_body(arena, token=arena.mint_token(age=121)), s).status_code == 403


def test_refresh_grant_rotation(arena, client):
    s = arena.new_session(lifetime=5)
    rt = FakeArena.decode_session(s)["refresh_token"]
    url = arena.url + "/auth/v1/token?grant_type=refresh_token"
    hdr = {"apikey": arena.anon_key, "Authorization": f"Bearer {arena.anon_key}"}
    assert client.post(url, json={"refresh_token": rt}).status_code == 401
    r1 = client.post(url, json={"refresh_token": rt}, headers=hdr)
    assert r1.status_code == 200 and r1.json()["refresh_token"] != rt
    r2 = client.post(url, json={"refresh_token": rt}, headers=hdr)   # within the grace: same session
    assert r2.json() == r1.json()
    arena.clock_offset = 11
    r3 = client.post(url, json={"refresh_token": rt}, headers=hdr)
    assert r3.status_code == 400 and r3.json()["error_code"] == "refresh_token_not_found"
    new_value = FakeArena.encode_session(r1.json())
    assert arena.session_user(new_value) == arena.session_user(s)
    # the original session (5 s lifetime) is now expired: chat gives 401, page GET refreshes via Set-Cookie
    r = post_chat(client, arena, "/nextjs-api/stream/create-evaluation", create_body(arena), s)
    assert r.status_code == 401


def test_page_refreshes_expired_session(arena, client):
    s = arena.new_session()
    arena.expire_session(s)
    arena.configure(refresh_cookie_form="chunks")
    r = client.get(arena.url + "/", headers={"Cookie": cookie_header(s)})
    sc = r.headers.get_list("set-cookie")
    chunks = [c.split(";")[0].split("=", 1)[1] for c in sc if c.startswith(AUTH_COOKIE + ".")]
    assert len(chunks) >= 2
    fresh = "".join(chunks)
    assert arena.session_user(fresh) == arena.session_user(s)
    body = create_body(arena)
    r = post_chat(client, arena, "/nextjs-api/stream/create-evaluation", body, None,
                  headers={"Cookie": cookie_header(chunks=chunks)})
    assert r.status_code == 200


def test_split_cookie_accepted(arena, client):
    s = arena.new_session(big=True, alphabet="std", padding=True)
    assert len(s) > 3180
    chunks = arena.split_session(s)
    assert len(chunks) >= 2
    r = post_chat(client, arena, "/nextjs-api/stream/create-evaluation", create_body(arena), None,
                  headers={"Cookie": cookie_header(chunks=chunks)})
    assert r.status_code == 200, r.text


def test_server_action_upload_round_trip(arena, client):
    s = arena.new_session()
    uid = arena.session_user(s)
    hdr = {"Next-Action": arena.action_ids["generateUploadUrl"], "Origin": arena.url,
           "Content-Type": "text/plain;charset=UTF-8", "Cookie": cookie_header(s), "Accept": "text/x-component"}
    r = client.post(arena.url + "/?mode=direct", content='["cat.png","image/png"]', headers=hdr)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/x-component")
    line1 = next(ln for ln in r.text.splitlines() if ln.startswith("1:"))
    data = json.loads(line1[2:])["data"]
    assert data["key"].startswith(uid + "/") and "x-id=PutObject" in data["uploadUrl"]
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 100
    assert client.put(data["uploadUrl"], content=png, headers={"Content-Type": "image/png"}).status_code == 200
    hdr["Next-Action"] = arena.action_ids["getSignedUrl"]
    r = client.post(arena.url + "/", content=json.dumps([data["key"]]), headers=hdr)
    url = json.loads(next(ln for ln in r.text.splitlines() if ln.startswith("1:"))[2:])["data"]["url"]
    g = client.get(url)
    assert g.status_code == 200 and g.content == png
    assert client.post(arena.url + "/", content="[]", headers=dict(hdr, Origin="http://evil.example")
                       ).status_code == 403
    old = arena.action_ids["getSignedUrl"]
    arena.redeploy()
    assert client.post(arena.url + "/", content=json.dumps([data["key"]]), headers=dict(hdr, **{"Next-Action": old})
                       ).status_code == 404
    arena.clock_offset = 3700
    g = client.get(url)
    assert g.status_code == 403 and b"AccessDenied" in g.content


def test_fault_applied_once(arena, client):
    s = arena.new_session()
    arena.fault(status=429, headers={"retry-after": "1200"}, body={"error": "Too Many Requests"})
    path = "/nextjs-api/stream/create-evaluation"
    r = post_chat(client, arena, path, create_body(arena), s)
    assert r.status_code == 429 and r.headers["retry-after"] == "1200"
    assert post_chat(client, arena, path, create_body(arena), s).status_code == 200
    arena.fault(disconnect_after=1)
    with pytest.raises(httpx.HTTPError):
        post_chat(client, arena, path, create_body(arena), s)
    arena.fault(content_less="only_ad")
    r = post_chat(client, arena, path, create_body(arena), s)
    assert r.status_code == 200 and r.text == 'ad:{"finishReason":"stop"}\n'


def test_stream_variants(arena, client):
    s = arena.new_session()
    path = "/nextjs-api/stream/create-evaluation"
    thinking = next(m["id"] for m in arena.models if "thinking" in m["publicName"] and m.get("organization"))
    r = post_chat(client, arena, path, create_body(arena, "why", model=thinking), s)
    assert r.text.startswith('ag:"thinking ')
    r = post_chat(client, arena, path, create_body(arena, "q", model=SEARCH_MODEL, modality="search"), s)
    content, lines = parse_stream(r.text)
    assert lines[0].startswith('ac:{"toolCallId":"citation-source"') and "<!--citation:1-->" in content
    r = post_chat(client, arena, path, create_body(arena, "a cat", model=IMAGE_MODEL, modality="image"), s)
    img = json.loads(r.text.splitlines()[1][3:])[0]
    png = client.get(img["image"]).content
    assert png.startswith(b"\x89PNG") and "x-id=GetObject" in img["image"]
    arena.configure(unicode=True, split="random", crlf=True, data_prefix=True, b_lines="unknown", noise_codes=True)
    r = post_chat(client, arena, path, create_body(arena, "hi"), s)
    content, _ = parse_stream("\n".join(ln.removeprefix("data: ") for ln in r.text.split("\r\n")))
    assert content.startswith("turn 1: hi 你好") and "😀" in content and "\\ud83d" in r.text
    assert "bd:" in r.text and 'ad:{"finishReason":"unknown"' in r.text and "af:" in r.text
    arena.reset()
    arena.configure(script=[['a0:"scripted"', 'ad:{"finishReason":"stop"}']], lines=0)
    assert post_chat(client, arena, path, create_body(arena), s).text == 'a0:"scripted"\nad:{"finishReason":"stop"}\n'


def test_signup_and_cloudflare(arena, client):
    r = client.get(arena.url + "/")
    pid = r.cookies["provisional_user_id"]
    ts = arena._mint_turnstile(arena.turnstile_sitekey)
    body = {"turnstileToken": ts, "recaptchaToken": arena.mint_token("sign_up"), "provisionalUserId": pid}
    r = client.post(arena.url + "/nextjs-api/sign-up", json=body, headers={"Cookie": f"provisional_user_id={pid}"})
    assert r.status_code == 200, r.text
    value = r.cookies[AUTH_COOKIE]
    assert arena.session_user(value) == pid and r.json()["access_token"]
    body = {"turnstileToken": arena._mint_turnstile(arena.turnstile_sitekey),
            "recaptchaToken": arena.mint_token("sign_up"), "provisionalUserId": pid}
    r = client.post(arena.url + "/nextjs-api/sign-up", json=body, headers={"Cookie": f"provisional_user_id={pid}"})
    assert r.status_code == 400 and r.json() == {"error": "User already exists"}

    arena.configure(cloudflare=True)
    r = client.get(arena.url + "/", headers={"User-Agent": UA})
    assert r.status_code == 403 and r.headers["cf-mitigated"] == "challenge" and "Just a moment..." in r.text
    assert "challenges.cloudflare.com" in r.text
    r = client.post(arena.url + "/cdn-cgi/challenge-platform/solve", headers={"User-Agent": UA})
    cf = r.cookies["cf_clearance"]
    assert client.get(arena.url + "/", headers={"User-Agent": UA, "Cookie": f"cf_clearance={cf}"}).status_code == 200
    assert client.get(arena.url + "/", headers={"User-Agent": "other", "Cookie": f"cf_clearance={cf}"}
                      ).status_code == 403


def test_control_endpoints_and_scripts(arena, client):
    assert client.post(arena.url + "/__emulator/config", json={"recaptcha": "off"}).status_code == 200
    assert arena.knobs["recaptcha"] == "off"
    assert client.post(arena.url + "/__emulator/config", json={"nope": 1}).status_code == 400
    v = client.post(arena.url + "/__emulator/session", json={}).json()["value"]
    assert arena.session_user(v)
    body = create_body(arena)
    body.pop("recaptchaV3Token")
    assert post_chat(client, arena, "/nextjs-api/stream/create-evaluation", body, v).status_code == 200
    js = client.get(arena.url + f"/recaptcha/enterprise.js?render={arena.sitekey}").text
    assert "enterprise" in js and "/__recaptcha/mint" in js
    tok = client.get(arena.url + f"/__recaptcha/mint?sitekey={arena.sitekey}&action=chat_submit").json()["token"]
    assert tok.startswith("0cAFcWeA") and len(tok) > 1500
    assert "turnstile" in client.get(arena.url + "/turnstile/v0/api.js").text
    log = client.get(arena.url + "/__emulator/requests").json()
    assert any(e["path"] == "/nextjs-api/stream/create-evaluation" and e["status"] == 200 for e in log)
    arena.configure(legacy_redirect=True)
    r = client.get(arena.url + "/__legacy/c/abc?x=1")
    assert r.status_code == 301 and r.headers["location"] == arena.url + "/c/abc?x=1"


def test_score_knobs_penalty_and_v2(arena, client):
    s = arena.new_session()
    path = "/nextjs-api/stream/create-evaluation"
    arena.configure(recaptcha_fail_next=1)
    assert post_chat(client, arena, path, create_body(arena), s).status_code == 403
    assert post_chat(client, arena, path, create_body(arena), s).status_code == 200
    arena.configure(recaptcha_fail_always=True, v2_passes_when_v3_fails=True)
    assert post_chat(client, arena, path, create_body(arena), s).status_code == 403
    body = create_body(arena, recaptchaV2Token=arena.mint_token(v2=True))
    body.pop("recaptchaV3Token")
    assert post_chat(client, arena, path, body, s).status_code == 200
    arena.reset()
    arena.configure(recaptcha_penalty={"k": 2, "w": 60, "p": 100})
    codes = [post_chat(client, arena, path, create_body(arena), s).status_code for _ in range(3)]
    assert codes == [200, 200, 403]
    arena.clock_offset = 90      # flagged at t=0 for 100 s; this attempt extends the flag to t=190
    assert post_chat(client, arena, path, create_body(arena), s).status_code == 403
    arena.clock_offset = 150     # flag extended to 90+100: still flagged
    assert post_chat(client, arena, path, create_body(arena), s).status_code == 403
    arena.clock_offset = 400
    assert post_chat(client, arena, path, create_body(arena), s).status_code == 200
    # another account is not affected
    assert post_chat(client, arena, path, create_body(arena), arena.new_session()).status_code == 200


def test_user_fault_retry_heartbeat_r2_cap(arena, client):
    s1, s2 = arena.new_session(), arena.new_session()
    path = "/nextjs-api/stream/create-evaluation"
    arena.fault(expire_auth=True, user=arena.session_user(s2))
    assert post_chat(client, arena, path, create_body(arena), s1).status_code == 200
    assert post_chat(client, arena, path, create_body(arena), s2).status_code == 401
    body = create_body(arena, "hello")
    post_chat(client, arena, path, body, s1)
    eid, mid = body["id"], body["modelAMessageId"]
    retry = {"messages": [], "modelId": TEXT_MODEL, "recaptchaV3Token": arena.mint_token("chat_retry")}
    r = post_chat(client, arena, f"/nextjs-api/stream/retry-evaluation-session-message/{eid}/messages/{mid}",
                  retry, s1, method="PUT")
    assert r.status_code == 200 and parse_stream(r.text)[0] == "turn 1: hello"
    arena.configure(heartbeat_every=0.05, line_delay=0.12)
    r = post_chat(client, arena, path, create_body(arena, "a b c d"), s1)
    assert r.text.count('a2:[{"type":"heartbeat"}]') >= 3 and parse_stream(r.text)[0] == "turn 1: a b c d"
    arena.reset()
    hdr = {"Next-Action": arena.action_ids["generateUploadUrl"], "Origin": arena.url, "Cookie": cookie_header(s1)}
    r = client.post(arena.url + "/", content='["big.png","image/png"]', headers=hdr)
    up = json.loads(r.text.splitlines()[1][2:])["data"]["uploadUrl"]
    assert client.options(up).status_code == 204
    assert client.put(up, content=b"x" * (10 * 1024 * 1024 + 1)).status_code == 413
    assert client.put(up + "0", content=b"x").status_code == 403


# --- Cloudflare's interactive challenge (cloudflare_interactive) -----------------------------------------------------


def widget_of(challenge_page: str) -> str:
    """The id in the challenge iframe's src (…/turnstile/if/ov2/<id>/normal)."""
    match = re.search(r"/turnstile/if/ov2/([0-9a-f]+)/normal", challenge_page)
    assert match, challenge_page
    return match.group(1)


def test_interactive_solve_wants_the_widget_of_a_shown_challenge_once(arena, client):
    arena.configure(cloudflare=True, cloudflare_interactive=True)
    page = client.get(arena.url + "/", headers={"User-Agent": UA})
    assert page.status_code == 403 and "Just a moment..." in page.text and "setTimeout" not in page.text
    widget = widget_of(page.text)
    frame = client.get(arena.url + f"/cdn-cgi/challenge-platform/challenges.cloudflare.com/turnstile/if/ov2/"
                                   f"{widget}/normal")
    assert 'type=checkbox id="cf-chl-widget">' in frame.text and "checked" not in frame.text
    for refused in ({}, {"widget": "0123abcd"}):  # the delay's solve, a widget no challenge showed
        r = client.post(arena.url + SOLVE, json=refused, headers={"User-Agent": UA})
        assert r.status_code == 403 and "cf_clearance" not in r.cookies
    assert arena.requests[-1]["note"] == "cloudflare: no click on a shown challenge widget"
    r = client.post(arena.url + SOLVE, json={"widget": widget}, headers={"User-Agent": UA})
    cf = r.cookies["cf_clearance"]
    assert r.status_code == 200 and "HttpOnly" in r.headers["set-cookie"]
    assert client.get(arena.url + "/", headers={"User-Agent": UA, "Cookie": f"cf_clearance={cf}"}).status_code == 200
    assert client.get(arena.url + "/", headers={"User-Agent": "other", "Cookie": f"cf_clearance={cf}"}
                      ).status_code == 403
    assert client.post(arena.url + SOLVE, json={"widget": widget}, headers={"User-Agent": UA}).status_code == 403


@contextlib.contextmanager
def challenged_page(arena: FakeArena) -> Iterator[Any]:
    """A headless Chromium page on the interactive challenge (its widget loaded)."""
    from playwright.sync_api import sync_playwright
    arena.configure(cloudflare=True, cloudflare_interactive=True, cloudflare_delay=0.2)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, headless=True)
        try:
            page = browser.new_context(user_agent=UA).new_page()
            page.goto(arena.url + "/", wait_until="load")
            assert page.title() == "Just a moment..."
            yield page
        finally:
            browser.close()


def widget_frame(page: Any) -> Any:
    return next(f for f in page.frames if "challenges.cloudflare.com" in f.url)


@pytest.mark.skipif(not BROWSER, reason="needs Chromium")
def test_interactive_challenge_never_clears_by_waiting_or_by_a_scripted_click(arena):
    with challenged_page(arena) as page:
        time.sleep(1.5)  # well past cloudflare_delay
        widget_frame(page).evaluate("() => document.getElementById('cf-chl-widget').click()")  # untrusted
        time.sleep(1.0)
        assert page.title() == "Just a moment..."
        assert "cf_clearance" not in {c["name"] for c in page.context.cookies()}
    assert not [e for e in arena.requests if e["path"] == SOLVE]


@pytest.mark.skipif(not BROWSER, reason="needs Chromium")
def test_interactive_challenge_clears_on_a_click_with_a_clearance_bound_to_the_browser(arena, client):
    with challenged_page(arena) as page:
        with page.expect_navigation():
            widget_frame(page).click("#cf-chl-widget")
        assert page.title() == "LMArena"
        [cf] = [c for c in page.context.cookies() if c["name"] == "cf_clearance"]
        assert cf["httpOnly"]
    [solve] = [e for e in arena.requests if e["path"] == SOLVE]
    assert solve["status"] == 200 and solve["headers"]["user-agent"] == UA
    jar = f"cf_clearance={cf['value']}"
    assert client.get(arena.url + "/", headers={"User-Agent": UA, "Cookie": jar}).status_code == 200
    assert client.get(arena.url + "/", headers={"User-Agent": "other", "Cookie": jar}).status_code == 403
