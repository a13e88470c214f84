"""Start the real bridge (Hypercorn, as `python bridge.py` does) against the emulator, for end-to-end tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import jsonschema

import bridge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "tests", "fixtures", "openai-schemas.json"), encoding="utf-8") as _schemas:
    SCHEMAS = json.load(_schemas)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream_aborted(arena, timeout: float) -> bool:
    """Whether the emulator saw a chat stream's client (the bridge, or its browser page) hang up."""
    deadline = time.time() + timeout
    while time.time() < deadline and not any(r.get("aborted") for r in arena.chat_requests()):
        time.sleep(0.1)
    return any(r.get("aborted") for r in arena.chat_requests())


def validate(name: str, instance: dict) -> None:
    """Check a body against OpenAI's own schema (extensions such as reasoning_content are allowed)."""
    jsonschema.Draft202012Validator({"$defs": SCHEMAS["$defs"], "$ref": f"#/$defs/{name}"}).validate(instance)


class BridgeProcess:
    def __init__(self, arena_url: str, folder: str, env: dict | None = None, args: tuple = (),
                 sidecar: str = "off", new_session: bool = False):
        self.port = free_port()
        self.folder = folder
        self.db = os.path.join(folder, "bridge.db")
        self.log_path = os.path.join(folder, "bridge.log")
        # The emulator's accounts send far more chats than LM Arena's accounts tolerate (BRIDGE_ACCOUNT_RPH's
        # default): the suite lifts that budget here, and the pacing tests set their own.
        self.env = {**os.environ, "BRIDGE_LOG_LEVEL": "debug", "BRIDGE_SIDECAR": sidecar, "BRIDGE_ACCOUNT_RPH": "0",
                    **(env or {})}
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), "--db", self.db,
                     "--arena-url", arena_url, *args]
        self.process: subprocess.Popen | None = None
        self.new_session = new_session  # a process group of its own, as a shell runs it: Ctrl-C can be sent to it
        self.url = f"http://127.0.0.1:{self.port}"
        self._store: bridge.Store | None = None
        self._health_key: str | None = None

    def start(self, timeout: float = 20.0) -> BridgeProcess:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "bridge.py"), *self.args],
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                            start_new_session=self.new_session)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("bridge exited:\n" + self.log())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("bridge did not start:\n" + self.log())

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._store is not None:
            self._store.close()
            self._store = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    @property
    def store(self) -> bridge.Store:
        if self._store is None:
            self._store = bridge.Store(self.db)
        return self._store

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def create_key(self, rpm: int = 10_000, name: str = "test") -> str:
        return self.store.create_key(name, rpm)[1]

    def health(self) -> dict:
        """The health route's answer with its details (each account, the sidecar), which need a key."""
        if self._health_key is None:
            self._health_key = self.create_key(name="health")
        return httpx.get(self.url + "/health", headers={"Authorization": f"Bearer {self._health_key}"},
                         timeout=10).json()

    def set_accounts(self, *values: str) -> list[int]:
        """Replace all arena accounts with these (any input form)."""
        for account in self.store.accounts():
            self.store.remove_account(account["id"])
        return [bridge.add_account(self.store, bridge.parse_account_input(v))[0] for v in values]

    def abandon_stream(self, key: str, body: dict, after: str) -> None:
        """Stream a chat and hang up as soon as a line containing `after` arrives, as a client that goes away."""
        with httpx.stream("POST", self.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            for line in response.iter_lines():
                if after in line:
                    return

    def hang_up(self, key: str, path: str, body: dict, after: float) -> tuple[bytes, float]:
        """POST from a raw socket and close it `after` seconds later, as a client that goes away whatever it
        got: the bytes that had arrived by then, and when it closed."""
        data = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            time.sleep(after)
            s.setblocking(False)
            try:
                received = s.recv(65536)
            except BlockingIOError:
                received = b""
        return received, time.time()

    def wait_for_models(self, timeout: float = 15.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.store.models():
                return
            time.sleep(0.05)
        raise RuntimeError("bridge never discovered the models:\n" + self.log())
