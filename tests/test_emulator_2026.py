"""The emulator's late-2026 switches (arena-protocol §0, U1–U10), scripted replies and replays of real captures,
checked with raw HTTP against the emulator alone (no bridge), one behaviour per test."""

import json
import os
import re
import shutil
import time
import uuid

import httpx
import pytest
from emulator.catalog import ROUTER_MODEL_ID
from emulator.common import PAGE_HEADER, REAL_FIXTURES
from emulator.replay import capture_names
from emulator_client import (
    CREATE,
    IMAGE_MODEL,
    SEARCH_MODEL,
    TEXT_MODEL,
    UA,
    cookie_header,
    create_body,
    follow_up_body,
    parse_stream,
    post_chat,
)
from fake_arena import FakeArena, make_uuid7

BATTLE_400 = "Bad next turn request in Battles in Direct mode. DIRECT was requested, but expected a BATTLE turn"
BROWSER = os.environ.get("BRIDGE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")


# The conftest's emulator (one per module), from default knobs in every test; `raw` is a plain HTTP client.
pytestmark = pytest.mark.usefixtures("default_knobs")


def post(raw, arena, eid, content, session, **kw):
    return post_chat(raw, arena, f"/nextjs-api/stream/post-to-evaluation/{eid}",
                     follow_up_body(arena, eid, content, **kw), session)


def skip(raw, arena, eid, session, a, b):
    return raw.post(arena.url + f"/nextjs-api/stream/skip-direct-battle/{eid}",
                       json={"messageAId": a, "messageBId": b}, headers={"Cookie": cookie_header(session)})


def page_models(text):
    flight = "".join(json.loads(p) for p in re.findall(r"self\.__next_f\.push\(\[1,(\".*?\")\]\)</script>", text,
                                                     re.DOTALL))
    at = flight.find('"initialModels":')
    return None if at < 0 else json.JSONDecoder().raw_decode(flight, at + len('"initialModels":'))[0]


def chunks_js(raw, arena):
    page = raw.get(arena.url + "/?mode=direct").text
    return "".join(raw.get(arena.url + c).text
                   for c in re.findall(r'<script src="(/_next/static/chunks/[^"]+)"', page))


def ac_sources(lines):
    return [json.loads(json.loads(ln[3:])["argsTextDelta"])["source"] for ln in lines if ln.startswith("ac:")]


# --- U1: tokens bound to the page that minted them -------------------------------------------------------------


def test_u1_a_token_passes_when_sent_with_the_minting_pages_id(arena, raw):
    arena.configure(context_bound_tokens=True)
    body = create_body(arena, token=arena.mint_token(context="tab-1"))
    assert post_chat(raw, arena, CREATE, body, arena.new_session(), headers={PAGE_HEADER: "tab-1"}).status_code == 200


def test_u1_a_replayed_token_without_the_pages_id_gets_403(arena, raw):
    arena.configure(context_bound_tokens=True)
    r = post_chat(raw, arena, CREATE, create_body(arena, token=arena.mint_token(context="tab-1")),
                  arena.new_session())
    assert r.status_code == 403 and r.json() == {"error": "recaptcha validation failed"}
    assert arena.chat_requests()[-1]["note"] == "recaptcha: not sent by the minting page"


def test_u1_a_token_sent_by_another_page_gets_403(arena, raw):
    arena.configure(context_bound_tokens=True)
    body = create_body(arena, token=arena.mint_token(context="tab-1"))
    assert post_chat(raw, arena, CREATE, body, arena.new_session(), headers={PAGE_HEADER: "tab-2"}).status_code == 403


def test_u1_the_token_does_not_reveal_the_page_id(arena):
    assert "tab-secret" not in json.dumps(arena.recaptcha.decode(arena.mint_token(context="tab-secret")))


def test_u1_also_binds_sign_up_tokens_to_their_page(arena, raw):
    arena.configure(context_bound_tokens=True, signup_turnstile="none", provisional_id_store="local_storage")
    body = {"recaptchaToken": arena.mint_token("sign_up", context="tab-1"), "provisionalUserId": str(uuid.uuid4())}
    r = raw.post(arena.url + "/nextjs-api/sign-up", json=body)
    assert r.status_code == 403 and r.json() == {"error": "recaptcha validation failed"}
    body["recaptchaToken"] = arena.mint_token("sign_up", context="tab-1")
    assert raw.post(arena.url + "/nextjs-api/sign-up", json=body, headers={PAGE_HEADER: "tab-1"}).status_code == 200


@pytest.mark.skipif(not BROWSER, reason="needs Chromium")
def test_u1_in_chromium_the_pages_own_fetch_passes_and_a_replay_with_its_cookies_fails(arena, raw):
    from playwright.sync_api import sync_playwright
    arena.configure(context_bound_tokens=True)
    session = arena.new_session()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, headless=True)
        try:
            context = browser.new_context(user_agent=UA)
            context.add_cookies([{"name": "arena-auth-prod-v1", "value": session, "url": arena.url + "/"}])
            page = context.new_page()
            page.goto(arena.url + "/?mode=direct")
            page.wait_for_function("() => window.grecaptcha && window.grecaptcha.enterprise")
            mint = "k => new Promise(r => grecaptcha.enterprise.ready(() => " \
                   "grecaptcha.enterprise.execute(k, {action: 'chat_submit'}).then(r)))"
            send = "b => fetch('/nextjs-api/stream/create-evaluation', {method: 'POST', body: b}).then(r => r.status)"
            in_page = create_body(arena, token=page.evaluate(mint, arena.sitekey))
            assert page.evaluate(send, json.dumps(in_page)) == 200
            assert page.evaluate("() => JSON.stringify(window.___grecaptcha_cfg)").count(arena.sitekey) == 1
            replayed = create_body(arena, token=page.evaluate(mint, arena.sitekey))
            jar = "; ".join(f"{c['name']}={c['value']}" for c in context.cookies(arena.url))
        finally:
            browser.close()
    r = post_chat(raw, arena, CREATE, replayed, None, headers={"Cookie": jar})
    assert r.status_code == 403 and r.json() == {"error": "recaptcha validation failed"}


# --- U2: account penalties -------------------------------------------------------------------------------------


def test_u2_the_third_request_within_20_seconds_puts_the_account_under_penalty(arena, raw):
    arena.configure(recaptcha_penalty={"k": 2, "w": 20, "p": 600})
    s = arena.new_session()
    assert [post_chat(raw, arena, CREATE, create_body(arena), s).status_code for _ in range(3)] == [200, 200, 403]
    assert arena.penalty_until(arena.session_user(s)) == pytest.approx(arena.now() + 600, abs=2)


def test_u2_each_attempt_during_the_penalty_extends_it(arena, raw):
    arena.configure(recaptcha_penalty={"k": 2, "w": 20, "p": 600})
    s = arena.new_session()
    for _ in range(3):
        post_chat(raw, arena, CREATE, create_body(arena), s)
    arena.clock_offset = 500
    assert post_chat(raw, arena, CREATE, create_body(arena), s).status_code == 403   # now until 1100
    arena.clock_offset = 1000
    assert post_chat(raw, arena, CREATE, create_body(arena), s).status_code == 403   # now until 1600
    arena.clock_offset = 1700
    assert post_chat(raw, arena, CREATE, create_body(arena), s).status_code == 200


def test_u2_a_failed_token_puts_the_account_under_penalty_and_others_are_unaffected(arena, raw):
    arena.configure(recaptcha_penalty={"k": 5, "w": 20, "p": 900})
    s = arena.new_session()
    assert post_chat(raw, arena, CREATE, create_body(arena, token="0cAFcWeAbogus"), s).status_code == 403
    r = post_chat(raw, arena, CREATE, create_body(arena), s)
    assert r.status_code == 403 and r.json() == {"error": "recaptcha validation failed"}
    assert arena.chat_requests()[-1]["note"] == "recaptcha: account penalty"
    assert post_chat(raw, arena, CREATE, create_body(arena), arena.new_session()).status_code == 200


def test_u2_on_fail_false_leaves_a_failed_token_without_penalty(arena, raw):
    arena.configure(recaptcha_penalty={"k": 5, "w": 20, "p": 900, "on_fail": False})
    s = arena.new_session()
    post_chat(raw, arena, CREATE, create_body(arena, token="0cAFcWeAbogus"), s)
    assert post_chat(raw, arena, CREATE, create_body(arena), s).status_code == 200


# --- U3: battle turns in direct-battle -------------------------------------------------------------------------


def battle_conversation(raw, arena, s):
    """A direct-battle chat whose second reply is a battle turn: (evaluation id, the battle turn's body, reply)."""
    arena.configure(battle_turn_every=2)
    first = create_body(arena, "one")
    assert post_chat(raw, arena, CREATE, first, s).status_code == 200
    second = follow_up_body(arena, first["id"], "two", modelBMessageId=make_uuid7())
    r = post_chat(raw, arena, f"/nextjs-api/stream/post-to-evaluation/{first['id']}", second, s)
    return first["id"], second, r


def test_u3_every_kth_reply_carries_both_lanes(arena, raw):
    _, _, r = battle_conversation(raw, arena, arena.new_session())
    lines = parse_stream(r.text)[1]
    assert parse_stream(r.text)[0] == "turn 2: two"
    assert any(ln.startswith("b0:") for ln in lines) and 'bd:{"finishReason":"stop"}' in lines
    assert lines[-1].startswith("ad:")


def test_u3_replies_between_battle_turns_have_one_lane(arena, raw):
    arena.configure(battle_turn_every=2)
    r = post_chat(raw, arena, CREATE, create_body(arena), arena.new_session())
    assert not any(ln.startswith("b") for ln in parse_stream(r.text)[1])


def test_u3_a_plain_follow_up_after_a_battle_turn_gets_the_400(arena, raw):
    s = arena.new_session()
    eid, _, _ = battle_conversation(raw, arena, s)
    r = post(raw, arena, eid, "three", s)
    assert r.status_code == 400 and r.json() == {"error": BATTLE_400}


def test_u3_skipping_the_battle_turn_lets_the_conversation_continue(arena, raw):
    s = arena.new_session()
    eid, second, _ = battle_conversation(raw, arena, s)
    r = skip(raw, arena, eid, s, second["modelAMessageId"], second["modelBMessageId"])
    assert r.status_code == 200 and r.json() == {"success": True}
    r = post(raw, arena, eid, "three", s)
    assert r.status_code == 200 and parse_stream(r.text)[0] == "turn 3: three"


def test_u3_skip_accepts_the_model_message_id_spelling(arena, raw):
    s = arena.new_session()
    eid, second, _ = battle_conversation(raw, arena, s)
    r = raw.post(arena.url + f"/nextjs-api/stream/skip-direct-battle/{eid}", headers={"Cookie": cookie_header(s)},
                 json={"modelAMessageId": second["modelAMessageId"], "modelBMessageId": second["modelBMessageId"]})
    assert r.status_code == 200


def test_u3_skip_needs_the_owning_account(arena, raw):
    eid, second, _ = battle_conversation(raw, arena, arena.new_session())
    assert skip(raw, arena, eid, arena.new_session(), second["modelAMessageId"],
                second["modelBMessageId"]).status_code == 401


def test_u3_skipping_without_a_battle_turn_is_only_allowed_for_first_response(arena, raw):
    s = arena.new_session()
    eid, second, _ = battle_conversation(raw, arena, s)
    skip(raw, arena, eid, s, second["modelAMessageId"], second["modelBMessageId"])
    r = skip(raw, arena, eid, s, second["modelAMessageId"], second["modelBMessageId"])
    assert r.status_code == 400 and r.json() == {"error": "Skipping only allowed for first response"}


def test_u3_skipping_with_other_message_ids_is_refused(arena, raw):
    s = arena.new_session()
    eid, second, _ = battle_conversation(raw, arena, s)
    assert skip(raw, arena, eid, s, second["modelAMessageId"], make_uuid7()).status_code == 400
    assert post(raw, arena, eid, "three", s).status_code == 400


def test_u3_a_refused_skip_leaves_the_evaluation_broken(arena, raw):
    s = arena.new_session()
    eid, second, _ = battle_conversation(raw, arena, s)
    arena.configure(battle_skip_refused=True)
    r = skip(raw, arena, eid, s, second["modelAMessageId"], second["modelBMessageId"])
    assert r.status_code == 400 and r.json() == {"error": "Skipping only allowed for first response"}
    assert post(raw, arena, eid, "three", s).json() == {"error": BATTLE_400}


def test_u3_a_battle_turn_without_model_b_message_id_announces_lane_bs_id(arena, raw):
    arena.configure(battle_turn_every=1)
    s = arena.new_session()
    body = create_body(arena)
    lines = parse_stream(post_chat(raw, arena, CREATE, body, s).text)[1]
    b_id = json.loads(next(ln for ln in lines if ln.startswith("bf:"))[3:])["messageId"]
    assert skip(raw, arena, body["id"], s, body["modelAMessageId"], b_id).status_code == 200


def test_u3_direct_mode_has_no_battle_turns(arena, raw):
    arena.configure(battle_turn_every=1)
    r = post_chat(raw, arena, CREATE, create_body(arena, mode="direct"), arena.new_session())
    assert not any(ln.startswith("b") for ln in parse_stream(r.text)[1])


# --- U4: guests behind LOGIN_GATE ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["direct", "direct-battle", "side-by-side", "auto"])
def test_u4_a_guest_gets_401_login_gate_in_direct_modes(arena, raw, mode):
    arena.configure(login_gate=True)
    r = post_chat(raw, arena, CREATE, create_body(arena, mode=mode, modelBId=TEXT_MODEL,
                                                     modelBMessageId=make_uuid7()), arena.new_session())
    assert r.status_code == 401 and r.json() == {"error": "LOGIN_GATE", "message": "Direct mode requires user login"}


def test_u4_a_guest_may_still_battle(arena, raw):
    arena.configure(login_gate=True)
    body = create_body(arena, mode="battle", modelBMessageId=make_uuid7())
    del body["modelAId"]
    assert post_chat(raw, arena, CREATE, body, arena.new_session()).status_code == 200


def test_u4_a_signed_in_account_passes_the_gate(arena, raw):
    arena.configure(login_gate=True)
    assert post_chat(raw, arena, CREATE, create_body(arena), arena.new_session(anonymous=False)).status_code == 200


def test_u4_the_gate_also_stops_a_guests_follow_up(arena, raw):
    s = arena.new_session()
    body = create_body(arena)
    post_chat(raw, arena, CREATE, body, s)
    arena.configure(login_gate=True)
    assert post(raw, arena, body["id"], "again", s).status_code == 401


# --- U5: the 2026 sign-up ---------------------------------------------------------------------------------------


def test_u5_the_2026_page_has_no_turnstile_and_no_provisional_cookie(arena, raw):
    arena.configure(signup_turnstile="none", provisional_id_store="local_storage")
    r = raw.get(arena.url + "/")
    assert "turnstile" not in r.text and "provisional_user_id" not in r.cookies
    assert "localStorage.setItem('provisional_user_id'" in r.text


def test_u5_sign_up_with_recaptcha_token_and_a_client_made_provisional_id(arena, raw):
    arena.configure(signup_turnstile="none", provisional_id_store="local_storage")
    pid = str(uuid.uuid4())
    r = raw.post(arena.url + "/nextjs-api/sign-up",
                    json={"recaptchaToken": arena.mint_token("sign_up"), "provisionalUserId": pid})
    assert r.status_code == 200 and arena.session_user(r.cookies["arena-auth-prod-v1"]) == pid


def test_u5_a_provisional_id_is_used_once(arena, raw):
    arena.configure(signup_turnstile="none", provisional_id_store="local_storage")
    pid = str(uuid.uuid4())
    for _ in range(2):
        r = raw.post(arena.url + "/nextjs-api/sign-up",
                        json={"recaptchaToken": arena.mint_token("sign_up"), "provisionalUserId": pid})
    assert r.status_code == 400 and r.json() == {"error": "User already exists"}


@pytest.mark.skipif(not BROWSER, reason="needs Chromium")
@pytest.mark.parametrize("knobs", [{}, {"signup_turnstile": "none", "provisional_id_store": "local_storage"}],
                         ids=["2025-turnstile-and-cookie", "2026-body-and-local-storage"])
def test_u5_the_page_signs_itself_up_in_chromium(arena, knobs):
    from playwright.sync_api import sync_playwright
    arena.configure(page_auto_signup=True, turnstile_delay=0.05, **knobs)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, headless=True)
        try:
            context = browser.new_context(user_agent=UA)
            page = context.new_page()
            page.goto(arena.url + "/")
            page.wait_for_function("() => window.__arenaSignUp !== undefined", timeout=10000)
            status = page.evaluate("() => window.__arenaSignUp")
            jar = {c["name"]: c["value"] for c in context.cookies(arena.url)}
        finally:
            browser.close()
    assert status == 200 and arena.session_user(jar["arena-auth-prod-v1"])
    assert ("provisional_user_id" in jar) == (knobs == {})


def test_u5_the_2026_body_fails_where_turnstile_is_still_required(arena, raw):
    pid = raw.get(arena.url + "/").cookies["provisional_user_id"]
    r = raw.post(arena.url + "/nextjs-api/sign-up", headers={"Cookie": f"provisional_user_id={pid}"},
                    json={"recaptchaToken": arena.mint_token("sign_up"), "provisionalUserId": pid})
    assert r.status_code == 400 and r.json() == {"error": "Invalid turnstile token"}


def test_u5_without_turnstile_only_the_2026_body_is_accepted(arena, raw):
    arena.configure(signup_turnstile="none", provisional_id_store="local_storage")
    pid = str(uuid.uuid4())
    for extra in ({"turnstileToken": arena._mint_turnstile(arena.turnstile_sitekey)}, {"turnstile_token": arena._mint_turnstile(arena.turnstile_sitekey)}):
        r = raw.post(arena.url + "/nextjs-api/sign-up",
                     json={**extra, "recaptchaToken": arena.mint_token("sign_up"), "provisionalUserId": pid})
        assert r.status_code == 400 and r.json() == {"error": "Invalid request body"}
    r = raw.post(arena.url + "/nextjs-api/sign-up",
                 json={"recaptchaToken": arena.mint_token("sign_up"), "provisionalUserId": pid})
    assert r.status_code == 200


def test_u5_a_page_may_keep_no_provisional_id_and_sign_up_takes_the_clients(arena, raw):
    arena.configure(signup_turnstile="none", provisional_id_store="none")
    r = raw.get(arena.url + "/")
    assert "provisional_user_id" not in r.cookies and "provisional_user_id" not in r.text
    pid = str(uuid.uuid4())
    r = raw.post(arena.url + "/nextjs-api/sign-up",
                 json={"recaptchaToken": arena.mint_token("sign_up"), "provisionalUserId": pid})
    assert r.status_code == 200 and arena.session_user(r.cookies["arena-auth-prod-v1"]) == pid


# --- U6: citations as offsets ------------------------------------------------------------------------------------


def search_reply(raw, arena):
    arena.configure(citation_format="offsets")
    r = post_chat(raw, arena, CREATE, create_body(arena, "q", model=SEARCH_MODEL, modality="search"),
                  arena.new_session())
    return parse_stream(r.text)


def test_u6_the_text_carries_no_markers_and_the_reply_finishes_unknown(arena, raw):
    text, lines = search_reply(raw, arena)
    assert "<!--citation" not in text and json.loads(lines[-1][3:])["finishReason"] == "unknown"


def test_u6_a_source_repeats_with_a_growing_char_location_and_gains_its_title_later(arena, raw):
    sources = [s for s in ac_sources(search_reply(raw, arena)[1]) if isinstance(s, dict) and s["id"] == "1"]
    assert [len(s["charLocation"]) for s in sources] == [1, 2, 3]
    assert "title" not in sources[0] and sources[1]["title"] == "Example A"


def test_u6_the_last_citation_part_carries_every_source_as_an_array(arena, raw):
    last = ac_sources(search_reply(raw, arena)[1])[-1]
    assert isinstance(last, list) and [s["id"] for s in last] == ["1", "2"] and all(s["title"] for s in last)


def test_u6_char_locations_are_the_ends_of_the_cited_sentences(arena, raw):
    text, lines = search_reply(raw, arena)
    ends = {n for s in ac_sources(lines)[-1] for n in s["charLocation"]}
    assert ends and all(text[n - 1] == "." for n in ends)


# --- U7: the per-modality image quota -----------------------------------------------------------------------------


def image(raw, arena, s):
    return post_chat(raw, arena, CREATE, create_body(arena, "a cat", model=IMAGE_MODEL, modality="image"), s)


def test_u7_the_days_image_says_the_quota_is_used(arena, raw):
    arena.configure(image_quota=1)
    r = image(raw, arena, arena.new_session())
    assert r.status_code == 200 and r.headers["ratelimit"] == "limit=1, remaining=0, reset=86400"


def test_u7_the_next_image_gets_the_real_429(arena, raw):
    arena.configure(image_quota=1)
    s = arena.new_session()
    image(raw, arena, s)
    r = image(raw, arena, s)
    assert r.status_code == 429 and r.text == "Too many requests, please try again later."
    assert r.headers["content-type"].startswith("text/plain") and r.headers["retry-after"] == "0"
    assert r.headers["ratelimit-modality"] == "image" and r.headers["ratelimit"] == "limit=0, remaining=0, reset=0"


def test_u7_text_chats_keep_working_past_the_image_quota(arena, raw):
    arena.configure(image_quota=1)
    s = arena.new_session()
    image(raw, arena, s)
    assert post_chat(raw, arena, CREATE, create_body(arena), s).status_code == 200


def test_u7_the_quota_is_per_account_and_resets_after_a_day(arena, raw):
    arena.configure(image_quota=1)
    s = arena.new_session(lifetime=3 * 86400)
    image(raw, arena, s)
    assert image(raw, arena, arena.new_session()).status_code == 200
    arena.clock_offset = 86401
    assert image(raw, arena, s).status_code == 200


# --- U8: the sitekey at the real call site, in script URLs, and rotated -------------------------------------------


def test_u8_the_call_site_passes_the_action_as_a_variable(arena, raw):
    arena.configure(sitekey_call_site="variable")
    js = chunks_js(raw, arena)
    assert f'grecaptcha.enterprise.execute("{arena.sitekey}",{{action:e}})' in js
    assert '{action:"chat_submit"}' not in js and '"chat_submit"' in js


def test_u8_the_page_may_name_the_sitekey_only_as_k(arena, raw):
    arena.configure(sitekey_in_page="k")
    page = raw.get(arena.url + "/").text
    assert "enterprise.js?render=explicit" in page and f"k={arena.sitekey}" in page
    assert f"render={arena.sitekey}" not in page


def test_u8_the_page_may_not_name_the_sitekey_at_all(arena, raw):
    arena.configure(sitekey_in_page="none")
    assert arena.sitekey not in raw.get(arena.url + "/").text
    assert arena.sitekey in chunks_js(raw, arena)


def test_u8_hidden_in_the_chunks_and_live_in_the_page_no_text_names_the_sitekey(arena, raw):
    arena.configure(sitekey_call_site="hidden", sitekey_in_page="live")
    text = raw.get(arena.url + "/").text + chunks_js(raw, arena)
    assert arena.sitekey not in text and "execute(atob(" in text


@pytest.mark.skipif(not BROWSER, reason="needs Chromium")
def test_u8_a_live_key_page_has_the_sitekey_in_its_live_recaptcha_config(arena):
    from playwright.sync_api import sync_playwright
    arena.configure(sitekey_call_site="hidden", sitekey_in_page="live")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, headless=True)
        try:
            page = browser.new_context(user_agent=UA).new_page()
            page.goto(arena.url + "/")
            page.wait_for_function("() => window.___grecaptcha_cfg && window.___grecaptcha_cfg.count > 0")
            config = page.evaluate("() => JSON.stringify(window.___grecaptcha_cfg)")
            scripts = page.evaluate("() => [...document.scripts].map(s => s.src).join(' ')")
        finally:
            browser.close()
    assert arena.sitekey in config and arena.sitekey not in scripts


def test_u8_a_rotated_sitekey_is_served_everywhere_and_old_tokens_fail(arena, raw):
    old_token = arena.mint_token()
    old = arena.sitekey
    arena.rotate_sitekey()
    try:
        assert arena.sitekey in chunks_js(raw, arena) and old not in chunks_js(raw, arena)
        body = create_body(arena, token=old_token)
        assert post_chat(raw, arena, CREATE, body, arena.new_session()).status_code == 403
    finally:
        arena.rotate_sitekey(old)


# --- U9: the 2026 body and model fields, the router, dead credentials, server-action flight trees ------------------


def body_2026(arena, **kw):
    body = create_body(arena, modelBMessageId=make_uuid7(), **kw)
    body["userMessage"]["metadata"] = {"autoModalityMetadata": {"modality": "chat", "confidence": 0.98}}
    return body


def test_u9_strict_2026_body_refuses_a_body_without_its_fields(arena, raw):
    arena.configure(strict_2026_body=True)
    r = post_chat(raw, arena, CREATE, create_body(arena), arena.new_session())
    assert r.status_code == 403 and r.json() == {"error": "recaptcha validation failed"}


def test_u9_strict_2026_body_accepts_the_web_clients_body(arena, raw):
    arena.configure(strict_2026_body=True)
    assert post_chat(raw, arena, CREATE, body_2026(arena), arena.new_session()).status_code == 200


def test_u9_the_retry_endpoint_takes_the_browsers_body_of_a_token_alone(arena, raw):
    s = arena.new_session()
    body = create_body(arena, "hello")
    post_chat(raw, arena, CREATE, body, s)
    path = f"/nextjs-api/stream/retry-evaluation-session-message/{body['id']}/messages/{body['modelAMessageId']}"
    r = post_chat(raw, arena, path, {"recaptchaV3Token": arena.mint_token("chat_retry")}, s, method="PUT")
    assert r.status_code == 200 and parse_stream(r.text)[0] == "turn 1: hello"


def test_u9_models_gain_display_name_and_user_selectable(arena, raw):
    arena.configure(model_fields_2026=True, unselectable_models=["gemini-3-pro"])
    models = {m["id"]: m for m in page_models(raw.get(arena.url + "/?mode=direct").text)}
    assert models[TEXT_MODEL]["displayName"] == "Gemini 3 Pro" and models[TEXT_MODEL]["userSelectable"] is False
    assert models[SEARCH_MODEL]["userSelectable"] is True


def test_u9_a_model_not_selectable_is_refused(arena, raw):
    arena.configure(unselectable_models=[TEXT_MODEL])
    r = post_chat(raw, arena, CREATE, create_body(arena), arena.new_session())
    assert r.status_code == 400 and r.json() == {"error": "Selected model is not available for user selection"}


def test_u9_the_max_router_names_the_model_it_chose(arena, raw):
    arena.configure(router_model="gemini-3-pro")
    assert any(m["id"] == ROUTER_MODEL_ID for m in page_models(raw.get(arena.url + "/").text))
    r = post_chat(raw, arena, CREATE, create_body(arena, model=ROUTER_MODEL_ID), arena.new_session())
    first = json.loads(parse_stream(r.text)[1][0][3:])
    assert first == [{"type": "routed_model", "modelId": TEXT_MODEL, "publicName": "gemini-3-pro"}]


def test_u9_a_dead_credential_gets_user_not_found(arena, raw):
    s = arena.new_session()
    arena.kill_account(s)
    r = post_chat(raw, arena, CREATE, create_body(arena), s)
    assert r.status_code == 200 and parse_stream(r.text)[1][0] == 'a3:"User not found"'


def test_u9_a_dead_credential_cannot_be_refreshed(arena, raw):
    s = arena.new_session()
    arena.kill_account(s)
    rt = FakeArena.decode_session(s)["refresh_token"]
    r = raw.post(arena.url + "/auth/v1/token?grant_type=refresh_token", json={"refresh_token": rt},
                    headers={"apikey": arena.anon_key})
    assert r.status_code == 400


def test_u9_a_server_action_may_answer_with_the_whole_flight_tree(arena, raw):
    arena.configure(action_answer="flight")
    s = arena.new_session()
    r = raw.post(arena.url + "/", content='["a.png","image/png"]', headers={
        "Next-Action": arena.action_ids["generateUploadUrl"], "Origin": arena.url, "Cookie": cookie_header(s)})
    lines = r.text.splitlines()
    assert r.headers["x-action-revalidated"] == "[[],0,1]" and lines[3].startswith('0:{"a":"$@1","f":[[')
    assert json.loads(lines[4][2:])["data"]["key"].startswith(arena.session_user(s)) and len(lines) > 5


# --- U10: the model list only at /?mode=direct, no anon key ------------------------------------------------------


def test_u10_the_model_list_may_be_only_at_mode_direct(arena, raw):
    arena.configure(models_at="direct_only")
    assert page_models(raw.get(arena.url + "/").text) is None
    assert len(page_models(raw.get(arena.url + "/?mode=direct").text)) == 320
    assert len(page_models(raw.get(arena.url + "/text/direct").text)) == 320


def test_u10_the_chunks_may_carry_no_anon_key_and_the_page_still_refreshes(arena, raw):
    arena.configure(anon_key_in_chunks=False)
    assert arena.anon_key not in chunks_js(raw, arena)
    s = arena.new_session()
    arena.expire_session(s)
    r = raw.get(arena.url + "/", headers={"Cookie": cookie_header(s)})
    fresh = r.cookies["arena-auth-prod-v1"]
    assert arena.session_user(fresh) == arena.session_user(s)


# --- scripted replies ---------------------------------------------------------------------------------------------


def test_scripted_replies_come_in_order_with_their_reasoning_then_generated_ones_resume(arena, raw):
    arena.script_reply(text="The answer is 42.", reasoning="Think first.")
    arena.script_reply(text="Second.")
    s = arena.new_session()
    replies = [post_chat(raw, arena, CREATE, create_body(arena, "q"), s).text for _ in range(3)]
    assert [parse_stream(t)[0] for t in replies] == ["The answer is 42.", "Second.", "turn 1: q"]
    reasoning = "".join(json.loads(ln[3:]) for ln in parse_stream(replies[0])[1] if ln.startswith("ag:"))
    assert reasoning == "Think first." and replies[0].endswith('ad:{"finishReason":"stop"}\n')


def test_a_scripted_reply_is_kept_in_the_history(arena, raw):
    arena.script_reply(text="Scripted.", finish="length", usage={"promptTokens": 3, "completionTokens": 1})
    body = create_body(arena)
    r = post_chat(raw, arena, CREATE, body, arena.new_session())
    assert arena.evaluations[body["id"]]["messages"][-1]["content"] == "Scripted."
    assert parse_stream(r.text)[1][-1] == 'ad:{"finishReason":"length","usage":{"promptTokens":3,"completionTokens":1}}'


def test_the_control_api_queues_and_lists_scripted_replies(arena, raw):
    r = raw.post(arena.url + "/__emulator/script", json={"replies": [{"text": "A"}, {"lines": ['a0:"B"']}]})
    assert [q.get("text") or q.get("lines") for q in r.json()["queue"]] == ["A", ['a0:"B"']]
    s = arena.new_session()
    assert parse_stream(post_chat(raw, arena, CREATE, create_body(arena), s).text)[0] == "A"
    assert post_chat(raw, arena, CREATE, create_body(arena), s).text == 'a0:"B"\n'
    assert raw.get(arena.url + "/__emulator/script").json() == {"queue": []}


def test_an_unknown_capture_name_is_refused_when_queued(arena, raw):
    r = raw.post(arena.url + "/__emulator/script", json={"replay": "no-such-capture"})
    assert r.status_code == 400 and "unknown capture" in r.json()["error"]


# --- replays of real captures --------------------------------------------------------------------------------------


def capture(name):
    folder = "streams" if os.path.exists(os.path.join(REAL_FIXTURES, "streams", name + ".body")) else "errors"
    with open(os.path.join(REAL_FIXTURES, folder, name + ".body"), "rb") as fh:
        body = fh.read()
    with open(os.path.join(REAL_FIXTURES, folder, name + ".meta.json"), encoding="utf-8") as fh:
        return body, json.load(fh)


def test_the_control_api_lists_every_capture(arena, raw):
    names = raw.get(arena.url + "/__emulator/captures").json()["captures"]
    assert "dec-search-00" in names and "dec-edit-22" in names and len(names) == 9


@pytest.mark.parametrize("name", capture_names())
def test_a_replayed_capture_is_byte_for_byte_with_its_status_and_headers(arena, raw, name):
    body, meta = capture(name)
    arena.script_reply(replay=name)
    r = post_chat(raw, arena, CREATE, create_body(arena), arena.new_session())
    assert r.status_code == (meta["status"] or 200) and r.content == body  # the HAR says 0 for one stream
    for header in ("content-type", "ratelimit", "ratelimit-policy", "retry-after", "ratelimit-modality"):
        assert r.headers.get(header) == meta["response_headers"].get(header)


def test_a_replay_in_random_writes_is_still_byte_for_byte(arena, raw):
    body, _ = capture("dec-search-00")
    arena.configure(split="random")
    arena.script_reply(replay="dec-search-00")
    assert post_chat(raw, arena, CREATE, create_body(arena), arena.new_session()).content == body


@pytest.mark.parametrize("cut", [1, 250, 2717, "random"])
def test_a_replay_cut_at_an_offset_hangs_up_after_exactly_that_prefix(arena, raw, cut):
    body, _ = capture("dec-search-00")
    arena.script_reply(replay="dec-search-00", cut=cut)
    got = b""
    with pytest.raises(httpx.HTTPError), raw.stream("POST", arena.url + CREATE, content=json.dumps(
            create_body(arena)), headers={"Cookie": cookie_header(arena.new_session())}) as r:
        for data in r.iter_raw():
            got += data
    assert 0 < len(got) < len(body) and body.startswith(got) and (cut == "random" or len(got) == cut)


def test_a_replayed_reply_is_the_evaluations_history(arena, raw):
    body = create_body(arena)
    arena.script_reply(replay="nov-evalcreate-00")
    post_chat(raw, arena, CREATE, body, arena.new_session())
    assert arena.evaluations[body["id"]]["messages"][-1]["content"] == "Hello there! How can I help you today?"


def test_a_client_that_hangs_up_on_a_held_answer_is_logged_aborted_at_once(arena):
    arena.configure(first_byte_delay=60)
    with httpx.Client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        post_chat(client, arena, CREATE, create_body(arena), arena.new_session())
    closed = time.time()
    deadline = closed + 2
    while time.time() < deadline and not arena.chat_requests()[0].get("aborted"):
        time.sleep(0.02)
    [entry] = arena.chat_requests()
    assert entry["aborted"] and entry["aborted_at"] - closed < 0.5 and entry.get("status") is None


def test_a_held_answer_goes_out_whole_once_the_hold_is_over(arena, raw):
    arena.configure(first_byte_delay=0.3)
    started = time.time()
    r = post_chat(raw, arena, CREATE, create_body(arena, "held"), arena.new_session())
    assert r.status_code == 200 and time.time() - started >= 0.3
    assert parse_stream(r.text)[0] == "turn 1: held" and not arena.chat_requests()[0].get("aborted")


def test_open_connections_counts_the_connections_not_yet_closed():
    with FakeArena() as arena:     # its own server: the shared one may still be closing earlier tests' connections
        with httpx.Client(timeout=10) as client:
            client.get(arena.url + "/")
            assert arena.open_connections == 1
            assert client.get(arena.url + "/__emulator/state").json()["open_connections"] == 1
        deadline = time.time() + 2
        while time.time() < deadline and arena.open_connections:
            time.sleep(0.02)
        assert arena.open_connections == 0
