"""The event loop of the socket plugins: one epoll set, the wake-up eventfd, spin then block.

The epoll fd is the plugin's ``poll_fd()``. Spinning (non-blocking polls with
``sched_yield()`` between them, so a peer on the same CPU still runs) for ``spin_us`` after any
event before blocking: on the measured VM a blocking wake-up costs ~70 us and a polled round
trip ~6 us (DESIGN.md, Performance approach).
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
from collections.abc import Callable

from ._conn import EPOLLIN, Outbox
from ._spin import SpinPolicy
from ._timerfd import TimerFd
from .core import CompletionQueue

# A trigger pass with at most this many completions sends its first message at once (``hold``).
# tcp, calls kept in flight from completion callbacks (bench/rpc.py, three alternations): 2 in
# flight 53K -> 66K/s, 4: 69K -> 74K, 8 and 16 unchanged; sending the first at once in every
# pass cost 8% at 16 in flight, where the passes are larger and hold the sends to good effect.
LEAD_MAX = int(os.environ.get("PETASUS_LEAD_MAX", "4"))
FIRST_SAMPLE = 16
FIRST_WEIGHT = 1 / 8


class EventLoop:
    """File descriptors and their handlers; ``progress`` drives them."""

    def __init__(self, cq: CompletionQueue, outbox: Outbox, lock: threading.Lock,
                 spin: float) -> None:
        self.cq = cq
        self.outbox = outbox
        self.lock = lock
        self.spin = spin  # the configured limit; ``policy`` holds the budget of the moment
        self.policy = SpinPolicy(spin)
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        # A wake-up means work the plugin keeps outside the fds (sm's queued copies, a
        # completion posted by another thread): progress returns so its caller sees it.
        self.woken = False
        # The plugin's timer (connection deadlines): a timerfd in the epoll set, so that
        # whatever waits on poll_fd() wakes for it and progress pays nothing per pass.
        # ``on_timer(now)`` runs when it fires and returns when it is next due.
        self.on_timer: Callable[[float], float] | None = None
        self.timer = TimerFd()
        self.closed = False
        # How often a spinning wait's first poll found events (an average, FIRST_WEIGHT per
        # sample), and the waits counted, every FIRST_SAMPLE-th a sample: ``progress``.
        self.first_hits = 1.0
        self.waits = 0
        self.add(cq.wake_fd, EPOLLIN, self._on_wake)
        self.add(self.timer.fd, EPOLLIN, self._on_timer)

    def _on_wake(self, _ev: int) -> None:
        self.cq.drain_wake()
        self.woken = True

    def fileno(self) -> int:
        return self.ep.fileno()

    def add(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.ep.modify(fd, mask)

    def remove(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.closed = True
        self.ep.close()
        self.timer.close()

    def progress(self, timeout: float) -> bool:
        """Move bytes for up to ``timeout`` seconds; True once it sent what was queued or
        completions are ready to trigger."""
        cq, outbox, lock = self.cq, self.outbox, self.lock
        ops, dirty = cq.ops, outbox.dirty
        if dirty:
            # Sending what callers queued is progress: return, so that a caller driving
            # several plugins (or waiting for the answer) gets on with it.
            with lock:
                outbox.flush_dirty()
            return True
        if ops:
            return True
        done = cq.completed
        poll, dispatch, policy = self.ep.poll, self._dispatch, self.policy
        now = time.monotonic()
        deadline = now + timeout
        spin_end = now + policy.budget
        # When this pass last found nothing to do (0: busy; -1: idle, but it spun first), and
        # whether it is spinning now: what the spin policy learns from.
        idle = 0.0
        spinning = False
        # A wait that will spin yields before its first poll when first polls have mostly
        # missed of late: then a peer on this CPU cannot answer what we just sent until we let
        # it run, and that poll is a syscall that can only miss (both ends pinned to one CPU,
        # tcp, one call in flight: 31.0K -> 33.2K calls/s). Where first polls find events
        # (calls in flight, a busy server) they stay first: a yield there would delay what is
        # ready, by a time slice if another task or thread wants the CPU. Every FIRST_SAMPLE-th
        # wait polls first anyway, to keep measuring.
        sample = False
        if timeout > 0 and spin_end > now:
            waits = self.waits = self.waits + 1
            if self.first_hits < 0.5 and waits % FIRST_SAMPLE:
                idle, spinning = now, True
                os.sched_yield()
            else:
                sample = True
        while True:
            if dirty:
                with lock:
                    outbox.flush_dirty()
            if ops or cq.completed != done:
                return True
            events = poll(0)
            if sample:
                # (A sample taken while yielding first is one in FIRST_SAMPLE: it counts more,
                # so that calls in flight again stop the yields within a few samples.)
                sample = False
                hits = self.first_hits
                self.first_hits = hits + ((1.0 if events else 0.0) - hits) * (
                    FIRST_WEIGHT if hits >= 0.5 else 0.5)
            if events:
                if spinning:
                    policy.caught(time.monotonic() - idle)
                    spinning = False
                idle = 0.0
                dispatch(events)
                if ops or cq.completed != done or self.woken:
                    self.woken = False
                    return True
                now = time.monotonic()
                if now >= deadline:
                    # Busy with work that completes nothing here: still bounded. What the
                    # dispatch queued (an RMA refusal, a chunk served) leaves before we return.
                    if dirty:
                        with lock:
                            outbox.flush_dirty()
                        return True
                    return False
                spin_end = now + policy.budget
                continue
            now = time.monotonic()
            if now >= deadline:
                return False
            if now < spin_end:
                if not spinning:
                    idle, spinning = now, True
                os.sched_yield()
                continue
            if spinning:
                policy.missed()
                spinning = False
                idle = -1.0  # this wait spun first: it says nothing about blocking
            elif not idle:
                idle = now
            cq.polling += 1  # a count: several threads may sleep here at once
            try:
                if ops or dirty or cq.completed != done:
                    continue
                events = poll(deadline - now)
            finally:
                cq.polling -= 1
            if events:
                if idle > 0:
                    policy.woke(time.monotonic() - idle)
                idle = 0.0
                dispatch(events)
                if ops or cq.completed != done or self.woken:
                    self.woken = False
                    return True
                spin_end = time.monotonic() + policy.budget

    def hold(self, lead: bool = False) -> None:
        """Queue sends until ``release()``, as during a trigger pass: what a batch of asyncio
        tasks sends in one turn of their loop leaves in a few ``sendmsg`` (every ``_FLUSH_AT``
        items, na/_conn.py) instead of one per message (na/aio_driver.py).

        ``lead``: the pass's first message leaves at once, the rest at its end. Holding them
        all makes a few calls in flight run in lock step: the peer idles while we finish the
        pass, then we idle while it answers the lot (see ``LEAD_MAX``)."""
        outbox = self.outbox
        if lead and not outbox.in_pass:
            outbox.lead = True
        outbox.in_pass += 1

    def release(self) -> None:
        outbox = self.outbox
        outbox.in_pass -= 1
        outbox.lead = False
        if outbox.dirty and not outbox.in_pass and not self.closed:
            with self.lock:
                outbox.flush_dirty()

    def arm(self, at: float) -> None:
        """Run the plugin's timer at ``at`` if that is sooner than it is armed for."""
        if at < self.timer.at and not self.closed:
            self.timer.arm(at)

    def _on_timer(self, _ev: int) -> None:
        # Runs in _dispatch, under the plugin's lock.
        self.timer.clear()
        self.timer.at = math.inf
        now = time.monotonic()
        if self.on_timer is not None:
            self.arm(self.on_timer(now))

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        handlers, outbox = self.handlers, self.outbox
        with self.lock:
            if self.closed:
                # Closed by another thread while this one slept in poll: the events name
                # descriptors that are closed now (or already reused).
                return
            outbox.in_pass += 1
            try:
                for fd, ev in events:
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler(ev)
            finally:
                outbox.in_pass -= 1
