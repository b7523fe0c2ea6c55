"""The Engine: RPCs defined by decorated functions, called like methods (Thallium/Margo style).

    engine = hg.Engine("tcp://127.0.0.1:0", listen=True)

    @engine.rpc
    def sum(x: hg.int32, y: hg.int32) -> hg.int32:
        return x + y

    with hg.Engine("tcp://127.0.0.1:0") as client:
        client.declare(sum)                       # or hg.declare in a module both sides import
        print(client.lookup(engine.uri).sum(42, 23))

A call blocks (``remote.sum(1, 2)``), returns a handle to wait on later
(``remote.sum.future(1, 2)``), or is awaited (``await remote.sum.async_(1, 2)``): one core
serves all three. Handlers are plain functions (run inline on the progress thread),
``async def`` functions (tasks on the engine's asyncio loop) or ``blocking=True`` functions
(sent to a thread pool). The asyncio side waits on the NA plugin's ``poll_fd()`` with
``loop.add_reader``; no thread polls.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from petasus import na
from petasus.bulk import Bulk

from . import state as st
from .awaited import settle
from .context import MAX_OVERFLOW, Context
from .declarations import _SHUTDOWN, Declaration
from .header import rpc_id
from .origin import Handle
from .registry import RPC, Class
from .remote import Remote
from .target import TargetHandle

log = logging.getLogger("petasus.hg.engine")
_FORWARDED = st.FORWARDED
_NEVER = float("inf")
_get_ident = threading.get_ident
_Future = asyncio.Future  # exact: a Task awaiting one takes its C fast path (hg/awaited.py)


class Engine:
    """An NA plugin, an RPC class and context, and the friendly API over them."""

    def __init__(self, uri: str = "tcp://127.0.0.1:0", listen: bool = False, *,
                 timeout: float = 30.0, pool_size: int = 4, allow_remote_shutdown: bool = False,
                 max_overflow: int = MAX_OVERFLOW, max_overflow_per_peer: int | None = None,
                 overflow_timeout: float = 60.0,
                 bulk_peers: Iterable[str] | Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic, **na_options: Any) -> None:
        """``max_overflow``: bytes all overflowing calls being pulled may hold at once;
        ``max_overflow_per_peer`` the part of it one peer may hold (default a quarter,
        ``overflow.share``); ``overflow_timeout``: seconds a pull may land nothing before it
        is given up (a stall timeout, not a total), and that exposed results wait for their
        acknowledgement. ``bulk_peers``: the third parties that bulk handles received in
        calls and results may name as their owner (URIs, or a predicate on the URI); by
        default a handle is used only with the peer that sent it."""
        self.na = na.initialize(uri, listen=listen, **na_options)
        self.hg = Class(self.na, listen)
        self.context = Context(self.hg, clock=clock, max_overflow=max_overflow,
                               max_overflow_per_peer=max_overflow_per_peer,
                               overflow_timeout=overflow_timeout, bulk_peers=bulk_peers)
        spin = self.na.statistics().get("spin_us", 200) / 1e6
        hold = getattr(self.na, "hold_sends", None)
        release = getattr(self.na, "release_sends", None)
        self._aio = na.AsyncioDriver(self.context, clock, spin, batch=(
            (hold, release) if hold is not None and release is not None else None))
        self.context.timer_hook = self._aio.deadline_armed
        # An attached loop also drives progress, without the blocking driver's lock.
        self._driver = self.context.driver
        self._driver.shared = lambda: self._aio.loop is not None
        self.timeout = timeout
        self._declared: dict[str, Declaration] = {}
        self._async_ids: set[int] = set()
        self._pool_size = pool_size
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._closed = False
        self._inflight = 0
        self._awaiting = 0  # calls awaited through a future (acall's slow path)
        self._wake_awaited = self._wake  # one bound method, not one per awaited call
        self._inflight_lock = threading.Lock()
        if listen and allow_remote_shutdown:
            self.register(_SHUTDOWN, self.shutdown)

    # -- identity, context manager ----------------------------------------------------------------
    @property
    def uri(self) -> str:
        return self.na.addr_self().uri

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.hg.rpcs)} RPCs"
        return f"<Engine {self.uri} {state}>"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # (An __init__ that failed left _closed unset here, and None where compiled.)
        if getattr(self, "_closed", True) is False:
            warnings.warn(f"{self!r} was not closed", ResourceWarning, stacklevel=2)

    def statistics(self) -> dict[str, Any]:
        landing = self.context.landing
        return {**self.context.stats, "inflight_handlers": self._inflight,
                "overflow_held": landing.held, "overflow_landings": landing.landings,
                "overflow_pinned": landing.pinned,
                "overflow_kept": landing.pool.held, "overflow_reused": landing.pool.reused,
                "overflow_peers": landing.by_uri(),
                "overflow_exposed": self.context.exposed.held, "na": self.na.statistics()}

    @property
    def rma_ordered(self) -> bool:
        """Whether pulls from one peer read its memory in the order they started, each after
        the pushes started before it (``na.Plugin.rma_ordered``): then a read that validates
        another may start at once behind it instead of after it completes, a round trip
        sooner."""
        return bool(getattr(self.na, "rma_ordered", False))

    def bulk(self, buffers: Any, access: na.Access, *, eager: bool | None = None) -> Bulk:
        """Expose ``buffers`` (one buffer or a list) for transfers driven by this engine."""
        return Bulk(self, buffers, access, eager=eager)

    # -- defining RPCs ----------------------------------------------------------------------------
    def rpc(self, func: Any = None, *, name: str | None = None, one_way: bool = False,
            provider_id: int = 0, blocking: bool = False) -> Any:
        """Decorator: declare an RPC from the function's annotations and serve it here."""
        def wrap(f: Any) -> Declaration:
            decl = f if isinstance(f, Declaration) else Declaration(f, name=name,
                                                                     one_way=one_way)
            self.register(decl, decl.func, provider_id=provider_id, blocking=blocking)
            return decl
        return wrap(func) if func is not None else wrap

    def declare(self, *items: Declaration | ModuleType | Iterable[Declaration]) -> None:
        """Make declared RPCs callable as ``remote.<name>``: declarations or modules of them."""
        for item in items:
            if isinstance(item, Declaration):
                self._declared[item.name] = item
            elif isinstance(item, ModuleType):
                for value in vars(item).values():
                    if isinstance(value, Declaration):
                        self._declared[value.name] = value
            else:
                self.declare(*item)

    def register(self, decl: Declaration, impl: Callable[..., Any], *, provider_id: int = 0,
                 blocking: bool = False) -> RPC:
        """Serve ``decl`` with ``impl`` for ``provider_id``."""
        self._declared.setdefault(decl.name, decl)
        rpc = RPC(decl.name, decl.in_proc, decl.out_proc, one_way=decl.one_way,
                  provider_id=provider_id)
        if inspect.iscoroutinefunction(impl):
            rpc.handler = lambda handle: self._run_async(handle, impl)
            self._async_ids.add(rpc.id)
        elif blocking:
            rpc.handler = lambda handle: self._run_pooled(handle, impl)
        else:
            rpc.impl = impl
        return self.hg.register(rpc)

    def _rpc_for(self, decl: Declaration, provider_id: int) -> RPC:
        rpc = self.hg.rpcs.get(rpc_id(decl.name, provider_id))
        if rpc is None or rpc.name != decl.name:
            rpc = RPC(decl.name, decl.in_proc, decl.out_proc, one_way=decl.one_way,
                      provider_id=provider_id)
        return rpc

    # -- calling ----------------------------------------------------------------------------------
    def lookup(self, uri: str, provider_id: int = 0) -> Remote:
        return Remote(self, self.na.addr_lookup(uri), provider_id)

    def forward(self, addr: na.Addr, rpc: RPC, args: tuple[Any, ...],
                timeout: float | None = None,
                callback: Callable[[Handle], Any] | None = None) -> Handle:
        return Handle(self.context, addr, rpc).forward(args, callback, timeout or self.timeout)

    def wait(self, handle: Handle) -> Any:
        """Drive progress (or let the thread that does) until ``handle`` finishes, enforcing
        its deadline here for calls forwarded without a context timer."""
        if handle.state == _FORWARDED:
            self._driver.wait_until(lambda: handle.state != _FORWARDED,
                                    handle.deadline or _NEVER, handle.expire)
        if handle.error is not None:
            raise handle.error
        return handle.value

    def wait_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Drive progress until ``done()`` or ``timeout`` (default: the engine's) has passed;
        return ``done()``. Bulk transfers wait through this."""
        if done():
            return True
        limit = self.timeout if timeout is None else timeout
        return self._driver.wait_until(
            done, _NEVER if limit is None else self.context.clock() + limit)

    async def wait_async(self, subscribe: Callable[[Callable[[], None]], None],
                         cancel: Callable[[], None]) -> None:
        """Await a completion that ``subscribe(fn)`` reports by calling ``fn`` (on whatever
        thread drives progress); ``cancel()`` it if the awaiting task is cancelled."""
        await self._aio.wait(subscribe, cancel)

    def call(self, addr: na.Addr, rpc: RPC, args: tuple[Any, ...],
             timeout: float | None = None) -> Any:
        return self.wait(self.forward(addr, rpc, args, timeout))

    async def acall(self, addr: na.Addr, rpc: RPC, args: tuple[Any, ...],
                    timeout: float | None = None) -> Any:
        aio = self._aio
        loop = aio.loop
        if loop is None or getattr(loop, "_thread_id", None) != _get_ident():
            # (One loop runs per thread at a time: when the attached one runs on this thread,
            # as a stdlib loop's ``_thread_id`` tells, it is this task's, and 3.11's
            # get_running_loop, a getpid() per call, is not needed.)
            loop = asyncio.get_running_loop()
            if loop is not aio.loop:
                aio.attach(loop)
        if not self._awaiting and aio.turn_due():
            # Lone calls answered inline one after another still let the loop turn (its other
            # fds, timers and callbacks) every ``inline_turn``; before sending, so that a
            # cancellation here leaves nothing behind.
            await aio.give_turn()
        handle = Handle(self.context, addr, rpc).forward(args, None, timeout or self.timeout,
                                                         arm=False)
        if not self._awaiting and aio.inline(lambda: handle.state != _FORWARDED):
            # A lone call, answered while the loop had nothing else to do: no future, no
            # timer. (With other calls awaited, waiting here for this one measured slower:
            # x16 went from 10.6K/s to 9.1K/s, and the server's CPU per call up by a quarter.)
            if handle.error is not None:
                raise handle.error
            return handle.value
        future = handle.waiter = _Future(loop=loop)
        handle.callback = self._wake_awaited
        if handle.state != _FORWARDED:
            settle(future, handle)  # finished by another thread driving progress meanwhile
        else:
            if handle.deadline:
                # Its deadline reaches the loop's timer through the context's timer hook.
                self.context.timers.arm(handle, handle.deadline, handle.timeout)
            aio.kick()
        self._awaiting += 1
        try:
            return await future
        except asyncio.CancelledError:
            handle.cancel()  # the task was cancelled: so is the call
            raise
        finally:
            self._awaiting -= 1

    def _wake(self, handle: Handle) -> None:
        """Settle the future of a call awaited through one (``acall``): run from trigger(),
        on the loop's thread or on one driving a blocking wait. One method, not a closure per
        call."""
        future = handle.waiter
        loop = future.get_loop()
        aio = self._aio
        if aio.polling and loop is aio.loop and _get_ident() == aio.thread:
            # In the driver's trigger pass, on this (running) loop: the task wakes once the
            # pass is over, from the driver, not through the loop's ready queue.
            settle(future, handle, aio)
        elif loop.is_closed():
            return  # its loop is gone, and nobody awaits it any more
        elif _get_ident() != aio.thread or loop is not aio.loop:
            loop.call_soon_threadsafe(settle, future, handle)
        else:
            settle(future, handle)

    async def serve_async(self) -> None:
        """Serve until ``shutdown()``, as a task of the running loop."""
        await self._aio.serve(self._stop.is_set)

    # -- handlers that answer later ---------------------------------------------------------------
    def _enter(self) -> None:
        with self._inflight_lock:
            self._inflight += 1

    def _leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def _run_async(self, handle: TargetHandle, impl: Callable[..., Any]) -> None:
        loop = self._aio.loop
        if loop is None:
            raise RuntimeError(f"{handle.rpc.name} is an async handler: serve with "
                               "serve_async() or serve() (which runs an event loop)")
        self._enter()

        async def run() -> None:
            try:
                _answer(handle, await _outcome(impl(*handle.args)))
            finally:
                self._leave()
                self._aio.kick()
        self._aio.on_loop(loop.create_task, run())

    def _run_pooled(self, handle: TargetHandle, impl: Callable[..., Any]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix="petasus-handler")
        self._enter()

        def run() -> None:
            try:
                _answer(handle, _call(impl, handle.args))
            finally:
                self._leave()
                # An attached loop waits on the fd, not in NA's poll: wake it to flush.
                self._aio.kick_threadsafe()
        self._pool.submit(run)

    # -- serving and shutting down ----------------------------------------------------------------
    def serve(self, *, handle_signals: bool = True) -> None:
        """Serve until ``shutdown()`` (or SIGINT/SIGTERM when ``handle_signals``)."""
        self._check_open()
        previous = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: self.shutdown())
        try:
            if any(rpc.id in self._async_ids for rpc in self.hg.rpcs.values()):
                asyncio.run(self.serve_async())
            else:
                self._driver.serve(self._stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def shutdown(self) -> None:
        """Make ``serve()`` return (thread-safe; also the remote shutdown RPC's handler)."""
        self._stop.set()
        self._aio.stop()

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for handlers still running, then release everything."""
        if self._closed:
            return
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            loop = self._aio.loop
            if loop is not None and loop.is_running():
                break  # the loop's own tasks finish with it
            self.context.progress(0.01)
            self.context.trigger()
        if self._inflight:
            log.warning("%r: closing with %d handlers still running", self, self._inflight)
        self._closed = True
        self.context.closing = True  # requests still queued are dropped, not run
        try:
            self._aio.close()
            self.na.close()
            self.na.trigger()
            self.context.landing.close()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")


def _call(impl: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """(True, value) or (False, the exception): a handler's outcome, to answer with."""
    try:
        return True, impl(*args)
    except Exception as exc:
        return False, exc


async def _outcome(pending: Any) -> tuple[bool, Any]:
    try:
        return True, await pending
    except Exception as exc:
        return False, exc


def _answer(handle: TargetHandle, outcome: tuple[bool, Any]) -> None:
    ok, value = outcome
    if ok:
        handle.respond(value)
    else:
        handle.fail(value)
