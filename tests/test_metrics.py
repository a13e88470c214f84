"""The metrics registry (SPEC §9): what /metrics exposes, in the Prometheus text format, counted per app."""
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

import bridge as dx

MODELS = ["gpt-5", "flux"]


def snapshot(accounts=(), sidecar="stopped", executors=None, conversations=0):
    return lambda: dx.Snapshot(list(accounts), sidecar, executors or {}, conversations)


def new_metrics(get=None) -> dx.Metrics:
    return dx.Metrics(get or snapshot(), lambda: MODELS)


def samples(metrics: dx.Metrics) -> dict[tuple, float]:
    """Every sample as (name, sorted labels) -> value, parsed back from the exposition text."""
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dx.Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_exposition_parses_as_prometheus_text():
    metrics = new_metrics()
    metrics.request("/v1/chat/completions", "gpt-5", 200, 0.3)
    names = {family.name for family in text_string_to_metric_families(metrics.exposition().decode())}
    assert {"bridge_requests", "bridge_errors", "bridge_request_duration_seconds",
            "bridge_time_to_first_token_seconds", "bridge_token_mints", "bridge_account_state",
            "bridge_account_cooldown_end_seconds", "bridge_sidecar_state", "bridge_executors",
            "bridge_conversations"} <= names


def test_requests_are_counted_by_route_model_and_status():
    metrics = new_metrics()
    for _ in range(3):
        metrics.request("/v1/chat/completions", "gpt-5", 200, 0.3)
    metrics.request("/v1/images/generations", "flux", 200, 4.0)
    assert value(metrics, "bridge_requests_total", route="/v1/chat/completions", model="gpt-5", status="200") == 3
    assert value(metrics, "bridge_requests_total", route="/v1/images/generations", model="flux", status="200") == 1


def test_errors_are_counted_by_cause_from_the_upstream_failure_kind():
    metrics = new_metrics()
    route = "/v1/chat/completions"
    for code, status in (("rate_limited", 502), ("recaptcha", 502), ("cloudflare", 503), ("login_gate", 503),
                         ("server", 502), ("invalid_request", 400), ("internal_error", 500), ("upstream_503", 502)):
        metrics.request(route, "gpt-5", status, 0.1, code)
    for cause, count in (("rate_limit", 1), ("recaptcha", 1), ("cloudflare", 1), ("login_gate", 1),
                         ("upstream_5xx", 2), ("client_error", 1), ("bridge", 1)):
        assert value(metrics, "bridge_errors_total", route=route, model="gpt-5", cause=cause) == count
    assert value(metrics, "bridge_requests_total", route=route, model="gpt-5", status="503") == 2


def test_a_client_that_hung_up_is_counted_as_client_left_not_client_error():
    metrics = new_metrics()
    metrics.request("/v1/chat/completions", "gpt-5", 499, 0.1, dx.CLIENT_LEFT)
    route = "/v1/chat/completions"
    assert value(metrics, "bridge_errors_total", route=route, model="gpt-5", cause="client_left") == 1
    assert value(metrics, "bridge_errors_total", route=route, model="gpt-5", cause="client_error") == 0


def test_a_model_name_lm_arena_does_not_publish_is_counted_as_other():
    metrics = new_metrics()
    metrics.request("/v1/chat/completions", "made-up-model", 404, 0.01, "model_not_found")
    assert value(metrics, "bridge_errors_total", route="/v1/chat/completions", model="other", cause="client_error") == 1
    assert not any(dict(labels).get("model") == "made-up-model" for _, labels in samples(metrics))


def test_a_model_lm_arena_publishes_later_gets_its_own_label():
    names = ["gpt-5"]
    metrics = dx.Metrics(snapshot(), lambda: names, names_max_age=0.0)
    metrics.request("/v1/chat/completions", "new-model", 200, 0.1)
    names.append("new-model")
    metrics.request("/v1/chat/completions", "new-model", 200, 0.1)
    route = "/v1/chat/completions"
    assert value(metrics, "bridge_requests_total", route=route, model="other", status="200") == 1
    assert value(metrics, "bridge_requests_total", route=route, model="new-model", status="200") == 1


def test_latency_and_time_to_first_token_are_histograms():
    metrics = new_metrics()
    metrics.request("/v1/chat/completions", "gpt-5", 200, 0.3)
    metrics.first_token_after("/v1/chat/completions", 0.07)
    route = "/v1/chat/completions"
    assert value(metrics, "bridge_request_duration_seconds_bucket", route=route, le="0.25") == 0
    assert value(metrics, "bridge_request_duration_seconds_bucket", route=route, le="0.5") == 1
    assert value(metrics, "bridge_time_to_first_token_seconds_count", route=route) == 1
    assert value(metrics, "bridge_time_to_first_token_seconds_bucket", route=route, le="0.1") == 1


def test_token_mints_and_their_failures_are_counted():
    metrics = new_metrics()
    metrics.token_minted(True)
    metrics.token_minted(True)
    metrics.token_minted(False)
    assert value(metrics, "bridge_token_mints_total", result="ok") == 2
    assert value(metrics, "bridge_token_mints_total", result="failed") == 1


def test_account_state_and_cool_down_end_are_read_at_scrape_time():
    accounts = [dx.AccountGauge(1, "signed_in", "ok", None)]
    metrics = new_metrics(lambda: dx.Snapshot(list(accounts), "running", {}, 0))
    assert value(metrics, "bridge_account_state", account="1", kind="signed_in", state="ok") == 1
    until = time.time() + 600
    accounts[0] = dx.AccountGauge(1, "signed_in", "cooling_down", until)
    assert value(metrics, "bridge_account_state", account="1", kind="signed_in", state="cooling_down") == 1
    assert value(metrics, "bridge_account_state", account="1", kind="signed_in", state="ok") == 0
    assert abs(value(metrics, "bridge_account_cooldown_end_seconds", account="1") - until) < 1


def test_sidecar_executors_and_conversations_are_gauges():
    metrics = new_metrics(snapshot(sidecar="running", executors={"connected": 2, "busy": 1}, conversations=7))
    assert value(metrics, "bridge_sidecar_state", state="running") == 1
    assert value(metrics, "bridge_executors", state="connected") == 2
    assert value(metrics, "bridge_executors", state="busy") == 1
    assert value(metrics, "bridge_conversations") == 7


def test_two_apps_in_one_process_count_apart():
    first, second = new_metrics(), new_metrics()
    first.request("/v1/chat/completions", "gpt-5", 200, 0.3)
    assert value(second, "bridge_requests_total", route="/v1/chat/completions", model="gpt-5", status="200") == 0


# --- /metrics through the real bridge ------------------------------------------------------------------

def scrape(proc, key: str) -> dict[tuple, float]:
    response = httpx.get(proc.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def chat(proc, key: str, model: str = "gemini-3-pro"):
    return httpx.post(proc.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "x"}]}, timeout=30)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_need_an_api_key_or_an_admin_session(fresh):
    for headers in ({}, {"Authorization": "Bearer sk-arena-not-a-key"}):
        response = httpx.get(fresh.url + "/metrics", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] in ("missing_api_key",
                                                                                     "invalid_api_key")


def test_counters_move_with_requests(fresh, api_key):
    before = scrape(fresh, api_key)
    assert chat(fresh, api_key).status_code == 200
    assert chat(fresh, api_key, "no-such-model").status_code == 404
    after = scrape(fresh, api_key)
    route = "/v1/chat/completions"
    assert moved(before, after, "bridge_requests_total", route=route, model="gemini-3-pro", status="200") == 1
    assert moved(before, after, "bridge_errors_total", route=route, model="other", cause="client_error") == 1
    assert moved(before, after, "bridge_request_duration_seconds_count", route=route) == 2
    assert after[("bridge_account_state", (("account", str(fresh.store.accounts()[0]["id"])),
                                           ("kind", fresh.store.accounts()[0]["kind"]), ("state", "ok")))] == 1


def test_an_upstream_failure_is_counted_by_its_cause(fresh, api_key, arena):
    before = scrape(fresh, api_key)
    arena.fault(times=3, status=429)
    assert chat(fresh, api_key).status_code == 503
    after = scrape(fresh, api_key)
    assert moved(before, after, "bridge_errors_total", route="/v1/chat/completions", model="gemini-3-pro",
                 cause="rate_limit") == 1
    [account] = fresh.store.accounts()
    assert after[("bridge_account_cooldown_end_seconds", (("account", str(account["id"])),))] > time.time()


def test_streams_measure_time_to_first_token(fresh, api_key):
    before = scrape(fresh, api_key)
    with httpx.stream("POST", fresh.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": "gemini-3-pro", "stream": True, "messages": [{"role": "user", "content": "x"}]},
                      timeout=30) as response:
        assert response.status_code == 200 and "[DONE]" in response.read().decode()
    after = scrape(fresh, api_key)
    assert moved(before, after, "bridge_time_to_first_token_seconds_count", route="/v1/chat/completions") == 1


def test_a_client_that_leaves_mid_stream_is_counted_as_client_left_not_client_error(fresh, api_key, arena):
    arena.configure(lines=3, line_delay=60)
    before = scrape(fresh, api_key)
    received, _ = fresh.hang_up(api_key, "/v1/chat/completions", {"model": "gemini-3-pro", "stream": True,
                                "messages": [{"role": "user", "content": "x"}]}, after=1.5)
    assert b"line 1" in received        # the answer had begun
    route, deadline = "/v1/chat/completions", time.time() + 10
    while moved(before, after := scrape(fresh, api_key), "bridge_errors_total", route=route, model="gemini-3-pro",
                cause="client_left") == 0 and time.time() < deadline:
        time.sleep(0.1)
    assert moved(before, after, "bridge_errors_total", route=route, model="gemini-3-pro", cause="client_left") == 1
    assert moved(before, after, "bridge_errors_total", route=route, model="gemini-3-pro", cause="client_error") == 0
