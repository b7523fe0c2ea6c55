"""The generic half of the plugins whose transport is a completion queue that progress polls
(ofi's libfabric CQ, verbs' ibv CQ): spin-then-block progress, and close.

Both loops were the same loop with different calls in it, and one of them had lost a check
the other kept (see ``progress``); written once, they cannot drift apart again. The socket
plugins drive their descriptors in ``na._loop`` instead (an adaptive spin over epoll events).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable

from .core import canceled, check_open
from .generic import PluginCore
from .types import Op


class PolledPlugin(PluginCore):
    """Adds ``progress``, ``poll_fd`` and ``close`` to ``PluginCore``. The plugin creates
    ``_poll_set``, the epoll set ``poll_fd()`` returns (its completion channel or timer, the
    wake-up eventfd, whatever else it waits on), and supplies:

    - ``_pass(now)``: poll the transport once without blocking and handle what came; how
      many events that was. Once per pass of the loop, never per completion;
    - ``_may_block(wait)``: ready the transport for a sleep of up to ``wait`` s; how long the
      loop may sleep, or None when something came in meanwhile (poll again);
    - ``_on_events(events)``: handle what woke the sleep;
    - ``_leave()``: what must happen before progress returns (default: nothing);
    - ``_pending()``: the ops the transport holds, and ``_release()``: free the transport.

    All of them run with the lock held.
    """

    _poll_set: select.epoll

    def _pass(self, now: float) -> int:
        raise NotImplementedError

    def _may_block(self, wait: float) -> float | None:
        raise NotImplementedError

    def _on_events(self, events: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    def _leave(self) -> None:
        """Before progress returns (verbs arms its CQ so that poll_fd() wakes a waiter)."""

    def _pending(self) -> Iterable[Op | None]:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def poll_fd(self) -> int:
        return self._poll_set.fileno()

    def progress(self, timeout: float = 0.0) -> bool:
        """Drive the transport for up to ``timeout`` seconds; True once completions are ready.

        Spin, then block (DESIGN.md, Performance): after any event the loop polls without
        blocking, with ``sched_yield`` between passes so that a peer on the same CPU runs,
        for ``spin_us``; then it sleeps in ``poll_fd()``'s set. It counts itself in the
        completion queue's ``polling`` before it sleeps, so that a completion posted by
        another thread writes the wake-up eventfd, and checks once more after counting: a
        completion posted between the last pass and the count wrote nothing, and would
        otherwise have slept until the timeout (verbs' loop lacked that check).
        """
        if self._closed:
            check_open(True, "progress", self)
        cqueue, lock, spin, poll = self._cq, self._lock, self._spin, self._poll_set.poll
        ops = cqueue.ops
        if ops:
            return True
        done = cqueue.completed
        now = time.monotonic()
        deadline = now + timeout
        spin_end = now + spin
        while True:
            with lock:
                if self._closed:
                    return bool(ops)
                got = self._pass(now)
                now = time.monotonic()
                if ops or cqueue.completed != done or now >= deadline:
                    self._leave()
                    return bool(ops) or cqueue.completed != done
            if got:
                spin_end = now + spin
            if now < spin_end:
                os.sched_yield()
                continue
            with lock:
                if self._closed:
                    return False
                wait = self._may_block(deadline - now)
            if wait is None:
                continue
            cqueue.polling += 1  # a count: several threads may sleep here at once
            try:
                if ops or cqueue.completed != done:
                    continue
                events = poll(wait)
            finally:
                cqueue.polling -= 1
            if events:
                with lock:
                    if self._closed:
                        return bool(ops)
                    self._on_events(events)
            now = time.monotonic()
            spin_end = now + spin

    def close(self) -> None:
        """Close the plugin; pending operations complete as canceled (run trigger())."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reason = "the plugin was closed"
            self._matcher.close(reason)
            for op in self._pending():
                if op is not None:
                    self._cq.fail(op, canceled(op, reason))  # unless it finished already
            self._release()
