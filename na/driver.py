"""Drivers: who runs progress, and how a caller waits. Shared by hg and bulk.

A driver needs two things from what it drives (a ``Source``): the plugin's ``poll_fd()`` and
the ``next_deadline()`` of its timers (none for a bare plugin). ``BlockingDriver`` drives
progress on the thread that waits, one thread at a time; the others wait on a condition the
driving thread signals after every pass. ``AsyncioDriver`` (na/aio_driver.py) attaches to one
event loop. Neither polls on a period of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from .interface import Plugin

_NEVER = float("inf")


class Source(Protocol):
    """What a driver drives: progress and trigger, a pollable fd and the timers' deadline."""

    def progress(self, timeout: float) -> bool: ...
    def trigger(self, max_count: int = ...) -> int: ...
    def poll_fd(self) -> int: ...
    def next_deadline(self) -> float | None: ...


class PluginSource:
    """A bare NA plugin as a ``Source``: it has no timers."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.progress = plugin.progress
        self.trigger = plugin.trigger
        self.poll_fd = plugin.poll_fd

    def next_deadline(self) -> float | None:
        return None


class BlockingDriver:
    """Blocking waits: the waiting thread drives progress, or waits for the one that does.

    ``shared()`` says whether something else (an attached event loop) may also drive the
    source without this driver's lock; a completion it runs does not end our sleep in the
    plugin's poll, so then we sleep in short slices.
    """

    def __init__(self, source: Source, clock: Callable[[], float] = time.monotonic,
                 shared: Callable[[], bool] = lambda: False) -> None:
        self.source = source
        self.clock = clock
        self.shared = shared
        self.lock = threading.Lock()
        self.owner: int | None = None  # the thread holding ``lock``
        self._cond = threading.Condition()
        self._waiters = 0

    def wait_until(self, done: Callable[[], bool], deadline: float = _NEVER,
                   expire: Callable[[], None] | None = None) -> bool:
        """Drive progress until ``done()`` or ``deadline`` (on ``clock``); at the deadline
        call ``expire`` if given. Returns ``done()``."""
        me = threading.get_ident()
        while not done():
            owner = self.owner
            if owner == me or self.lock.acquire(blocking=False):
                # Ours already (a handler calling out from serve()) or free: drive it here.
                self.owner = me
                try:
                    # Inline, not a method: this is every blocking call's path.
                    source, clock = self.source, self.clock
                    most = 0.01 if self.shared() else 1.0
                    while True:
                        left = deadline - clock()
                        if left <= 0:
                            if expire is not None:
                                expire()
                            break
                        source.progress(left if left < most else most)
                        source.trigger()
                        if self._waiters:
                            self.notify()
                        if done():
                            return True
                finally:
                    if owner != me:
                        self.owner = None
                        self.lock.release()
                    if self._waiters:
                        self.notify()
                return done()
            if deadline <= self.clock():
                if expire is not None:
                    expire()
                return done()
            with self._cond:
                self._waiters += 1
                try:
                    self._cond.wait(0.01)
                finally:
                    self._waiters -= 1
        return True

    def notify(self) -> None:
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def serve(self, stop: threading.Event) -> None:
        """Drive progress until ``stop`` is set (the serving thread owns progress)."""
        with self.lock:
            self.owner = threading.get_ident()
            try:
                source = self.source
                while not stop.is_set():
                    source.progress(0.1)
                    source.trigger()
                    if self._waiters:
                        self.notify()
                source.progress(0)  # send the answers of the last pass (shutdown's own)
            finally:
                self.owner = None
