#!/usr/bin/env python3
"""Probe for clients that hang up early (issue 19, defect 2). Not part of the test run.

    python tests/hangup_probe.py              # 500 hang-ups of each kind
    python tests/hangup_probe.py -n 100       # fewer

The bridge (`python bridge.py`, as tests/harness.py starts it) runs against the emulator in this process,
with 50 accounts so that the requests reach LM Arena at once instead of queueing for an account. The
emulator holds every chat answer back (`first_byte_delay`) and watches its connections, so a request the
bridge leaves is seen leaving. Each kind sends its requests 50 at a time from raw sockets and hangs up:

  stream-early     a streamed chat, hung up 0.3 s in: before any byte (the keep-alive ping comes at 5 s)
  stream-pinged    a streamed chat with pings every 0.1 s, hung up 0.5 s in: after the headers, while the
                   bridge still waits for LM Arena's answer
  complete         a chat completion (not streamed), hung up 0.5 s in

After each kind and a few seconds for the clean-up, it prints the asyncio tasks alive in the bridge and
its upstream transfers (both from /metrics), the connections the emulator still has open, the bridge's
TCP connections to the emulator, the usage rows recorded, and the task warnings in the bridge's log.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx
from fake_arena import FakeArena
from harness import BridgeProcess

MODEL = "gemini-3-pro"
WARNINGS = re.compile(r"Task was destroyed but it is pending|exception was never retrieved")


def connections_to(port: int) -> int:
    """TCP connections of this machine to `port` that are not closed yet (ESTABLISHED or CLOSE_WAIT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                count += fields[3] in ("01", "08") and int(fields[2].rsplit(":", 1)[1], 16) == port
    return count


def gauge(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


async def hang_up(port: int, key: str, body: dict, after: float) -> None:
    """POST a chat from a raw socket, then close the socket after `after` seconds (whatever arrived)."""
    data = json.dumps(body).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    await asyncio.sleep(after)
    writer.close()
    await writer.wait_closed()


async def hang_ups(port: int, key: str, body: dict, after: float, n: int, at_once: int = 50) -> None:
    for start in range(0, n, at_once):
        await asyncio.gather(*(hang_up(port, key, body, after) for _ in range(min(at_once, n - start))))


class Probe:
    def __init__(self, folder: str, n: int):
        self.n, self.folder = n, folder
        self.arena = FakeArena().start()
        self.arena.configure(recaptcha="off", first_byte_delay=600, ratelimit_limit=10**9)

    def bridge(self, kind: str, ping: float) -> BridgeProcess:
        proc = BridgeProcess(self.arena.url, os.path.join(self.folder, kind), args=("--ping-interval", str(ping)))
        os.makedirs(proc.folder)
        proc.start()
        proc.wait_for_models()
        proc.set_accounts(*(self.arena.new_session() for _ in range(50)))
        return proc

    def figures(self, proc: BridgeProcess, key: str) -> dict:
        metrics = httpx.get(proc.url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
        return {"tasks": gauge(metrics, "bridge_asyncio_tasks"), "transfers": gauge(metrics, "bridge_upstream_transfers"),
                "emulator_open": self.arena.open_connections, "bridge_to_emulator": connections_to(self.arena.port)}

    def run(self, kind: str, stream: bool, ping: float, after: float, settle: float = 10.0) -> None:
        proc = self.bridge(kind, ping)
        try:
            key = proc.create_key()
            before = self.figures(proc, key)
            self.arena.clear_log()
            started = time.time()
            body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hang up"}]}
            asyncio.run(hang_ups(proc.port, key, body, after, self.n))
            sent = time.time() - started
            time.sleep(settle)
            after_figures = self.figures(proc, key)
            chats = self.arena.chat_requests()
            aborted = [r for r in chats if r.get("aborted")]
            statuses = proc.store.rows("SELECT status, error, COUNT(*) AS n FROM usage GROUP BY status, error")
        finally:
            proc.stop()
        warnings = len(WARNINGS.findall(proc.log()))
        print(f"{kind}: {self.n} hang-ups in {sent:.1f} s, then {settle:.0f} s to settle", flush=True)
        print(f"  asyncio tasks in the bridge: {before['tasks']:.0f} before, {after_figures['tasks']:.0f} after")
        print(f"  upstream transfers in the bridge: {before['transfers']:.0f} before, "
              f"{after_figures['transfers']:.0f} after")
        print(f"  connections open at the emulator: {before['emulator_open']} before, "
              f"{after_figures['emulator_open']} after; the bridge's TCP connections to it: "
              f"{before['bridge_to_emulator']} before, {after_figures['bridge_to_emulator']} after")
        print(f"  chat requests upstream: {len(chats)}, seen hung up by the bridge: {len(aborted)}")
        rows = ", ".join(f"{r['status']} {r['error'] or ''} x{r['n']}" for r in statuses) or "none"
        print(f"  usage rows: {rows}")
        print(f"  task warnings in the bridge's log: {warnings}", flush=True)

    def stop(self) -> None:
        self.arena.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=500, help="hang-ups of each kind (default 500)")
    args = parser.parse_args()
    probe = Probe(tempfile.mkdtemp(prefix="hangup-probe-"), args.n)
    try:
        probe.run("stream-early", stream=True, ping=5.0, after=0.3)
        probe.run("stream-pinged", stream=True, ping=0.1, after=0.5)
        probe.run("complete", stream=False, ping=5.0, after=0.5)
    finally:
        probe.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
