"""The failure policy as tables (arena-protocol §8): what an LM Arena answer means, the step each failure
runs, and the status a client sees. Pure: no network, no bridge process."""
from __future__ import annotations

import pytest

import bridge
from bridge import Answer, ArenaError, Attempt, next_step

DIRECT = Attempt(needs_browser=False, in_page=False, followup=False, sidecar=True, moved=False)


def steps(kind: str, attempt: Attempt = DIRECT, n: int = 4) -> list[str]:
    """The steps of the first `n` failures of one kind, all seen with the same attempt."""
    return [next_step(kind, failures, attempt) for failures in range(n)]


# --- what an answer means -----------------------------------------------------------------------------

@pytest.mark.parametrize("status,headers,body,kind", [
    (301, {"location": "https://new.example/"}, "", "moved"),
    (308, {}, "", "moved"),
    (403, {"cf-mitigated": "challenge"}, "", "cloudflare"),
    (503, {}, "<title>Just a moment...</title>", "cloudflare"),
    (403, {}, "Enable JavaScript and cookies to continue", "cloudflare"),
    (403, {}, '{"error":"reCAPTCHA validation failed"}', "recaptcha"),
    (429, {}, '{"error":"Prompt failed"}', "recaptcha"),
    (401, {}, '{"error":"Unauthorized"}', "unauthorized"),
    (429, {"retry-after": "5"}, '{"error":"Too many requests"}', "rate_limited"),
    (400, {}, '{"error":"mode direct-battle is not allowed"}', "mode"),
    (404, {}, '{"error":"Evaluation not found"}', "not_found"),
    (500, {}, "oops", "server"),
    (503, {}, "maintenance", "server"),
    (400, {}, '{"error":"bad"}', "client"),
    (422, {}, '{"error":"flagged"}', "client"),
])
def test_an_answer_is_named_by_the_first_matching_row(status, headers, body, kind):
    assert Answer(status, headers, body).kind == kind


def test_every_answer_kind_has_a_rule():
    assert {kind for kind, _ in bridge.ANSWER_KINDS} == set(bridge.POLICY)


def test_the_message_is_the_json_error_or_the_page_title():
    assert Answer(400, {}, '{"error": "no such model"}').message == "no such model"
    assert Answer(503, {}, "<html><title> Down </title></html>").message == "Down"


def test_a_relayed_answer_names_its_kind_and_status():
    error = Answer(429, {}, '{"error":"slow down"}').relayed()
    assert error.relayed and error.kind == "rate_limited" and error.message == "LM Arena answered 429: slow down"


@pytest.mark.parametrize("status,body,kind,start", [
    (400, '{"error":"Private models are only in battles"}', "model_not_available", "LM Arena serves this model only"),
    (422, '{"error":"no"}', "content_filter", "LM Arena's moderation flagged"),
    (400, '{"error":"Message flagged"}', "content_filter", "LM Arena's moderation flagged"),
    (413, '{"error":"big"}', "attachment_too_large", "LM Arena refused the attachment"),
    (404, '{"error":"gone"}', "model_not_found", "LM Arena does not serve this model"),
    (403, '{"error":"no"}', "upstream_forbidden", "LM Arena refused the request"),
    (400, '{"error":"bad"}', "upstream_400", "LM Arena refused the request"),
    (500, '{"error":"boom"}', "upstream_500", "LM Arena refused the request"),
])
def test_a_final_answer_is_a_named_refusal(status, body, kind, start):
    error = Answer(status, {}, body).refusal()
    assert error.kind == kind and error.message.startswith(start) and not error.relayed


# --- the step for the n-th failure --------------------------------------------------------------------

def test_recaptcha_rediscovers_then_backs_off():
    assert steps("recaptcha") == ["rediscover", "back_off", "back_off", "back_off"]


def test_recaptcha_rediscovers_first_on_every_path():
    """A rotated sitekey heals on any path; an unchanged one backs off inside the rediscover step (U2)."""
    for needs_browser, in_page, sidecar in [(True, False, True), (True, True, True), (False, True, True),
                                            (False, False, False)]:
        attempt = Attempt(needs_browser=needs_browser, in_page=in_page, followup=False, sidecar=sidecar, moved=False)
        assert steps("recaptcha", attempt, 2) == ["rediscover", "back_off"]


def test_cloudflare_is_cleared_once_then_the_request_gives_up():
    assert steps("cloudflare", n=3) == ["clear_cloudflare", "give_up", "give_up"]


def test_unauthorized_refreshes_once_then_expires_the_account():
    assert steps("unauthorized", n=3) == ["refresh", "expire", "expire"]


def test_rate_limited_cools_the_account_down_every_time():
    assert steps("rate_limited", n=3) == ["cool_down"] * 3


def test_a_move_is_followed_only_to_the_same_path_elsewhere():
    moved = Attempt(needs_browser=False, in_page=False, followup=False, sidecar=True, moved=True)
    assert steps("moved", moved, 2) == ["follow_move"] * 2
    assert steps("moved", DIRECT, 1) == ["refuse"]


def test_a_refused_mode_switches_for_new_conversations_and_is_final_on_a_follow_up():
    followup = Attempt(needs_browser=False, in_page=False, followup=True, sidecar=True, moved=False)
    assert steps("mode", DIRECT, 2) == ["switch_mode"] * 2
    assert steps("mode", followup, 1) == ["refuse"]


def test_a_lost_conversation_starts_over_and_a_missing_model_is_final():
    followup = Attempt(needs_browser=False, in_page=False, followup=True, sidecar=True, moved=False)
    assert steps("not_found", followup, 1) == ["start_over"]
    assert steps("not_found", DIRECT, 1) == ["refuse"]


def test_a_server_error_pauses_once_then_is_final():
    assert steps("server", n=3) == ["pause", "refuse", "refuse"]


def test_any_other_answer_is_final():
    assert steps("client", n=2) == ["refuse", "refuse"]


def test_every_step_of_the_policy_has_a_handler_in_the_turn_runner():
    named = {step for rule in bridge.POLICY.values() for step in rule.steps} | {"refuse"}
    assert all(callable(getattr(bridge.TurnRunner, "step_" + step, None)) for step in named)
    assert set(bridge.STEP_APPLIES) <= named


def test_failures_are_counted_per_account_or_per_request_as_the_rule_says():
    tries = bridge.Tries(followup=None)
    assert [tries.count("recaptcha", 1), tries.count("recaptcha", 2), tries.count("recaptcha", 1)] == [0, 0, 1]
    assert [tries.count("cloudflare", 1), tries.count("cloudflare", 2)] == [0, 1]


# --- the status a client sees -------------------------------------------------------------------------

@pytest.mark.parametrize("error,status", [
    (ArenaError("no_account", "x"), 503),
    (ArenaError("accounts_cooling_down", "x", retry_after=5), 503),
    (ArenaError("cloudflare", "x"), 503),
    (ArenaError("cloudflare", "x", relayed=True), 502),
    (ArenaError("content_filter", "x"), 422),
    (ArenaError("model_not_available", "x"), 403),
    (ArenaError("attachment_too_large", "x"), 413),
    (ArenaError("model_not_found", "x"), 404),
    (ArenaError("upstream_timeout", "x"), 504),
    (ArenaError("upstream_400", "x"), 400),
    (ArenaError("upstream_502", "x"), 502),
    (ArenaError("upload_failed", "x"), 502),
    (ArenaError("empty_reply", "x"), 502),
])
def test_the_openai_layer_chooses_the_status_from_the_kind(error, status):
    api_error = bridge.ApiError.from_arena(error)
    assert api_error.status == status and api_error.code == error.kind


def test_a_retry_after_becomes_a_header_and_a_long_one_says_not_to_retry():
    short = bridge.ApiError.from_arena(ArenaError("accounts_cooling_down", "x", retry_after=4.2))
    long = bridge.ApiError.from_arena(ArenaError("accounts_cooling_down", "x", retry_after=600))
    assert short.headers == {"Retry-After": "5"}
    assert long.headers == {"Retry-After": "600", "x-should-retry": "false"}


# --- how long a 429 asks to wait ----------------------------------------------------------------------

def wait(headers: dict[str, str]) -> float | None:
    return Answer(429, headers, '{"error":"Too many requests"}').retry_after


def test_retry_after_zero_beside_a_ratelimit_header_waits_for_its_reset():
    assert wait({"retry-after": "0", "ratelimit": "limit=3, remaining=0, reset=600"}) == 600


def test_retry_after_zero_beside_a_ratelimit_header_without_a_reset_is_a_used_up_quota():
    u7 = {"retry-after": "0", "ratelimit-modality": "image", "ratelimit": "limit=0, remaining=0, reset=0"}
    assert wait(u7) == bridge.QUOTA_COOLDOWN > 60


def test_retry_after_zero_alone_is_a_short_wait_not_retry_now():
    assert wait({"retry-after": "0"}) == bridge.RETRY_AFTER_LEAST
    assert wait({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == bridge.RETRY_AFTER_LEAST


@pytest.mark.parametrize("value", ["inf", "Infinity", "1e999", "99999999999999999999", "31536000"])
def test_absurdly_long_retry_after_values_are_clamped_to_a_day(value):
    assert wait({"retry-after": value}) == bridge.RETRY_AFTER_MOST == 86400


@pytest.mark.parametrize("value", ["-5", "-inf"])
def test_a_negative_retry_after_is_the_short_wait(value):
    assert wait({"retry-after": value}) == bridge.RETRY_AFTER_LEAST


@pytest.mark.parametrize("value", ["nan", "soon", ""])
def test_a_retry_after_that_says_nothing_leaves_the_default_to_the_caller(value):
    assert wait({"retry-after": value}) is None


def test_an_ordinary_retry_after_is_kept():
    assert wait({"retry-after": "30"}) == 30.0


# --- the request path (§0 U1, U2) -------------------------------------------------------------------------

def facts(browser=True, account_refused=False, site_said=None, recaptcha_seen=True) -> bridge.PathFacts:
    return bridge.PathFacts(browser=browser, account_refused=account_refused, site_said=site_said,
                            recaptcha_seen=recaptcha_seen)


def test_a_site_is_taken_to_enforce_no_token_only_when_every_chunk_was_read_and_none_names_recaptcha():
    assert bridge.names_recaptcha("<html>", ["chunk one", "chunk two"], {}) is False
    assert bridge.names_recaptcha("<html>", ["chunk one", ""], {}) is None       # a chunk failed to load
    assert bridge.names_recaptcha("<html>", ["grecaptcha.enterprise", ""], {}) is True
    assert bridge.names_recaptcha("<html>", [], {"sitekey": "6Le"}) is True


def test_every_request_path_setting_names_a_path_for_every_evidence():
    evidence = {name for name, _ in bridge.PATH_EVIDENCE}
    assert set(bridge.REQUEST_PATHS) == set(bridge.REQUEST_PATH_SETTINGS)
    for paths in bridge.REQUEST_PATHS.values():
        assert set(paths) == evidence and set(paths.values()) <= {"page", "direct"}


@pytest.mark.parametrize("known,path", [
    (facts(), "page"),                                   # tokens may be bound: the page first, no 403 to learn it
    (facts(recaptcha_seen=None), "page"),                # nothing discovered yet: assume bound
    (facts(recaptcha_seen=False), "direct"),             # the site names no reCAPTCHA: no token is enforced
    (facts(site_said="direct"), "direct"),               # the direct path has served here
    (facts(site_said="page"), "page"),                   # the direct path was refused here: never re-probed
    (facts(site_said="direct", account_refused=True), "page"),
    (facts(browser=False), "direct"),                    # no browser page to send from
])
def test_auto_uses_the_page_unless_the_direct_path_is_known_to_work(known, path):
    assert bridge.request_path_for("auto", known) == path


@pytest.mark.parametrize("known,path", [
    (facts(), "direct"), (facts(site_said="page"), "direct"), (facts(account_refused=True), "page"),
])
def test_direct_is_used_when_asked_except_on_an_account_the_site_refused(known, path):
    assert bridge.request_path_for("direct", known) == path


def test_page_is_used_when_asked_whatever_is_known():
    assert {bridge.request_path_for("page", f) for f in (facts(), facts(recaptcha_seen=False), facts(browser=False),
                                                           facts(site_said="direct"))} == {"page"}


def account_row(needs_browser=1, retry_in=3600.0, failures=0) -> dict:
    return {"needs_browser": needs_browser, "direct_retry_at": 1000.0 + retry_in, "failures": failures}


def test_a_refused_account_retries_direct_only_after_a_day_and_in_good_standing():
    assert bridge.in_browser_mode(account_row(), 1000.0)
    assert not bridge.in_browser_mode(account_row(retry_in=-1), 1000.0)
    assert bridge.in_browser_mode(account_row(retry_in=-1, failures=1), 1000.0)     # not in good standing yet
    assert not bridge.in_browser_mode(account_row(needs_browser=0), 1000.0)
    assert bridge.DIRECT_RETRY_AFTER >= 86400
