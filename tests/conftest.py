import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import httpx
import pytest
from fake_arena import FakeArena
from harness import BridgeProcess


@pytest.fixture(scope="module")
def arena():
    emulator = FakeArena().start()
    yield emulator
    emulator.stop()


@pytest.fixture
def default_knobs(arena):
    """The emulator with every knob at its default (accounts and evaluations stay)."""
    arena.reset()


@pytest.fixture
def raw():
    """A plain HTTP client, for raw requests to the emulator."""
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def bridge_proc(arena, tmp_path_factory):
    proc = BridgeProcess(arena.url, str(tmp_path_factory.mktemp("bridge")), args=("--ping-interval", "0.5")).start()
    proc.wait_for_models()
    yield proc
    proc.stop()


@pytest.fixture
def fresh(arena, bridge_proc):
    """Each test starts with default emulator knobs (reCAPTCHA off: the sidecar is off here), one new
    arena account, and a new API key."""
    arena.reset()
    arena.configure(recaptcha="off")
    bridge_proc.set_accounts(arena.new_session())
    return bridge_proc


@pytest.fixture
def api_key(fresh):
    return fresh.create_key()


@pytest.fixture
def client(fresh, api_key):
    import openai
    return openai.OpenAI(base_url=fresh.base_url, api_key=api_key, max_retries=0, timeout=30)
