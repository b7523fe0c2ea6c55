"""The context's timers (hg/timers.py) on made-up deadlines: the per-span FIFO lanes and the
heap must fire the same entries at the same times, whatever order they were armed in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from petasus.hg.timers import Timers


class Entry:
    """A call's timer: live until finished or expired; records when it fired."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.live = True
        self.fired: list[float] = []

    def expire(self) -> None:
        self.live = False
        self.fired.append(self.deadline)


def test_lane_fires_in_order_and_skips_finished_and_rearmed() -> None:
    timers = Timers()
    a, b, c = Entry(10.0), Entry(11.0), Entry(12.0)
    for e in (a, b, c):
        timers.arm(e, e.deadline, span=5.0)
    b.live = False  # finished before its deadline
    c.deadline = 20.0  # forwarded again: only the new deadline counts
    timers.arm(c, 20.0, span=5.0)
    assert timers.next_deadline() == 10.0
    timers.expire(12.5)
    assert a.fired == [10.0] and b.fired == [] and c.fired == []
    timers.expire(20.0)
    assert c.fired == [20.0]
    assert timers.next_deadline() is None and len(timers) == 0


def test_a_deadline_out_of_order_for_its_lane_still_fires_on_time() -> None:
    timers = Timers()
    late, early = Entry(50.0), Entry(30.0)  # the clock was set back between the two
    timers.arm(late, 50.0, span=5.0)
    timers.arm(early, 30.0, span=5.0)
    assert timers.next_deadline() == 30.0
    timers.expire(30.0)
    assert early.fired == [30.0] and late.fired == []


def test_the_hook_hears_only_of_a_new_earliest_deadline() -> None:
    timers = Timers()
    heard: list[float] = []
    timers.hook = heard.append
    timers.arm(Entry(10.0), 10.0, span=1.0)
    timers.arm(Entry(11.0), 11.0, span=1.0)  # behind the lane's head: not the earliest
    timers.arm(Entry(5.0), 5.0, span=2.0)  # a new lane, earlier than everything
    timers.arm(Entry(7.0), 7.0)  # the heap, not earlier
    timers.arm(Entry(1.0), 1.0)  # the heap, earliest
    assert heard == [10.0, 5.0, 1.0]


def test_lanes_are_bounded_when_calls_finish_behind_one_that_does_not() -> None:
    timers = Timers()
    stuck = Entry(1e9)
    timers.arm(stuck, 1e9, span=3600.0)
    for i in range(20000):
        e = Entry(1e9 + i)
        timers.arm(e, e.deadline, span=3600.0)
        e.live = False
    assert len(timers) <= 4097
    timers.expire(2e9)
    assert stuck.fired == [1e9]


def test_more_spans_than_lanes_go_to_the_heap() -> None:
    timers = Timers()
    entries = [Entry(100.0 + k) for k in range(20)]
    for k, e in enumerate(entries):
        timers.arm(e, e.deadline, span=float(k))
    timers.expire(109.0)
    assert [e.fired for e in entries] == [[100.0 + k] if k <= 9 else [] for k in range(20)]


@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from([None, 1.0, 2.0]),
                          st.booleans()), max_size=60),
       st.lists(st.integers(0, 60), max_size=8))
def test_fires_exactly_the_live_entries_that_are_due(
        arms: list[tuple[int, float | None, bool]], checks: list[int]) -> None:
    timers = Timers()
    entries = []
    for deadline, span, finishes in arms:
        e = Entry(float(deadline))
        timers.arm(e, e.deadline, span=span)
        entries.append((e, finishes))
    for e, finishes in entries:
        if finishes:
            e.live = False
    for now in [*sorted(checks), 100]:
        timers.expire(float(now))
        for e, finishes in entries:
            want = [] if finishes or e.deadline > now else [e.deadline]
            assert e.fired == want


class Loop:
    """An event loop as the asyncio driver is one: a timer set by the hook at the earliest
    deadline it hears of; when it fires, the loop expires what is due and sets the timer at
    the next deadline. The only other time it expires anything is never."""

    def __init__(self, timers: Timers) -> None:
        self.timers = timers
        self.at: float | None = None
        timers.hook = self.heard

    def heard(self, deadline: float) -> None:
        if self.at is None or deadline < self.at:
            self.at = deadline

    def advance(self, now: float) -> None:
        while self.at is not None and self.at <= now:
            self.timers.expire(now)
            self.at = self.timers.next_deadline()
            if self.at is not None and self.at <= now:
                self.at = None  # only entries that finished remain due: none left to fire


ops = st.lists(st.one_of(
    st.tuples(st.just("arm"), st.sampled_from([None, 1.0, 3.0])),
    st.tuples(st.just("finish"), st.integers(0, 40)),
    st.tuples(st.just("rearm"), st.integers(0, 40)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.5])),
    st.tuples(st.just("back"), st.just(0.7)),  # the clock set back a little
), max_size=80)


@given(ops)
def test_a_loop_woken_only_by_the_hook_misses_no_deadline_and_fires_none_early(
        script: list[tuple[str, object]]) -> None:
    timers = Timers()
    loop = Loop(timers)
    now = high = 100.0
    entries: list[tuple[Entry, float | None]] = []
    for op, arg in script:
        if op == "arm":
            span = arg if arg is not None else 2.0
            e = Entry(now + span)  # type: ignore[operator]
            timers.arm(e, e.deadline, span=arg)  # type: ignore[arg-type]
            entries.append((e, arg))  # type: ignore[arg-type]
        elif op == "finish" and entries:
            entries[arg % len(entries)][0].live = False  # type: ignore[operator]
        elif op == "rearm" and entries:
            e, span = entries[arg % len(entries)]  # type: ignore[operator]
            if e.live:
                e.deadline = now + (span if span is not None else 2.0)
                timers.arm(e, e.deadline, span=span)
        elif op == "advance":
            now += arg  # type: ignore[operator]
            high = max(high, now)
            loop.advance(now)
        elif op == "back":
            now -= arg  # type: ignore[operator]
        for e, _span in entries:
            assert all(d <= high for d in e.fired)  # nothing before its time
            if e.live:
                assert not e.fired
                # A live entry is due only once the loop's timer says so, never later.
                assert loop.at is not None and loop.at <= e.deadline

