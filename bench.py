#!/usr/bin/env python3
"""Benchmark the bridge against the LM Arena emulator (issue 9). Not part of the test run.

    python bench.py            # full run (about a minute)
    python bench.py --quick    # short run (about 10 s), for a smoke check
    python bench.py --emulator inproc     # emulator in this process instead of its own subprocess
    python bench.py --profile out.txt     # also sample the bridge with py-spy during the load phases

Processes: this script is the load generator (raw asyncio HTTP/1.1 sockets for the concurrent phases,
curl_cffi for the sequential ones); the bridge runs as the image runs it, `python -m bridge` from compiled
bytecode (BRIDGE_SIDECAR=off, log level info), and once more as `python bridge.py` for the cold start and
memory of the script form; the emulator runs as `python tests/fake_arena.py --no-recaptcha` in its own subprocess by default,
so that its threads never share a GIL with the load generator. All traffic stays on 127.0.0.1.

Every figure is printed as median and p99 over the runs listed in the n column, beside its target; the
script never fails on a missed target.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import py_compile
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from typing import Self

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import httpx
from curl_cffi import requests as curl

import bridge

HOST = "127.0.0.1"
PROMPT = "bench"
# Phase 7: what an agent sends (20 function tools) and what its model answers with (a call after the text).
TOOLS = [{"type": "function", "function": {
    "name": f"tool_{i}", "description": f"Bench tool {i}: reads or writes the file at `path`, `count` times.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "count": {"type": "integer"}},
                   "required": ["path"]}}} for i in range(20)]
CALL = '<tool_call>{"name": "tool_7", "arguments": {"path": "/tmp/bench.txt", "count": 3}}</tool_call>'
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# =====================================================================================================
# Statistics and /proc readings
# =====================================================================================================

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples p99 is the largest."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def proc_status(pid: int, field: str) -> float:
    """A /proc/<pid>/status field in MB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def busy_seconds() -> float:
    """CPU time all processes on this machine used (from /proc/stat), to see what other work competed."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def close_wait(port: int) -> int:
    """Sockets of a server port whose client has closed but the server has not (TCP state CLOSE_WAIT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                count += state == "08" and int(local.rsplit(":", 1)[1], 16) == port
    return count


def read_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def listen_overflows() -> int:
    """TcpExt ListenOverflows: connections dropped because an accept queue was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split()[1:], values.split()[1:])).get("ListenOverflows", 0))
    return 0


class RssSampler:
    """Largest VmRSS of a process seen while active, sampled every 10 ms from a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))
            except OSError:
                return
            self.stop.wait(0.01)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


# =====================================================================================================
# The emulator: its own subprocess (default) or a thread of this process
# =====================================================================================================

class Emulator:
    def __init__(self, mode: str):
        self.mode = mode
        if mode == "inproc":
            from fake_arena import FakeArena
            self.arena = FakeArena().start()
            self.url, self.pid, self.process = self.arena.url, os.getpid(), None
        else:
            port = free_port()
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "tests", "fake_arena.py"), "--host", HOST, "--port", str(port),
                 "--no-recaptcha"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
            if "listening" not in line:
                raise RuntimeError("emulator did not start: " + line + self.process.stdout.read())
            self.url, self.pid = f"http://{HOST}:{port}", self.process.pid
            self.control = httpx.Client(base_url=self.url + "/__emulator", timeout=10)
        self.port = int(self.url.rsplit(":", 1)[1])

    def configure(self, **knobs) -> None:
        """Default knobs (clears the emulator's request log), reCAPTCHA off, then these. The site's per-account
        window (3,000 chats in 5 minutes by default) is lifted: the bench sends more than that from one account,
        and the bridge rightly stops asking an account whose `ratelimit` header says none remain."""
        knobs = {"recaptcha": "off", "ratelimit_limit": 10**9, **knobs}
        if self.mode == "inproc":
            self.arena.reset()
            self.arena.configure(**knobs)
        else:
            self.control.post("/reset").raise_for_status()
            self.control.post("/config", json=knobs).raise_for_status()

    def new_session(self) -> str:
        if self.mode == "inproc":
            return self.arena.new_session()
        return self.control.post("/session", json={}).json()["value"]

    def last_turn(self) -> str:
        """The user message of the last chat the emulator received: what the bridge sent for a turn."""
        if self.mode == "inproc":
            bodies = [r["body"].decode() for r in self.arena.requests]
        else:
            bodies = [r["body"] for r in self.control.post("/requests").json()]
        chats = [json.loads(b) for b in bodies if b.startswith("{") and '"userMessage"' in b]
        return chats[-1]["userMessage"]["content"]

    def stop(self) -> None:
        if self.mode == "inproc":
            self.arena.stop()
        elif self.process is not None:
            self.control.close()
            self.process.terminate()
            self.process.wait(10)


# =====================================================================================================
# The bridge subprocess
# =====================================================================================================

class Bridge:
    """`python -m bridge` (or, with script=True, `python bridge.py`) on a free port; launch() times process
    start to the first 200 on the health route, polling every 2 ms."""

    def __init__(self, arena_url: str, db: str, log_path: str, script: bool = False):
        self.arena_url, self.db, self.log_path = arena_url, db, log_path
        self.entry = [os.path.join(ROOT, "bridge.py")] if script else ["-m", "bridge"]
        self.process: subprocess.Popen | None = None
        self.port = 0

    def launch(self, timeout: float = 30.0) -> float:
        self.port = free_port()
        # The bench sends thousands of chats from one emulator account, far beyond the hourly budget the bridge
        # keeps for a real LM Arena account (BRIDGE_ACCOUNT_RPH): a budget it cannot reach, so that each chat
        # still pays for the budget's bookkeeping, as it does in a deployment.
        env = {**os.environ, "BRIDGE_SIDECAR": "off", "BRIDGE_LOG_LEVEL": "info", "BRIDGE_ANONYMOUS": "off",
               "BRIDGE_ACCOUNT_RPH": "100000000", "PYTHONPATH": ROOT}
        env.pop("ARENA_AUTH_TOKENS", None)
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *self.entry, "--host", HOST, "--port", str(self.port),
                 "--db", self.db, "--arena-url", self.arena_url], env=env, stdout=log, stderr=subprocess.STDOUT,
                cwd=os.path.dirname(self.db))
        request = f"GET /api/v1/health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError("bridge exited:\n" + read_text(self.log_path))
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    s.sendall(request)
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.002)
        self.stop()
        raise RuntimeError("bridge did not answer its health route")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "launch() first"
        return self.process.pid

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for_models(store: bridge.Store, timeout: float = 20.0) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        models = store.models()
        if models:
            return models
        time.sleep(0.02)
    raise RuntimeError("the bridge never discovered the models")


# =====================================================================================================
# A minimal HTTP/1.1 client on asyncio streams (the load generator: nearly no work per chunk)
# =====================================================================================================

class Reply(types.SimpleNamespace):
    status: int
    body: bytes
    started: float
    first: float        # when `marker` first appeared (time to first token), else nan
    ended: float


def dechunk(raw: bytes) -> bytes:
    out: list[bytes] = []
    i = 0
    while True:
        j = raw.index(b"\r\n", i)
        size = int(raw[i:j].split(b";")[0], 16)
        i = j + 2
        if size == 0:
            if raw[i:] != b"\r\n":
                raise ValueError("bytes after the last chunk")
            return b"".join(out)
        out.append(raw[i:i + size])
        i += size
        if raw[i:i + 2] != b"\r\n":
            raise ValueError("bad chunk framing")
        i += 2


async def http_post(port: int, path: str, body: bytes, headers: dict[str, str], marker: bytes | None = None,
                    timeout: float = 120.0) -> Reply:
    started = time.perf_counter()
    first = math.nan
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n{head}\r\n".encode() + body)
        deadline = started + timeout
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            data = await asyncio.wait_for(reader.read(65536), deadline - time.perf_counter())
            if not data:
                raise ConnectionError("closed before the headers")
            buf += data
        end = buf.index(b"\r\n\r\n")
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        raw = bytearray(buf[end + 4:])
        scanned = 0
        chunked = "chunked" in fields.get("transfer-encoding", "")
        length = int(fields["content-length"]) if "content-length" in fields else None
        while True:
            if marker is not None and math.isnan(first):  # not seen yet
                if raw.find(marker, max(0, scanned - len(marker))) >= 0:
                    first = time.perf_counter()
                scanned = len(raw)
            if chunked and (raw.endswith(b"\r\n0\r\n\r\n") or raw == b"0\r\n\r\n"):
                break
            if length is not None and len(raw) >= length:
                break
            data = await asyncio.wait_for(reader.read(65536), deadline - time.perf_counter())
            if not data:
                if chunked or length is not None:
                    raise ConnectionError("closed mid-body")
                break
            raw += data
        ended = time.perf_counter()
        return Reply(status=status, body=dechunk(bytes(raw)) if chunked else bytes(raw), started=started,
                     first=first, ended=ended)
    finally:
        writer.close()


# =====================================================================================================
# Requests and content checks
# =====================================================================================================

def expected_lines(n: int) -> str:
    return "".join(f"line {i}\n" for i in range(1, n + 1))


def sse_text(body: bytes, expect_finish: str = "stop") -> str:
    """The content of an OpenAI SSE stream; raises unless it ends with `expect_finish` and [DONE]."""
    parts, finish, done = [], None, False
    for event in body.decode("utf-8").split("\n\n"):
        if not event or event.startswith(":"):
            continue
        if event == "data: [DONE]":
            done = True
            continue
        obj = json.loads(event[len("data: "):])
        if "error" in obj:
            raise ValueError(f"error event: {obj['error']}")
        for choice in obj["choices"]:
            parts.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    if not done or finish != expect_finish:
        raise ValueError(f"stream ended without {expect_finish}/[DONE] (finish={finish}, done={done})")
    return "".join(parts)


def sse_calls(body: bytes) -> list[dict]:
    """The tool_calls deltas of an OpenAI SSE stream."""
    events = [json.loads(e[len("data: "):]) for e in body.decode("utf-8").split("\n\n")
              if e.startswith("data: {")]
    return [call for obj in events for choice in obj["choices"] for call in choice["delta"].get("tool_calls", [])]


def sse_data(body: bytes) -> list[dict]:
    """The `data:` payloads of an Anthropic or Responses stream (event lines, pings and comments skipped)."""
    return [json.loads(line[6:]) for line in body.decode("utf-8").split("\n") if line.startswith("data: ")]


def messages_sse_text(body: bytes) -> str:
    data = sse_data(body)
    if data[-1]["type"] != "message_stop":
        raise ValueError(f"stream ended with {data[-1]['type']}")
    return "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta"
                   and d["delta"]["type"] == "text_delta")


def responses_sse_text(body: bytes) -> str:
    data = sse_data(body)
    if data[-1]["type"] != "response.completed":
        raise ValueError(f"stream ended with {data[-1]['type']}")
    return "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")


# The bridge's three client APIs, each asked for the same one turn: (path, body for model and stream,
# what marks the first token of a stream, the text of a streamed reply, the text of a whole reply).
APIS: dict[str, tuple] = {
    "chat": ("/v1/chat/completions",
             lambda model, stream: {"model": model, "stream": stream,
                                    "messages": [{"role": "user", "content": PROMPT}]},
             b'{"content":"', sse_text, lambda body: json.loads(body)["choices"][0]["message"]["content"]),
    "messages": ("/v1/messages",
                 lambda model, stream: {"model": model, "max_tokens": 1024, "stream": stream,
                                        "messages": [{"role": "user", "content": PROMPT}]},
                 b'"text_delta"', messages_sse_text, lambda body: json.loads(body)["content"][0]["text"]),
    "responses": ("/v1/responses", lambda model, stream: {"model": model, "input": PROMPT, "stream": stream},
                  b'"response.output_text.delta"', responses_sse_text, lambda body: json.loads(body)["output_text"]),
}


def arena_text(body: bytes) -> str:
    events = bridge.parse_stream(body)
    if not any(e.kind == "finish" for e in events) or any(e.kind == "error" for e in events):
        raise ValueError("emulator stream without finish")
    return "".join(e.value for e in events if e.kind == "text")


class Target:
    """How to send one chat turn to the bridge (by one of its APIS) or straight to the emulator
    (create-evaluation with the body and headers the bridge itself would send)."""

    def __init__(self, bench: Bench, direct: bool, tools: bool = False, api: str = "chat", content: str = PROMPT):
        self.bench, self.direct, self.tools, self.content = bench, direct, tools, content
        self.path, self.body, self.first_token, self.stream_text, self.whole_text = APIS[api]

    def request(self, stream: bool) -> tuple[str, bytes, dict[str, str]]:
        b = self.bench
        if self.direct:
            body = bridge.chat_body(evaluation_id=bridge.uuid7(), model_id=b.model["id"], content=self.content,
                                    modality="chat", attachments=[], token=None,
                                    mode=b.settings.arena_mode or bridge.DEFAULT_ARENA_MODE)
            return ("/nextjs-api/stream/create-evaluation", json.dumps(body, ensure_ascii=False).encode(),
                    b.direct_headers)
        body = self.body(b.model["publicName"], stream) | ({"tools": TOOLS} if self.tools else {})
        return self.path, json.dumps(body).encode(), b.bridge_headers


    @property
    def port(self) -> int:
        return self.bench.emulator.port if self.direct else self.bench.bridge.port

    @property
    def base(self) -> str:
        return self.bench.emulator.url if self.direct else self.bench.bridge.url

    @property
    def marker(self) -> bytes:
        return b"a0:" if self.direct else self.first_token

    def text(self, body: bytes, stream: bool) -> str:
        if self.direct:
            return arena_text(body)
        return self.stream_text(body) if stream else self.whole_text(body)


# =====================================================================================================
# The benchmark
# =====================================================================================================

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.quick = args, args.quick
        self.rows: list[tuple] = []
        self.notes: list[str] = []
        self.folder = tempfile.mkdtemp(prefix="bridge-bench-")
        self.emulator = Emulator(args.emulator)
        self.emulator.configure()
        self.settings = bridge.Settings.load(env={})
        # One arena account and one API key, stored before the bridge starts.
        self.db = os.path.join(self.folder, "bridge.db")
        self.store = bridge.Store(self.db)
        self.session = self.emulator.new_session()
        bridge.add_account(self.store, bridge.parse_account_input(self.session), label="bench")
        # rpm high enough never to trigger, but not 0, so that the limiter stays on the measured path
        self.key = self.store.create_key("bench", 100_000_000)[1]
        self.bridge = Bridge(self.emulator.url, self.db, os.path.join(self.folder, "bridge.log"))
        self.profiler: subprocess.Popen | None = None
        self.rss_trail: list[str] = []

    def trail(self, label: str) -> None:
        held = close_wait(self.bridge.port)
        self.rss_trail.append(f"{label} {proc_status(self.bridge.pid, 'VmRSS'):.0f}"
                              + (f" ({held} client-closed sockets still held)" if held else ""))

    # --- output -------------------------------------------------------------------------------------
    def row(self, name: str, values: list[float], unit: str, target: str = "", met: bool | None = None,
            fmt: str = "{:.2f}", n: int | None = None) -> None:
        med, p99 = median(values), percentile(values, 99)
        verdict = "" if met is None else ("met" if met else "MISSED")
        self.rows.append((name, fmt.format(med), fmt.format(p99), unit, target, verdict,
                          str(n if n is not None else len(values))))
        print(f"  {name}: median {fmt.format(med)} {unit}, p99 {fmt.format(p99)} {unit}"
              + (f"  [{target}: {verdict}]" if target else ""), flush=True)

    def table(self) -> str:
        head = ("figure", "median", "p99", "unit", "target", "", "n")
        rows = [head, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        rule = "  ".join("-" * w for w in widths)
        lines = [rule]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j in (0, 3, 4, 5) else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(r, widths))).rstrip())
            if i == 0:
                lines.append(rule)
        lines.append(rule)
        return "\n".join(lines)

    # --- setup --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.bridge.launch()
        models = wait_for_models(self.store)
        self.model = next(m for m in bridge.usable_models(models) if bridge.choose_modality(m) == "chat")
        self.model = bridge.resolve_model(models, self.model["publicName"])
        account = self.store.accounts()[0]
        # The bridge's own headers for the direct runs, from a stand-in with the fields and the method they
        # read (a whole ArenaSite would open an HTTP session and a sidecar client just for this).
        site = types.SimpleNamespace(params={}, origin=self.emulator.url, settings=self.settings)
        site.identity = functools.partial(bridge.ArenaSite.identity, site)  # type: ignore[arg-type]
        self.direct_headers = bridge.ArenaSite.request_headers(site, account)  # type: ignore[arg-type]
        self.bridge_headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        time.sleep(0.3)   # let the discovery burst settle before measuring idle memory
        self.idle_rss = proc_status(self.bridge.pid, "VmRSS")
        print(f"load average {read_text('/proc/loadavg').split()[0]} on {os.cpu_count()} CPUs; "
              f"emulator: {self.emulator.url} ({'own subprocess' if self.emulator.mode == 'subprocess' else 'in this process'}); "
              f"bridge: {self.bridge.url} pid {self.bridge.pid}; model {self.model['publicName']}; "
              f"folder {self.folder}", flush=True)

    def stop(self) -> None:
        self.stop_profile()
        self.bridge.stop()
        self.store.close()
        self.emulator.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- profiling ----------------------------------------------------------------------------------
    def start_profile(self) -> None:
        if not self.args.profile or self.profiler is not None:
            return
        exe = shutil.which("py-spy")
        if exe is None:
            self.notes.append("--profile: py-spy is not installed (pip install py-spy)")
            return
        self.profiler = subprocess.Popen([exe, "record", "-p", str(self.bridge.pid), "-r", "200", "--format",
                                          "raw", "-o", self.args.profile + ".raw"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop_profile(self) -> None:
        if self.profiler is None:
            return
        self.profiler.send_signal(signal.SIGINT)
        self.profiler.wait(30)
        self.profiler = None
        summarise_profile(self.args.profile + ".raw", self.args.profile)
        self.notes.append(f"profile: {self.args.profile} (raw stacks in {self.args.profile}.raw)")

    # --- 1 and 2: sequential latency --------------------------------------------------------------
    def sequential(self, runs: int, stream: bool, api: str = "chat") -> tuple[list[float], list[float], list[float]]:
        """Alternate bridge and direct requests (so drift hits both alike); returns per-pair (bridge,
        direct, difference) in ms. Streaming: time to the first content token; else the whole reply."""
        self.emulator.configure()
        warmup = max(20, runs // 10)
        targets = (Target(self, True), Target(self, False, api=api))
        sessions: dict[bool, curl.Session] = {t.direct: curl.Session(impersonate=self.settings.impersonate)
                                              for t in targets}
        out: dict[bool, list[float]] = {True: [], False: []}
        before, t_start = self.cpu_snapshot(), time.perf_counter()
        for i in range(warmup + runs):
            order = targets if i % 2 else targets[::-1]
            for target in order:
                path, body, headers = target.request(stream)
                session = sessions[target.direct]
                t0 = time.perf_counter()
                if stream:
                    response = session.post(target.base + path, data=body, headers=headers, stream=True,
                                            timeout=30, discard_cookies=True)
                    buf, first = b"", math.nan
                    for chunk in response.iter_content():
                        buf += chunk
                        if math.isnan(first) and target.marker in buf:
                            first = time.perf_counter()
                    response.close()
                    elapsed = first - t0
                else:
                    response = session.post(target.base + path, data=body, headers=headers, timeout=30,
                                            discard_cookies=True)
                    buf = response.content
                    elapsed = time.perf_counter() - t0
                if response.status_code != 200 or not target.text(buf, stream).startswith("turn 1: " + PROMPT):
                    raise RuntimeError(f"bad reply ({'direct' if target.direct else 'bridge'}): "
                                       f"{response.status_code} {buf[:300]!r}")
                if i >= warmup:
                    out[target.direct].append(elapsed * 1000)
        for s in sessions.values():
            s.close()
        used = self.cpu_delta(before)
        self.notes.append(f"{'streaming' if stream else 'non-streaming'} sequential phase: CPU "
                          f"{cpu_shares(used, time.perf_counter() - t_start)}")
        self.bridge_cpu_per_request = used["bridge"] / (warmup + runs) * 1000
        bridge_ms, direct_ms = out[False], out[True]
        return bridge_ms, direct_ms, [b - d for b, d in zip(bridge_ms, direct_ms)]

    # --- 3: concurrent streams ----------------------------------------------------------------------
    async def burst(self, target: Target, n: int, lines: int, cpu: dict | None = None) -> dict:
        """n streams at once; CPU use is added to `cpu` for the streaming only (not the checks after)."""
        expected = expected_lines(lines)

        async def one() -> Reply:
            path, body, headers = target.request(True)
            return await http_post(target.port, path, body, headers)

        before = self.cpu_snapshot()
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        t1 = time.perf_counter()
        after = self.cpu_snapshot()
        if cpu is not None:
            for k in cpu:
                cpu[k] += after[k] - before[k]
        errors: list[str] = []
        durations = []
        for reply in replies:
            if isinstance(reply, BaseException):
                errors.append(type(reply).__name__ + ": " + str(reply))
                continue
            try:
                if reply.status != 200:
                    raise ValueError(f"HTTP {reply.status}: {reply.body[:200]!r}")
                if target.text(reply.body, True) != expected:
                    raise ValueError("content differs from the emulator's reply")
            except Exception as exc:  # noqa: BLE001 - every failure is counted as an error
                errors.append(str(exc))
                continue
            durations.append((reply.ended - reply.started) * 1000)
        return {"rate": (n - len(errors)) / (t1 - t0), "errors": errors, "durations": durations, "wall": t1 - t0}

    def concurrency(self, n: int, rounds: int, direct_too: bool) -> None:
        lines = 200
        self.emulator.configure(lines=lines)
        target = Target(self, False)
        asyncio.run(self.burst(target, min(n, 20), lines))     # warm connections and code paths
        rates, errors, durations = [], [], []
        cpu = {"bridge": 0.0, "emulator": 0.0, "client": 0.0, "other processes": 0.0}
        overflows = listen_overflows()
        sampler = RssSampler(self.bridge.pid) if n == max(self.args.n) else None
        if sampler:
            sampler.__enter__()
        wall = 0.0
        for i in range(rounds):
            result = asyncio.run(self.burst(target, n, lines, cpu))
            if sampler and i == 0:
                self.first_round_peak = sampler.peak
            wall += result["wall"]
            rates.append(result["rate"])
            errors += result["errors"]
            durations += result["durations"]
            self.emulator.configure(lines=lines)                # clears the emulator's request log
        if sampler:
            sampler.__exit__()
            self.peak_rss = max(sampler.peak, proc_status(self.bridge.pid, "VmRSS"))
            self.peak_hwm = proc_status(self.bridge.pid, "VmHWM")
        overflows = listen_overflows() - overflows
        ok = not errors
        self.row(f"3 throughput N={n} (200-line streams)", rates, "streams/s",
                 "0 errors" if n == 500 else "", ok if n == 500 else None, fmt="{:.0f}", n=rounds)
        self.row(f"    N={n}: errors / content mismatches", [float(len(errors))], "", "must be 0", ok, fmt="{:.0f}",
                 n=rounds * n)
        self.row(f"    N={n}: per-stream duration", durations, "ms", fmt="{:.0f}")
        self.row(f"    N={n}: bridge CPU per stream", [cpu["bridge"] / (rounds * n) * 1000], "ms", fmt="{:.2f}",
                 n=rounds * n)
        self.notes.append(f"N={n}: CPU while streaming {cpu_shares(cpu, wall)}; listen-queue overflows "
                          f"{overflows} (machine-wide)")
        for e in sorted(set(errors))[:5]:
            self.notes.append(f"N={n} error: {e}")
        if direct_too:
            self.emulator.configure(lines=lines)
            direct = asyncio.run(self.burst(Target(self, True), n, lines))
            self.row(f"    N={n}: emulator alone (direct)", [direct["rate"]], "streams/s", fmt="{:.0f}", n=1)
            if direct["errors"]:
                self.notes.append(f"direct N={n}: {len(direct['errors'])} errors, e.g. {direct['errors'][0]}")

    def cpu_delta(self, before: dict) -> dict:
        after = self.cpu_snapshot()
        return {k: after[k] - before[k] for k in after}

    def cpu_snapshot(self) -> dict:
        """CPU seconds so far; with the emulator in this process, "client" includes its threads."""
        client = cpu_seconds(os.getpid())
        emulator = cpu_seconds(self.emulator.pid) if self.emulator.mode == "subprocess" else 0.0
        bridge_cpu = cpu_seconds(self.bridge.pid)
        return {"bridge": bridge_cpu, "emulator": emulator, "client": client,
                "other processes": busy_seconds() - bridge_cpu - emulator - client}

    # --- 6: relay rate ------------------------------------------------------------------------------
    def relay(self, runs: int, lines: int = 10_000) -> None:
        self.emulator.configure(lines=lines)
        expected = expected_lines(lines)
        rates: dict[bool, list[float]] = {True: [], False: []}
        before, t_start = self.cpu_snapshot(), time.perf_counter()
        for i in range(runs + 1):
            for target in (Target(self, False), Target(self, True)):
                path, body, headers = target.request(True)
                reply = asyncio.run(http_post(target.port, path, body, headers))
                if reply.status != 200 or target.text(reply.body, True) != expected:
                    raise RuntimeError(f"relay: bad reply {reply.status} {reply.body[:200]!r}")
                if i:
                    rates[target.direct].append(lines / (reply.ended - reply.started))
            self.emulator.configure(lines=lines)
        used = self.cpu_delta(before)
        self.notes.append(f"relay phase (bridge and direct alternating): CPU "
                          f"{cpu_shares(used, time.perf_counter() - t_start)}")
        self.row("6 relay rate, one 10,000-line stream", rates[False], "lines/s", ">= 20,000 lines/s",
                 median(rates[False]) >= 20_000, fmt="{:,.0f}")
        self.plain_rate = median(rates[False])
        per_line = used["bridge"] / ((runs + 1) * lines) * 1e6
        self.row("    bridge CPU per relayed line", [per_line], "us", fmt="{:.1f}", n=runs + 1)
        self.row("    emulator alone (direct)", rates[True], "lines/s", fmt="{:,.0f}")
        self.plain_cpu_per_line = per_line

    # --- 7: tools ------------------------------------------------------------------------------------
    def tool_latency(self, runs: int) -> tuple[list[float], list[float]]:
        """The added latency (ms) of a one-line reply, without and with TOOLS in the request, each against a
        direct request carrying the turn the bridge sends for it (with tools, their rendered instructions:
        what LM Arena takes longer to read is not the bridge's), alternating so that drift hits all alike."""
        self.emulator.configure(lines=1)
        session: curl.Session[curl.Response] = curl.Session(impersonate=self.settings.impersonate)
        path, body, headers = Target(self, False, tools=True).request(False)
        session.post(self.bridge.url + path, data=body, headers=headers, timeout=30).raise_for_status()
        targets = (Target(self, True), Target(self, False), Target(self, False, tools=True),
                   Target(self, True, tools=True, content=self.emulator.last_turn()))
        times: dict[tuple[bool, bool], list[float]] = {(t.direct, t.tools): [] for t in targets}
        warmup = max(20, runs // 10)
        for i in range(warmup + runs):
            for target in targets[i % 4:] + targets[:i % 4]:
                path, body, headers = target.request(False)
                t0 = time.perf_counter()
                response = session.post(target.base + path, data=body, headers=headers, timeout=30,
                                        discard_cookies=True)
                elapsed = (time.perf_counter() - t0) * 1000
                if response.status_code != 200 or target.text(response.content, False) != "line 1\n":
                    raise RuntimeError(f"tool latency: bad reply {response.status_code} {response.content[:300]!r}")
                if i >= warmup:
                    times[(target.direct, target.tools)].append(elapsed)
        session.close()
        return ([b - d for b, d in zip(times[(False, False)], times[(True, False)])],
                [b - d for b, d in zip(times[(False, True)], times[(True, True)])])

    def tool_relay(self, runs: int, lines: int = 10_000) -> None:
        """One long stream with 20 tool definitions that ends in a call: every line passes the tool-call
        parser, and the call goes out as tool_calls."""
        script = [[f"a0:{json.dumps(f'line {i}{chr(10)}')}" for i in range(1, lines + 1)]
                  + [f"a0:{json.dumps(CALL[i:i + 16])}" for i in range(0, len(CALL), 16)]
                  + ['ad:{"finishReason":"stop"}']]
        expected, target, rates = expected_lines(lines), Target(self, False, tools=True), []
        before, t_start = self.cpu_snapshot(), time.perf_counter()
        for i in range(runs + 1):
            self.emulator.configure(script=script)
            path, body, headers = target.request(True)
            reply = asyncio.run(http_post(target.port, path, body, headers))
            if (reply.status != 200 or sse_text(reply.body, "tool_calls") != expected.rstrip("\n")
                    or [c["function"]["name"] for c in sse_calls(reply.body)] != ["tool_7"]):
                raise RuntimeError(f"tool relay: bad reply {reply.status} {reply.body[-300:]!r}")
            if i:
                rates.append(lines / (reply.ended - reply.started))
        used = self.cpu_delta(before)
        self.notes.append(f"tool relay phase: CPU {cpu_shares(used, time.perf_counter() - t_start)}")
        self.row("7 relay rate with 20 tools, ending in a call", rates, "lines/s", ">= 90% of phase 6",
                 median(rates) >= 0.9 * self.plain_rate, fmt="{:,.0f}")
        per_line = used["bridge"] / ((runs + 1) * lines) * 1e6
        self.row("    bridge CPU per relayed line", [per_line], "us", "<= 110% of phase 6",
                 per_line <= 1.1 * self.plain_cpu_per_line, fmt="{:.1f}", n=runs + 1)

    # --- 5: cold start ------------------------------------------------------------------------------
    def cold_start(self, runs: int) -> None:
        """A new bridge process on the populated database (a restart), on an empty one (first run: the first
        chat also waits for model discovery), and a restart as `python bridge.py`, the script form. RSS is
        read 0.3 s after each restart's first chat."""
        self.emulator.configure()
        kinds = ("restart", "first run", "script restart")
        results: dict[str, tuple[list[float], list[float], list[float]]] = {kind: ([], [], []) for kind in kinds}
        for i in range(runs):
            for kind in kinds:
                folder = tempfile.mkdtemp(dir=self.folder)
                db = os.path.join(folder, "bridge.db")
                headers = dict(self.bridge_headers)
                if kind == "first run":
                    store = bridge.Store(db)
                    bridge.add_account(store, bridge.parse_account_input(self.session))
                    headers["Authorization"] = f"Bearer {store.create_key('bench', 100_000_000)[1]}"
                    store.close()
                else:
                    shutil.copy(self.db, db)
                proc = Bridge(self.emulator.url, db, os.path.join(folder, "bridge.log"), script=(kind == "script restart"))
                body = json.dumps({"model": self.model["publicName"], "messages": [{"role": "user",
                                                                                     "content": PROMPT}]})
                try:
                    t0 = time.perf_counter()
                    health = proc.launch()
                    response = httpx.post(proc.url + "/v1/chat/completions", content=body, headers=headers,
                                          timeout=30)
                    chat = time.perf_counter() - t0
                    time.sleep(0.3)
                    results[kind][2].append(proc_status(proc.pid, "VmRSS"))
                finally:
                    proc.stop()
                if response.status_code != 200:
                    raise RuntimeError(f"cold start chat: {response.status_code} {response.text[:300]}")
                results[kind][0].append(health)
                results[kind][1].append(chat)
        healths, chats, rss = results["restart"]
        self.row("5 cold start: process start -> health 200", [h * 1000 for h in healths], "ms", "<= 500 ms",
                 median(healths) <= 0.5, fmt="{:.0f}")
        self.row("5 cold start: process start -> first chat", [c * 1000 for c in chats], "ms", fmt="{:.0f}")
        self.row("    RSS after the first chat", rss, "MB", fmt="{:.1f}")
        healths, chats, _ = results["first run"]
        self.row("    first run, empty DB -> health 200", [h * 1000 for h in healths], "ms", fmt="{:.0f}")
        self.row("    first run, empty DB -> first chat", [c * 1000 for c in chats], "ms", fmt="{:.0f}")
        healths, chats, rss = results["script restart"]
        self.row("    as `python bridge.py` -> health 200", [h * 1000 for h in healths], "ms", fmt="{:.0f}")
        self.row("    as `python bridge.py`: RSS after the first chat", rss, "MB", fmt="{:.1f}")

    # --- 8: metrics -------------------------------------------------------------------------------
    def metrics(self, runs: int) -> None:
        """Phase 1 again while /metrics is scraped ten times a second (a scraper far busier than any
        Prometheus), the scrape's own time, and what counting one request costs (this process, on a
        Metrics like the bridge's)."""
        stop, scrapes = threading.Event(), []

        def scraper() -> None:
            with httpx.Client(base_url=self.bridge.url, headers=self.bridge_headers, timeout=10) as client:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    if client.get("/metrics").status_code != 200:
                        raise RuntimeError("/metrics did not answer 200")
                    scrapes.append((time.perf_counter() - t0) * 1000)
                    stop.wait(0.1)

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        try:
            b, _, diff = self.sequential(runs, stream=False)
        finally:
            stop.set()
            thread.join()
        self.row("8 added latency, /metrics scraped at 10 Hz", diff, "ms", "<= 1 ms median", median(diff) <= 1.0)
        self.row("    through the bridge", b, "ms")
        self.row("    one /metrics scrape", scrapes, "ms")
        counted = bridge.Metrics(lambda: bridge.Snapshot([], "off", {}, 0), lambda: [self.model["publicName"]])
        rounds, n = [], 5_000
        for _ in range(9):   # rounds, so that one preempted round on a busy machine does not set the figure
            t0 = time.perf_counter()
            for _ in range(n):
                counted.request("/v1/chat/completions", self.model["publicName"], 200, 0.1, None)
            rounds.append((time.perf_counter() - t0) / n * 1e6)
        self.row("    counting one request (in-process)", rounds, "us")

    # --- all ----------------------------------------------------------------------------------------
    def run(self) -> None:
        q = self.quick
        started = time.perf_counter()
        # The bytecode `python -m bridge` starts from, as the image's build writes it (with
        # PYTHONDONTWRITEBYTECODE set nothing else would, and every start would compile the file again).
        py_compile.compile(os.path.join(ROOT, "bridge.py"), doraise=True)
        self.start()
        print("1. added latency (non-streaming, sequential)", flush=True)
        b, d, diff = self.sequential(200 if q else 2000, stream=False)
        self.row("1 added latency, non-streaming", diff, "ms", "<= 1 ms median", median(diff) <= 1.0)
        self.row("    through the bridge", b, "ms")
        self.row("    straight to the emulator", d, "ms")
        self.row("    bridge CPU per request", [self.bridge_cpu_per_request], "ms", n=len(b))
        chat = median(diff)
        for api in ("messages", "responses"):
            b, d, diff = self.sequential(200 if q else 1000, stream=False, api=api)
            self.row(f"1 added latency, {APIS[api][0]}", diff, "ms", "<= chat + 0.3 ms median",
                     median(diff) <= chat + 0.3)
            self.row("    bridge CPU per request", [self.bridge_cpu_per_request], "ms", n=len(b))
        self.trail("after phase 1")
        print("2. time to first token (streaming, sequential)", flush=True)
        b, d, diff = self.sequential(200 if q else 1000, stream=True)
        self.row("2 time to first token, bridge", b, "ms")
        self.row("    straight to the emulator", d, "ms")
        self.row("    difference", diff, "ms")
        self.trail("after phase 2")
        print("3. throughput (concurrent streams)", flush=True)
        self.start_profile()
        for n in self.args.n:
            self.concurrency(n, 1 if q else {50: 10, 200: 5}.get(n, 4), direct_too=(n == max(self.args.n)))
            self.trail(f"after N={n}")
        print("4. memory", flush=True)
        self.row("4 memory: RSS idle (after start)", [self.idle_rss], "MB", "<= 60 MB", self.idle_rss <= 60,
                 fmt="{:.1f}")
        top = max(self.args.n)
        self.row(f"4 memory: peak RSS at N={top}", [self.peak_rss], "MB", "<= 150 MB", self.peak_rss <= 150,
                 fmt="{:.1f}")
        self.notes.append(f"memory: VmHWM {self.peak_hwm:.1f} MB; bridge RSS (MB): idle {self.idle_rss:.0f}, "
                          + ", ".join(self.rss_trail) + f"; peak of the first N={top} round "
                          f"{self.first_round_peak:.0f}")
        print("6. relay rate (one long stream)", flush=True)
        self.relay(2 if q else 8)
        print("7. tools (20 definitions; a streamed call)", flush=True)
        plain, tools = self.tool_latency(200 if q else 1000)
        self.row("7 added latency with 20 tools, non-streaming", tools, "ms", "<= 110% without",
                 median(tools) <= 1.1 * median(plain))
        self.row("    the same requests without tools", plain, "ms")
        self.tool_relay(2 if q else 8)
        print("8. metrics (phase 1 while /metrics is scraped)", flush=True)
        self.metrics(200 if q else 1000)
        self.stop_profile()
        self.bridge.stop()
        print("5. cold start", flush=True)
        self.cold_start(2 if q else 8)
        self.notes.append(f"bench took {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs; load average "
                          f"at the end {read_text('/proc/loadavg').split()[0]} (other work on the machine skews "
                          f"every figure: see 'other processes' above)")


def cpu_shares(cpu: dict, wall: float) -> str:
    return "(100% = one core): " + ", ".join(f"{k} {v / wall * 100:.0f}%" for k, v in cpu.items())


def summarise_profile(raw_path: str, out_path: str, top: int = 40) -> None:
    """Self and total sample counts per function from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            samples += n
            frames = stack.split(";")
            for frame in set(frames):
                total[frame] = total.get(frame, 0) + n
            own[frames[-1]] = own.get(frames[-1], 0) + n
    with open(out_path, "w") as f:
        f.write(f"{samples} samples\n\nself time\n")
        for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
            f.write(f"{n / samples * 100:6.1f}%  {frame}\n")
        f.write("\ntotal time (including callees)\n")
        for frame, n in sorted(total.items(), key=lambda kv: -kv[1])[:top * 2]:
            f.write(f"{n / samples * 100:6.1f}%  {frame}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs (about 30 s); figures are noisier")
    parser.add_argument("--emulator", choices=("subprocess", "inproc"), default="subprocess",
                        help="run the emulator in its own process (default) or as a thread of this one")
    parser.add_argument("-n", type=int, nargs="+", default=[50, 200, 500], help="concurrency levels")
    parser.add_argument("--profile", metavar="FILE", help="sample the bridge with py-spy during phases 3 and 6")
    args = parser.parse_args()
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.stop()
    print()
    print(bench.table())
    for note in bench.notes:
        print("  " + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
