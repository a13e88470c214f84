"""End to end against the late-2026 site (issue 14, arena-protocol.md §0 U1–U10): the real bridge and the
emulator with its late-2026 switches on. One behaviour per test, named after it; each says what it costs
in upstream requests where that is the point."""
import collections
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from emulator.common import REAL_FIXTURES
from harness import ROOT, BridgeProcess, validate
from test_real_fixtures import read_bytes, read_raw

SEARCH_MODEL = "gemini-3-pro-grounding"
IMAGE_MODEL = "flux-2-flex"
TEXT_MODEL = "gemini-3-pro"
UNSELECTABLE = "grok-4.1"
GOOD = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "x"}]}


def chat(client, *contents, model=TEXT_MODEL, **extra):
    """One request whose messages alternate user/assistant, starting with the user."""
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(contents)]
    return client.chat.completions.create(model=model, messages=messages, **extra)


def post(proc, key, body, timeout=60):
    return httpx.post(proc.url + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"})


def raw_reading(name: str) -> dict:
    """Lane A of a real capture as its raw lines say (the real-fixture tests' independent reading)."""
    return read_raw(read_bytes("streams", name + ".body"))


STREAM_CAPTURES = sorted(f[:-len(".body")] for f in os.listdir(os.path.join(REAL_FIXTURES, "streams"))
                         if f.endswith(".body"))
OPENAI_FINISH = {"stop": "stop", "unknown": "stop", "length": "length"}


# --- U10, U9: where the model list is, which models it offers ---------------------------------------------------------


@pytest.fixture(scope="module")
def late_bridge(arena, tmp_path_factory):
    """A bridge that first met the site with its model list only at /?mode=direct, 2026 model fields, one
    unselectable model and the "Max" router."""
    arena.reset()
    arena.configure(**LATE_SITE)
    proc = BridgeProcess(arena.url, str(tmp_path_factory.mktemp("late"))).start()
    proc.wait_for_models()
    proc.pages_read = [(r["path"], r["query"]) for r in arena.core.requests if r["method"] == "GET"
                       and not r["path"].startswith(("/_next/", "/__"))]
    yield proc
    proc.stop()


LATE_SITE = {"models_at": "direct_only", "model_fields_2026": True, "unselectable_models": [UNSELECTABLE],
             "router_model": TEXT_MODEL, "recaptcha": "off"}


@pytest.fixture
def late(arena, late_bridge):
    arena.reset()
    arena.configure(**LATE_SITE)
    late_bridge.set_accounts(arena.new_session())
    return late_bridge


def models_of(proc):
    key = proc.create_key()
    response = httpx.get(proc.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    validate("ListModelsResponse", response.json())
    return [m["id"] for m in response.json()["data"]]


def test_u10_a_model_list_only_at_the_direct_page_still_serves_v1_models(late):
    names = models_of(late)
    assert TEXT_MODEL in names and len(names) > 10


def test_u10_discovery_reads_the_direct_page_first_and_needs_no_other(late):
    assert late.pages_read == [("/", {"mode": "direct"})]


def test_u9_a_model_the_site_marks_unselectable_is_not_listed(late):
    assert any(m["publicName"] == UNSELECTABLE and m["userSelectable"] is False for m in late.store.models())
    assert UNSELECTABLE not in models_of(late)


def test_u9_an_unselectable_model_is_refused_without_asking_the_site(late, arena):
    key = late.create_key()
    arena.clear_log()
    response = post(late, key, {"model": UNSELECTABLE, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 403 and "user selection" in response.json()["error"]["message"]
    assert arena.chat_requests() == []


def test_u9_the_display_name_is_kept_with_the_model(late):
    stored = next(m for m in late.store.models() if m["publicName"] == TEXT_MODEL)
    assert stored["displayName"] == "Gemini 3 Pro"


def test_u9_the_router_s_choice_goes_into_a_header_and_the_usage_record(late):
    key = late.create_key()
    response = post(late, key, {"model": "max", "messages": [{"role": "user", "content": "route me"}]})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "max"
    assert response.headers["x-arena-routed-model"] == TEXT_MODEL
    deadline = time.time() + 5
    while time.time() < deadline and not late.store.rows("SELECT * FROM usage WHERE routed_model IS NOT NULL"):
        time.sleep(0.1)
    [row] = late.store.rows("SELECT model, routed_model FROM usage WHERE routed_model IS NOT NULL")
    assert row == {"model": "max", "routed_model": TEXT_MODEL}


def test_u9_a_streamed_routed_reply_names_the_chosen_model_in_its_header(late):
    key = late.create_key()
    with httpx.stream("POST", late.url + "/v1/chat/completions", timeout=30,
                      json={"model": "max", "stream": True, "messages": [{"role": "user", "content": "s"}]},
                      headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.headers["x-arena-routed-model"] == TEXT_MODEL
        assert '"model":"max"' in response.read().decode().replace(" ", "")


# --- U9: a dead credential --------------------------------------------------------------------------------------------


def test_u9_user_not_found_marks_the_account_dead_and_another_serves(fresh, arena, client):
    dead, alive = arena.new_session(), arena.new_session()
    fresh.set_accounts(dead, alive)
    arena.kill_account(dead)
    assert chat(client, "hello").choices[0].message.content == "turn 1: hello"
    states = {a["auth"]: a["state"] for a in fresh.store.accounts()}
    assert states == {dead: "invalid", alive: "ok"}
    assert len(arena.chat_requests()) == 2       # one on the dead account, one that served


# --- U6: citations as offsets ------------------------------------------------------------------------------------------


def test_u6_offset_citations_get_numbers_after_the_cited_sentences(client, arena):
    arena.configure(citation_format="offsets")
    content = chat(client, "tower", model=SEARCH_MODEL).choices[0].message.content
    text = content.split("\n\nSources:\n")[0]
    assert text == ("turn 1: tower.[1] The first source says so.[1] The second source agrees.[2] "
                    "Both say it again.[1][2]")


def test_u6_offset_citations_get_a_titled_sources_list(client, arena):
    arena.configure(citation_format="offsets")
    message = chat(client, "tower", model=SEARCH_MODEL).choices[0].message
    footer = message.content.split("\n\nSources:\n")[1].split("\n")
    assert len(footer) == 2 and all(re.fullmatch(r"\d\. \[[^\]/]+\]\(https?://\S+\)", line) for line in footer)
    assert [a.url_citation.title for a in message.annotations] == [re.match(r"\d\. \[(.*)\]", line).group(1)
                                                                   for line in footer]


def test_u6_the_real_search_capture_gives_numbers_and_titles(client, arena):
    arena.script_reply(replay="dec-search-00")
    content = chat(client, "gemini 3", model=SEARCH_MODEL).choices[0].message.content
    raw = raw_reading("dec-search-00")
    text, footer = content.split("\n\nSources:\n")
    assert re.sub(r"\[\d\]", "", text) == raw["text"]
    for number, sid in enumerate(sorted(raw["citations"]), 1):
        source = raw["citations"][sid]
        assert text.count(f"[{number}]") == len(source["charLocation"])
        assert f"{number}. [{source['title']}]({source['url']})" in footer


# --- every real capture through the bridge -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAM_CAPTURES)
def test_each_real_capture_replayed_through_the_bridge_gives_what_its_raw_lines_say(client, arena, name):
    raw = raw_reading(name)
    arena.script_reply(replay=name)
    reply = chat(client, "replay")
    message = reply.choices[0].message
    content = message.content
    if raw["citations"]:
        content = re.sub(r"\[\d+\]", "", content.split("\n\nSources:\n")[0])
    assert len(re.findall(r"!\[image\]\([^)]+\)", content)) == len(raw["images"])
    assert re.sub(r"(\n\n)?!\[image\]\([^)]+\)", "", content) == raw["text"]
    assert ((message.model_extra or {}).get("reasoning_content") or "") == raw["reasoning"]
    assert reply.choices[0].finish_reason == OPENAI_FINISH[raw["finish"]]


# --- U7: the image quota -----------------------------------------------------------------------------------------------


def image(proc, key, prompt="a red square"):
    return httpx.post(proc.base_url + "/images/generations", timeout=60, headers={"Authorization": f"Bearer {key}"},
                      json={"model": IMAGE_MODEL, "prompt": prompt})


def test_u7_past_the_image_quota_image_requests_get_429_at_once_without_an_upstream_request(fresh, arena, api_key):
    arena.configure(image_quota=1)
    assert image(fresh, api_key).status_code == 200
    arena.clear_log()
    started = time.perf_counter()
    second = image(fresh, api_key)
    assert second.status_code == 429 and int(second.headers["retry-after"]) > 80_000
    assert time.perf_counter() - started < 1.0 and arena.chat_requests() == []
    assert "image quota" in second.json()["error"]["message"]


def test_u7_the_image_quota_leaves_text_chats_working(fresh, arena, api_key, client):
    arena.configure(image_quota=1)
    assert image(fresh, api_key).status_code == 200
    assert image(fresh, api_key).status_code == 429
    assert chat(client, "still here").choices[0].message.content == "turn 1: still here"
    [account] = fresh.store.accounts()
    assert account["state"] == "ok"


def test_u7_the_real_quota_429_costs_one_request_and_blocks_only_images(fresh, arena, api_key, client):
    arena.script_reply(replay="dec-edit-22")
    first = image(fresh, api_key)
    assert first.status_code == 429 and int(first.headers["retry-after"]) > 3000
    assert len(arena.chat_requests()) == 1
    assert image(fresh, api_key).status_code == 429 and len(arena.chat_requests()) == 1
    assert chat(client, "text").choices[0].message.content == "turn 1: text"


# --- U3: battle turns in direct-battle ---------------------------------------------------------------------------------


def six_turns(client, arena):
    """Six turns of one conversation; each reply answers its question, and LM Arena saw every earlier
    question in the evaluation that answered it (a follow-up's, or a new one's carried history)."""
    history = []
    for turn in range(1, 7):
        history.append(f"question {turn}")
        reply = chat(client, *history).choices[0].message.content
        assert reply.startswith("turn ") and reply.endswith(f"question {turn}"), (turn, reply)
        history.append(reply)
        served = [r for r in arena.chat_requests() if r["status"] == 200 and "/stream/" in r["path"]
                  and "skip" not in r["path"]][-1]
        evaluation = arena.evaluations[served["json"].get("id") or served["path"].rsplit("/", 1)[1]]
        asked = json.dumps(evaluation)
        assert all(f"question {n}" in asked for n in range(1, turn + 1)), (turn, evaluation)
    return history


def test_u3_a_six_turn_conversation_with_a_battle_turn_every_second_reply_keeps_its_context(client, arena):
    arena.configure(battle_turn_every=2)
    six_turns(client, arena)
    skips = [r for r in arena.chat_requests() if "skip-direct-battle" in r["path"]]
    assert len(skips) == 3 and all(r["status"] == 200 for r in skips)
    chats = [r for r in arena.chat_requests() if "skip-direct-battle" not in r["path"]]
    assert len(chats) == 6 and all(r["status"] == 200 for r in chats)
    assert sum("create-evaluation" in r["path"] for r in chats) == 1


def test_u3_a_refused_skip_starts_a_new_evaluation_carrying_the_history_invisibly(client, arena):
    arena.configure(battle_turn_every=2, battle_skip_refused=True)
    six_turns(client, arena)
    refused = [r for r in arena.chat_requests() if r["status"] == 400 and "post-to-evaluation" in r["path"]]
    assert 1 <= len(refused) <= 3      # one wasted follow-up per refused skip, then a new evaluation


def test_u3_create_and_follow_up_bodies_carry_model_b_message_id_and_auto_modality_metadata(client, arena):
    arena.configure(strict_2026_body=True)
    assert chat(client, "a").choices[0].message.content == "turn 1: a"
    assert chat(client, "a", "turn 1: a", "b").choices[0].message.content == "turn 2: b"
    for request in arena.chat_requests():
        assert request["json"]["modelBMessageId"] and request["json"]["userMessage"]["metadata"]["autoModalityMetadata"]


def test_u3_the_bare_body_is_a_setting(arena, tmp_path):
    arena.reset()
    arena.configure(recaptcha="off")
    proc = BridgeProcess(arena.url, str(tmp_path), env={"BRIDGE_BARE_BODY": "1"}).start()
    try:
        proc.wait_for_models()
        proc.set_accounts(arena.new_session())
        assert post(proc, proc.create_key(), {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "x"}]}
                    ).status_code == 200
        [request] = arena.chat_requests()
        assert "modelBMessageId" not in request["json"] and request["json"]["userMessage"]["metadata"] == {}
    finally:
        proc.stop()


def test_u3_lane_b_of_a_battle_turn_never_reaches_the_client(client, arena):
    arena.configure(battle_turn_every=1)
    assert chat(client, "only a").choices[0].message.content == "turn 1: only a"


# --- U4: guests behind the login gate -----------------------------------------------------------------------------------


def test_u4_a_guest_behind_the_login_gate_gets_one_clear_error_and_is_marked(fresh, arena, api_key):
    arena.configure(login_gate=True)
    body = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "x"}]}
    first = post(fresh, api_key, body)
    assert first.status_code == 503 and first.json()["error"]["code"] == "needs_signed_in_account"
    assert "signed-in account" in first.json()["error"]["message"] and "tokens add" in first.json()["error"]["message"]
    assert len(arena.chat_requests()) == 1            # the gate costs one upstream request, once
    [account] = fresh.store.accounts()
    assert account["state"] == "needs_login" and "signed-in" in account["last_error"]


def test_u4_a_gated_guest_is_neither_refreshed_nor_asked_again(fresh, arena, api_key):
    arena.configure(login_gate=True)
    body = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "x"}]}
    assert post(fresh, api_key, body).status_code == 503
    arena.clear_log()
    again = post(fresh, api_key, body)
    assert again.status_code == 503 and again.json()["error"]["code"] == "needs_signed_in_account"
    assert arena.core.requests == []                  # no chat, no page load, no refresh grant


def test_u4_the_gated_state_shows_in_tokens_list_and_health(fresh, arena, api_key):
    arena.configure(login_gate=True)
    post(fresh, api_key, {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "x"}]})
    listing = subprocess.run([sys.executable, os.path.join(ROOT, "bridge.py"), "--db", fresh.db, "tokens", "list"],
                             capture_output=True, text=True, check=True).stdout
    assert "needs a signed-in account" in listing
    health = httpx.get(fresh.url + "/health", headers={"Authorization": f"Bearer {api_key}"}).json()
    assert [a["state"] for a in health["checks"]["accounts"]["items"]] == ["needs_login"]


def test_u4_a_signed_in_account_beside_a_gated_guest_serves(fresh, arena, client):
    arena.configure(login_gate=True)
    fresh.set_accounts(arena.new_session(), arena.new_session(anonymous=False))
    assert chat(client, "hi").choices[0].message.content == "turn 1: hi"
    assert sorted(a["state"] for a in fresh.store.accounts()) == ["needs_login", "ok"]


# --- U1: the User-Agent and the TLS fingerprint of one browser ---------------------------------------------------------


def versions_agree(headers: dict) -> bool:
    """The User-Agent's Chrome version is the one its client hints name (a real Chrome never differs)."""
    [ua_major] = re.findall(r"Chrome/(\d+)\.", headers["user-agent"])
    return set(re.findall(r'v="(\d{3})"', headers["sec-ch-ua"])) == {ua_major}


def test_u1_a_direct_chat_sends_the_user_agent_of_the_browser_its_tls_imitates(fresh, arena, client):
    chat(client, "hi")
    [sent] = [r["headers"] for r in arena.chat_requests()]
    assert "Chrome/152." in sent["user-agent"] and versions_agree(sent)


# --- U2: a budget per account -------------------------------------------------------------------------------------------


def test_u2_requests_are_spread_over_the_accounts_and_past_their_budget_get_429_without_asking(arena, tmp_path):
    arena.reset()
    arena.configure(recaptcha="off")
    proc = BridgeProcess(arena.url, str(tmp_path), env={"BRIDGE_ACCOUNT_RPH": "2"}).start()
    try:
        proc.wait_for_models()
        values = [arena.new_session(), arena.new_session()]
        proc.set_accounts(*values)
        key = proc.create_key()
        for i in range(4):
            assert post(proc, key, {**GOOD, "messages": [{"role": "user", "content": f"paced {i}"}]}).status_code == 200
        senders = collections.Counter(arena.session_user(r["cookies"]["arena-auth-prod-v1"])
                                      for r in arena.chat_requests())
        assert sorted(senders.values()) == [2, 2]
        fifth = post(proc, key, GOOD)
        assert fifth.status_code == 429 and fifth.json()["error"]["code"] == "accounts_paced"
        assert 3000 < int(fifth.headers["retry-after"]) <= 3601
        assert len(arena.chat_requests()) == 4
    finally:
        proc.stop()


@contextlib.contextmanager
def budget_bridge(arena, folder, rph: int):
    """A bridge with an hourly budget of `rph` chats per account, and one account."""
    arena.reset()
    arena.configure(recaptcha="off")
    proc = BridgeProcess(arena.url, str(folder), env={"BRIDGE_ACCOUNT_RPH": str(rph)}).start()
    try:
        proc.wait_for_models()
        proc.set_accounts(arena.new_session())
        yield proc
    finally:
        proc.stop()


def test_u2_a_bridge_restarted_on_the_same_database_still_refuses_an_account_whose_budget_was_spent(arena, tmp_path):
    with budget_bridge(arena, tmp_path, rph=2) as proc:
        key = proc.create_key()
        for i in range(2):
            assert post(proc, key, {**GOOD, "messages": [{"role": "user", "content": f"spent {i}"}]}).status_code == 200
        proc.restart()              # a crash, a deploy: the budget is in the database, not forgiven
        refused = post(proc, key, GOOD)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "accounts_paced"
        assert 3500 < int(refused.headers["retry-after"]) <= 3601
        assert len(arena.chat_requests()) == 2


def test_u2_chat_requests_sent_more_than_an_hour_before_a_restart_no_longer_count(arena, tmp_path):
    with budget_bridge(arena, tmp_path, rph=1) as proc:
        key = proc.create_key()
        assert post(proc, key, GOOD).status_code == 200
        proc.stop()
        proc.store.write("UPDATE account_requests SET ts = ts - 3600")    # as if it had been sent an hour ago
        proc.start()
        assert post(proc, key, {**GOOD, "messages": [{"role": "user", "content": "an hour later"}]}).status_code == 200
        assert len(arena.chat_requests()) == 2


def test_u2_a_request_arriving_while_the_picked_account_refreshes_its_session_cannot_overspend_its_budget(
        arena, tmp_path):
    """pick -> refresh -> send: the refresh awaits LM Arena, and the account must count as taken meanwhile
    (BRIDGE_ACCOUNT_MIN_INTERVAL is 0 by default, so its last_used alone does not hold a second request off)."""
    arena.reset()
    arena.configure(recaptcha="off")
    proc = BridgeProcess(arena.url, str(tmp_path), env={"BRIDGE_ACCOUNT_RPH": "1"}).start()
    try:
        proc.wait_for_models()
        arena.fault(times=1, path="page", status=500, first_byte_delay=1.0)   # a slow refresh, then the grant's
        proc.set_accounts(arena.new_session(lifetime=-60))
        key = proc.create_key()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda i: post(proc, key, {**GOOD, "messages": [{"role": "user", "content": f"r{i}"}]}),
                                    range(2)))
        assert sorted(r.status_code for r in replies) == [200, 429]
        assert max(replies, key=lambda r: r.status_code).json()["error"]["code"] == "accounts_paced"
        assert len(arena.chat_requests()) == 1
    finally:
        proc.stop()


# --- with the real sidecar and Chromium: U1, U2, U4 zero setup, U8 -------------------------------------------------------

BROWSER = os.environ.get("BRIDGE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium binary found")


@contextlib.contextmanager
def browser_bridge(arena, folder, env=None, **knobs):
    """A bridge with its sidecar (and these settings), first meeting the emulator under these knobs."""
    arena.reset()
    arena.configure(**knobs)
    proc = BridgeProcess(arena.url, str(folder), sidecar="auto",
                         env={"BRIDGE_BROWSER": BROWSER, "BRIDGE_SIDECAR_SOCKET": str(folder / "s.sock"), **(env or {})},
                         args=("--ping-interval", "0.5")).start()
    try:
        proc.wait_for_models()
        yield proc
    finally:
        proc.stop()


PAGE_HEADER = "x-arena-page"      # the emulator's grecaptcha adds it to its page's own fetch() calls only
PENALTY = {"k": 2, "w": 20, "p": 1200, "on_fail": True}


@needs_browser
def test_u1_with_context_bound_tokens_the_first_chat_goes_through_the_page_and_costs_no_403(arena, tmp_path):
    with browser_bridge(arena, tmp_path, context_bound_tokens=True, recaptcha_penalty=PENALTY) as proc:
        proc.set_accounts(arena.new_session())
        assert post(proc, proc.create_key(), GOOD).status_code == 200
        [sent] = arena.chat_requests()
        assert sent["status"] == 200 and PAGE_HEADER in sent["headers"]
        assert proc.store.accounts()[0]["failures"] == 0


@needs_browser
def test_u1_a_site_that_names_no_recaptcha_is_sent_direct_without_starting_the_browser(arena, tmp_path):
    with browser_bridge(arena, tmp_path, recaptcha="absent") as proc:
        proc.set_accounts(arena.new_session())
        assert post(proc, proc.create_key(), GOOD).status_code == 200
        [sent] = arena.chat_requests()
        assert PAGE_HEADER not in sent["headers"] and "recaptchaV3Token" not in sent["json"]
        assert proc.health()["checks"]["sidecar"]["state"] == "stopped"
        assert proc.store.site_params()["request_path"] == "direct"


@needs_browser
def test_u1_request_path_direct_sends_straight_from_the_bridge_with_a_sidecar_token(arena, tmp_path):
    with browser_bridge(arena, tmp_path, env={"BRIDGE_REQUEST_PATH": "direct"}) as proc:
        proc.set_accounts(arena.new_session())
        assert post(proc, proc.create_key(), GOOD).status_code == 200
        [sent] = arena.chat_requests()
        assert PAGE_HEADER not in sent["headers"] and sent["json"]["recaptchaV3Token"].startswith("0cAFcWeA")


@needs_browser
def test_u1_request_path_direct_moves_a_refused_account_into_the_page_until_its_daily_retry(arena, tmp_path):
    with browser_bridge(arena, tmp_path, env={"BRIDGE_REQUEST_PATH": "direct"}, context_bound_tokens=True) as proc:
        [account_id] = proc.set_accounts(arena.new_session())
        key = proc.create_key()
        assert post(proc, key, GOOD).status_code == 503       # the user asked for direct: it is refused once
        refused = proc.store.account(account_id)
        assert refused["needs_browser"] == 1 and refused["direct_retry_at"] > time.time() + 86000
        proc.store.update_account(account_id, state="ok", cooldown_until=0)   # its penalty is over
        assert post(proc, key, GOOD).status_code == 200
        assert [(PAGE_HEADER in r["headers"], r["status"]) for r in arena.chat_requests()] == [(False, 403), (True, 200)]


@needs_browser
def test_u1_after_cloudflare_clearance_a_direct_chat_sends_the_browser_s_user_agent_with_matching_hints(arena, tmp_path):
    with browser_bridge(arena, tmp_path, env={"BRIDGE_REQUEST_PATH": "direct"}, cloudflare=True) as proc:
        proc.set_accounts(arena.new_session())
        assert post(proc, proc.create_key(), GOOD).status_code == 200
        passed = arena.chat_requests()[-1]
        clearance = proc.store.site_params()["clearance"]
        assert passed["status"] == 200 and PAGE_HEADER not in passed["headers"] and "cf_clearance" in passed["cookies"]
        assert passed["headers"]["user-agent"] == clearance["user_agent"] and versions_agree(passed["headers"])
        assert passed["headers"]["sec-ch-ua-platform"] == '"Linux"'


@needs_browser
def test_u1_u2_a_burst_over_two_accounts_gets_at_most_one_403_each_and_every_request_an_answer(arena, tmp_path):
    with browser_bridge(arena, tmp_path, context_bound_tokens=True, recaptcha_penalty=PENALTY) as proc:
        values = [arena.new_session(), arena.new_session()]
        proc.set_accounts(*values)
        key = proc.create_key()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: post(proc, key, {**GOOD, "messages": [
                {"role": "user", "content": f"burst {i}"}]}, timeout=120), range(20)))
        for answer in answers:
            assert answer.status_code in (200, 429, 503), answer.text
            assert answer.status_code == 200 or int(answer.headers["retry-after"]) >= 1
        refused = collections.Counter(arena.session_user(r["cookies"].get("arena-auth-prod-v1", ""))
                                      for r in arena.chat_requests() if r["status"] == 403)
        assert all(n <= 1 for n in refused.values()), refused
        assert len(arena.chat_requests()) <= 2 + 2 * 2     # a 403 and k served per account, nothing more


@needs_browser
def test_u8_a_rotated_sitekey_at_the_real_call_site_heals_without_a_restart(arena, tmp_path):
    with browser_bridge(arena, tmp_path, sitekey_call_site="variable", sitekey_in_page="none") as proc:
        proc.set_accounts(arena.new_session())
        key = proc.create_key()
        assert post(proc, key, GOOD).status_code == 200
        assert proc.store.site_params()["sitekey"] == arena.sitekey
        arena.rotate_sitekey()
        time.sleep(2.1)    # discovery is rate-limited to one page load per 2 s while failures come in
        arena.clear_log()
        assert post(proc, key, GOOD).status_code == 200
        assert proc.store.site_params()["sitekey"] == arena.sitekey
        assert len(arena.chat_requests()) <= 2          # the refused token, then the one with the new key


# The 2026 sign-up (U5): no Turnstile, the provisional id in localStorage; one request makes a guest.
SITE_2026_SIGN_UP = {"signup_turnstile": "none", "provisional_id_store": "local_storage"}


@needs_browser
def test_u4_zero_setup_behind_the_login_gate_ends_in_one_clear_error_after_one_sign_up(arena, tmp_path):
    with browser_bridge(arena, tmp_path, login_gate=True, **SITE_2026_SIGN_UP) as proc:
        key = proc.create_key()
        for _ in range(3):
            answer = post(proc, key, GOOD)
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "needs_signed_in_account"
        assert len([r for r in arena.core.requests if r["path"] == "/nextjs-api/sign-up"]) == 1
        assert len(arena.chat_requests()) == 1
        [account] = proc.store.accounts()
        assert account["kind"] == "anonymous" and account["state"] == "needs_login"


def sign_ups(arena):
    return [r for r in arena.core.requests if r["path"] == "/nextjs-api/sign-up"]


@needs_browser
@pytest.mark.parametrize("store", ["local_storage", "none"], ids=["id-in-local-storage", "id-made-by-the-client"])
def test_u5_zero_setup_signs_up_a_guest_with_the_2026_body_and_chats(arena, tmp_path, store):
    with browser_bridge(arena, tmp_path, signup_turnstile="none", provisional_id_store=store) as proc:
        assert post(proc, proc.create_key(), GOOD).status_code == 200
        [signup] = sign_ups(arena)
        assert signup["status"] == 200 and set(signup["json"]) == {"recaptchaToken", "provisionalUserId"}
        assert [a["kind"] for a in proc.store.accounts()] == ["anonymous"]
        [chat] = arena.chat_requests()      # the guest that provisional id became did the chatting
        assert arena.session_user(chat["cookies"]["arena-auth-prod-v1"]) == signup["json"]["provisionalUserId"]


@needs_browser
def test_u5_on_the_2025_site_sign_up_falls_back_to_the_turnstile_body_once_the_2026_one_is_refused(arena, tmp_path):
    with browser_bridge(arena, tmp_path) as proc:
        assert post(proc, proc.create_key(), GOOD).status_code == 200
        first, second = sign_ups(arena)
        assert first["status"] == 400 and "turnstileToken" not in first["json"]
        assert second["status"] == 200 and second["json"]["turnstileToken"]
        assert second["json"]["provisionalUserId"] == first["json"]["provisionalUserId"]
        assert [a["kind"] for a in proc.store.accounts()] == ["anonymous"]


LIVE_KEY_ONLY = {"sitekey_call_site": "hidden", "sitekey_in_page": "live"}


@needs_browser
def test_u8_a_sitekey_named_by_no_text_is_read_from_the_pages_live_recaptcha_config(arena, tmp_path):
    with browser_bridge(arena, tmp_path, **LIVE_KEY_ONLY) as proc:
        assert "sitekey" not in proc.store.site_params()      # the page and its chunks did not name it
        proc.set_accounts(arena.new_session())
        assert post(proc, proc.create_key(), GOOD).status_code == 200
        assert proc.store.site_params()["sitekey"] == arena.sitekey
        assert [r["status"] for r in arena.chat_requests()] == [200]     # no request spent on a wrong key


@needs_browser
def test_u8_a_rotated_sitekey_named_by_no_text_heals_from_the_live_config_without_a_restart(arena, tmp_path):
    with browser_bridge(arena, tmp_path, **LIVE_KEY_ONLY) as proc:
        proc.set_accounts(arena.new_session())
        key = proc.create_key()
        assert post(proc, key, GOOD).status_code == 200
        arena.rotate_sitekey()
        time.sleep(2.1)    # discovery and live look-ups are rate-limited to one per 2 s while failures come in
        arena.clear_log()
        assert post(proc, key, GOOD).status_code == 200
        assert proc.store.site_params()["sitekey"] == arena.sitekey
        assert [r["status"] for r in arena.chat_requests()] == [403, 200]   # the stale key's token, then the new
