"""The state every part of the emulator shares: origin, clock, seeded random source, secret, lock and knobs."""

from __future__ import annotations

import hashlib
import random
import string
import threading
import time
import uuid
from typing import Any

from .common import DEFAULT_KNOBS, MUTABLE_KNOBS


class Core:
    """One emulated origin's shared context.  Parts read knobs and the clock here and take ``lock`` for state
    that concurrent requests change."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.secret = hashlib.sha256(f"fake-arena-secret-{seed}".encode()).digest()
        self.lock = threading.RLock()
        self.clock_offset = 0.0
        self.url = ""
        self.host = ""
        self.port = 0
        self.knobs: dict[str, Any] = {}
        self.requests: list[dict] = []
        self.reset_knobs()

    def reset_knobs(self) -> None:
        self.knobs = {k: (list(v) if k in MUTABLE_KNOBS else v) for k, v in DEFAULT_KNOBS.items()}

    def set_knob(self, name: str, value: Any) -> None:
        if name not in DEFAULT_KNOBS:
            raise ValueError(f"unknown knob {name!r}")
        self.knobs[name] = list(value) if name in MUTABLE_KNOBS else value

    def now(self) -> float:
        """The emulator's clock: wall time plus ``clock_offset`` (to test expiry without waiting)."""
        return time.time() + self.clock_offset

    def hex(self, n: int) -> str:
        return "".join(self.rng.choice("0123456789abcdef") for _ in range(n))

    def token_chars(self, n: int, alphabet: str = string.ascii_letters + string.digits + "_-") -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def uuid4(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
