"""The future an awaited call's task waits on, and how a finished call settles it (``acall``).

A plain asyncio future wakes its task through ``loop.call_soon``; ``Awaited`` keeps the wake-up
so that the asyncio driver can run it once its trigger pass is over (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from petasus import na

from .origin import Handle


def settle(future: Awaited, handle: Handle, driver: na.AsyncioDriver | None = None) -> None:
    """Settle ``future`` with the call's outcome and wake its task: through ``driver``'s
    ``after_trigger`` when given (in its trigger pass), else through the loop."""
    if future.done():
        return
    if handle.error is not None:
        future.set_exception(handle.error)
    else:
        future.set_result(handle.value)
    wakeup = future.wakeup
    if wakeup is not None:
        context = future.context
        future.wakeup = future.context = None
        if driver is not None:
            driver.after_trigger(wakeup, future, context)
        else:
            future.get_loop().call_soon(wakeup, future, context=context)


class Awaited(asyncio.Future):  # type: ignore[type-arg]
    """The future an awaited call's task waits on, which wakes that task itself.

    A plain future wakes its task through ``loop.call_soon``: a Handle, a place in the ready
    queue and a turn of the loop per call, all Python in the stdlib loop. The task hands its
    wake-up to ``add_done_callback``; this future keeps it, and when the call completes in
    the asyncio driver's trigger pass ``settle`` hands it to the driver, which runs it once
    the pass is over, from its reader callback (no task running; the tasks' sends held and
    flushed together). Elsewhere (another task's inline wait, a blocking wait on the loop's
    thread, another thread, a cancel) it goes through ``call_soon``. Any other callback goes
    the usual way."""

    # Slots, not the future's dict (one made per call); ``acall`` sets ``wakeup`` to None
    # (no __init__ of our own: creating one stays the C constructor's).
    __slots__ = ("context", "wakeup")

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        if self.wakeup is None and not self.done():
            self.wakeup = fn
            self.context = context if context is not None else contextvars.copy_context()
        else:
            super().add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Any) -> int:
        if fn is self.wakeup and fn is not None:
            self.wakeup = None
            return 1 + super().remove_done_callback(fn)
        return super().remove_done_callback(fn)

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        wakeup, context = self.wakeup, self.context
        if wakeup is not None:
            self.wakeup = self.context = None
            self.get_loop().call_soon(wakeup, self, context=context)
        return True
