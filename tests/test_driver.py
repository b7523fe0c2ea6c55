"""The drivers (na/driver.py, na/aio_driver.py) against a fake source: no sockets, a fake clock,
an eventfd."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time

import pytest
from conftest import TIMEOUT, Spec, receive

from petasus import na
from petasus.na._loop import LEAD_MAX


class FakeSource:
    """Progress that completes ``ready`` work items, a pollable eventfd, timers on a clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.deadline: float | None = None
        self.progressed = 0
        self.triggered = 0
        self.ready = 0
        self.done = 0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def progress(self, timeout: float) -> bool:
        self.progressed += 1
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        if not self.ready:
            self.slept.append(timeout)
            self.now += timeout  # sleeping moves the fake clock, as time would
        return bool(self.ready)

    def trigger(self, max_count: int = 1 << 30) -> int:
        n, self.ready = self.ready, 0
        self.done += n
        self.triggered += 1
        return n

    def poll_fd(self) -> int:
        return self.fd

    def next_deadline(self) -> float | None:
        return self.deadline

    def close(self) -> None:
        os.close(self.fd)


def test_blocking_wait_returns_when_done_and_expires_at_the_deadline() -> None:
    source = FakeSource()
    driver = na.BlockingDriver(source, source.clock)
    source.ready = 1
    assert driver.wait_until(lambda: source.done == 1, 10.0)
    expired: list[float] = []
    assert not driver.wait_until(lambda: False, 5.0, lambda: expired.append(source.now))
    assert expired == [5.0]  # expired once, at its deadline on the source's clock
    assert max(source.slept) <= 1.0  # bounded slices, each ending at an event or the deadline
    source.close()


def test_a_second_thread_waits_for_the_driving_one() -> None:
    source = FakeSource()
    driver = na.BlockingDriver(source, source.clock)
    gate = threading.Event()
    results: list[bool] = []
    with driver.lock:  # another thread is driving
        driver.owner = -1
        waiter = threading.Thread(target=lambda: results.append(
            driver.wait_until(gate.is_set, float("inf"))))
        waiter.start()
        gate.set()
        driver.notify()
        waiter.join(10.0)
    driver.owner = None
    assert results == [True] and source.progressed == 0  # it never drove progress itself
    source.close()


def test_the_asyncio_driver_wakes_on_the_fd_and_at_the_next_deadline() -> None:
    source = FakeSource()
    driver = na.AsyncioDriver(source, source.clock, spin=0.0, keep=False)

    async def main() -> None:
        finished = asyncio.Event()

        def subscribe(fn: object) -> None:
            source.ready = 1
            os.eventfd_write(source.fd, 1)  # the fd becomes readable: the loop polls
            loop = asyncio.get_running_loop()
            loop.call_later(0.01, fn)  # type: ignore[arg-type]
            finished.set()

        await asyncio.wait_for(driver.wait(subscribe, lambda: None), 10.0)
        assert finished.is_set() and source.done == 1
        assert driver.loop is None  # keep=False: detached once nothing awaits
        # A deadline armed while attached wakes the loop at that time, with no fd event.
        driver.attach(asyncio.get_running_loop())
        polls = source.progressed
        source.now = 100.0
        source.deadline = 100.02
        driver.deadline_armed(100.02)
        await asyncio.sleep(0.2)
        assert source.progressed > polls
        driver.detach()
        # And the poll fd alone wakes it: no timer, no kick.
        source.deadline = None
        driver.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        polls = source.progressed
        os.eventfd_write(source.fd, 1)
        await asyncio.sleep(0.05)
        assert source.progressed == polls + 1  # one reader callback, which drained the fd
        driver.detach()

    asyncio.run(main())
    source.close()


def test_asyncio_serve_returns_on_stop_from_another_thread() -> None:
    source = FakeSource()
    driver = na.AsyncioDriver(source, source.clock, spin=0.0)
    stopped = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: threading.Thread(
            target=lambda: (stopped.set(), driver.stop())).start())
        await asyncio.wait_for(driver.serve(stopped.is_set), 10.0)

    asyncio.run(main())
    assert stopped.is_set()
    driver.close()
    source.close()


def test_inline_waits_in_the_task_only_while_the_loop_has_nothing_else_to_do() -> None:
    source = FakeSource()
    driver = na.AsyncioDriver(source, source.clock, spin=10.0)
    driver.inline_turn = 1e9  # what this test looks at is the ready queue, not the time

    async def main() -> None:
        loop = asyncio.get_running_loop()
        driver.attach(loop)
        driver.poll()  # a turn of the loop
        source.ready = 1
        assert driver.inline(lambda: source.done == 1)  # driven here, no future
        # Another callback is ready: the caller awaits as usual, and nothing is driven here.
        loop.call_soon(lambda: None)
        polls = source.progressed
        source.ready = 1
        assert not driver.inline(lambda: source.done == 2)
        assert source.progressed == polls
        await asyncio.sleep(0)  # the loop runs it
        # Our own scheduled poll waiting its turn is no other work.
        driver.kick()
        assert driver.inline(lambda: source.done == 2)
        # Progress that makes work ready for the loop ends the wait at once.
        def progress(timeout: float) -> bool:
            loop.call_soon(lambda: None)  # as a completion that wakes another task would
            return False
        source.progress = progress  # type: ignore[method-assign]
        assert not driver.inline(lambda: source.done == 3)
        driver.detach()

    asyncio.run(main())
    source.close()


def test_back_to_back_inline_waits_give_the_loop_a_turn_every_inline_turn() -> None:
    source = FakeSource()
    driver = na.AsyncioDriver(source, source.clock, spin=10.0)

    async def main() -> None:
        driver.attach(asyncio.get_running_loop())
        driver.inline_turn = 60.0
        assert not driver.turn_due()  # no inline wait yet
        source.ready = 1
        assert driver.inline(lambda: source.done == 1)
        assert not driver.turn_due()  # one inline wait: well within the minute
        driver._streak = time.monotonic() - 120.0  # as if inline for two minutes on end
        assert driver.turn_due()
        ran = []
        asyncio.get_running_loop().call_soon(ran.append, "other work")
        await driver.give_turn()
        assert ran == ["other work"] and not driver.turn_due()
        # A poll run by the loop (a turn of it) ends a streak as well.
        source.ready = 1
        assert driver.inline(lambda: source.done == 2)
        driver._streak = time.monotonic() - 120.0
        driver.poll()
        assert not driver.turn_due()
        driver.detach()

    asyncio.run(main())
    source.close()


def test_inline_never_waits_on_a_loop_without_a_ready_queue() -> None:
    source = FakeSource()
    driver = na.AsyncioDriver(source, source.clock, spin=10.0)
    driver.inline_turn = 1e9

    class Opaque:
        """A loop whose ready queue cannot be seen (uvloop's is in C)."""

    async def main() -> None:
        driver.attach(asyncio.get_running_loop())
        driver.poll()
        real, driver.loop = driver.loop, Opaque()  # type: ignore[assignment]
        source.ready = 1
        assert not driver.inline(lambda: source.done == 1)
        assert source.done == 0
        driver.loop = real
        driver.detach()

    asyncio.run(main())
    source.close()


class Batch:
    """A plugin's hold_sends/release_sends, counted."""

    def __init__(self) -> None:
        self.held = 0
        self.releases = 0
        self.leads: list[bool] = []

    def hold(self, lead: bool = False) -> None:
        self.held += 1
        self.leads.append(lead)

    def release(self) -> None:
        self.held -= 1
        self.releases += 1


def test_a_poll_that_wakes_tasks_holds_sends_until_they_have_run() -> None:
    source = FakeSource()
    batch = Batch()
    driver = na.AsyncioDriver(source, source.clock, spin=0.0, batch=(batch.hold, batch.release))
    seen: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        driver.attach(loop)
        driver.poll()  # nothing completed: nothing held
        assert batch.held == 0
        woken = loop.create_future()
        original = source.trigger

        def trigger(max_count: int = 1 << 30) -> int:
            n = original(max_count)
            if n and not woken.done():
                woken.set_result(None)  # a completion wakes a task, as hg.awaited.settle does
            return n
        source.trigger = trigger  # type: ignore[method-assign]

        async def task() -> None:
            await woken
            seen.append(batch.held)  # the woken task runs (and sends) while held

        waiting = asyncio.ensure_future(task())
        await asyncio.sleep(0)
        source.ready = 1
        driver.poll()
        assert batch.held == 1
        await waiting
        await asyncio.sleep(0)
        assert seen == [1] and batch.held == 0 and batch.releases == 1
        # A task about to wait inline releases what the woken tasks sent at once (here the
        # woken task is the caller itself: only our release waits its turn on the loop).
        source.ready = 1
        driver.poll()
        assert batch.held == 1 and batch.releases == 1
        driver.inline_turn = 1e9
        assert driver.inline(lambda: True)
        assert batch.held == 0 and batch.releases == 2
        await asyncio.sleep(0)  # the scheduled release, cancelled, releases nothing more
        assert batch.releases == 2
        # Held when the loop goes away: detaching releases.
        source.ready = 1
        source.trigger = original  # type: ignore[method-assign]
        driver.poll()
        assert batch.held == 1
        driver.detach()
        assert batch.held == 0

    asyncio.run(main())
    source.close()


def test_wake_ups_handed_over_in_a_pass_run_after_it_even_if_the_pass_detaches() -> None:
    """``after_trigger`` (an awaited call's task wake-up, hg/awaited.py ``settle``): run once
    the pass is over, not inside it, with the sends held (the first at once when they are
    few), on the loop the pass began on even when the pass detached the driver from it."""
    source = FakeSource()
    batch = Batch()
    driver = na.AsyncioDriver(source, source.clock, spin=0.0, batch=(batch.hold, batch.release))
    order: list[object] = []
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="outside")

    async def main() -> None:
        driver.attach(asyncio.get_running_loop())
        original = source.trigger
        context = contextvars.copy_context()
        context.run(var.set, "the task's")

        def wake(arg: str) -> None:
            order.append((arg, driver.polling, batch.held, var.get()))

        def trigger(max_count: int = 1 << 30) -> int:
            n = original(max_count)
            assert driver.polling
            for name in ("first", "second"):
                driver.after_trigger(wake, name, context)
            order.append("pass over")
            driver.detach()  # as an engine closed by a completion callback would
            return n
        source.trigger = trigger  # type: ignore[method-assign]
        source.ready = 1
        loop = asyncio.get_running_loop()
        ran = loop.create_future()
        loop.call_soon(lambda: (driver.poll(), ran.set_result(None)))  # a reader callback
        await ran
        assert order == ["pass over", ("first", False, 1, "the task's"),
                         ("second", False, 1, "the task's")]
        assert batch.held == 0 and batch.leads == [True]
        # Polled from a task (the serving task's last poll), they go through the loop.
        del order[:]
        source.trigger = original  # type: ignore[method-assign]
        driver.attach(loop)
        driver.polling = True
        driver.after_trigger(wake, "queued", context)
        driver.polling = False
        driver._run_after(loop)
        assert order == []
        await asyncio.sleep(0)
        assert order == [("queued", False, 0, "the task's")]

    asyncio.run(main())
    source.close()


def test_held_sends_leave_together_at_release(socket_spec: Spec) -> None:
    spec = socket_spec
    with na.initialize(spec.uri, listen=True, **spec.options) as server, \
            na.initialize(spec.uri, **spec.options) as client:
        addr = client.addr_lookup(server.addr_self().uri)
        na.wait(client, client.msg_send_unexpected(addr, b"\x00", 0), timeout=TIMEOUT)  # connected
        client.hold_sends()
        sends = [client.msg_send_unexpected(addr, bytes([i]), i) for i in range(1, 4)]
        client.trigger()
        assert not any(op.done for op in sends)  # still ours: not handed to the kernel
        client.release_sends()
        for op in sends:
            na.wait(client, op, timeout=TIMEOUT)
        assert receive(server, 4, 4) == [(i, bytes([i])) for i in range(4)]


@pytest.mark.parametrize("completions", [1, LEAD_MAX + 1])
def test_a_small_trigger_pass_sends_its_first_message_at_once(socket_spec: Spec,
                                                               completions: int) -> None:
    """A pass of a few completions hands its first send to the kernel at once (so that the
    peer starts on it while the pass goes on) and holds the rest to its end; a larger pass
    holds them all."""
    spec = socket_spec
    with na.initialize(spec.uri, listen=True, **spec.options) as server, \
            na.initialize(spec.uri, **spec.options) as client:
        addr = client.addr_lookup(server.addr_self().uri)
        na.wait(client, client.msg_send_unexpected(addr, b"\x00", 0), timeout=TIMEOUT)
        seen: list[list[bool]] = []
        sends: list[na.Op] = []

        def sent(_op: na.Op) -> None:
            if seen:
                return
            ops = [client.msg_send_unexpected(addr, bytes([i]), i) for i in range(1, 4)]
            sends.extend(ops)
            seen.append([op.done for op in ops])

        first = [client.msg_send_unexpected(addr, b"\x00", 0, sent) for _ in range(completions)]
        deadline = time.monotonic() + TIMEOUT
        while len(client._cq.ops) < completions:  # completed, not yet triggered
            assert time.monotonic() < deadline, "the sends did not complete"
            client.progress(0.01)
        client.trigger()
        assert seen == [[completions <= LEAD_MAX, False, False]]
        for op in first + sends:
            na.wait(client, op, timeout=TIMEOUT)
        got = receive(server, 1 + completions + 3, 4)
        assert got[-3:] == [(i, bytes([i])) for i in range(1, 4)]
