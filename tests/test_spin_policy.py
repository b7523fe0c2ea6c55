"""The adaptive spin policy (na/_spin.py): made-up waits in, budgets out; no clock, no I/O."""

from __future__ import annotations

import pytest

from petasus.na._spin import PROBE_MAX, PROBE_MIN, SLACK, SpinPolicy

US = 1e-6
LIMIT = 200 * US


def test_a_fresh_policy_spins_the_whole_limit() -> None:
    policy = SpinPolicy(LIMIT)
    assert policy.budget == LIMIT
    assert SpinPolicy(0).budget == 0


def test_hits_keep_the_full_budget() -> None:
    policy = SpinPolicy(LIMIT)
    for _ in range(100):
        policy.caught(40 * US)
    assert policy.budget == LIMIT
    assert policy.hits == 100 and policy.late == 0


def test_late_catches_turn_spinning_off() -> None:
    # A yield that handed the CPU to a busy process for a time slice: the event is found
    # milliseconds after the spin began.
    policy = SpinPolicy(LIMIT)
    for _ in range(3):
        policy.caught(40 * US)
    policy.caught(2000 * US)
    assert 0 < policy.budget < LIMIT  # one late catch halves it
    lates = 1
    while policy.budget:
        policy.caught(2000 * US)
        lates += 1
    assert lates <= 4  # halved to nothing
    assert policy.late == lates


def test_a_hit_after_one_late_catch_restores_the_budget() -> None:
    policy = SpinPolicy(LIMIT)
    for _ in range(20):
        policy.caught(40 * US)
    policy.caught(2000 * US)
    policy.caught(40 * US)
    assert policy.budget == LIMIT


def test_misses_in_a_row_halve_the_budget_to_zero_without_touching_the_averages() -> None:
    policy = SpinPolicy(LIMIT)
    policy.caught(40 * US)
    average = policy.spin_avg
    budgets = []
    for _ in range(5):
        policy.missed()
        budgets.append(policy.budget)
    assert budgets == [LIMIT, LIMIT / 2, LIMIT / 4, LIMIT / 8, 0]
    assert policy.spin_avg == average
    assert policy.misses == 5


def test_a_lone_miss_among_hits_keeps_the_budget() -> None:
    # A call slower than most (a handler that pulls) is not an idle peer.
    policy = SpinPolicy(LIMIT)
    for _ in range(50):
        policy.caught(40 * US)
        policy.caught(40 * US)
        policy.missed()
        assert policy.budget == LIMIT
    assert policy.misses == 50


def _to_zero_by_late_catches(policy: SpinPolicy) -> None:
    """Late catches until spins average more than SLACK times the blocking waits."""
    while policy.budget or policy.spin_avg <= SLACK * policy.block_avg:
        policy.caught(5000 * US)


def test_quick_blocking_waits_probe_with_a_full_spin() -> None:
    policy = SpinPolicy(LIMIT)
    _to_zero_by_late_catches(policy)
    for _ in range(PROBE_MIN - 1):
        policy.woke(50 * US)
        assert policy.budget == 0
    policy.woke(50 * US)
    assert policy.budget == LIMIT and policy.probing
    assert policy.probes == 1


def test_slow_blocking_waits_do_not_probe() -> None:
    policy = SpinPolicy(LIMIT)
    _to_zero_by_late_catches(policy)
    for _ in range(50):
        policy.woke(5000 * US)  # nothing a spin could have caught
    assert policy.budget == 0 and policy.probes == 0


def test_failed_probes_back_off_exponentially_to_a_bound() -> None:
    policy = SpinPolicy(LIMIT)
    _to_zero_by_late_catches(policy)
    waits_between_probes = []
    for _ in range(12):
        waits = 0
        while not policy.budget:
            policy.woke(100 * US)
            waits += 1
        waits_between_probes.append(waits)
        policy.caught(3000 * US)  # the probe's yield lost the CPU again
        assert policy.budget == 0
    assert waits_between_probes[:4] == [PROBE_MIN, 2 * PROBE_MIN, 4 * PROBE_MIN, 8 * PROBE_MIN]
    assert waits_between_probes[-1] == PROBE_MAX


def test_a_missed_probe_backs_off_too() -> None:
    policy = SpinPolicy(LIMIT)
    _to_zero_by_late_catches(policy)
    for _ in range(PROBE_MIN):
        policy.woke(100 * US)
    policy.missed()
    assert policy.budget == 0 and policy.probe_after == 2 * PROBE_MIN


def test_probes_that_keep_hitting_bring_spinning_back() -> None:
    # The busy process went away: each probe is a hit, and the spin average falls below
    # the blocking waits' (which a wake-up keeps above a polled catch).
    policy = SpinPolicy(LIMIT)
    _to_zero_by_late_catches(policy)
    for _ in range(200):
        if policy.budget:
            policy.caught(30 * US)
        else:
            policy.woke(120 * US)
    assert policy.budget == LIMIT
    for _ in range(10):
        policy.caught(30 * US)
    assert policy.budget == LIMIT and policy.probe_after == PROBE_MIN


def test_blocking_waits_are_learned_only_while_blocking() -> None:
    policy = SpinPolicy(LIMIT)
    before = policy.block_avg
    policy.woke(10 * US)  # the budget is not zero: this wait spun first
    assert policy.block_avg == before


def test_a_zero_limit_always_blocks() -> None:
    policy = SpinPolicy(0)
    for _ in range(10):
        policy.woke(1 * US)
    assert policy.budget == 0 and policy.probes == 0


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="spin limit"):
        SpinPolicy(-1.0)


def test_statistics_report_the_counters() -> None:
    policy = SpinPolicy(LIMIT)
    policy.caught(10 * US)
    policy.missed()
    policy.missed()
    stats = policy.statistics()
    assert stats["spin_hits"] == 1 and stats["spin_misses"] == 2
    assert stats["spin_budget_us"] == 100
    assert "budget=100us" in repr(policy)


def test_a_budget_run_down_by_misses_comes_back_with_a_catchable_wait() -> None:
    policy = SpinPolicy(LIMIT)
    policy.caught(30 * US)
    while policy.budget:
        policy.missed()  # an idle stretch
    policy.woke(5000 * US)  # still idle: nothing a spin could have caught
    assert policy.budget == 0
    policy.woke(80 * US)  # traffic again, and spins did better than this
    assert policy.budget == LIMIT and policy.probes == 0


def test_spinning_stays_while_spins_do_within_slack_of_blocking() -> None:
    # A loaded machine: now and then a yield costs a slice, but spins still average within
    # SLACK times the blocking waits; blocking would cost the wakers more than it saves.
    policy = SpinPolicy(LIMIT)
    policy.block_avg = 150 * US
    for i in range(400):
        policy.caught(1500 * US if i % 10 == 0 else 50 * US)
        if not policy.budget:
            policy.woke(150 * US)
    assert policy.spin_avg <= SLACK * policy.block_avg
    assert policy.budget > 0


def test_a_fixed_policy_keeps_its_budget_whatever_the_waits() -> None:
    """PETASUS_SPIN_ADAPT=0: the budget of before, for comparison (bench/handle_rpc.py)."""
    policy = SpinPolicy(LIMIT, adapt=False)
    for _ in range(10):
        policy.missed()
        policy.caught(10 * LIMIT)
        policy.woke(LIMIT / 10)
    assert policy.budget == LIMIT
    assert policy.statistics()["spin_misses"] == 10 and policy.statistics()["spin_hits"] == 10
