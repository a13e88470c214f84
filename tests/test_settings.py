"""One Settings object from defaults, environment and flags (SPEC §2)."""
import dataclasses
import os
import stat
import subprocess
import sys
import time

import pytest
from harness import ROOT

import bridge


def test_every_option_is_a_settings_field_and_back():
    assert [f.name for f in dataclasses.fields(bridge.Settings)] == [o.name for o in bridge.OPTIONS]


def test_defaults_match_the_spec():
    s = bridge.Settings.load(env={})
    assert (s.host, s.port, s.db, s.arena_url, s.sidecar, s.log_level) == \
        ("127.0.0.1", 8000, "bridge.db", "https://arena.ai", "auto", "info")


def test_environment_sets_values_and_port_is_an_alias():
    s = bridge.Settings.load(env={"PORT": "9001", "BRIDGE_DB": "/x/y.db", "ARENA_URL": "http://a/", "BRIDGE_HEADFUL": "1"})
    assert (s.port, s.db, s.arena_url, s.headful) == (9001, "/x/y.db", "http://a", True)


def test_a_flag_wins_over_the_environment():
    args = bridge.build_parser().parse_args(["--port", "7000", "--db", "flag.db"])
    s = bridge.Settings.load(args, env={"BRIDGE_PORT": "9001", "BRIDGE_DB": "env.db"})
    assert (s.port, s.db) == (7000, "flag.db")


def test_flags_are_accepted_after_the_command_too():
    args = bridge.build_parser().parse_args(["keys", "list", "--db", "after.db"])
    assert bridge.Settings.load(args, env={}).db == "after.db"


def test_secrets_have_no_flags_but_are_documented_in_help():
    out = subprocess.run([sys.executable, f"{ROOT}/bridge.py", "--help"], capture_output=True, text=True,
                         check=False).stdout
    assert "BRIDGE_ADMIN_PASSWORD" in out and "ARENA_AUTH_TOKENS" in out
    assert "--admin-password" not in out and "--auth-tokens" not in out


def test_trusted_proxy_is_a_list_of_networks_where_1_means_loopback_and_0_none():
    def trusted(value):
        return [str(n) for n in bridge.Settings.load(env={"BRIDGE_TRUSTED_PROXY": value}).trusted_proxy]
    assert trusted("10.0.0.0/8, 192.0.2.1,fd00::/8") == ["10.0.0.0/8", "192.0.2.1/32", "fd00::/8"]
    assert trusted("1") == trusted("true") == ["127.0.0.0/8", "::1/128"]
    assert trusted("0") == trusted("") == []
    with pytest.raises(ValueError):
        trusted("proxy.example")


def test_a_sign_in_throttle_of_zero_guesses_is_refused_at_start():
    for env in ("BRIDGE_LOGIN_ATTEMPTS", "BRIDGE_LOGIN_BUDGET"):
        with pytest.raises(SystemExit, match=f"{env} must be 1 or more"):
            bridge.Settings.load(env={env: "0"})


def test_the_client_behind_a_chain_of_listed_proxies_is_the_last_hop_that_is_not_one():
    trusted = bridge.networks("10.0.0.0/8, 127.0.0.1")
    assert bridge.forwarding_client("203.0.113.9, 10.1.2.3", trusted) == "203.0.113.9"
    assert bridge.forwarding_client("198.51.100.1, 203.0.113.9", trusted) == "203.0.113.9"   # a client's own claim
    assert bridge.forwarding_client("10.1.2.3, 127.0.0.1", trusted) == "10.1.2.3"            # all hops are proxies


def test_the_sidecar_socket_defaults_to_beside_the_database(tmp_path):
    s = bridge.Settings.load(env={"BRIDGE_DB": str(tmp_path / "state.db")})
    assert s.socket_path == str(tmp_path / "bridge-sidecar.sock")


def test_keys_create_prints_the_key_alone_on_the_last_line(tmp_path):
    out = subprocess.run([sys.executable, f"{ROOT}/bridge.py", "--db", str(tmp_path / "b.db"), "keys", "create",
                          "ci", "--rpm", "7"], capture_output=True, text=True, check=True).stdout
    key = out.strip().splitlines()[-1]
    assert key.startswith("sk-arena-") and " " not in key
    store = bridge.Store(str(tmp_path / "b.db"))
    assert store.key_by_secret(key)["rpm"] == 7 and key.encode() not in (tmp_path / "b.db").read_bytes()


def test_tokens_add_rejects_bad_input_without_storing_anything(tmp_path):
    result = subprocess.run([sys.executable, f"{ROOT}/bridge.py", "--db", str(tmp_path / "b.db"), "tokens", "add",
                             "not-a-cookie"], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "arena-auth-prod-v1" in result.stderr
    assert bridge.Store(str(tmp_path / "b.db")).accounts() == []


def test_schema_is_versioned_and_migrates_forward(tmp_path):
    store = bridge.Store(str(tmp_path / "m.db"))
    assert store.schema_version == len(bridge.MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_migration_that_fails_half_way_leaves_a_database_that_starts(tmp_path, monkeypatch):
    first = bridge.MIGRATIONS[0]

    def crashes_after_its_first_tables(db):
        first(db)
        raise RuntimeError("power cut")

    monkeypatch.setattr(bridge, "MIGRATIONS", (crashes_after_its_first_tables,))
    with pytest.raises(RuntimeError, match="power cut"):
        bridge.Store(str(tmp_path / "m.db"))
    monkeypatch.undo()
    store = bridge.Store(str(tmp_path / "m.db"))
    assert store.schema_version == len(bridge.MIGRATIONS) and store.accounts() == []


def test_arena_auth_tokens_are_imported_at_start_once(arena, tmp_path):
    from harness import BridgeProcess
    values = f"{arena.new_session()},\n{arena.new_session()}, not-a-cookie"
    proc = BridgeProcess(arena.url, str(tmp_path), env={"ARENA_AUTH_TOKENS": values}).start()
    try:
        assert len(proc.store.accounts()) == 2
        proc.restart()
        assert len(proc.store.accounts()) == 2
        assert "skipped one value" in proc.log() and "not-a-cookie" not in proc.log()
    finally:
        proc.stop()


def test_models_refresh_and_list_from_the_cli(arena, tmp_path):
    db = str(tmp_path / "c.db")
    run = lambda *a: subprocess.run([sys.executable, f"{ROOT}/bridge.py", "--db", db, "--arena-url", arena.url,
                                     "--sidecar", "off", "models", *a], capture_output=True, text=True, check=True).stdout
    assert "320 models stored (156 usable)" in run("refresh")
    listing = run("list")
    assert "gemini-3-pro\tgoogle\tchat\tvision" in listing and "stellarblade" not in listing


def test_a_remembered_conversation_expires_after_its_idle_time(tmp_path):
    store = bridge.Store(str(tmp_path / "c.db"))
    store.remember_conversation("fp", "eval-1", 1, "model", 1, turns=1)
    assert store.conversation_for("fp", ttl=60)["evaluation_id"] == "eval-1"
    store.write("UPDATE conversations SET updated = updated - 120")
    assert store.conversation_for("fp", ttl=60) is None
    store.forget_old_conversations(ttl=60)
    assert store.rows("SELECT * FROM conversations") == []


def test_a_conversation_that_moved_on_is_not_offered_for_an_older_history(tmp_path):
    store = bridge.Store(str(tmp_path / "c.db"))
    store.remember_conversation("after-turn-1", "eval-1", 1, "model", 1, turns=1)
    store.remember_conversation("after-turn-2", "eval-1", 1, "model", 1, turns=2)
    assert store.conversation_for("after-turn-1", ttl=60) is None
    assert store.conversation_for("after-turn-2", ttl=60)["turns"] == 2


def test_tokens_add_of_a_stored_user_updates_its_account_and_says_so(arena, tmp_path):
    value = arena.new_session()
    add = lambda v: subprocess.run([sys.executable, f"{ROOT}/bridge.py", "--db", str(tmp_path / "b.db"), "tokens",
                                    "add", v], capture_output=True, text=True, check=True).stdout
    assert add(value).startswith("Account 1 added")
    assert add(value).startswith("Account 1 already holds this LM Arena user's session")
    assert len(bridge.Store(str(tmp_path / "b.db")).accounts()) == 1


def usage_at(store, days_ago, key_id=1, status=200, tokens=10):
    store.record_usage([{"ts": time.time() - days_ago * 86400, "key_id": key_id, "model": "m", "status": status,
                         "latency_ms": 5.0, "prompt_tokens": tokens, "completion_tokens": 0, "error": None}])


def test_usage_older_than_the_kept_window_is_pruned(tmp_path):
    store = bridge.Store(str(tmp_path / "u.db"))
    for days_ago in (200, 100, 1):
        usage_at(store, days_ago)
    assert store.prune_usage(days=90) == 2
    assert [round((time.time() - r["ts"]) / 86400) for r in store.rows("SELECT ts FROM usage")] == [1]


def test_all_time_totals_per_key_survive_pruning(tmp_path):
    store = bridge.Store(str(tmp_path / "u.db"))
    key_id, _ = store.create_key("k", 0)
    for days_ago, status in ((200, 200), (200, 502), (100, 200), (1, 200)):
        usage_at(store, days_ago, key_id, status)
    usage_at(store, 150, key_id=None)                    # a request without a key is summed too, under key 0
    before = store.usage_by_key(since=0)
    store.prune_usage(days=90)
    usage_at(store, 100, key_id)                         # a late row of an already pruned day adds to it
    store.prune_usage(days=90)
    [after] = store.usage_by_key(since=0)
    assert (after["requests"], after["errors"], after["tokens"]) == (before[0]["requests"] + 1, 1, 50)
    assert after["last_used"] == before[0]["last_used"]
    assert store.usage_by_key(since=time.time() - 7 * 86400)[0]["requests"] == 1


def test_the_usage_window_is_90_days_unless_set(tmp_path):
    assert bridge.Settings.load(env={}).usage_days == 90
    assert bridge.Settings.load(env={"BRIDGE_USAGE_DAYS": "30"}).usage_days == 30


def test_the_server_prunes_old_usage_when_it_starts(arena, tmp_path):
    from harness import BridgeProcess
    proc = BridgeProcess(arena.url, str(tmp_path), env={"BRIDGE_USAGE_DAYS": "90"})
    store = bridge.Store(proc.db)
    usage_at(store, 100)
    usage_at(store, 1)
    store.close()
    proc.start()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and proc.store.rows("SELECT COUNT(*) AS n FROM usage")[0]["n"] != 1:
            time.sleep(0.1)
        assert proc.store.rows("SELECT COUNT(*) AS n FROM usage")[0]["n"] == 1
        assert proc.store.rows("SELECT SUM(requests) AS n FROM usage_daily")[0]["n"] == 1
    finally:
        proc.stop()


def test_the_database_and_its_wal_files_are_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store = bridge.Store(str(tmp_path / "p.db"))
        store.create_key("k", 0)
        modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("p.db", "p.db-wal", "p.db-shm")}
        store.close()
    finally:
        os.umask(old)
    assert modes == {"p.db": 0o600, "p.db-wal": 0o600, "p.db-shm": 0o600}


def test_a_request_body_that_arrives_too_slowly_is_408(arena, tmp_path):
    import socket

    from harness import BridgeProcess
    proc = BridgeProcess(arena.url, str(tmp_path), args=("--body-timeout", "1")).start()
    try:
        with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as conn:   # without a deadline: never
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + proc.create_key().encode() + b"\r\nContent-Length: 100\r\n\r\n{")
            started = time.monotonic()
            answer = b"".join(iter(lambda: conn.recv(4096), b"")).decode()   # the bridge closes after it
        assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer
        assert time.monotonic() - started < 15     # 1 s, with room for a loaded machine
    finally:
        proc.stop()


def test_the_request_path_pacing_and_headful_defaults():
    s = bridge.Settings.load(env={})
    assert (s.request_path, s.account_rph, s.headful) == ("auto", 10, None)
    assert bridge.Settings.load(env={"BRIDGE_HEADFUL": "0"}).headful is False
    assert bridge.Settings.load(env={"BRIDGE_HEADFUL": "auto"}).headful is None


def test_an_unknown_request_path_is_refused_at_start():
    with pytest.raises(SystemExit, match="BRIDGE_REQUEST_PATH"):
        bridge.Settings.load(env={"BRIDGE_REQUEST_PATH": "sideways"})


@pytest.mark.parametrize("setting,environ,xvfb,headful", [
    (None, {}, "/usr/bin/xvfb-run", True),
    (None, {"DISPLAY": ":0"}, None, True),
    (None, {}, None, False),
    (False, {"DISPLAY": ":0"}, "/usr/bin/xvfb-run", False),
    (True, {}, None, False),
])
def test_headful_by_default_wherever_a_window_can_be_had(setting, environ, xvfb, headful):
    assert bridge.headful_wanted(setting, environ, xvfb) is headful
