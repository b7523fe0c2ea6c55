"""The context's timers: call deadlines and overflow deadlines, on an injected clock. No I/O.

A driver asks ``next_deadline()`` when it must wake up and calls ``expire(now)`` then; that is
all an event loop needs besides the plugin's poll fd.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any, Protocol


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
    """A heap of (deadline, entry); ``hook(deadline)`` is told of each deadline that becomes
    the earliest, so that an event loop driving progress can wake up for it."""

    def __init__(self) -> None:
        self.hook: Callable[[float], Any] | None = None
        self._heap: list[tuple[float, int, Timed]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._heap)

    def next_deadline(self) -> float | None:
        """The earliest armed deadline (perhaps of an entry that finished meanwhile)."""
        heap = self._heap
        return heap[0][0] if heap else None

    def arm(self, entry: Timed, deadline: float) -> None:
        with self._lock:
            heap = self._heap
            if len(heap) > 4096:
                # Entries of calls that already finished stay until their deadline; drop them
                # in bulk so a high call rate with long timeouts cannot grow the heap unbounded.
                heap[:] = [t for t in heap if t[2].live and t[2].deadline == t[0]]
                heapq.heapify(heap)
            heapq.heappush(heap, (deadline, next(self._seq), entry))
            earliest = heap[0][2] is entry
        hook = self.hook
        if hook is not None and earliest:
            # Only a new earliest deadline moves the wake-up: the loop's timer fires for the
            # heap's top and re-arms for the next one then.
            hook(deadline)

    def expire(self, now: float) -> None:
        """Fire every live entry whose deadline is ``now`` or earlier."""
        expired = []
        with self._lock:
            heap = self._heap
            while heap and heap[0][0] <= now:
                deadline, _seq, entry = heapq.heappop(heap)
                if entry.live and entry.deadline == deadline:
                    expired.append(entry)
        for entry in expired:
            entry.expire()
