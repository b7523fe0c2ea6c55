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
import os
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


class Engine:
    """An NA plugin, an RPC class and context, and the friendly API over them."""

    def __init__(self, uri: str = "tcp://127.0.0.1:0", listen: bool = False, *,
                 timeout: float = 30.0, pool_size: int = 4, allow_remote_shutdown: bool = False,
                 max_overflow: int = MAX_OVERFLOW, overflow_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, **na_options: Any) -> None:
        self.na = na.initialize(uri, listen=listen, **na_options)
        self.hg = Class(self.na, listen)
        self.context = Context(self.hg, clock=clock, max_overflow=max_overflow,
                               overflow_timeout=overflow_timeout)
        self.context.timer_hook = self._timer_armed
        self.timeout = timeout
        self._declared: dict[str, Declaration] = {}
        self._async_ids: set[int] = set()
        self._pool_size = pool_size
        self._pool: ThreadPoolExecutor | None = None
        self._progress_lock = threading.Lock()
        self._progress_owner: int | None = None  # thread id holding _progress_lock
        self._cond = threading.Condition()
        self._waiters = 0
        self._stop = threading.Event()
        self._closed = False
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._poll_pending: asyncio.Handle | None = None
        self._loop_timer: asyncio.TimerHandle | None = None
        self._spin_until = 0.0
        self._spin = self.na.statistics().get("spin_us", 200) / 1e6
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
        if not getattr(self, "_closed", True):
            warnings.warn(f"{self!r} was not closed", ResourceWarning, stacklevel=2)

    def statistics(self) -> dict[str, Any]:
        return {**self.context.stats, "inflight_handlers": self._inflight,
                "na": self.na.statistics()}

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
            self._block(lambda: handle.state != _FORWARDED, handle.deadline or _NEVER,
                        handle.expire)
        if handle.error is not None:
            raise handle.error
        return handle.value

    def wait_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Drive progress until ``done()`` or ``timeout`` (default: the engine's) has passed;
        return ``done()``. Bulk transfers wait through this."""
        if not done():
            limit = self.timeout if timeout is None else timeout
            self._block(done, _NEVER if limit is None else self.context.clock() + limit, None)
        return done()

    async def wait_async(self, subscribe: Callable[[Callable[[], None]], None],
                         cancel: Callable[[], None]) -> None:
        """Await a completion that ``subscribe(fn)`` reports by calling ``fn`` (on whatever
        thread drives progress); ``cancel()`` it if the awaiting task is cancelled."""
        loop = asyncio.get_running_loop()
        self._attach(loop)
        future: asyncio.Future[None] = loop.create_future()
        subscribe(lambda: self._on_loop(_resolve, future))
        self._kick()
        try:
            await future
        except asyncio.CancelledError:
            cancel()
            raise

    def _block(self, done: Callable[[], bool], deadline: float,
               expire: Callable[[], None] | None) -> None:
        me = threading.get_ident()
        clock = self.context.clock
        while not done():
            if self._progress_owner == me or self._progress_lock.acquire(blocking=False):
                # Ours already (a handler calling out from serve()) or free: drive it here.
                nested = self._progress_owner == me
                self._progress_owner = me
                try:
                    self._drive(done, deadline, expire)
                finally:
                    if not nested:
                        self._progress_owner = None
                        self._progress_lock.release()
                if self._waiters:
                    with self._cond:
                        self._cond.notify_all()
                if not done():
                    return  # the deadline passed
            else:
                if deadline <= clock():
                    if expire is not None:
                        expire()
                    return
                with self._cond:
                    self._waiters += 1
                    try:
                        self._cond.wait(0.01)
                    finally:
                        self._waiters -= 1

    def _drive(self, done: Callable[[], bool], deadline: float,
               expire: Callable[[], None] | None) -> None:
        ctx = self.context
        clock = ctx.clock
        # An attached event loop also drives progress (without this lock) and may run our
        # completion: then our epoll sleep would not end with it, so sleep in short slices.
        most = 0.01 if self._loop is not None else 1.0
        while not done():
            left = deadline - clock()
            if left <= 0:
                if expire is not None:
                    expire()
                return
            ctx.progress(left if left < most else most)
            ctx.trigger()
            if self._waiters:
                with self._cond:
                    self._cond.notify_all()

    def call(self, addr: na.Addr, rpc: RPC, args: tuple[Any, ...],
             timeout: float | None = None) -> Any:
        return self.wait(self.forward(addr, rpc, args, timeout))

    async def acall(self, addr: na.Addr, rpc: RPC, args: tuple[Any, ...],
                    timeout: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        self._attach(loop)
        future = loop.create_future()
        # Its deadline reaches the loop's timer through the context's timer hook.
        handle = self.forward(addr, rpc, args, timeout,
                              lambda h: self._on_loop(_settle, future, h))
        self._kick()
        try:
            return await future
        except asyncio.CancelledError:
            handle.cancel()  # the task was cancelled: so is the call
            raise

    def _arm_loop_timer(self, deadline: float) -> None:
        """One loop timer, at the earliest deadline, lets the context expire calls on time."""
        current = self._loop_timer
        if current is not None and current.when() <= self._loop.time() + (  # type: ignore[union-attr]
                deadline - self.context.clock()) and not current.cancelled():
            return
        if current is not None:
            current.cancel()
        delay = max(0.0, deadline - self.context.clock())
        self._loop_timer = self._loop.call_later(delay, self._on_loop_timer)  # type: ignore[union-attr]

    def _timer_armed(self, deadline: float) -> None:
        """The context armed a deadline (an overflow's): an attached loop must wake for it."""
        loop = self._loop
        if loop is not None and not loop.is_closed() and not self._closed:
            self._on_loop(self._arm_loop_timer, deadline)

    def _on_loop_timer(self) -> None:
        self._loop_timer = None
        if self._closed:
            return
        self._poll()
        deadline = self.context.next_deadline()
        if deadline is not None and self._loop is not None:
            self._arm_loop_timer(deadline)

    # -- asyncio driver ---------------------------------------------------------------------------
    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError(f"{self!r} is already attached to another event loop")
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._poll_pending = None  # handles of a previous (closed) loop are void
        self._loop_timer = None
        loop.add_reader(self.na.poll_fd(), self._poll)
        deadline = self.context.next_deadline()
        if deadline is not None:
            self._arm_loop_timer(deadline)

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the loop's thread: progress may be driven by another thread (a
        blocking call from an executor), and asyncio objects are not thread-safe."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]

    def _kick(self) -> None:
        """Schedule one poll soon, unless one is already pending (never two spin chains)."""
        if self._poll_pending is None and self._loop is not None:
            self._poll_pending = self._loop.call_soon(self._scheduled_poll)

    def _scheduled_poll(self) -> None:
        self._poll_pending = None
        self._poll()

    def _poll(self) -> None:
        """Reader callback: progress without blocking, then keep polling for the spin budget
        (via call_soon, so other tasks still run) before waiting on the fd again."""
        if self._closed:
            return
        ctx = self.context
        busy = ctx.progress(0)
        if ctx.trigger() or busy:
            self._spin_until = time.monotonic() + self._spin
        elif time.monotonic() < self._spin_until:
            # Idle spin: let a peer that shares this CPU run, as NA's own spin does.
            os.sched_yield()
        if time.monotonic() < self._spin_until:
            self._kick()

    async def serve_async(self) -> None:
        """Serve until ``shutdown()``, as a task of the running loop."""
        loop = asyncio.get_running_loop()
        self._attach(loop)
        self._kick()
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        self._poll()  # send the answers of the last pass (shutdown's own)

    # -- handlers that answer later ---------------------------------------------------------------
    def _enter(self) -> None:
        with self._inflight_lock:
            self._inflight += 1

    def _leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def _run_async(self, handle: TargetHandle, impl: Callable[..., Any]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{handle.rpc.name} is an async handler: serve with "
                               "serve_async() or serve() (which runs an event loop)")
        self._enter()

        async def run() -> None:
            try:
                value = await impl(*handle.args)
            except Exception as exc:
                handle.fail(exc)
            else:
                handle.respond(value)
            finally:
                self._leave()
                self._kick()
        self._on_loop(loop.create_task, run())

    def _run_pooled(self, handle: TargetHandle, impl: Callable[..., Any]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix="petasus-handler")
        self._enter()

        def run() -> None:
            try:
                value = impl(*handle.args)
            except Exception as exc:
                handle.fail(exc)
            else:
                handle.respond(value)
            finally:
                self._leave()
                loop = self._loop
                if loop is not None and not loop.is_closed():
                    # The loop waits on the fd, not in NA's poll: wake it to flush the answer.
                    loop.call_soon_threadsafe(self._kick)
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
                with self._progress_lock:
                    self._progress_owner = threading.get_ident()
                    try:
                        ctx = self.context
                        while not self._stop.is_set():
                            ctx.progress(0.1)
                            ctx.trigger()
                            if self._waiters:
                                with self._cond:
                                    self._cond.notify_all()
                        ctx.progress(0)  # send the answers of the last pass (shutdown's own)
                    finally:
                        self._progress_owner = None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def shutdown(self) -> None:
        """Make ``serve()`` return (thread-safe; also the remote shutdown RPC's handler)."""
        self._stop.set()

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for handlers still running, then release everything."""
        if self._closed:
            return
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            if self._loop is not None and self._loop.is_running():
                break  # the loop's own tasks finish with it
            self.context.progress(0.01)
            self.context.trigger()
        if self._inflight:
            log.warning("%r: closing with %d handlers still running", self, self._inflight)
        self._closed = True
        self.context.closing = True  # requests still queued are dropped, not run
        try:
            if self._loop_timer is not None:
                self._loop_timer.cancel()
                self._loop_timer = None
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_reader(self.na.poll_fd())
                except (ValueError, RuntimeError):
                    pass
            self.na.close()
            self.na.trigger()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle(future: asyncio.Future[Any], handle: Handle) -> None:
    if future.done():
        return
    if handle.error is not None:
        future.set_exception(handle.error)
    else:
        future.set_result(handle.value)
