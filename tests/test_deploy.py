"""Deploy files and the process lifecycle: the Dockerfile's CMD really serves, fly.toml agrees with the
Dockerfile, the README documents exactly the settings bridge.OPTIONS has, and SIGTERM stops gracefully.

`python tests/test_deploy.py` rewrites the README's configuration table from bridge.OPTIONS.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bridge

README = os.path.join(ROOT, "README.md")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
FLY_TOML = os.path.join(ROOT, "fly.toml")
TABLE_START = "<!-- options-table:start (generated from bridge.OPTIONS by `python tests/test_deploy.py`) -->"
TABLE_END = "<!-- options-table:end -->"
MODEL = "gemini-3-pro"


# --- the Dockerfile, read as Docker reads it ------------------------------------------------------

def dockerfile_instructions(path: str = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and backslash continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if line.lstrip().startswith("#") or (not line.strip() and not pending):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def dockerfile() -> dict:
    """What the image runs: ENV (in order), WORKDIR, USER, EXPOSE, VOLUME, COPY, ENTRYPOINT, CMD, HEALTHCHECK."""
    info: dict = {"env": {}, "copy": [], "expose": [], "volume": [], "from": []}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {item!r}: use the KEY=value form"
                info["env"][key] = value
        elif word in ("CMD", "ENTRYPOINT"):
            info[word.lower()] = json.loads(rest)  # exec form only: no shell between tini and python
        elif word == "HEALTHCHECK":
            options, _, command = rest.partition("CMD ")
            info["healthcheck"] = {"options": options.split(), "cmd": json.loads(command)}
        elif word == "EXPOSE":
            info["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif word == "VOLUME":
            info["volume"] += json.loads(rest) if rest.startswith("[") else rest.split()
        elif word == "COPY":
            info["copy"].append(rest.split())
        elif word == "FROM":
            info["from"].append(rest)
        elif word in ("WORKDIR", "USER"):
            info[word.lower()] = rest
    return info


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, log_path: str, timeout: float = 20.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "bridge exited:\n" + pathlib.Path(log_path).read_text(errors="replace")
        try:
            response = httpx.get(url, timeout=1)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("no health answer:\n" + pathlib.Path(log_path).read_text(errors="replace"))


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dockerfile_is_small_pinned_and_non_root():
    info = dockerfile()
    assert info["from"] == ["${PYTHON_IMAGE}"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in pathlib.Path(DOCKERFILE).read_text()
    assert info["user"] not in ("", "0", "root") and not info["user"].startswith(("0:", "root"))
    assert "/data" in info["volume"]
    run = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert "--no-install-recommends" in run and "chromium" in run and "xvfb" in run
    assert "rm -rf /var/lib/apt/lists/*" in run and "--no-cache-dir" in run
    assert "--require-hashes" in run and "-r requirements.lock" in run
    for line in pathlib.Path(ROOT, "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        assert not line or "==" in line, f"requirements.txt must pin every package: {line}"
    # Only what the image needs enters the build context (no bridge.db with secrets, no .git).
    ignored = [l.strip() for l in pathlib.Path(ROOT, ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ignored[0] == "*"
    allowed = {l[1:] for l in ignored[1:] if l.startswith("!")}
    copied = {name for args in info["copy"] for name in args[:-1]}
    assert copied <= allowed, f"COPY uses files that .dockerignore leaves out: {copied - allowed}"
    assert {"bridge.py", "sidecar.py", "requirements.lock"} <= copied


def _pins(path: str) -> dict[str, str]:
    """name -> version of each `name==version` line (continuation lines and comments skipped)."""
    pins = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#")[0].strip().rstrip("\\").strip()
            if line and not line.startswith("-"):
                name, _, version = line.partition("==")
                pins[re.sub(r"[-_.]+", "-", name.lower())] = version.split(";")[0].strip()
    return pins


def test_the_image_lock_file_pins_requirements_txt_with_hashes():
    """The image installs requirements.lock with --require-hashes: it must hold requirements.txt's versions
    (regenerate it with the command in its header when requirements.txt changes) and a hash for each pin."""
    lock = os.path.join(ROOT, "requirements.lock")
    locked = _pins(lock)
    wanted = _pins(os.path.join(ROOT, "requirements.txt"))
    assert {name: locked.get(name) for name in wanted} == wanted, "requirements.lock is out of date"
    with open(lock, encoding="utf-8") as f:
        entries = re.split(r"\n(?=[A-Za-z0-9])", f.read())
    unhashed = [e.split()[0] for e in entries if "==" in e.split("#")[0] and "--hash=sha256:" not in e]
    assert not unhashed, f"requirements.lock has pins without hashes: {unhashed}"
    assert len(locked) > len(wanted), "requirements.lock must also pin the indirect packages"


def test_dockerfile_cmd_serves_health_with_state_in_the_volume(arena):
    """Run the image's CMD with its ENV on this machine: a temp dir stands for /data, PORT is set as a
    platform would set it, and ARENA_URL points at the emulator. Then its HEALTHCHECK must pass."""
    arena.reset()
    info = dockerfile()
    assert info["entrypoint"][0].endswith("tini") and info["entrypoint"][-1] == "--"
    assert info["cmd"] == ["python", "-m", "bridge"], "the bridge starts as a module, from its bytecode"
    assert any(word == "RUN" and "compileall" in rest and "bridge.py" in rest for word, rest in dockerfile_instructions())
    assert any(args[-1] in ("./", ".", info["workdir"], info["workdir"] + "/") and "bridge.py" in args
               for args in info["copy"]), "bridge.py must be copied into the WORKDIR"
    data = tempfile.mkdtemp(prefix="data-", dir="/tmp")  # short: the sidecar socket goes beside the db
    home = tempfile.mkdtemp(prefix="home-", dir="/tmp")
    try:
        env = {k: v.replace("/data", data, 1) if v.startswith("/data") else v for k, v in info["env"].items()}
        assert env["BRIDGE_DB"] == os.path.join(data, "bridge.db")
        assert int(env["PORT"]) in info["expose"]
        port = free_port()
        env.update(PORT=str(port), HOME=home, ARENA_URL=arena.url, PATH=os.environ.get("PATH", "/usr/bin:/bin"))
        settings = bridge.Settings.load(env=env)
        assert (settings.host, settings.port, settings.db) == ("0.0.0.0", port, env["BRIDGE_DB"])
        assert settings.socket_path == os.path.join(data, "bridge-sidecar.sock")
        log_path = os.path.join(data, "bridge.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, *info["cmd"][1:]], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            health = wait_for_health(f"http://127.0.0.1:{port}/api/v1/health", proc, log_path)
            assert health["status"] in ("ok", "degraded")
            store = bridge.Store(env["BRIDGE_DB"])
            key = store.create_key("health", 0)[1]
            store.close()
            details = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", headers={"Authorization": f"Bearer {key}"})
            assert details.json()["checks"]["sidecar"]["state"] == "stopped"  # the browser starts only when needed
            check = info["healthcheck"]
            assert "/api/v1/health" in " ".join(check["cmd"]) and check["cmd"][0] == "python"
            assert any(o.startswith("--start-period=") for o in check["options"])
            result = subprocess.run([sys.executable, *check["cmd"][1:]], env=env, capture_output=True, timeout=10, check=False)
            assert result.returncode == 0, result.stderr.decode()
            assert os.path.exists(env["BRIDGE_DB"])
        finally:
            assert stop(proc) == 0, pathlib.Path(log_path).read_text(errors="replace")
    finally:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_a_started_bridge_has_loaded_neither_numpy_nor_the_schema_validator(arena, tmp_path):
    """Idle memory: a bridge started as the image starts it, after discovery, has loaded neither numpy
    (sqlite_utils imports it when it can) nor jsonschema (the first request that validates a schema loads
    it). Their extension modules show in the process's memory map: numpy's core, and rpds under
    jsonschema's `referencing`, as this process's own map shows once it has imported jsonschema."""
    import jsonschema  # noqa: F401 - for the map of this process
    assert "/rpds/" in pathlib.Path("/proc/self/maps").read_text()
    arena.reset()
    port, log_path = free_port(), str(tmp_path / "bridge.log")
    env = {**os.environ, "BRIDGE_SIDECAR": "off", "BRIDGE_ANONYMOUS": "off"}
    env.pop("ARENA_AUTH_TOKENS", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bridge", "--port", str(port), "--db", str(tmp_path / "b.db"),
                                 "--arena-url", arena.url], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_health(f"http://127.0.0.1:{port}/api/v1/health", proc, log_path)
        deadline = time.time() + 20
        while "discovered LM Arena" not in pathlib.Path(log_path).read_text() and time.time() < deadline:
            time.sleep(0.05)
        maps = pathlib.Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        assert stop(proc) == 0, pathlib.Path(log_path).read_text(errors="replace")
    assert "discovered LM Arena" in pathlib.Path(log_path).read_text()
    assert [name for name in ("numpy", "rpds") if f"/{name}/" in maps] == []


def test_fly_toml_parses_and_agrees_with_the_dockerfile():
    with open(FLY_TOML, "rb") as f:
        fly = tomllib.load(f)
    info = dockerfile()
    service = fly["http_service"]
    assert service["internal_port"] == int(info["env"]["PORT"]) and service["internal_port"] in info["expose"]
    assert (service["auto_stop_machines"], service["auto_start_machines"], service["min_machines_running"]) == \
        ("stop", True, 0)
    assert [c["path"] for c in service["checks"]] == ["/api/v1/health"]
    assert "/api/v1/health" in " ".join(info["healthcheck"]["cmd"])
    mounts = fly["mounts"] if isinstance(fly["mounts"], list) else [fly["mounts"]]
    assert [m["destination"] for m in mounts] == ["/data"] and "/data" in info["volume"]
    assert os.path.dirname(info["env"]["BRIDGE_DB"]) == "/data"
    assert fly["build"]["dockerfile"] == "Dockerfile"
    memory = str(fly["vm"][0]["memory"]).lower()  # "1gb", "1024mb" or a number of MB
    megabytes = float(re.sub(r"[a-z]", "", memory)) * (1024 if memory.endswith("gb") else 1)
    assert megabytes >= 1024, "Chromium in the sidecar needs a VM of at least 1 GB"
    # The machine must get longer to stop than the bridge gives open streams.
    grace = float(fly.get("env", {}).get("BRIDGE_SHUTDOWN_TIMEOUT") or info["env"].get("BRIDGE_SHUTDOWN_TIMEOUT")
                  or bridge.Settings.shutdown_timeout)
    assert fly["kill_signal"] in ("SIGTERM", "SIGINT") and float(fly["kill_timeout"]) > grace
    # Secrets are documented, never set in the file.
    text = pathlib.Path(FLY_TOML).read_text()
    assert "BRIDGE_ADMIN_PASSWORD" in text and "ARENA_AUTH_TOKENS" in text
    assert not {"BRIDGE_ADMIN_PASSWORD", "ARENA_AUTH_TOKENS"} & set(fly.get("env", {}))
    for key in fly.get("env", {}):
        assert any(key in o.env for o in bridge.OPTIONS), f"fly.toml sets an unknown variable {key}"


def test_dockerfile_env_names_are_real_settings():
    own = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "HOME"}
    known = {name for o in bridge.OPTIONS for name in o.env}
    assert set(dockerfile()["env"]) - own <= known


# --- the README's configuration table -------------------------------------------------------------

def _cell(value) -> str:
    if value is None or value == "" or value == ():
        return "—"
    if value is False:
        return "off"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def options_table() -> str:
    rows = ["| flag | environment | default | what it does |", "| --- | --- | --- | --- |"]
    for o in bridge.OPTIONS:
        flag = f"`{o.flag}`" if o.flag else "— (environment only)"
        env = ", ".join(f"`{name}`" for name in o.env)
        text = o.help.replace("|", "\\|")
        if o.kind is bridge._bool:
            text += " (the flag takes no value; in the environment `1`, `true`, `yes` or `on`)"
        if o.kind is bridge._bool_or_auto:
            text += " (the flag takes no value and turns it on; in the environment `auto`, `1` or `0`)"
        rows.append(f"| {flag} | {env} | {_cell(o.default)} | {text} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    assert TABLE_START in text and TABLE_END in text, "README.md lost its configuration table markers"
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()


def write_readme_table() -> None:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    with open(README, "w", encoding="utf-8") as f:
        f.write(f"{head}{TABLE_START}\n{options_table()}\n{TABLE_END}{tail}")


def test_readme_configuration_table_is_generated_from_options():
    text = pathlib.Path(README).read_text(encoding="utf-8")
    assert readme_table(text) == options_table(), \
        "README.md's configuration table is out of date: run `python tests/test_deploy.py`"


def test_readme_mentions_only_real_settings_and_every_setting():
    text = pathlib.Path(README).read_text(encoding="utf-8")
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "bridge.py"), "--help"], capture_output=True,
                               text=True, check=True).stdout
    flags = {o.flag for o in bridge.OPTIONS if o.flag}
    envs = {name for o in bridge.OPTIONS for name in o.env}
    # Every option is documented, and `--help` shows every one.
    for name in flags | envs:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"README.md does not mention {name}"
        assert name in help_text, f"`python bridge.py --help` does not show {name}"
    # Every variable the README names exists (BRIDGE_* and ARENA_* are ours; PORT is checked above).
    named = set(re.findall(r"\b(?:BRIDGE|ARENA)_[A-Z0-9_]+\b", text))
    assert named <= envs, f"README.md names unknown variables: {sorted(named - envs)}"
    # Every flag given to bridge.py in the README exists: in commands and in the table.
    sub_flags = {"--rpm", "--help", "-h", "--images", "--save",   # keys create; doctor
                 "--url", "--rotate", "--revoke"}                 # userscript
    for line in text.splitlines():
        if "bridge.py" in line or line.startswith("| `--"):
            used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
            assert used <= flags | sub_flags, f"README.md uses unknown flags {sorted(used - flags - sub_flags)}: {line}"


# --- graceful lifecycle ---------------------------------------------------------------------------

class SlowStream(threading.Thread):
    """A streamed chat read in the background; `started` is set at the first content chunk."""

    def __init__(self, url: str, key: str):
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.started = threading.Event()
        self.events: list = []
        self.error: Exception | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "slow please"}]}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {self.key}"}) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.events.append("[DONE]")
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        self.events.append(event)
                        if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                            self.started.set()
        except Exception as exc:  # noqa: BLE001 - the cut-off test expects the stream to break, however it breaks
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.started.set()

    @property
    def text(self) -> str:
        return "".join((c.get("delta") or {}).get("content") or "" for e in self.events if isinstance(e, dict)
                       for c in e.get("choices") or [])


def refuses_connections(url: str, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=0.5)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


def assert_database_consistent(db: str) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(bridge.MIGRATIONS)
    finally:
        conn.close()


@pytest.fixture
def lifecycle(arena, tmp_path):
    """A bridge of its own (each test stops it), an account and a key; reCAPTCHA off, sidecar off."""
    from harness import BridgeProcess
    arena.reset()
    arena.configure(recaptcha="off")
    procs: list[BridgeProcess] = []

    def start(*args: str, sidecar: str = "off", env: dict | None = None,
              new_session: bool = False) -> tuple[BridgeProcess, str]:
        proc = BridgeProcess(arena.url, str(tmp_path / f"b{len(procs)}"), args=args, sidecar=sidecar, env=env,
                             new_session=new_session)
        os.makedirs(proc.folder, exist_ok=True)
        procs.append(proc.start())
        proc.wait_for_models()
        proc.set_accounts(arena.new_session())
        key = proc.create_key()
        proc.store.close()  # the bridge must be the last one to close the file
        proc._store = None
        return proc, key

    yield start
    for proc in procs:
        proc.stop()


def sigterm_during_stream(arena, proc, key, lines: int) -> tuple[SlowStream, float]:
    """Start a reply of `lines` lines, 0.25 s apart, and send SIGTERM once it has begun."""
    arena.configure(lines=lines, line_delay=0.25)
    stream = SlowStream(proc.url, key)
    stream.start()
    assert stream.started.wait(10)
    signalled = time.monotonic()
    proc.process.send_signal(signal.SIGTERM)
    return stream, signalled


def test_sigterm_refuses_new_connections_lets_the_stream_finish_and_exits_0(arena, lifecycle):
    proc, key = lifecycle("--shutdown-timeout", "15")
    stream, signalled = sigterm_during_stream(arena, proc, key, lines=12)  # a ~3 s reply
    assert refuses_connections(proc.url), "the bridge still accepts connections after SIGTERM"
    assert stream.finished_at is None, "the stream ended before the bridge stopped accepting"
    code = proc.process.wait(15 + 5)
    exited = time.monotonic()
    stream.join(5)
    assert code == 0, proc.log()
    assert stream.error is None and stream.events[-1] == "[DONE]", (stream.error, stream.events[-3:])
    assert stream.text.count("line ") == 12
    assert stream.events[-2]["choices"][0]["finish_reason"] == "stop"
    assert exited - signalled < 15, "the bridge waited for the full bound although the stream had ended"
    assert exited - stream.finished_at < 5
    log = proc.log()
    assert "open requests get up to 15s" in log and "stopped" in log and "CancelledError" not in log
    db = proc.db
    assert_database_consistent(db)
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0, "the database was not closed"
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM usage WHERE model = ? AND status = 200", (MODEL,)).fetchone()[0] == 1
    conn.close()


def test_sigterm_cuts_streams_that_outlast_the_bound(arena, lifecycle):
    proc, key = lifecycle("--shutdown-timeout", "1")
    stream, signalled = sigterm_during_stream(arena, proc, key, lines=60)  # a ~15 s reply
    code = proc.process.wait(15)
    took = time.monotonic() - signalled
    stream.join(5)
    assert code == 0, proc.log()
    assert 0.8 < took < 1 + 4, f"stopped after {took:.1f}s with a 1 s bound"
    assert "[DONE]" not in stream.events
    assert "CancelledError" not in proc.log()
    assert_database_consistent(proc.db)


def test_a_busy_port_is_a_one_line_error(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, os.path.join(ROOT, "bridge.py"), "--port", str(port),
                                 "--db", str(tmp_path / "bridge.db"), "--arena-url", "http://127.0.0.1:9"],
                                capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unusable_database_folder_is_a_one_line_error(tmp_path):
    """As a bind mount the image's uid may not write (deploy/test-image.sh checks that case, which root
    cannot reproduce here): the folder of --db is a file."""
    (tmp_path / "data").write_text("not a folder")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bridge.py"), "--port", str(free_port()),
                             "--db", str(tmp_path / "data" / "bridge.db"), "--arena-url", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert f"{tmp_path / 'data'} is not a folder" in result.stderr and "--db" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_health_answers_before_discovery_completes(arena, tmp_path):
    """Cold start: the model list is fetched in the background, so a slow LM Arena cannot delay start-up."""
    from harness import BridgeProcess
    arena.reset()
    # The page answers only after 15 s; health must come long before that, with room for a loaded machine's
    # slow interpreter start.
    arena.fault(path="page", status=503, first_byte_delay=15)
    proc = BridgeProcess(arena.url, str(tmp_path))
    started = time.monotonic()
    try:
        proc.start()
        took = time.monotonic() - started
        health = httpx.get(proc.url + "/api/v1/health", timeout=2).json()
        assert took < 10, f"health answered only after {took:.1f}s"
        assert health["status"] == "degraded" and health["checks"]["models"]["known"] == 0
        assert stop(proc.process, 20) == 0, proc.log()
    finally:
        proc.stop()


def _browser() -> str | None:
    return os.environ.get("BRIDGE_BROWSER") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(_browser() is None, reason="no Chromium/Chrome binary found")
@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_sigterm_stops_the_sidecar_and_its_browser(arena, lifecycle, stop):
    """Also Ctrl-C in a terminal (SIGINT to the whole foreground group): the sidecar, in a session of its own,
    is not cut off under the in-page stream while the bridge drains it; the bridge stops it afterwards."""
    proc, key = lifecycle("--shutdown-timeout", "15", sidecar="auto", env={"BRIDGE_BROWSER": _browser()},
                          new_session=stop == "ctrl-c")
    # A token is needed: the sidecar starts. 6 s of reply: longer than the sidecar's own 2 s of grace.
    arena.configure(recaptcha="required", lines=24, line_delay=0.25)
    stream = SlowStream(proc.url, key)
    stream.start()
    assert stream.started.wait(60), proc.log()
    sidecar = httpx.get(proc.url + "/api/v1/health", headers={"Authorization": f"Bearer {key}"},
                        timeout=5).json()["checks"]["sidecar"]
    assert sidecar["state"] == "running", sidecar
    tree = {sidecar["pid"]}
    for _ in range(3):  # sidecar -> Playwright driver -> Chromium
        tree |= {child for pid in tree for child in _children(pid)}
    socket_path = os.path.join(proc.folder, "bridge-sidecar.sock")
    assert os.path.exists(socket_path)
    if stop == "ctrl-c":
        os.killpg(proc.process.pid, signal.SIGINT)
    else:
        proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(15 + 10) == 0, proc.log()
    stream.join(5)
    assert stream.events[-1] == "[DONE]", stream.events[-3:]
    assert all(f"line {i}\n" in stream.text for i in range(1, 25)), stream.events[-3:]  # whole, not cut off
    assert stream.events[-2]["choices"][0]["finish_reason"] == "stop"
    deadline = time.monotonic() + 5
    while any(map(_alive, tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in tree if _alive(pid)], "the sidecar or its browser outlived the bridge"
    assert not os.path.exists(socket_path)
    assert "sidecar stopped" in proc.log()
    assert_database_consistent(proc.db)


if __name__ == "__main__":
    write_readme_table()
    print("README.md: configuration table rewritten from bridge.OPTIONS")
