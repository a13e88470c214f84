"""Unit tests of the hardening (issue 19): pure functions, no network."""
import time

import bridge


def test_trimming_keeps_the_newest_blocks_that_fit():
    head, body = ["system"], [f"block {i}" for i in range(20)]
    text, dropped = bridge.keep_newest(head, body, 60)
    assert len(text) <= 60 and text == "\n\n".join(head + body[dropped:])
    assert len("\n\n".join(head + body[dropped - 1:])) > 60


def test_trimming_is_linear_in_the_history():
    body = [f"message {i}" for i in range(50_000)]
    started = time.perf_counter()
    text, dropped = bridge.keep_newest([], body, 100_000)
    assert time.perf_counter() - started < 1.0 and dropped > 40_000 and len(text) <= 100_000
