"""The upstream client and the account pool without a network: clearance, refresh, the arena mode."""
import asyncio
import types

from test_accounts import session_value

import bridge


class SlowSidecar:
    """A stand-in for the browser sidecar whose clearance takes a while and is counted."""

    def __init__(self):
        self.clearances = 0

    async def clearance(self):
        self.clearances += 1
        await asyncio.sleep(0.2)
        return {"cf_clearance": f"c{self.clearances}"}, "Mozilla/5.0 test"


def parts(tmp_path, sidecar=None, **env):
    settings = bridge.Settings.load(env={"BRIDGE_DB": str(tmp_path / "u.db"), "BRIDGE_SIDECAR": "off", **env})
    store = bridge.Store(settings.db)
    site = bridge.ArenaSite(settings, store, sidecar or SlowSidecar())
    return settings, store, site


def test_concurrent_cloudflare_challenges_share_one_clearance(tmp_path):
    sidecar = SlowSidecar()
    _, store, site = parts(tmp_path, sidecar)

    async def challenged_at_once():
        await asyncio.gather(*(site.clear_cloudflare() for _ in range(5)))
        await site.aclose()

    asyncio.run(challenged_at_once())
    assert sidecar.clearances == 1
    assert store.site_params()["clearance"] == {"cookies": {"cf_clearance": "c1"}, "user_agent": "Mozilla/5.0 test"}


def test_a_refresh_that_loses_its_compare_and_swap_leaves_the_account_usable(tmp_path):
    settings, store, site = parts(tmp_path)
    pool = bridge.AccountPool(settings, store, site, site.sidecar)
    stale, _ = session_value(exp_offset=-60)
    account_id, _ = bridge.add_account(store, bridge.parse_account_input(stale))
    newer, _ = session_value(exp_offset=3600)

    async def page_refresh_while_another_writer_stores_a_session(account):
        store.update_account(account_id, auth=newer)        # e.g. a session adopted from a reply meanwhile
        return bridge.Session(session_value(exp_offset=1800)[0])

    pool.refresh_by_page = page_refresh_while_another_writer_stores_a_session

    async def refresh():
        result = await pool.refresh(store.account(account_id))
        await site.aclose()
        return result

    result = asyncio.run(refresh())
    row = store.account(account_id)
    assert row["state"] == "ok" and row["auth"] == newer and result["auth"] == newer


def test_an_explicit_arena_mode_wins_over_the_mode_learned_before(tmp_path):
    _, store, _ = parts(tmp_path)
    store.set_site_params(arena_mode="direct")
    assert parts(tmp_path, BRIDGE_ARENA_MODE="direct-battle")[2].arena_mode() == "direct-battle"
    args = bridge.build_parser().parse_args(["--arena-mode", "direct-battle"])
    settings = bridge.Settings.load(args, env={"BRIDGE_DB": str(tmp_path / "u.db")})
    assert bridge.ArenaSite(settings, store, SlowSidecar()).arena_mode() == "direct-battle"


def test_without_a_flag_the_learned_arena_mode_is_the_default(tmp_path):
    _, store, site = parts(tmp_path)
    assert site.arena_mode() == "direct-battle"
    store.set_site_params(arena_mode="direct")
    assert parts(tmp_path)[2].arena_mode() == "direct"


def test_a_refused_mode_switches_for_this_run_even_when_the_flag_named_it(tmp_path):
    _, store, site = parts(tmp_path, BRIDGE_ARENA_MODE="direct")
    site.switch_mode()
    assert site.arena_mode() == "direct-battle"
    assert store.site_params()["arena_mode"] == "direct-battle"


def queue_of(tmp_path):
    settings, store, site = parts(tmp_path)
    return bridge.AccountPool(settings, store, site, site.sidecar), site


def test_queued_requests_are_woken_by_answers_in_order_one_each_not_at_their_next_poll(tmp_path):
    pool, site = queue_of(tmp_path)
    pool.asking.update({1, 2})

    async def three_queued_two_answers():
        places = [pool.join_queue() for _ in range(3)]
        waiting = [asyncio.create_task(pool.wait_in_queue(place, bridge.now() + 30)) for place in places]
        await asyncio.sleep(0.01)
        pool.answered(1)
        pool.answered(2)
        await asyncio.sleep(0.2)
        woken = [task.done() for task in waiting]
        pool.leave_queue(places[0], served=True)
        pool.leave_queue(places[1], served=False)        # woken, but it leaves unserved: the next one is woken
        await asyncio.wait_for(waiting[2], 0.2)
        pool.leave_queue(places[2], served=True)
        await site.aclose()
        return woken

    assert asyncio.run(three_queued_two_answers()) == [True, True, False]
    assert not pool.asking and not pool.queued


def test_only_the_first_queued_request_polls_the_store_soon(tmp_path):
    pool, site = queue_of(tmp_path)

    async def two_queued_without_an_answer():
        places = [pool.join_queue() for _ in range(2)]
        until = bridge.now() + 30
        waiting = [asyncio.create_task(pool.wait_in_queue(place, until)) for place in places]
        await asyncio.sleep(0.3)
        polled = [task.done() for task in waiting]
        pool.leave_queue(places[0], served=True)
        await asyncio.gather(*waiting)              # the second is first now, and polls within QUEUE_POLLS[1]
        pool.leave_queue(places[1], served=True)
        await site.aclose()
        return polled

    assert asyncio.run(two_queued_without_an_answer()) == [True, False]    # 50 ms for the first, 500 ms after it
    assert not pool.queued


def test_a_refusal_whose_body_never_ends_is_given_up_after_the_idle_timeout_and_closed():
    """The status came, the body hangs: the attempt goes on by its status after the stream's idle timeout,
    and the answer is closed (not held until the client leaves)."""
    closed = []

    class Hanging:
        async def acontent(self) -> bytes:
            await asyncio.sleep(3600)
            return b""

    async def close(response, grace=0.0):
        closed.append(response)

    runner = types.SimpleNamespace(settings=types.SimpleNamespace(stream_idle_timeout=0.05),
                                   site=types.SimpleNamespace(close=close))
    response = Hanging()
    assert asyncio.run(asyncio.wait_for(bridge.TurnRunner.refusal_text(runner, response), 5)) == ""
    assert closed == [response]


def test_an_account_over_its_budget_waits_until_enough_of_its_requests_leave_the_hour(tmp_path, monkeypatch):
    """Requests sent past the budget count too (a follow-up, the doctor): with 2 an hour and 4 sent, the
    account may send again once its first three have left the window, not its first alone."""
    at = [1_800_000_000.0]
    monkeypatch.setattr(bridge, "now", lambda: at[0])
    settings, store, site = parts(tmp_path, BRIDGE_ACCOUNT_RPH="2")
    pool = bridge.AccountPool(settings, store, site, site.sidecar)
    account = {"id": 7}
    pool.spend(account)
    assert pool.budget_wait(account) == 0
    for _ in range(3):
        at[0] += 100
        pool.spend(account)
    at[0] += 100
    assert pool.budget_wait(account) == bridge.BUDGET_WINDOW - 200        # until the third one leaves
    at[0] += bridge.BUDGET_WINDOW - 200
    assert pool.budget_wait(account) == 0
    assert pool.budget_wait({"id": 8}) == 0
