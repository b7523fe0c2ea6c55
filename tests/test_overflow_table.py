"""The overflow state table, driven without sockets: events in, actions out, budget paired."""

from __future__ import annotations

import itertools

import pytest

from petasus.hg.overflow import (
    EXPOSER,
    ORIGIN,
    TABLE,
    TARGET,
    TARGET_ONE_WAY,
    Action,
    Landing,
    Overflow,
    Phase,
)
from petasus.hg.state import StateError

A = Action


def test_target_pulls_then_dispatches_and_releases_the_budget() -> None:
    budget = Landing(100, 100)
    flow = Overflow(TARGET, budget)
    assert flow.begin(60) == (A.PULL,)
    assert flow.phase is Phase.PULLING_INPUT and budget.held == 60
    assert flow.handle("pulled") == (A.DISPATCH,)
    assert flow.phase is Phase.RECEIVED and budget.held == 0


def test_a_one_way_target_acknowledges_before_it_dispatches() -> None:
    flow = Overflow(TARGET_ONE_WAY, Landing(100, 100))
    flow.begin(10)
    assert flow.handle("pulled") == (A.ACK, A.DISPATCH)


def test_the_budget_refuses_and_nothing_is_held() -> None:
    budget = Landing(100, 100)
    first = Overflow(TARGET, budget)
    assert first.begin(70) == (A.PULL,)
    second = Overflow(TARGET, budget)
    assert second.begin(40) == (A.REPLY_ERROR,)
    assert second.phase is Phase.COMPLETED and "does not fit" in (second.reason or "")
    assert Overflow(ORIGIN, budget).begin(101) == (A.ACK, A.FAIL)
    assert budget.held == 70
    first.handle("failed")
    assert budget.held == 0


def test_a_handle_that_does_not_resolve_is_refused_without_reserving() -> None:
    budget = Landing(100, 100)
    flow = Overflow(TARGET, budget)
    assert flow.begin(10, refused="names another peer") == (A.REPLY_ERROR,)
    assert flow.reason == "names another peer" and budget.held == 0


def test_a_timed_out_pull_is_canceled_then_fails() -> None:
    budget = Landing(100, 100)
    flow = Overflow(TARGET, budget)
    flow.begin(50)
    assert flow.handle("timeout") == (A.CANCEL_PULL,)
    assert budget.held == 50  # the transfer may still write into the landing buffer
    assert flow.handle("failed") == (A.REPLY_ERROR,)
    assert budget.held == 0


def test_the_origin_pulls_acknowledges_and_delivers() -> None:
    budget = Landing(100, 100)
    flow = Overflow(ORIGIN, budget)
    assert flow.phase is Phase.FORWARDED
    assert flow.begin(30) == (A.PULL,)
    assert flow.phase is Phase.PULLING_OUTPUT
    assert flow.handle("cancel") == (A.CANCEL_PULL,)
    assert flow.handle("failed") == (A.ACK, A.FAIL)
    assert flow.handle("cancel") == ()  # the call had ended: nothing left to do
    assert budget.held == 0


def test_exposed_memory_is_released_once_acked_or_withdrawn() -> None:
    acked = Overflow(EXPOSER)
    assert acked.handle("acked") == (A.RELEASE,) and acked.phase is Phase.ACKED
    withdrawn = Overflow(EXPOSER)
    assert withdrawn.handle("timeout") == (A.WITHDRAW,)
    assert withdrawn.handle("acked") == (A.RELEASE,) and withdrawn.phase is Phase.WITHDRAWN


def test_illegal_transitions_name_the_event_the_role_and_the_state() -> None:
    flow = Overflow(TARGET, Landing(10, 10))
    with pytest.raises(StateError, match=r"target handle: event 'pulled' is not allowed in "
                                         r"state 'new'"):
        flow.handle("pulled")
    done = Overflow(EXPOSER)
    done.handle("acked")
    with pytest.raises(StateError, match=r"exposer .*'timeout'.*'acked'"):
        done.handle("timeout")


@pytest.mark.parametrize("role", [TARGET, TARGET_ONE_WAY, ORIGIN])
def test_every_path_through_the_table_releases_what_it_reserved(role: str) -> None:
    # Walk every event sequence up to four long from a granted pull: whatever the order,
    # the budget is held exactly while the pull is in a pulling phase.
    events = sorted({event for (r, _phase, event) in TABLE if r == role} - {"begin", "refused"})
    for path in itertools.chain.from_iterable(
            itertools.product(events, repeat=n) for n in range(1, 5)):
        budget = Landing(100, 100)
        flow = Overflow(role, budget)
        flow.begin(40)
        for event in path:
            try:
                flow.handle(event)
            except StateError:
                break
            pulling = flow.phase in (Phase.PULLING_INPUT, Phase.PULLING_OUTPUT)
            assert budget.held == (40 if pulling else 0), (role, path, flow.phase)


def test_each_peer_holds_at_most_its_share_and_the_others_still_fit() -> None:
    # One peer declaring the whole budget used to refuse every other peer's large call for
    # as long as its pull lasted; now it gets its share, and the rest is left for the others.
    budget = Landing(400)
    assert budget.per_peer == 100  # a quarter by default (overflow.share)
    greedy = Overflow(TARGET, budget)
    assert greedy.begin(400, peer="tcp://greedy") == (A.REPLY_ERROR,)
    assert "max_overflow_per_peer" in (greedy.reason or "") and budget.held == 0
    first = Overflow(TARGET, budget)
    assert first.begin(100, peer="tcp://greedy") == (A.PULL,)
    second = Overflow(TARGET, budget)
    assert second.begin(1, peer="tcp://greedy") == (A.REPLY_ERROR,)  # its share is used up
    assert "100 B of its other calls are held" in (second.reason or "")
    good = Overflow(TARGET, budget)
    assert good.begin(100, peer="tcp://good") == (A.PULL,)
    assert budget.peers == {"tcp://greedy": 100, "tcp://good": 100} and budget.held == 200
    first.handle("failed")
    good.handle("pulled")
    assert budget.peers == {} and budget.held == 0


def test_the_share_and_the_whole_budget_are_both_enforced() -> None:
    budget = Landing(100, per_peer=60)
    a, b = Overflow(TARGET, budget), Overflow(ORIGIN, budget)
    assert a.begin(60, peer="a") == (A.PULL,)
    assert b.begin(50, peer="b") == (A.ACK, A.FAIL)  # within b's share, not in what is left
    assert "does not fit" in (b.reason or "")
    assert Overflow(TARGET, budget).begin(40, peer="b") == (A.PULL,)
    assert budget.held == 100


def test_a_pull_that_keeps_moving_is_not_timed_out_however_long_it_takes() -> None:
    now = 1000.0  # the fake clock: the driver passes its clock's time in
    flow = Overflow(TARGET, Landing(100, 100), stall=60.0)
    flow.begin(50, now=now)
    assert flow.deadline == now + 60.0
    for _ in range(100):  # 100 minutes of a slow link: a chunk every 50 s
        now += 50.0
        assert flow.expire(now) == ()  # the timer fired early: nothing stalled
        assert flow.moved(now) == ()
        assert flow.deadline == now + 60.0  # the driver arms its timer again for this
    assert flow.handle("pulled") == (A.DISPATCH,)
    assert flow.deadline is None


def test_a_pull_that_lands_nothing_for_the_stall_timeout_is_canceled() -> None:
    now = 0.0
    budget = Landing(100, 100)
    flow = Overflow(TARGET, budget, stall=60.0)
    flow.begin(50, now=now)
    flow.moved(now + 10.0)
    assert flow.expire(now + 69.9) == ()
    assert flow.expire(now + 70.0) == (A.CANCEL_PULL,)
    assert flow.timed_out and flow.deadline is None  # no timer again: the cancel ends it
    assert budget.held == 50  # until the canceled transfer ends, it may still write
    assert flow.moved(now + 70.5) == ()  # a chunk that landed as the cancel went out
    assert flow.handle("failed") == (A.REPLY_ERROR,) and budget.held == 0


def test_without_a_stall_timeout_a_pull_has_no_deadline() -> None:
    flow = Overflow(ORIGIN, Landing(100, 100))
    flow.begin(10, now=5.0)
    assert flow.deadline is None and flow.expire(1e9) == ()


def test_landing_buffers_are_untouched_mappings_unmapped_when_given_back() -> None:
    budget = Landing(1 << 40, 1 << 40)
    huge = 1 << 30
    lease = budget.take(huge)  # a declared 1 GiB: no memset, no resident page
    buf = lease.buf
    assert len(lease.view) == huge and budget.landings == 1
    assert budget.give(lease)
    assert buf.closed and budget.landings == 0  # larger than LANDING_MAX: unmapped at once
    lease = budget.take(1 << 20)
    small = lease.buf
    budget.give(lease)
    assert not small.closed  # kept, its pages faulted in, for the next overflow
    lease = budget.take(1000)
    assert lease.buf is small
    budget.give(lease)
    budget.close()
    assert small.closed


def test_a_landing_still_viewed_is_unmapped_by_the_next_sweep() -> None:
    # Given back from inside the completion that ended its pull, the op still holds a view:
    # the buffer waits for the sweep the driver runs once the completion is over.
    budget = Landing(1 << 30)
    lease = budget.take(128 << 20)
    buf = lease.buf
    op_view = memoryview(buf)
    assert not budget.give(lease)
    assert budget.landings == 1 and not buf.closed
    op_view.release()
    assert budget.sweep(final=True) and buf.closed and budget.landings == 0
    assert budget.pinned == 0
    lease = budget.take(128 << 20)
    user_view = memoryview(lease.buf)  # a decoder that kept a view: left to it, and counted
    budget.give(lease)
    assert budget.sweep(final=True) and budget.pinned == 1 and budget.landings == 0
    user_view.release()
