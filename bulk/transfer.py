"""One transfer in flight: its NA operations, its completion, and how a caller waits for it.

A transfer completes when every piece has; the first failure cancels the rest, so a transfer
to a dead peer ends at once instead of piece by piece. Completion callbacks run from the NA
``trigger()``, on whichever thread drives progress.

Waiting goes through a *driver*: the RPC Engine is one (it owns progress, its lock and its
event loop); ``PluginDriver`` drives a bare NA plugin for programs that use bulk without RPCs.
Both are built on NA's ``BlockingDriver`` (``na/driver.py``) and ``AsyncioDriver``
(``na/aio_driver.py``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator
from typing import Any, Protocol

from petasus import na

log = logging.getLogger("petasus.bulk")


class Driver(Protocol):
    """What bulk needs from whoever drives the NA plugin's progress."""

    na: na.Plugin
    timeout: float

    def wait_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool: ...

    async def wait_async(self, subscribe: Callable[[Callable[[], None]], None],
                         cancel: Callable[[], None]) -> None: ...


class PluginDriver:
    """Progress for a bare NA plugin, through NA's blocking and asyncio drivers.

    It holds its plugin weakly: one driver per plugin is kept for as long as the plugin
    lives (``driver_for``), so every handle of a plugin awaited from one event loop shares
    one reader on its poll fd.
    """

    def __init__(self, plugin: na.Plugin, timeout: float = 30.0) -> None:
        self._plugin = weakref.ref(plugin)
        self.timeout = timeout
        source = na.PluginSource(_WeakPlugin(self._plugin))  # type: ignore[arg-type]
        self._blocking = na.BlockingDriver(source)
        self._aio = na.AsyncioDriver(source, time.monotonic, 0.0, keep=False)

    @property
    def na(self) -> na.Plugin:
        plugin = self._plugin()
        if plugin is None:
            raise RuntimeError("the NA plugin of this driver is gone")
        return plugin

    def wait_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        limit = self.timeout if timeout is None else timeout
        return self._blocking.wait_until(done, time.monotonic() + limit)

    async def wait_async(self, subscribe: Callable[[Callable[[], None]], None],
                         cancel: Callable[[], None]) -> None:
        await self._aio.wait(subscribe, cancel)


class _WeakPlugin:
    """The plugin operations a driver calls, through a weak reference."""

    def __init__(self, ref: weakref.ref[na.Plugin]) -> None:
        self._ref = ref

    def _get(self) -> na.Plugin:
        plugin = self._ref()
        if plugin is None:
            raise RuntimeError("the NA plugin of this driver is gone")
        return plugin

    def progress(self, timeout: float) -> bool:
        return self._get().progress(timeout)

    def trigger(self, max_count: int = 1 << 30) -> int:
        return self._get().trigger(max_count)

    def poll_fd(self) -> int:
        return self._get().poll_fd()


_DRIVERS: weakref.WeakKeyDictionary[Any, PluginDriver] = weakref.WeakKeyDictionary()


def driver_for(owner: Any) -> Driver:
    """An engine drives its own plugin; a bare NA plugin gets its one PluginDriver."""
    if hasattr(owner, "wait_until") and hasattr(owner, "na"):
        return owner  # type: ignore[no-any-return]
    driver = _DRIVERS.get(owner)
    if driver is None:
        driver = _DRIVERS[owner] = PluginDriver(owner)
    return driver


def _fresh(error: BaseException) -> BaseException:
    """A copy of a transfer's error to raise, so that the one the transfer keeps never
    carries a traceback: raised, it would hold the frames that waited (and the buffers in
    them), and those frames the transfer, in a cycle only the garbage collector breaks."""
    cls = type(error)
    try:
        dup = cls.__new__(cls, *error.args)  # as it was, without running its __init__ again
        dup.args = error.args
        dup.__dict__.update(getattr(error, "__dict__", {}))
    except Exception:  # an exception type that cannot be rebuilt: raise it as it is
        return error
    dup.__cause__ = error.__cause__
    return dup


class Transfer:
    """A pull or push in flight. Wait with ``wait()``, ``await``, or a callback."""

    __slots__ = ("__weakref__", "_callbacks", "_driver", "_keep", "_lock", "_ops", "done",
                 "error", "op", "peer", "remaining", "size")

    def __init__(self, op: str, peer: str | None, size: int, driver: Driver,
                 keep: Any = None) -> None:
        self.op = op
        self.peer = peer
        self.size = size
        self.done = False
        self.error: BaseException | None = None
        self.remaining = 0
        self._ops: list[na.Op] = []
        self._callbacks: list[Callable[[Transfer], Any]] = []
        self._driver = driver
        self._keep = keep  # what must stay alive while bytes move (registrations, buffers)
        self._lock = threading.Lock()  # completion vs. a callback added from another thread

    def __repr__(self) -> str:
        status = "done" if self.done else f"{self.remaining} pieces pending"
        if self.error is not None:
            status = f"failed: {self.error}"
        peer = f" with {self.peer}" if self.peer else ""
        return f"<Transfer {self.op} {self.size} B{peer} {status}>"

    # -- driven by the bulk handle and NA --------------------------------------------------------
    def _track(self, op: na.Op) -> None:
        self._ops.append(op)

    def _on_op(self, op: na.Op) -> None:
        self.remaining -= 1
        if op.error is not None and self.error is None:
            self._set_error(op.error)
            self.cancel()  # the rest would only finish later, or fail the same way
        if self.remaining == 0:
            self._complete()

    def _set_error(self, err: BaseException) -> None:
        cause = getattr(err, "cause", str(err))
        self.error = (type(err)(self.op, self.peer, cause) if isinstance(err, na.NAError)
                      else err)
        if self.error is not err:
            self.error.__cause__ = err

    def _fail(self, err: BaseException, unposted: int) -> None:
        """Posting a piece failed: the ``unposted`` ones never start, the posted ones are
        canceled, and the transfer completes failed once they have."""
        if self.error is None:
            self._set_error(err)
        self.remaining -= unposted
        self.cancel()
        if self.remaining == 0:
            self._complete()

    def _complete(self) -> None:
        with self._lock:
            self.done = True
            self._keep = None
            self._ops = []
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a user's callback must not take the progress loop down
                log.exception("%r: a completion callback raised", self)

    # -- public -----------------------------------------------------------------------------------
    def add_done_callback(self, fn: Callable[[Transfer], Any]) -> None:
        """Run ``fn(transfer)`` when the transfer completes (at once if it already has)."""
        with self._lock:
            if not self.done:
                self._callbacks.append(fn)
                return
        fn(self)

    def cancel(self) -> None:
        """Stop the pieces still moving; the transfer then completes with ``Canceled``."""
        plugin = self._driver.na
        for op in self._ops:
            if not op.done:
                plugin.cancel(op)

    def wait(self, timeout: float | None = None) -> Transfer:
        """Block until the transfer completes; raise its error. On timeout, cancel it (its
        memory is then no longer written) and raise ``TimeoutError``."""
        if not self.done:
            driver = self._driver
            if not driver.wait_until(lambda: self.done, timeout):
                self.cancel()
                driver.wait_until(lambda: self.done, 5.0)
                limit = driver.timeout if timeout is None else timeout
                raise TimeoutError(f"{self.op}{' with ' + self.peer if self.peer else ''}: "
                                   f"{self.size} B not transferred within {limit:g} s "
                                   "(canceled)")
        if self.error is not None:
            raise _fresh(self.error)
        return self

    result = wait

    def __await__(self) -> Generator[Any, None, Transfer]:
        if not self.done:
            yield from self._driver.wait_async(self._subscribe, self.cancel).__await__()
        if self.error is not None:
            raise _fresh(self.error)
        return self

    def _subscribe(self, fn: Callable[[], None]) -> None:
        self.add_done_callback(lambda _t: fn())
