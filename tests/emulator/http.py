"""HTTP plumbing: a threading server, a handler that only does I/O, the parsed request, plain responses and the
stream writer (framing, write splits, delays, heartbeats, deliberate disconnects)."""

from __future__ import annotations

import itertools
import json
import random
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .common import compact, parse_cookie_header

HEARTBEAT_LINE = 'a2:[{"type":"heartbeat"}]'


class Server(ThreadingHTTPServer):
    """Threading server sized for hundreds of concurrent streams."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections = 0          # client connections not yet closed (tests count leaks with it)
        self.count_lock = threading.Lock()

    def count_connection(self, delta: int) -> None:
        with self.count_lock:
            self.open_connections += delta

    def handle_error(self, request: Any, client_address: Any) -> None:  # resets are normal in fault tests
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class Abort(Exception):
    """Raised to stop handling a request after the connection was deliberately cut."""


class App(Protocol):
    def dispatch(self, h: Handler) -> None: ...


class Handler(BaseHTTPRequestHandler):
    """Per-connection handler; all logic lives in the emulator, this class only does I/O."""
    protocol_version = "HTTP/1.1"
    server_version = "cloudflare"
    sys_version = ""
    app: App  # set on a subclass per emulator instance
    log_entry: dict | None = None
    headers_sent = False

    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.count_connection(1)
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.count_connection(-1)

    def client_gone(self) -> bool:
        """Whether the client closed its side: readable with nothing to read (its request was read whole,
        so anything readable is its end or a reset)."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def version_string(self) -> str:
        return "cloudflare"

    def send_response(self, code: int, message: str | None = None) -> None:
        if self.log_entry is not None:
            self.log_entry["status"] = code
        super().send_response(code, message)

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _read_chunked(self) -> bytes:
        data = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return data
            data += self.rfile.read(size)
            self.rfile.readline()

    def _any(self) -> None:
        self.log_entry, self.headers_sent = None, False
        try:
            self.app.dispatch(self)
        except (Abort, BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug in the emulator: answer 500 and show the traceback
            traceback.print_exc()
            self.close_connection = True
            if not self.headers_sent:
                try:
                    send(self, 500, {"error": "emulator bug: " + traceback.format_exc(limit=1)})
                except OSError:
                    pass

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_HEAD = _any


class Request:
    """Parsed request view handed to route handlers."""

    def __init__(self, h: Handler, body: bytes) -> None:
        split = urlsplit(h.path)
        self.method = h.command
        self.raw_path = h.path
        self.path = split.path
        self.query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers: dict[str, str] = {}
        for k, v in h.headers.items():  # repeated headers are joined (cookies with "; ", others with ", ")
            k = k.lower()
            headers[k] = (headers[k] + ("; " if k == "cookie" else ", ") + v) if k in headers else v
        self.headers = headers
        self.cookies = parse_cookie_header(headers.get("cookie", ""))
        self.body = body
        try:
            self.json: Any = json.loads(body.decode("utf-8")) if body else None
        except (ValueError, UnicodeDecodeError):
            self.json = None
        self.ip = h.client_address[0]
        self.ua = headers.get("user-agent", "")
        self.kind = "other"
        self.uid: str | None = None
        self.log: dict = {}

    @property
    def obj(self) -> dict:
        """The JSON body if it is an object, else an empty dict."""
        return self.json if isinstance(self.json, dict) else {}


def send(h: Handler, status: int, body: Any = b"", ctype: str | None = "application/json",
         headers: Iterable[tuple[str, str]] = (), cookies: Iterable[str] = ()) -> None:
    if isinstance(body, (dict, list)):
        body = compact(body).encode()
    elif isinstance(body, str):
        body = body.encode("utf-8")
    h.send_response(status)
    if ctype:
        h.send_header("Content-Type", ctype if ";" in ctype or not ctype.startswith("text/")
                      else ctype + "; charset=utf-8")
    for k, v in headers:
        h.send_header(k, v)
    for c in cookies:
        h.send_header("Set-Cookie", c)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.headers_sent = True
    if h.command != "HEAD":
        h.wfile.write(body)


def err(h: Handler, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
    send(h, status, {"error": message}, headers=headers)


# ---------------------------------------------------------------------------------------------------------------------
# The stream writer
# ---------------------------------------------------------------------------------------------------------------------

FRAMING_KNOBS = ("data_prefix", "crlf", "no_final_newline", "split", "heartbeat_every", "first_byte_delay",
                 "line_delay", "stream_framing")


@dataclass
class StreamOptions:
    data_prefix: Any = False
    crlf: bool = False
    no_final_newline: bool = False
    split: str = "none"
    heartbeat_every: float = 0.0
    first_byte_delay: float = 0.0
    line_delay: float = 0.0
    stream_framing: str = "chunked"
    disconnect_after: int | None = None    # lines, then hang up (a stream fault)
    hang_up: bool = False                  # hang up after the last piece instead of ending the body

    @classmethod
    def from_knobs(cls, knobs: dict, fault: dict | None = None) -> StreamOptions:
        opts = cls(**{k: knobs[k] for k in FRAMING_KNOBS})
        for name in ("first_byte_delay", "line_delay"):
            if fault and fault.get(name) is not None:
                setattr(opts, name, fault[name])
        if fault and fault.get("disconnect_after") is not None:
            opts.disconnect_after, opts.hang_up = int(fault["disconnect_after"]), True
        return opts

    @property
    def prefix(self) -> str:
        return "data: " if self.data_prefix else ""

    @property
    def separator(self) -> str:
        eol = "\r\n" if self.crlf else "\n"
        return eol + (eol if self.data_prefix == "sse" else "")

    def encode(self, lines: list[str]) -> list[bytes]:
        """Each line framed (prefix, line end), cut after ``disconnect_after`` lines."""
        sep = self.separator
        encoded = [(self.prefix + ln + sep).encode("utf-8") for ln in lines]
        if encoded and self.no_final_newline:
            encoded[-1] = encoded[-1][:-len(sep.encode())]
        return encoded if self.disconnect_after is None else encoded[:self.disconnect_after]


def random_cuts(blob: bytes, rng: random.Random) -> list[bytes]:
    """The blob in pieces of 1–24 bytes, with one cut inside the ``a0:`` prefix and one inside the first
    multi-byte UTF-8 character (the cases a parser gets wrong)."""
    cuts = set()
    i = blob.find(b"0:")
    if i > 0:
        cuts.add(i)
    first_multibyte = next((j for j, byte in enumerate(blob) if byte >= 0xC0), None)
    if first_multibyte is not None:
        cuts.add(first_multibyte + 1)
    pos = 0
    while pos < len(blob):
        pos += rng.randint(1, 24)
        cuts.add(pos)
    edges = [0, *sorted(c for c in cuts if 0 < c < len(blob)), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(edges)]


# How the framed lines become TCP writes, per ``split`` knob.
WRITE_PLANS: dict[str, Callable[[list[bytes], random.Random], list[bytes]]] = {
    "none": lambda encoded, _rng: list(encoded),
    "coalesce": lambda encoded, _rng: [b"".join(encoded)] if encoded else [],
    "random": lambda encoded, rng: random_cuts(b"".join(encoded), rng) if encoded else [],
}


class StreamWriter:
    """Writes one 200 stream: headers, then the planned pieces with delays and heartbeats, then the end (or a
    deliberate disconnect)."""

    def __init__(self, h: Handler, opts: StreamOptions, rng: random.Random) -> None:
        self.h, self.opts, self.rng = h, opts, rng
        self.chunked = opts.stream_framing != "close"
        self.heartbeat = (opts.prefix + HEARTBEAT_LINE + opts.separator).encode()
        self.last_write = time.monotonic()

    def start(self, headers: Iterable[tuple[str, str]]) -> None:
        h = self.h
        if self.opts.first_byte_delay and not self.hold(float(self.opts.first_byte_delay)):
            self.aborted()
            raise Abort()
        h.send_response(200)
        for k, v in headers:
            h.send_header(k, v)
        if self.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        h.headers_sent = True

    def write(self, data: bytes) -> None:
        if data:
            self.h.wfile.write((b"%x\r\n" % len(data) + data + b"\r\n") if self.chunked else data)
            self.h.wfile.flush()
            self.last_write = time.monotonic()

    def hold(self, seconds: float) -> bool:
        """Wait, watching the connection: False as soon as the client hangs up (a write would only show
        it at the next piece, and a bridge that leaves during a long delay must be seen leaving)."""
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            if self.h.client_gone():
                return False
            time.sleep(min(remaining, 0.05))
        return True

    def wait(self, seconds: float) -> None:
        """Sleep, sending heartbeat lines at the configured interval meanwhile; a client that hangs up
        meanwhile ends the stream (as a failed write does)."""
        every = float(self.opts.heartbeat_every or 0)
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            if every and time.monotonic() - self.last_write >= every:
                self.write(self.heartbeat)
            if not self.hold(min(remaining, every) if every else remaining):
                raise ConnectionAbortedError("the client hung up")

    def aborted(self) -> None:
        """The client went away before the end: tests check that a bridge cancels upstream when its own
        client does."""
        if self.h.log_entry is not None:
            self.h.log_entry["aborted"] = True
            self.h.log_entry["aborted_at"] = time.time()
        self.h.close_connection = True

    def run(self, pieces: list[bytes], before_last: Callable[[], None]) -> bool:
        """Write the pieces; True if the stream completed, False when the client hung up.

        ``before_last`` runs just before the final bytes go out, so that the history is recorded before the
        client can see the end of the reply and send a follow-up (no race in tests)."""
        try:
            if self.opts.heartbeat_every:
                self.write(self.heartbeat)
            delay = float(self.opts.line_delay or 0)
            for idx, piece in enumerate(pieces):
                if delay and idx and b"\n" in pieces[idx - 1]:
                    self.wait(delay)
                if idx == len(pieces) - 1:
                    before_last()
                self.write(piece)
            if self.opts.hang_up:
                self._cut()
            if not pieces:
                before_last()
            if self.chunked:
                self.h.wfile.write(b"0\r\n\r\n")
                self.h.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.aborted()
            return False

    def _cut(self) -> None:
        try:
            self.h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise Abort()
