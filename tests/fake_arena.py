"""Fake LM Arena, the emulator the tests run against (the code is in the ``emulator`` package beside this file).

Run standalone: ``python tests/fake_arena.py --port 9000 [--no-recaptcha]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emulator import AUTH_COOKIE, DEFAULT_MODELS_PATH, FakeArena, make_png, make_uuid7

__all__ = ["AUTH_COOKIE", "FakeArena", "main", "make_png", "make_uuid7"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fake LM Arena emulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=DEFAULT_MODELS_PATH)
    ap.add_argument("--no-recaptcha", action="store_true", help="accept requests without reCAPTCHA tokens")
    ap.add_argument("--cloudflare", action="store_true", help="enable the Cloudflare interstitial")
    ap.add_argument("--replay", metavar="DIR", help="answer from a saved run (`bridge.py doctor --save DIR`)")
    args = ap.parse_args(argv)
    arena = FakeArena(models_path=args.models, seed=args.seed, host=args.host, port=args.port)
    if args.no_recaptcha:
        arena.configure(recaptcha="off")
    if args.cloudflare:
        arena.configure(cloudflare=True)
    arena.replay(args.replay)
    arena.start()
    print(f"Fake LM Arena listening on {arena.url}", flush=True)
    print(f"session cookie: arena-auth-prod-v1={arena.new_session()}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        arena.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
