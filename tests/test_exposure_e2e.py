"""End to end: a bridge reachable beyond its machine (issue 19, #8): whose forwarded headers it believes,
the sign-in budget shared by all addresses, and the warning about plain HTTP."""
import pathlib
import uuid

import httpx
import pytest
from harness import ROOT, BridgeProcess

PASSWORD = "exposure-test-password"
SECRET = "X-Bridge-Executor-Secret"


def bridge_with(arena, tmp_path_factory, *args: str) -> BridgeProcess:
    return BridgeProcess(arena.url, str(tmp_path_factory.mktemp("exposed")), args=args,
                         env={"BRIDGE_ADMIN_PASSWORD": PASSWORD}).start()


@pytest.fixture(scope="module")
def elsewhere(arena, tmp_path_factory):
    """A bridge whose trusted proxy is not on this machine: the tests' own connections are direct."""
    proc = bridge_with(arena, tmp_path_factory, "--trusted-proxy", "10.0.0.0/8, 192.0.2.1")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def behind_loopback(arena, tmp_path_factory):
    """A bridge behind a proxy on this machine: the list names loopback."""
    proc = bridge_with(arena, tmp_path_factory, "--trusted-proxy", "192.0.2.1,127.0.0.1")
    yield proc
    proc.stop()


def sign_in(proc: BridgeProcess, password: str, address: str, **headers: str) -> httpx.Response:
    return httpx.post(proc.url + "/login", data={"password": password}, timeout=30,
                      headers={"X-Forwarded-For": address, **headers})


def some_address() -> str:
    return f"203.0.113.{uuid.uuid4().int % 250}"


def test_a_direct_client_cannot_choose_its_throttle_identity_with_x_forwarded_for(elsewhere):
    statuses = [sign_in(elsewhere, "guess", some_address()).status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429]          # six "addresses", one peer: the peer's throttle holds
    assert sign_in(elsewhere, PASSWORD, "198.51.100.9").status_code == 429


def test_a_direct_client_cannot_claim_https_with_x_forwarded_proto(elsewhere, tmp_path_factory, arena):
    fresh = bridge_with(arena, tmp_path_factory, "--trusted-proxy", "10.0.0.0/8")
    try:
        answer = sign_in(fresh, PASSWORD, "198.51.100.10", **{"X-Forwarded-Proto": "https"})
    finally:
        fresh.stop()
    assert answer.status_code == 303 and "secure" not in answer.headers["set-cookie"].lower()


def test_a_listed_proxy_forwards_the_client_address(behind_loopback):
    address = some_address()
    assert [sign_in(behind_loopback, "guess", address).status_code for _ in range(6)] == [401] * 5 + [429]
    assert sign_in(behind_loopback, PASSWORD, "198.51.100.11").status_code == 303


def test_a_listed_proxy_forwards_https(behind_loopback):
    answer = sign_in(behind_loopback, PASSWORD, "198.51.100.13", **{"X-Forwarded-Proto": "https"})
    assert answer.status_code == 303 and "secure" in answer.headers["set-cookie"].lower()


def test_the_sign_in_budget_holds_guesses_spread_over_many_addresses(arena, tmp_path_factory):
    proc = bridge_with(arena, tmp_path_factory, "--trusted-proxy", "1", "--login-budget", "4")
    try:
        guesses = [sign_in(proc, "guess", f"203.0.113.{i}").status_code for i in range(1, 5)]
        blocked = sign_in(proc, PASSWORD, "198.51.100.12")
    finally:
        proc.stop()
    assert guesses == [401] * 4
    assert blocked.status_code == 429 and 0 < int(blocked.headers["retry-after"]) <= 60
    assert "from all addresses together" in blocked.text


def test_the_pairing_budget_holds_wrong_secrets_spread_over_many_addresses(arena, tmp_path_factory):
    proc = bridge_with(arena, tmp_path_factory, "--trusted-proxy", "--login-budget", "3")
    body = {"executor": "a" * 16, "state": {}}
    try:
        answers = [httpx.post(proc.url + "/executor/poll", json=body, timeout=30,
                              headers={SECRET: f"bx-wrong-{i}", "X-Forwarded-For": f"203.0.113.{i}"})
                   for i in range(1, 5)]
    finally:
        proc.stop()
    assert [a.status_code for a in answers] == [401] * 3 + [429]
    assert 0 < int(answers[-1].headers["retry-after"]) <= 60 and "all addresses" in answers[-1].json()["error"]


def warnings_of(proc: BridgeProcess) -> list[str]:
    return [line for line in proc.log().splitlines() if "without TLS in front" in line]


def test_listening_beyond_loopback_without_a_proxy_warns_once_with_the_readme_anchor(arena, tmp_path_factory):
    proc = bridge_with(arena, tmp_path_factory, "--host", "0.0.0.0")
    proc.stop()
    [line] = warnings_of(proc)
    assert "WARNING" in line and "BRIDGE_TRUSTED_PROXY" in line and "README.md#tls-and-trusted-proxies" in line
    readme = pathlib.Path(ROOT, "README.md").read_text(encoding="utf-8")
    assert "### TLS and trusted proxies" in readme


def test_listening_beyond_loopback_behind_a_trusted_proxy_does_not_warn(arena, tmp_path_factory):
    proc = bridge_with(arena, tmp_path_factory, "--host", "0.0.0.0", "--trusted-proxy", "10.0.0.1")
    proc.stop()
    assert "serving on" in proc.log() and warnings_of(proc) == []


def test_listening_on_loopback_does_not_warn(elsewhere):
    assert "serving on" in elsewhere.log() and warnings_of(elsewhere) == []
