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
    budget = Landing(100)
    flow = Overflow(TARGET, budget)
    assert flow.begin(60) == (A.PULL,)
    assert flow.phase is Phase.PULLING_INPUT and budget.held == 60
    assert flow.handle("pulled") == (A.DISPATCH,)
    assert flow.phase is Phase.RECEIVED and budget.held == 0


def test_a_one_way_target_acknowledges_before_it_dispatches() -> None:
    flow = Overflow(TARGET_ONE_WAY, Landing(100))
    flow.begin(10)
    assert flow.handle("pulled") == (A.ACK, A.DISPATCH)


def test_the_budget_refuses_and_nothing_is_held() -> None:
    budget = Landing(100)
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
    budget = Landing(100)
    flow = Overflow(TARGET, budget)
    assert flow.begin(10, refused="names another peer") == (A.REPLY_ERROR,)
    assert flow.reason == "names another peer" and budget.held == 0


def test_a_timed_out_pull_is_canceled_then_fails() -> None:
    budget = Landing(100)
    flow = Overflow(TARGET, budget)
    flow.begin(50)
    assert flow.handle("timeout") == (A.CANCEL_PULL,)
    assert budget.held == 50  # the transfer may still write into the landing buffer
    assert flow.handle("failed") == (A.REPLY_ERROR,)
    assert budget.held == 0


def test_the_origin_pulls_acknowledges_and_delivers() -> None:
    budget = Landing(100)
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
    flow = Overflow(TARGET, Landing(10))
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
        budget = Landing(100)
        flow = Overflow(role, budget)
        flow.begin(40)
        for event in path:
            try:
                flow.handle(event)
            except StateError:
                break
            pulling = flow.phase in (Phase.PULLING_INPUT, Phase.PULLING_OUTPUT)
            assert budget.held == (40 if pulling else 0), (role, path, flow.phase)
