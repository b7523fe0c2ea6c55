"""The master's state version and the ``watch`` long polls parked on it (store/master.py).

Every change of the master's state moves the version; a ``watch(since, timeout)`` call is
answered as soon as it has moved, else parked (no thread of its own) until the next change or
its deadline. The state lock is the master's own: ``Changes`` is entered instead of the lock
by a handler that changes the state, and bumps the version on the way out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from petasus import hg

log = logging.getLogger("petasus.store.master")

MAX_WATCH_S = 60.0  # the longest a ``watch`` call is parked
# Parked ``watch`` calls at most; past it a watch fails at once ("too many watches"), so the
# master's memory stays bounded and a caller is told rather than left polling.
MAX_PARKED = 4096


class Changes:
    """The master's state version, bumped on each change, and the ``watch`` calls parked until
    it moves. Entered, it holds the state lock and bumps the version on the way out, so a
    handler that changes the state says so by the lock it takes; a parked call is answered
    outside the lock (the answer is a send)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.changed = threading.Condition(lock)  # for waits on the master's own threads
        # Opaque to clients: it starts from the clock, so that a restarted master's versions
        # are all newer than any a watcher kept from the one before.
        self.version = time.time_ns()
        self.closing = False
        self.waiting = 0  # threads waiting on ``changed`` (most changes have none to wake)
        self._parked: list[tuple[float, hg.TargetHandle]] = []  # (deadline, call)
        self._unchanged = False

    def __enter__(self) -> None:
        self.lock.acquire()
        self._unchanged = False

    def __exit__(self, *exc: object) -> None:
        try:
            parked = [] if self._unchanged else self.bump()
        finally:
            self.lock.release()
        self.answer(parked)

    def unchanged(self) -> None:
        """Inside ``with``: the handler changed nothing after all (a refusal), so the version
        stays and no watcher wakes for nothing."""
        self._unchanged = True

    def bump(self) -> list[tuple[float, hg.TargetHandle]]:
        """Count a change (the lock held); return the parked calls to answer after."""
        self.version += 1
        if self.waiting:
            self.changed.notify_all()
        parked, self._parked = self._parked, []
        return parked

    def park(self, handle: hg.TargetHandle, since: int, deadline: float) -> bool:
        """Park ``handle`` until the version moves from ``since`` or ``deadline`` passes
        (the lock held); False if it has moved already or the master is closing."""
        if self.version != since or self.closing:
            return False
        self._parked.append((deadline, handle))
        return True

    def full(self) -> bool:
        return len(self._parked) >= MAX_PARKED

    def expire(self, now: float) -> list[tuple[float, hg.TargetHandle]]:
        """The parked calls whose deadline has passed (the lock held)."""
        if not self._parked:
            return []
        due = [w for w in self._parked if w[0] <= now]
        if due:
            self._parked = [w for w in self._parked if w[0] > now]
        return due

    def answer(self, parked: list[tuple[float, hg.TargetHandle]]) -> None:
        version = self.version  # a newer one than some saw moved is as good an answer
        for _, handle in parked:
            try:
                handle.respond(version)
            except Exception as exc:  # a caller gone is its own business, not the master's
                log.info("watch: answering %s failed: %s", handle.source, exc)

    def watch(self, handle: hg.TargetHandle, now: float) -> Callable[[], None] | None:
        """Serve ``watch(since, timeout)`` (the lock held): park the call, or return how to
        answer it once the lock is let go (the version; -1, which the client reports as too
        many watches; a refusal while closing, not an unchanged answer)."""
        since, timeout = handle.args
        timeout = min(max(timeout, 0.0), MAX_WATCH_S)  # NaN and below zero: no wait
        version = self.version
        if timeout > 0 and version == since:
            if self.closing:
                return partial(handle.fail, RuntimeError("the master is shutting down"))
            if self.full():
                return partial(handle.respond, -1)
            self.park(handle, since, now + timeout)  # answered by a change, or at its deadline
            return None
        return partial(handle.respond, version)
