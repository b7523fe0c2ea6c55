"""The low-level API (Class / Context / Handle) and time-dependent behaviour on a fake clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import TIMEOUT, Spec

from petasus import hg, na
from petasus.hg import state as st
from petasus.hg.procs import proc_for, record


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pair(spec: Spec) -> Iterator[tuple[hg.Context, hg.Context, FakeClock]]:
    clock = FakeClock()
    server_na = na.initialize(spec.uri, listen=True, **spec.options)
    client_na = na.initialize(spec.uri, **spec.options)
    server = hg.Context(hg.Class(server_na, True))
    client = hg.Context(hg.Class(client_na, False), clock=clock)
    yield server, client, clock
    client_na.close()
    server_na.close()


def drive(*contexts: hg.Context, until: object, seconds: float = TIMEOUT) -> None:
    """Round-robin progress without blocking (one context must not sleep while the other
    has work), bounded by wall time."""
    import time

    deadline = time.monotonic() + seconds
    while not until():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not reached in {seconds} s")
        for ctx in contexts:
            ctx.progress(0)
            ctx.trigger()


SUM_IN = record("sum.in", [proc_for(hg.int32), proc_for(hg.int32)], tuple, tuple)


def test_low_level_forward_respond_later(pair: tuple[hg.Context, hg.Context, FakeClock]) -> None:
    """Mercury's model: the handler gets a handle and responds when it pleases."""
    server, client, _clock = pair
    pending: list[hg.TargetHandle] = []
    server.hg.register(hg.RPC("sum", SUM_IN, proc_for(hg.int32), handler=pending.append))
    rpc = hg.RPC("sum", SUM_IN, proc_for(hg.int32))
    addr = client.na.addr_lookup(server.na.addr_self().uri)
    done: list[hg.Handle] = []
    handle = client.create(addr, rpc).forward((40, 2), done.append, timeout=None)
    drive(server, client, until=lambda: pending)
    target = pending[0]
    assert target.input == (40, 2) and target.source.uri == client.na.addr_self().uri
    target.respond(sum(target.input))
    with pytest.raises(st.StateError, match=r"respond.*responded"):
        target.respond(0)
    drive(server, client, until=lambda: done)
    assert done == [handle] and handle.result() == 42
    # A handle can be forwarded again once it has finished.
    handle.forward((1, 1), done.append, timeout=None)
    drive(server, client, until=lambda: pending[1:])
    pending[1].respond(2)
    drive(server, client, until=lambda: len(done) == 2)
    assert handle.value == 2


def test_timeout_on_a_fake_clock(pair: tuple[hg.Context, hg.Context, FakeClock]) -> None:
    server, client, clock = pair
    server.hg.register(hg.RPC("hold", SUM_IN, proc_for(hg.int32), handler=lambda h: None))
    rpc = hg.RPC("hold", SUM_IN, proc_for(hg.int32))
    addr = client.na.addr_lookup(server.na.addr_self().uri)
    handle = client.create(addr, rpc).forward((1, 2), timeout=30.0)
    drive(server, client, until=lambda: server.stats["received"] == 1)
    client.progress(0)
    assert handle.state == st.FORWARDED  # 30 s have not passed on the injected clock
    clock.now += 29.9
    client.progress(0)
    assert handle.state == st.FORWARDED
    clock.now += 0.2
    client.progress(0)
    assert handle.state == st.TIMED_OUT
    with pytest.raises(hg.RPCTimeout, match="30 s"):
        handle.result()
    assert client.stats["timeouts"] == 1


def test_timer_heap_stays_bounded(pair: tuple[hg.Context, hg.Context, FakeClock]) -> None:
    server, client, _clock = pair
    server.hg.register(hg.RPC("sum", SUM_IN, proc_for(hg.int32), impl=lambda x, y: x + y))
    rpc = hg.RPC("sum", SUM_IN, proc_for(hg.int32))
    addr = client.na.addr_lookup(server.na.addr_self().uri)
    for i in range(4200):
        handle = client.create(addr, rpc).forward((i, 1), timeout=3600.0)
        drive(client, server, until=lambda h=handle: h.done)
    assert len(client.timers) <= 4097


def test_state_table_rejects_illegal_events() -> None:
    with pytest.raises(st.StateError, match=r"event 'response' is not allowed in state 'created'"):
        st.next_state(st.ORIGIN, "origin", st.CREATED, "response")
    assert st.next_state(st.ORIGIN, "origin", st.TIMED_OUT, "response") is None  # late: ignored
    assert st.next_state(st.ORIGIN, "origin", st.COMPLETED, "forward") == st.FORWARDED


def test_register_rejects_hash_collisions_and_deregisters(
        pair: tuple[hg.Context, hg.Context, FakeClock]) -> None:
    server, _client, _clock = pair
    rpc = server.hg.register(hg.RPC("a", SUM_IN, proc_for(hg.int32), impl=lambda x, y: 0))
    impostor = hg.RPC("b", SUM_IN, proc_for(hg.int32))
    impostor.id = rpc.id
    with pytest.raises(ValueError, match="same RPC id"):
        server.hg.register(impostor)
    assert server.hg.registered("a")
    server.hg.deregister("a")
    assert not server.hg.registered("a")
    with pytest.raises(KeyError, match="no RPC"):
        server.hg.deregister("a")


def test_remote_shutdown(spec: Spec) -> None:
    import threading

    server = hg.Engine(spec.uri, listen=True, allow_remote_shutdown=True, **spec.options)
    thread = threading.Thread(target=server.serve, kwargs={"handle_signals": False})
    thread.start()
    with hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as client:
        client.lookup(server.uri).shutdown()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    server.close()


def test_close_waits_for_running_handlers(spec: Spec) -> None:
    import threading

    release = threading.Event()
    finished: list[int] = []

    def slow(x: int) -> int:
        release.wait(TIMEOUT)
        finished.append(x)
        return x

    server = hg.Engine(spec.uri, listen=True, **spec.options)
    decl = hg.declare(slow)
    server.register(decl, slow, blocking=True)
    thread = threading.Thread(target=server.serve, kwargs={"handle_signals": False})
    thread.start()
    with hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as client:
        client.declare(decl)
        handle = client.lookup(server.uri).slow.future(7)
        assert client.wait_until(lambda: server.statistics()["inflight_handlers"] == 1,
                                 TIMEOUT)
        server.shutdown()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        # The handler is released only once close() is waiting for it (its first progress
        # pass), so close() returning with the handler finished proves that it waited.
        waiting = server.context.progress

        def progress(timeout: float = 0.0) -> bool:
            release.set()
            return waiting(timeout)

        server.context.progress = progress  # type: ignore[method-assign]
        assert finished == []
        server.close(timeout=TIMEOUT)
        assert finished == [7]
        assert client.wait(handle) == 7  # and its answer still went out
