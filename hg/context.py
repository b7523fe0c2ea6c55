"""``Context``: progress, trigger, timers and the target's posted receives for one ``Class``
(Mercury's hg_context). The origin side is ``origin.Handle``, the target side ``target.Target``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from petasus import na

from .origin import Handle
from .overflow import Budget, Landing
from .registry import RPC, Class
from .target import Target
from .timers import Deadline, Timers

POSTED_REQUESTS = 64  # receives a listening context keeps posted: requests in flight per target
# The bytes all overflowing inputs and outputs being pulled may hold at once (Mercury takes
# the size from the peer uncapped); Engine(max_overflow=...) changes it.
MAX_OVERFLOW = 1 << 30


def allow_owners(peers: Iterable[str] | Callable[[str], bool] | None,
                 ) -> Callable[[str], bool] | None:
    """``Engine(bulk_peers=...)`` as a predicate on a handle's owner URI: None (the default)
    lets handles reach only the peer that sent them; a list names the third parties they may
    reach as well (as URIs, exactly as their owners serialize themselves); a function decides."""
    if peers is None or callable(peers):
        return peers
    if isinstance(peers, str):
        raise TypeError("bulk_peers: expected a list of URIs or a predicate, not one string")
    allowed = frozenset(peers)
    return allowed.__contains__


class Context:
    """Progress, trigger and timers for the handles of one Class (Mercury's hg_context)."""

    def __init__(self, hg: Class, *, clock: Callable[[], float] = time.monotonic,
                 posted: int = POSTED_REQUESTS, max_overflow: int = MAX_OVERFLOW,
                 max_overflow_per_peer: int | None = None, overflow_timeout: float = 60.0,
                 bulk_peers: Iterable[str] | Callable[[str], bool] | None = None) -> None:
        self.hg = hg
        self.na = hg.na
        self.clock = clock
        self.max_overflow = max_overflow
        self.landing = Landing(max_overflow, max_overflow_per_peer)
        # Results exposed and not yet pulled: the same limits, their own account.
        self.exposed = Budget(max_overflow, max_overflow_per_peer)
        # How long a pull may land nothing, and how long exposed memory waits for its ack.
        self.overflow_timeout = overflow_timeout
        self.bulk_allow = allow_owners(bulk_peers)
        self.timers = Timers()
        self.max_unexpected = self.na.msg_get_max_unexpected_size()
        self.max_expected = self.na.msg_get_max_expected_size()
        self._tags = itertools.count(1)
        self._bufs: list[memoryview] = []  # response buffers, reused across calls
        self.closing = False  # set by the owner before it closes the plugin
        self.stats = dict.fromkeys(("sent", "received", "errors", "timeouts", "canceled",
                                    "remote_errors", "handler_errors", "overflows",
                                    "overflow_timeouts", "overflow_bytes"), 0)
        self.target = Target(self)
        self.driver = na.BlockingDriver(self, clock)  # every blocking wait goes through it
        if hg.listening:
            for _ in range(posted):
                self.na.msg_recv_unexpected(bytearray(self.max_unexpected),
                                            self.target.on_request)

    @property
    def timer_hook(self) -> Callable[[float], Any] | None:
        """Told of each armed deadline (an event loop driving progress must wake for it)."""
        return self.timers.hook

    @timer_hook.setter
    def timer_hook(self, hook: Callable[[float], Any] | None) -> None:
        self.timers.hook = hook

    def poll_fd(self) -> int:
        return self.na.poll_fd()

    def next_deadline(self) -> float | None:
        """When progress must next run to expire a call or an overflow, if ever."""
        return self.timers.next_deadline()

    # -- driving ---------------------------------------------------------------------------------
    def progress(self, timeout: float = 0.0) -> bool:
        """Move bytes for up to ``timeout`` s and expire timed-out calls; True if work is ready."""
        timers = self.timers
        deadline = timers.next_deadline()
        if deadline is None:
            return self.na.progress(timeout)
        now = self.clock()
        if deadline > now:
            ready = self.na.progress(min(timeout, deadline - now))
            # The deadline read before, not read again (a lock and a scan of the lanes on
            # every poll of an asyncio loop): one armed meanwhile for sooner has told the
            # driver through the timer hook, and is expired by the next pass.
            now = self.clock()
            if deadline > now:
                return ready
        timers.expire(now)
        return True

    def trigger(self, max_count: int = 1 << 30) -> int:
        return self.na.trigger(max_count)

    def create(self, addr: na.Addr, rpc: RPC) -> Handle:
        return Handle(self, addr, rpc)

    def _arm(self, entry: Handle | Deadline, deadline: float, span: float | None = None) -> None:
        self.timers.arm(entry, deadline, span)

    def _take_buffer(self) -> memoryview:
        bufs = self._bufs
        return bufs.pop() if bufs else memoryview(bytearray(self.max_expected))
