"""The context's timers: call deadlines and overflow deadlines, on an injected clock. No I/O.

A driver asks ``next_deadline()`` when it must wake up and calls ``expire(now)`` then; that is
all an event loop needs besides the plugin's poll fd.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

# Finished entries a heap or lane may hold before it drops them in bulk.
_TRIM_AT = 4096
# Lanes at most: one per timeout in use, kept for good (next_deadline looks at each); past
# them, deadlines of other spans (a program computing its timeouts) go in the heap.
_LANES = 8


class Timed(Protocol):
    """What a timer fires: live while it waits, ``deadline`` the one it was armed for."""

    deadline: float

    @property
    def live(self) -> bool: ...

    def expire(self) -> None: ...


class Deadline:
    """A context timer that runs ``on_expire`` once, unless disarmed first."""

    __slots__ = ("deadline", "live", "on_expire")

    def __init__(self, deadline: float, on_expire: Callable[[], Any]) -> None:
        self.deadline = deadline
        self.on_expire = on_expire
        self.live = True

    def disarm(self) -> bool:
        """True if it was still armed (so it will not fire)."""
        was, self.live = self.live, False
        return was

    def expire(self) -> None:
        if self.disarm():
            self.on_expire()


class Timers:
    """Armed deadlines; ``hook(deadline)`` is told of each one that becomes the earliest, so
    that an event loop driving progress can wake up for it.

    Most deadlines are a call's: now plus the engine's timeout, the same span call after call
    on a monotonic clock, so they arrive in order. Those go in a FIFO lane per span (``arm``'s
    ``span``): an append, where a heap push with its tuple and sequence number cost ~1 us per
    awaited call (a tenth of its path at 16 in flight, bench/rpc.py). Anything else, and a
    deadline that would land out of order in its lane (a clock set back), goes in the heap.
    """

    def __init__(self) -> None:
        self.hook: Callable[[float], Any] | None = None
        self._heap: list[tuple[float, int, Timed]] = []
        self._lanes: dict[float, deque[tuple[float, Timed]]] = {}
        self._trim_at: dict[float, int] = {}  # a lane's length past which it drops finished ones
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap) + sum(map(len, self._lanes.values()))

    def next_deadline(self) -> float | None:
        """The earliest armed deadline (perhaps of an entry that finished meanwhile)."""
        with self._lock:  # threads arm and expire while a loop asks (a lane may be added)
            return self._first()

    def _first(self) -> float | None:
        heap = self._heap
        first = heap[0][0] if heap else None
        for lane in self._lanes.values():
            if lane and (first is None or lane[0][0] < first):
                first = lane[0][0]
        return first

    def arm(self, entry: Timed, deadline: float, span: float | None = None) -> None:
        """Fire ``entry.expire()`` at ``deadline`` unless it is no longer live by then;
        ``span``: the deadline is the clock's now plus this, as the lane's others are."""
        lock = self._lock
        lock.acquire()  # (not ``with``: per call, its two bound methods cost ~30 ns)
        try:
            lane = self._lanes.get(span)  # type: ignore[arg-type]
            if lane is None and span is not None and len(self._lanes) < _LANES:
                lane = self._lanes[span] = deque()
            if lane is not None and (not lane or lane[-1][0] <= deadline):
                # Entries of calls that finished stay until their deadline; those at the head
                # go as the next are armed, the rest in bulk past ``_trim_at``, so a high call
                # rate with long timeouts cannot grow a lane unbounded.
                # The last one stays: its deadline is the wake-up already armed, so a new one
                # behind it is not the earliest (no scan of the lanes for every call).
                while len(lane) > 1 and not lane[0][1].live:
                    lane.popleft()
                earliest = not lane and self._before(deadline)
                lane.append((deadline, entry))
                if len(lane) > self._trim_at.get(span, _TRIM_AT):  # type: ignore[arg-type]
                    self._trim(span, lane)  # type: ignore[arg-type]
            else:
                earliest = self._before(deadline)
                heap = self._heap
                if len(heap) > _TRIM_AT:
                    heap[:] = [t for t in heap if t[2].live and t[2].deadline == t[0]]
                    heapq.heapify(heap)
                heapq.heappush(heap, (deadline, next(self._seq), entry))
        finally:
            lock.release()
        hook = self.hook
        if hook is not None and earliest:
            # Only a new earliest deadline moves the wake-up: the loop's timer fires for the
            # earliest and re-arms for the next one then.
            hook(deadline)

    def _before(self, deadline: float) -> bool:
        first = self._first()
        return first is None or deadline < first

    def _trim(self, span: float, lane: deque[tuple[float, Timed]]) -> None:
        kept = [t for t in lane if t[1].live and t[1].deadline == t[0]]
        lane.clear()
        lane.extend(kept)
        # Past twice what is live, not at every call while many are: each lane its own.
        self._trim_at[span] = max(_TRIM_AT, 2 * len(kept))

    def expire(self, now: float) -> None:
        """Fire every live entry whose deadline is ``now`` or earlier."""
        expired = []
        with self._lock:
            heap = self._heap
            while heap and heap[0][0] <= now:
                deadline, _seq, entry = heapq.heappop(heap)
                if entry.live and entry.deadline == deadline:
                    expired.append(entry)
            for lane in self._lanes.values():
                while lane and lane[0][0] <= now:
                    deadline, entry = lane.popleft()
                    if entry.live and entry.deadline == deadline:
                        expired.append(entry)
        for entry in expired:
            entry.expire()
