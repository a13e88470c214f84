"""Account input in every form users paste, session decoding and expiry (arena-protocol §4)."""
import base64
import json
import time

import pytest

import bridge
from bridge import parse_account_input


def session_value(exp_offset=3600, alphabet="url", padding=False, extra=None, anonymous=True):
    claims = {"iss": "https://x.supabase.co/auth/v1", "sub": "u", "exp": int(time.time()) + exp_offset,
              "user_metadata": {"id": "arena-user"}, "is_anonymous": anonymous}
    jwt = "eyJhbGciOiJFUzI1NiJ9." + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=") + ".sig"
    session = {"access_token": jwt, "token_type": "bearer", "expires_in": 3600,
               "expires_at": claims["exp"], "refresh_token": "r1", "user": {"id": "u", "is_anonymous": anonymous},
               **(extra or {})}
    raw = json.dumps(session).encode()
    encoded = base64.urlsafe_b64encode(raw).decode() if alphabet == "url" else base64.b64encode(raw).decode()
    return "base64-" + (encoded if padding else encoded.rstrip("=")), jwt


def test_raw_value_is_accepted():
    value, _ = session_value()
    parsed = parse_account_input(value)
    assert parsed.auth == value and parsed.form == "whole" and parsed.anonymous


@pytest.mark.parametrize("alphabet,padding", [("url", False), ("url", True), ("std", True), ("std", False)])
def test_both_base64_alphabets_with_or_without_padding_decode(alphabet, padding):
    value, _ = session_value(alphabet=alphabet, padding=padding, extra={"pad": "??>>~~" * 7})
    assert bridge.Session(parse_account_input(value).auth).data["pad"] == "??>>~~" * 7


def test_quoted_prefixed_and_percent_encoded_values_are_accepted():
    value, _ = session_value()
    for pasted in (f'"{value}"', f"arena-auth-prod-v1={value}", f"arena-auth-prod-v1={value.replace('-', '%2D')}"):
        assert parse_account_input(pasted).auth == value


def test_split_pair_is_joined_in_numeric_order():
    value, _ = session_value(extra={"big": "x" * 7000})
    chunks = bridge.Session(value, "chunks").cookies()
    assert len(chunks) >= 3
    pasted = "; ".join(f"{k}={v}" for k, v in reversed(list(chunks.items())))
    parsed = parse_account_input(pasted)
    assert parsed.auth == value and parsed.form == "chunks"


def test_chunk_values_given_as_separate_fields_are_joined():
    value, _ = session_value(extra={"big": "x" * 4000})
    assert parse_account_input("\n".join(bridge.Session(value, "chunks").cookies().values())).auth == value


def test_cookie_header_keeps_the_auth_and_cloudflare_cookies():
    value, _ = session_value()
    header = f"Cookie: sidebar_state=true; cf_clearance=abc; __cf_bm=def; arena-auth-prod-v1={value}; _cfuvid=g"
    parsed = parse_account_input(header)
    assert parsed.auth == value and parsed.cookies == {"cf_clearance": "abc", "__cf_bm": "def", "_cfuvid": "g"}


def test_with_whole_and_chunks_the_later_expiry_wins():
    old, _ = session_value(exp_offset=100)
    new, _ = session_value(exp_offset=5000)
    chunks = bridge.Session(new, "chunks").cookies()
    header = f"arena-auth-prod-v1={old}; " + "; ".join(f"{k}={v}" for k, v in chunks.items())
    assert parse_account_input(header).auth == new


def test_bare_jwt_is_accepted_with_its_expiry():
    _, jwt = session_value(exp_offset=600)
    parsed = parse_account_input(jwt)
    assert parsed.form == "jwt" and abs(bridge.Session(jwt).expiry - (time.time() + 600)) < 5


@pytest.mark.parametrize("bad", ["", "hello", "base64-!!!!", "base64-" + base64.b64encode(b'{"no":"token"}').decode(),
                                 "sidebar_state=true; other=1", "a.b.c"])
def test_invalid_input_names_what_was_expected(bad):
    with pytest.raises(ValueError, match="arena-auth-prod-v1"):
        parse_account_input(bad)


def test_expiry_uses_a_30_second_margin():
    soon, _ = session_value(exp_offset=20)
    later, _ = session_value(exp_offset=60)
    assert bridge.Session(soon).expired() and not bridge.Session(later).expired()


def test_refreshed_set_cookie_is_taken_whole_or_chunked_only_when_fresh():
    fresh, _ = session_value()
    stale, _ = session_value(exp_offset=-10)
    assert bridge.Session.in_set_cookie([f"arena-auth-prod-v1={fresh}; Path=/"]) == bridge.Session(fresh, "whole")
    chunked = [f"{k}={v}; Path=/" for k, v in bridge.Session(fresh, "chunks").cookies().items()]
    assert bridge.Session.in_set_cookie(["arena-auth-prod-v1=; Max-Age=0", *chunked]) == bridge.Session(fresh, "chunks")
    assert bridge.Session.in_set_cookie([f"arena-auth-prod-v1={stale}"]) is None


def test_refresh_grant_answer_is_merged_and_gets_expires_at():
    value = session_value()[0]
    old = bridge.Session(value).data
    _, jwt = session_value(exp_offset=7200)
    merged = bridge.Session(value).refreshed({"access_token": jwt, "refresh_token": "r2"}).data
    assert merged["refresh_token"] == "r2" and merged["expires_at"] == bridge.jwt_claims(jwt)["exp"]
    assert merged["user"] == old["user"]


def test_a_sign_up_session_is_found_in_every_answer_shape():
    value, _ = session_value()
    session = bridge.Session(value).data
    assert bridge.Session.from_signup({"arena-auth-prod-v1": value}, None).value == value
    chunks = {f"arena-auth-prod-v1.{i}": c for i, c in enumerate(bridge.Session(value + "x" * 4000, "chunks").cookies().values())}
    assert bridge.Session.from_signup({**chunks, "other": "1"}, None).value == value + "x" * 4000
    for body in (session, {"session": session}, {"data": session}, {"data": {"session": session}}):
        assert bridge.Session.from_signup({}, body).data == session
    assert bridge.Session.from_signup({}, "base64-raw").value == "base64-raw"
    with pytest.raises(ValueError, match="no session"):
        bridge.Session.from_signup({}, {"ok": True})


# --- one account per LM Arena user --------------------------------------------------------------------

def user_session(user, exp_offset=3600):
    """A session of one LM Arena user (the `sub` of its access token), unique by its expiry."""
    claims = {"iss": "https://x.supabase.co/auth/v1", "sub": user, "exp": int(time.time()) + exp_offset}
    jwt = "eyJhbGciOiJFUzI1NiJ9." + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=") + ".s"
    return bridge.Session.encode({"access_token": jwt, "refresh_token": f"r{exp_offset}",
                                  "expires_at": claims["exp"], "user": {"id": user}}).value


def test_thirty_adds_of_one_cookie_make_one_account(tmp_path):
    store = bridge.Store(str(tmp_path / "a.db"))
    value = user_session("user-1")
    outcomes = [bridge.add_account(store, parse_account_input(value)) for _ in range(30)]
    assert len(store.accounts()) == 1
    assert outcomes[0][1] == "added" and {outcome for _, outcome in outcomes[1:]} == {"unchanged"}


def test_adding_a_newer_session_of_a_stored_user_updates_that_account(tmp_path):
    store = bridge.Store(str(tmp_path / "a.db"))
    account_id, _ = bridge.add_account(store, parse_account_input(user_session("user-1", 600)))
    store.update_account(account_id, state="expired", last_error="session expired")
    newer = user_session("user-1", 7200)
    assert bridge.add_account(store, parse_account_input(newer)) == (account_id, "updated")
    [row] = store.accounts()
    assert (row["auth"], row["state"], row["last_error"]) == (newer, "ok", None)


def test_an_env_account_the_site_rotated_is_not_imported_again_at_the_next_start(tmp_path):
    store = bridge.Store(str(tmp_path / "a.db"))
    configured = user_session("user-1", 600)
    bridge.import_env_accounts(store, configured)
    [account] = store.accounts()
    rotated = user_session("user-1", 3600)                # LM Arena rotated the session while answering
    assert store.swap_account_auth(account["id"], configured, auth=rotated)
    bridge.import_env_accounts(store, configured)         # the next start reads the same ARENA_AUTH_TOKENS
    assert [a["auth"] for a in store.accounts()] == [rotated]


def test_sessions_of_different_users_are_different_accounts(tmp_path):
    store = bridge.Store(str(tmp_path / "a.db"))
    for user in ("user-1", "user-2"):
        bridge.add_account(store, parse_account_input(user_session(user)))
    assert len(store.accounts()) == 2


# --- the chat requests each account sent, for its hourly budget (U2) -----------------------------------------------


@pytest.fixture
def clock(monkeypatch):
    """The store's wall clock, moved by the test."""
    at = [1_800_000_000.0]
    monkeypatch.setattr(bridge, "now", lambda: at[0])
    return at


def sent(store) -> dict:
    return {account_id: list(times) for account_id, times in store.sent_requests().items()}


def test_chat_requests_recorded_on_an_account_are_read_back_by_a_store_opened_later_on_the_file(tmp_path, clock):
    store = bridge.Store(str(tmp_path / "a.db"))
    store.record_request(1)
    clock[0] += 10
    store.record_request(1)
    store.record_request(2)
    store.close()
    assert sent(bridge.Store(str(tmp_path / "a.db"))) == {1: [clock[0] - 10, clock[0]], 2: [clock[0]]}


def test_chat_requests_older_than_the_budget_window_are_not_read_and_are_deleted_by_the_next_one(tmp_path, clock):
    store = bridge.Store(str(tmp_path / "a.db"))
    store.record_request(1)
    clock[0] += bridge.BUDGET_WINDOW
    assert sent(bridge.Store(str(tmp_path / "a.db"))) == {}
    store.record_request(2)
    assert store.rows("SELECT account_id, ts FROM account_requests") == [{"account_id": 2, "ts": clock[0]}]
    assert sent(store) == {1: [], 2: [clock[0]]}


def test_a_chat_request_another_connection_recorded_is_seen_without_reopening_the_store(tmp_path, clock):
    server, cli = bridge.Store(str(tmp_path / "a.db")), bridge.Store(str(tmp_path / "a.db"))
    assert sent(server) == {}
    cli.record_request(1)           # e.g. `python bridge.py doctor` beside a running server
    assert sent(server) == {1: [clock[0]]}
    server.record_request(1)
    assert sent(server) == {1: [clock[0], clock[0]]} and sent(cli) == sent(server)


def test_removing_an_account_forgets_the_chat_requests_it_sent(tmp_path, clock):
    store = bridge.Store(str(tmp_path / "a.db"))
    account_id, _ = bridge.add_account(store, parse_account_input(user_session("user-1")))
    store.record_request(account_id)
    assert store.remove_account(account_id)
    assert sent(store) == {} and store.rows("SELECT * FROM account_requests") == []


def test_a_session_too_long_for_one_browser_cookie_is_sent_in_chunks():
    value = "base64-" + "A" * 5000
    cookies = bridge.Session(value, "whole").cookies()
    assert list(cookies) == ["arena-auth-prod-v1.0", "arena-auth-prod-v1.1"]
    assert "".join(cookies.values()) == value and all(len(v) <= 3180 for v in cookies.values())
    assert bridge.Session("base64-short", "whole").cookies() == {"arena-auth-prod-v1": "base64-short"}
