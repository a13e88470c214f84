"""The pairing of curl_cffi's TLS imitation with the User-Agent and client hints sent beside it (§0 U1: the
site scores the User-Agent with the JA4 TLS fingerprint; cf_clearance is bound to the User-Agent). Pure."""
import re

import pytest
from curl_cffi.requests.impersonate import BrowserType

import bridge

SIDECAR_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"
FIREFOX_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:150.0) Gecko/20100101 Firefox/150.0"


def major(text: str, pattern: str) -> set[int]:
    return {int(v) for v in re.findall(pattern, text)}


def test_every_row_is_a_target_curl_cffi_imitates():
    known = {b.value for b in BrowserType}
    assert all(row.target in known for row in bridge.FINGERPRINTS)
    assert set(bridge.IMPERSONATE_ALIASES.values()) <= {row.target for row in bridge.FINGERPRINTS}


@pytest.mark.parametrize("row", bridge.FINGERPRINTS, ids=lambda r: r.target)
def test_each_row_s_user_agent_and_client_hints_name_its_own_browser_and_version(row):
    target, headers = bridge.paired_fingerprint(row.target, None)
    assert target == row.target and f"{row.family}/{row.major}." in headers["User-Agent"]
    if row.family == "Chrome":
        assert major(headers["sec-ch-ua"], r'v="(\d{3})"') == {row.major}
    else:
        assert "sec-ch-ua" not in headers


def test_the_default_impersonation_sends_that_browser_s_own_user_agent():
    target, headers = bridge.paired_fingerprint("chrome", None)
    assert target == "chrome152" and "Chrome/152.0" in headers["User-Agent"]
    assert headers["sec-ch-ua-platform"] == '"Windows"' and "Windows NT" in headers["User-Agent"]


def test_the_sidecar_s_user_agent_is_sent_as_is_with_the_nearest_chrome_target_and_its_own_hints():
    target, headers = bridge.paired_fingerprint("chrome", SIDECAR_UA)
    assert target == "chrome152" and headers["User-Agent"] == SIDECAR_UA
    assert major(headers["sec-ch-ua"], r'v="(\d{3})"') == {156}
    assert headers["sec-ch-ua-platform"] == '"Linux"' and headers["sec-ch-ua-mobile"] == "?0"


def test_a_chrome_user_agent_pairs_with_chrome_even_when_another_browser_is_configured():
    assert bridge.paired_fingerprint("firefox147", SIDECAR_UA)[0].startswith("chrome")


def test_a_firefox_user_agent_pairs_with_firefox_and_sends_no_client_hints():
    target, headers = bridge.paired_fingerprint("chrome", FIREFOX_UA)
    assert target == "firefox147" and headers == {"User-Agent": FIREFOX_UA}


def test_an_older_chrome_than_any_row_takes_the_oldest_row():
    old = SIDECAR_UA.replace("156.0.0.0", "120.0.0.0")
    assert bridge.paired_fingerprint("chrome", old)[0] == "chrome131"


def test_a_target_the_table_does_not_know_keeps_curl_cffi_s_own_matching_headers():
    assert bridge.paired_fingerprint("safari184", None) == ("safari184", {})
