"""The asyncio driver: progress from one event loop. Shared by hg and bulk.

``AsyncioDriver`` attaches to one event loop: a reader on the poll fd of what it drives (a
``Source``, na/driver.py), one loop timer at the next deadline, and the spin budget as
``call_soon`` passes (so other tasks still run). It never polls on a period of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ._loop import LEAD_MAX
from .driver import Source

# The longest an event loop goes without a turn while awaited calls complete inline (in the
# awaiting task, AsyncioDriver.inline): its other fds and timers wait at most this long.
INLINE_TURN = 0.001


class AsyncioDriver:
    """Progress from one asyncio event loop, woken by the poll fd and the next deadline.

    ``keep=False`` detaches from the loop as soon as nothing awaits (a bare plugin, which may
    be closed while the loop lives on); an engine stays attached until it closes.
    """

    def __init__(self, source: Source, clock: Callable[[], float], spin: float,
                 keep: bool = True,
                 batch: tuple[Callable[..., None], Callable[[], None]] | None = None) -> None:
        """``batch``: (hold, release) of the plugin's sends (``hold_sends``,
        ``release_sends``), if it has them: a poll that completes calls holds the sends until
        the tasks it woke have run, so that their next calls leave together (a ``sendmsg``
        every few frames, not one per call)."""
        self.source = source
        self.batch = batch
        self._held: asyncio.Handle | None = None  # the scheduled release of held sends
        # detach() (from close(), on any thread) and the loop's scheduled release race for
        # the one release a hold needs.
        self._held_lock = threading.Lock()
        self.clock = clock
        self.spin = spin
        self.keep = keep
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.thread: int | None = None
        self._pending: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._spin_until = 0.0
        # When calls began to complete inline with no turn of the loop since (0: they have
        # not, or the loop turned since: ``poll`` runs from the loop, a future path waits).
        self._streak = 0.0
        self.inline_turn = INLINE_TURN
        self._awaits = 0
        self._stop: asyncio.Event | None = None
        # True while ``poll``'s trigger pass runs. A completion in it may hand the wake-up of
        # the task awaiting it to ``after_trigger`` (hg/awaited.py ``settle``), which runs it
        # when the pass is over rather than through the loop's ready queue.
        self.polling = False
        self._after: list[tuple[Callable[[Any], Any], Any, contextvars.Context]] = []

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is loop:
            return
        if self.loop is not None and not self.loop.is_closed():
            raise RuntimeError("this driver is already attached to another event loop")
        self._release()  # a previous (closed) loop may not have run its release
        self.loop = loop
        self.thread = threading.get_ident()
        self._pending = None  # handles of a previous (closed) loop are void
        self._timer = None
        loop.add_reader(self.source.poll_fd(), self.poll)
        deadline = self.source.next_deadline()
        if deadline is not None:
            self._arm(deadline)

    def detach(self) -> None:
        self._release()
        loop, self.loop = self.loop, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if loop is not None and not loop.is_closed():
            try:
                loop.remove_reader(self.source.poll_fd())
            except (ValueError, RuntimeError, OSError):
                pass

    def close(self) -> None:
        self.closed = True
        self.detach()

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the loop's thread: progress may be driven by another thread (a
        blocking call from an executor), and asyncio objects are not thread-safe."""
        if threading.get_ident() == self.thread:
            fn(*args)
        elif self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def kick(self) -> None:
        """Schedule one poll soon, unless one is already pending (never two spin chains)."""
        if self._pending is None and self.loop is not None:
            self._pending = self.loop.call_soon(self._scheduled)

    def kick_threadsafe(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.kick)

    def _scheduled(self) -> None:
        self._pending = None
        self.poll()

    def _release(self) -> None:
        with self._held_lock:
            held, self._held = self._held, None
        if held is not None:
            held.cancel()  # a no-op when it is the handle running now
            self.batch[1]()  # type: ignore[index]

    def turn_due(self) -> bool:
        """Whether calls completing inline have kept the loop from turning for ``inline_turn``
        s (see ``inline``)."""
        streak = self._streak
        return bool(streak) and time.monotonic() - streak > self.inline_turn

    async def give_turn(self) -> None:
        """Let the loop turn once (its fds, timers and ready callbacks), so that ``inline``
        may wait again: cheaper than letting a call wait through a future to the same end."""
        await asyncio.sleep(0)
        self._streak = 0.0

    def inline(self, done: Callable[[], bool]) -> bool:
        """Wait for ``done()`` here, in the calling task, if the loop has nothing else to do:
        drive progress for up to the spin budget, as ``poll`` would, but without a future, a
        task wake-up and a turn of the loop per call (~11 us on this VM, the cost that made a
        lone awaited call 0.6x a blocking one). Gives up (returns False, and the caller awaits
        as usual) as soon as progress makes other work ready for the loop, or when the budget
        runs out. A caller that waits here call after call checks ``turn_due()`` before each
        and then ``give_turn()``s, so that the loop's other file descriptors and timers wait
        no longer than ``inline_turn`` behind back-to-back calls.
        Needs the base event loop's ready queue (``_idle_but_us``); under uvloop, which has
        none, it never waits."""
        if self.closed or not self._idle_but_us():
            return done()
        self._release()  # what the woken tasks sent leaves now: this one waits for its answer
        source = self.source
        now = time.monotonic()
        end = now + self.spin
        while not done():
            left = end - time.monotonic()
            if left <= 0:
                return False
            busy = source.progress(left)
            if source.trigger() or busy:
                self._spin_until = time.monotonic() + self.spin
            if not self._idle_but_us():
                return done()
        if not self._streak:
            self._streak = now
        return True

    def poll(self) -> None:
        """Reader callback: progress without blocking, then keep polling for the spin budget
        (via call_soon, so other tasks still run) before waiting on the fd again."""
        if self.closed:
            return
        self._streak = 0.0
        source = self.source
        busy = source.progress(0)
        woke = self._trigger()
        if woke or busy:
            self._spin_until = time.monotonic() + self.spin
            loop = self.loop  # (read once: close() may detach from another thread)
            if woke and self.batch is not None and self._held is None and loop is not None:
                # The completions woke tasks. Those handed to ``after_trigger`` have run and
                # sent; others' wake-ups are queued on the loop ahead of this: hold the sends
                # of their next calls until they have all run, as a trigger pass does, which
                # flushes every few frames (_FLUSH_AT)
                # so that the peer starts on the first while the rest are made. x16, tcp:
                # 76K/s sending each at once, 86K/s held. A loop stopped before the release
                # runs leaves them held until the next progress pass, which sends what is
                # queued first (or attach, detach or close).
                self.batch[0]()
                self._held = loop.call_soon(self._release)
        else:
            left = self._spin_until - time.monotonic()
            if left > 0 and self._loop_idle():
                # Nothing else is ready to run: spin inside the source's own progress (its
                # spin yields the CPU between polls) rather than one loop iteration, with its
                # epoll_wait, per turn. Other fds and timers wait at most the spin budget.
                busy = source.progress(left)
                if self._trigger() or busy:
                    self._spin_until = time.monotonic() + self.spin
            elif left > 0:
                os.sched_yield()  # idle spin: let a peer that shares this CPU run
        if time.monotonic() < self._spin_until:
            self.kick()

    def _trigger(self) -> int:
        """The poll's trigger pass, then the wake-ups its completions handed over."""
        loop = self.loop  # the wake-ups' loop, even if the pass detaches us from it
        polling, self.polling = self.polling, True
        try:
            woke = self.source.trigger()
        finally:
            self.polling = polling
            if self._after and not polling and loop is not None:
                self._run_after(loop)
        return woke

    def after_trigger(self, fn: Callable[[Any], Any], arg: Any,
                      context: contextvars.Context) -> None:
        """Run ``fn(arg)`` in ``context`` once the poll's trigger pass is over (only while
        ``polling``): a task's wake-up, run from the loop's reader callback at the top, not
        from inside the pass (a handler's blocking call, a timer's expiry) and not through
        ``call_soon`` and a turn of the loop."""
        self._after.append((fn, arg, context))

    def _run_after(self, loop: asyncio.AbstractEventLoop) -> None:
        after, self._after = self._after, []
        # A task runs only if none is running: not in the serving task's last poll.
        direct = asyncio.current_task(loop) is None
        batch = self.batch
        if batch is not None:
            # What the woken tasks send leaves together, every few frames; the first at once
            # when they are few, as in a trigger pass (LEAD_MAX in na/_loop.py).
            batch[0](len(after) <= LEAD_MAX)
        done = 0
        try:
            for fn, arg, context in after:
                done += 1
                if direct:
                    context.run(fn, arg)
                else:
                    loop.call_soon(fn, arg, context=context)
        finally:
            for fn, arg, context in after[done:]:  # past a BaseException: none is lost
                loop.call_soon(fn, arg, context=context)
            if batch is not None:
                batch[1]()

    def _loop_idle(self) -> bool:
        """Whether the loop has no callback ready to run (the base event loop's ready queue;
        a loop without one, such as uvloop, is never taken for idle)."""
        ready = getattr(self.loop, "_ready", None)
        return ready is not None and not ready

    def _idle_but_us(self) -> bool:
        """``_loop_idle``, from a task: our own scheduled poll and release of held sends may
        be waiting their turn (the release, if any, is due: every woken task has run)."""
        ready = getattr(self.loop, "_ready", None)
        if ready is None:
            return False
        for handle in ready:
            if handle is not self._pending and handle is not self._held and \
                    not handle.cancelled():
                return False
        return True

    def deadline_armed(self, deadline: float) -> None:
        """The source armed a deadline: the attached loop must wake up for it."""
        loop = self.loop
        if loop is not None and not loop.is_closed() and not self.closed:
            self.on_loop(self._arm, deadline)

    def _arm(self, deadline: float) -> None:
        """One loop timer, at the earliest deadline."""
        loop = self.loop
        if loop is None:
            return
        delay = max(0.0, deadline - self.clock())
        current = self._timer
        if current is not None and not current.cancelled() and \
                current.when() <= loop.time() + delay:
            return
        if current is not None:
            current.cancel()
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        self.poll()
        deadline = self.source.next_deadline()
        if deadline is not None:
            self._arm(deadline)

    async def wait(self, subscribe: Callable[[Callable[[], None]], None],
                   cancel: Callable[[], None]) -> None:
        """Await a completion that ``subscribe(fn)`` reports by calling ``fn`` (on whatever
        thread drives progress); ``cancel()`` it if the awaiting task is cancelled."""
        loop = asyncio.get_running_loop()
        self.attach(loop)
        future: asyncio.Future[None] = loop.create_future()
        subscribe(lambda: self.on_loop(_resolve, future))
        self._awaits += 1
        self.kick()
        try:
            await future
        except asyncio.CancelledError:
            cancel()
            raise
        finally:
            self._awaits -= 1
            if not self._awaits and not self.keep:
                self.detach()

    async def serve(self, stopped: Callable[[], bool]) -> None:
        """Drive progress from the running loop until ``stop()`` is called."""
        loop = asyncio.get_running_loop()
        self.attach(loop)
        self._stop = asyncio.Event()
        if not stopped():
            self.kick()
            await self._stop.wait()
        self.poll()  # send the answers of the last pass (shutdown's own)

    def stop(self) -> None:
        """Make ``serve()`` return; thread-safe."""
        event = self._stop
        if event is not None:
            self.on_loop(event.set)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
