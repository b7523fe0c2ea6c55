"""How a finished call settles the future its awaiting task waits on (``acall``).

A future wakes its task through ``loop.call_soon``: a Handle, a place in the ready queue and a
turn of the loop per call, all Python in the stdlib loop. ``settle`` in the asyncio driver's
trigger pass takes the task's wake-up off the future before settling it and hands it to the
driver, which runs it once the pass is over (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from petasus import na

from .origin import Handle


def settle(future: asyncio.Future[Any], handle: Handle,
           driver: na.AsyncioDriver | None = None) -> None:
    """Settle ``future`` with the call's outcome and wake its task: through ``driver``'s
    ``after_trigger`` when given (in its trigger pass), else through the loop.

    The future is a plain one (an exact ``asyncio.Future``): a Task takes its C fast path
    for those, in its step and its wake-up, where a subclass costs it attribute lookups and
    Python-level method calls. While one task awaits it, its one done-callback is that task's
    wake-up; taken off (``_callbacks`` is asyncio's own view of them, which its repr reads),
    settling schedules nothing, and the driver runs the wake-up itself. Any other set of
    callbacks is left to the future."""
    if future.done():
        return
    if driver is not None:
        callbacks = future._callbacks
        if callbacks is not None and len(callbacks) == 1:
            wakeup, context = callbacks[0]
            future.remove_done_callback(wakeup)
            try:
                _set(future, handle)
            except BaseException:
                future.add_done_callback(wakeup, context=context)  # a cancel still wakes it
                raise
            driver.after_trigger(wakeup, future, context)
            return
    _set(future, handle)


def _set(future: asyncio.Future[Any], handle: Handle) -> None:
    if handle.error is not None:
        future.set_exception(handle.error)
    else:
        future.set_result(handle.value)
