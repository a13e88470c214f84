"""Fake LM Arena: a local, standard-library-only emulator of the arena.ai web protocol.

Why this exists
---------------
The bridge talks to a private, moving target (see ``shared/arena-protocol.md``).  Tests must not touch the real
site, so this package stands in for *all* of it on one local origin.  One module per concern:

=============  =====================================================================================================
``common``     constants, default knobs, encoders (base64, uuid7, PNG, JSON string literals)
``core``       what every part shares: origin, clock, seeded random source, secret, lock, knobs
``http``       server, I/O-only handler, parsed request, plain responses, the stream writer (framing, splits, delays)
``site``       page and discovery: build and action ids, sitekey, JS chunks, flight data, page-GET cookies/refresh
``catalog``    the model list as served: 2026 fields (displayName, userSelectable), the "max" router model
``accounts``   auth and sessions: JWTs, session cookies (whole, chunked), refresh tokens, the refresh grant
``signup``     anonymous sign-up
``antibot``    reCAPTCHA tokens and checks, Turnstile, the Cloudflare interstitial (``scripts``: their JavaScript)
``chat``       the chat endpoints and skip-direct-battle: validation, evaluations, the reply stream
``policy``     late-2026 request policies: login gate, image quota, 2026 body, battle turns
``replies``    reply building: text, reasoning, citations (markers or offsets), images, lanes, scripted replies
``replay``     the real captures of tests/fixtures/real, replayed byte for byte
``uploads``    server actions and the R2 stand-in
``faults``     fault injection (status faults, stream faults, content-less 200s)
``control``    the ``/__emulator/*`` control API
``emulator``   ``FakeArena``: the parts wired behind one routing table
=============  =====================================================================================================

Design choices
--------------
* ``http.server.ThreadingHTTPServer`` (daemon threads, big listen backlog) so that we control every byte written
  and flushed: streams use HTTP/1.1 chunked encoding, one chunk per write, with TCP_NODELAY.
* Strict by default: what the real site rejects, the emulator rejects, with the real status and message.
* Deterministic: a seeded ``random.Random`` and a clock that is ``time.time() + clock_offset``.

Run standalone: ``python tests/fake_arena.py --port 9000 [--no-recaptcha]``.  The knobs, the late-2026 switches
and the control API are described in ``tests/emulator/README.md``.
"""

from .common import AUTH_COOKIE, DEFAULT_KNOBS, DEFAULT_MODELS_PATH, make_png, make_uuid7
from .emulator import FakeArena

__all__ = ["AUTH_COOKIE", "DEFAULT_KNOBS", "DEFAULT_MODELS_PATH", "FakeArena", "make_png", "make_uuid7"]
