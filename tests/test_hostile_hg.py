"""Issue 11 at the RPC and bulk layers: what a peer names or declares in a call cannot make a
server connect to a third party, hold everyone's overflow budget, stall its progress thread,
or keep memory alive after a failed pull. Each test attacks, then shows a good client served.

The hostile peers are bare NA plugins driven by the test thread: one that stops calling
``progress`` never serves the pull of the input it declared (on tcp and on sm's copy path,
where the owner's loop answers each read), which is how a stalled peer looks to the server.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import mmap
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest
from conftest import SPECS, TIMEOUT, Spec, pump
from served import wait_served
from test_hg_core import FakeClock

from petasus import bulk, hg, na
from petasus.bulk import stream
from petasus.hg import header as hd

MiB = 1 << 20
SOCKETS = SPECS[:4]  # tcp, tcp6, sm (process_vm), sm (copy)
_ids = {"ids": lambda s: s.id if isinstance(s, Spec) else None}


@hg.declare
def add(x: hg.int32, y: hg.int32) -> hg.int32: ...


@hg.declare
def take(data: bytes) -> hg.uint64: ...


@hg.declare
def pull_digest(data: bulk.Bulk) -> bytes: ...


@hg.declare
def hand_on() -> bulk.Bulk: ...


def _stalls(spec: Spec) -> bool:
    """Whether a peer that stops progressing stalls the pull of its memory: not with
    process_vm, where the server reads the peer's memory itself."""
    return spec.options.get("rma") != "process_vm"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


@contextlib.contextmanager
def serving(engine: hg.Engine) -> Iterator[hg.Engine]:
    thread = threading.Thread(target=engine.serve, kwargs={"handle_signals": False},
                              daemon=True)
    thread.start()
    try:
        yield engine
    finally:
        engine.shutdown()
        thread.join(TIMEOUT)
        engine.close()
    assert not thread.is_alive(), "serve() did not return after shutdown"


def _server(spec: Spec, **options: object) -> hg.Engine:
    engine = hg.Engine(spec.uri, listen=True, timeout=TIMEOUT, **options, **spec.options)
    engine.register(add, lambda x, y: x + y)
    engine.register(take, len)

    def digest(data: bulk.RemoteBulk) -> bytes:
        with engine.bulk(bytearray(data.size), bulk.WRITE_ONLY) as local:
            local.pull_from(data).wait(TIMEOUT)
            return hashlib.sha256(local.views[0]).digest()

    engine.register(pull_digest, digest, blocking=True)
    return engine


class Hostile:
    """A bare plugin that sends hand-made overflow requests: "the input of ``take`` is in
    this handle", the handle as big as it likes, over memory nobody touches."""

    def __init__(self, spec: Spec, server_uri: str,
                 drive: Callable[[], object] | None = None) -> None:
        self.na = na.initialize(spec.uri, **spec.options)
        self.addr = self.na.addr_lookup(server_uri)
        self.regions: list[tuple[mmap.mmap, na.MemHandle]] = []
        self.tags = iter(range(1, 1 << 20))
        # A first exchange sets the connection up: from then on the peer can send without
        # progressing (and stall what it declared by not progressing).
        tag = next(self.tags)
        hello = self.na.msg_recv_expected(self.addr, bytearray(4096), tag)
        self.na.msg_send_unexpected(self.addr, hd.encode_request(hd.rpc_id("nothing")), tag)
        if drive is None:  # the server serves on a thread of its own
            na.wait(self.na, hello, timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not hello.done:  # or the test drives it: ``drive()`` is one pass of the server
            assert time.monotonic() < deadline, "the server never answered the first exchange"
            drive()  # type: ignore[misc]
            self.na.progress(0)
            self.na.trigger()

    def handle(self, size: int) -> bytes:
        from petasus.bulk import layout

        memory = mmap.mmap(-1, size)  # untouched: declaring 1 GiB costs the peer nothing
        key = self.na.mem_register(memory, na.Access.READ_ONLY)
        self.regions.append((memory, key))
        owner = self.na.addr_serialize(self.na.addr_self())
        return layout.encode(layout.Wire(int(na.Access.READ_ONLY), owner, (size,),
                                         (self.na.mem_handle_serialize(key),)))

    def declare(self, wire: bytes) -> tuple[na.Op, bytearray]:
        """Send the request; return the receive its answer lands in (progress to get it)."""
        tag = next(self.tags)
        reply = bytearray(self.na.msg_get_max_expected_size())
        recv = self.na.msg_recv_expected(self.addr, reply, tag)
        request = hd.REQUEST.pack(hd.IDENTIFIER, hd.PROTOCOL, hd.rpc_id(take.name),
                                  hd.MORE_DATA, 0) + wire
        self.na.msg_send_unexpected(self.addr, request, tag)
        return recv, reply

    def answer(self, recv: na.Op, reply: bytearray) -> tuple[int, bytes]:
        na.wait(self.na, recv, timeout=TIMEOUT)
        recv.result()
        return reply[2], bytes(reply[: recv.size])

    def close(self) -> None:
        for _memory, key in self.regions:
            with contextlib.suppress(ValueError, RuntimeError):
                self.na.mem_deregister(key)
        self.na.close()
        self.na.trigger()
        for memory, _key in self.regions:
            memory.close()


# -- 1. a handle cannot steer where the server connects --------------------------------------------
@pytest.mark.parametrize("spec", SOCKETS, **_ids)
def test_a_handle_naming_a_third_party_is_refused(spec: Spec) -> None:
    """A client hands the server a handle it learned of, owned by a third process (the
    victim): the server's handler pulls only from the client that sent it, so the pull is
    refused naming both addresses, and the server never connects to the victim."""
    victim = hg.Engine(spec.uri, listen=True, **spec.options)
    with serving(victim), victim.bulk(bytes(MiB), bulk.READ_ONLY, eager=False) as exposed, \
            serving(_server(spec)) as server, \
            hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as client:
        stolen = bulk.RemoteBulk.from_bytes(exposed.to_bytes())
        client.declare(pull_digest, add)
        with pytest.raises(hg.RemoteError) as refused:
            client.lookup(server.uri).pull_digest(stolen)
        message = str(refused.value)
        assert "AccessError" in message and "pull_from" in message
        assert victim.uri in message and client.uri in message
        assert victim.na.statistics()["open_connections"] == 0  # nobody dialed the victim
        assert client.lookup(server.uri).add(40, 2) == 42


@pytest.mark.parametrize("spec", SOCKETS, **_ids)
def test_a_server_that_allows_a_third_party_pulls_from_it(spec: Spec) -> None:
    secret = bytes(range(256)) * 4096
    victim = hg.Engine(spec.uri, listen=True, **spec.options)
    with serving(victim), victim.bulk(secret, bulk.READ_ONLY, eager=False) as exposed, \
            serving(_server(spec, bulk_peers=[victim.uri])) as trusting, \
            hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as client:
        client.declare(pull_digest)
        handle = bulk.RemoteBulk.from_bytes(exposed.to_bytes())
        assert client.lookup(trusting.uri).pull_digest(handle) == hashlib.sha256(secret).digest()


@pytest.mark.parametrize("spec", SOCKETS, **_ids)
def test_a_result_handle_naming_a_third_party_is_refused(spec: Spec) -> None:
    """The same the other way: a server answers with a handle owned by another process; the
    client's pull goes to the server it called, or nowhere."""
    victim = hg.Engine(spec.uri, listen=True, **spec.options)
    with serving(victim), victim.bulk(bytes(MiB), bulk.READ_ONLY, eager=False) as exposed:
        stolen = bulk.RemoteBulk.from_bytes(exposed.to_bytes())
        server = _server(spec)
        server.register(hand_on, lambda: stolen)
        with serving(server), hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as client:
            client.declare(hand_on)
            handle = client.lookup(server.uri).hand_on()
            with client.bulk(bytearray(MiB), bulk.WRITE_ONLY) as local, \
                    pytest.raises(na.AccessError, match="third party") as refused:
                local.pull_from(handle).wait(TIMEOUT)
            assert victim.uri in str(refused.value) and server.uri in str(refused.value)
            assert victim.na.statistics()["open_connections"] == 0


# -- 2. one peer cannot take everyone's overflow budget --------------------------------------------
@pytest.mark.parametrize("spec", SOCKETS, **_ids)
def test_a_peer_declaring_a_huge_input_cannot_refuse_another_clients_large_call(
        spec: Spec) -> None:
    """A 64 MiB budget: a quarter of it (16 MiB) per peer. The hostile peer's claim to all of
    it is refused at once; its claim to its whole share is granted and, on the plugins where
    it can, stalled; another client's large calls are served all the same."""
    hostile = None
    with serving(_server(spec, max_overflow=64 * MiB)) as server:
        try:
            hostile = Hostile(spec, server.uri)
            ret, body = hostile.answer(*hostile.declare(hostile.handle(64 * MiB)))
            assert ret == hd.OVERFLOW and b"max_overflow_per_peer" in body
            stalled = hostile.declare(hostile.handle(16 * MiB))  # no progress from here
            if _stalls(spec):
                wait_served(server, lambda: server.statistics()["overflow_held"] == 16 * MiB,
                            "the hostile share to be held")
            with hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as good:
                good.declare(add, take)
                remote = good.lookup(server.uri)
                assert remote.add(40, 2) == 42
                assert remote.take(bytes(200_000)) == 200_000
                assert remote.take(bytes(12 * MiB)) == 12 * MiB  # most of a share of its own
                if _stalls(spec):
                    assert not stalled[0].done
                    assert server.statistics()["overflow_peers"] == {
                        hostile.na.addr_self().uri: 16 * MiB}
        finally:
            if hostile is not None:
                hostile.close()  # its pull fails at once, and gives its share back
        wait_served(server, lambda: server.statistics()["overflow_held"] == 0,
                    "the share to come back")


# -- 3. a huge declared size costs no memory and no stall ------------------------------------------
@pytest.mark.parametrize("spec", [s for s in SOCKETS if not isinstance(s, Spec) or _stalls(s)],
                         **_ids)
def test_a_huge_declared_input_takes_no_memory_while_the_server_serves(spec: Spec) -> None:
    """A peer declares 1 GiB and never sends it. The landing buffer exists (counted) but
    takes no resident memory: nothing zero-fills it on the progress thread, which meanwhile
    serves another client's calls. (The old landing, ``bytearray(size)``, wrote 1 GiB of
    zeros on the progress thread first: 0.45 s during which nobody was served.)"""
    hostile = None
    # A 4 GiB budget: its default share, a quarter, is the 1 GiB the peer declares.
    with serving(_server(spec, max_overflow=4 << 30)) as server:
        try:
            hostile = Hostile(spec, server.uri)
            wire = hostile.handle(1 << 30)
            before = _rss()
            stalled = hostile.declare(wire)
            wait_served(server, lambda: server.statistics()["overflow_held"] == 1 << 30,
                        "the pull to begin")
            with hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as good:
                good.declare(add, take)
                assert good.lookup(server.uri).add(40, 2) == 42
                assert good.lookup(server.uri).take(b"small") == 5
            grown = _rss() - before
            assert grown < 128 * MiB, f"{grown >> 20} MiB resident for an untouched landing"
            assert server.statistics()["overflow_landings"] == 1 and not stalled[0].done
        finally:
            if hostile is not None:
                hostile.close()
        wait_served(server, lambda: server.statistics()["overflow_landings"] == 0,
                    "the landing's unmap")


# -- 4. a slow input that keeps moving is not cut off ----------------------------------------------
class ChunkClock(FakeClock):
    """Fake time that moves ``step`` s each time a chunk of an overflow input lands, as the
    server reads it for that chunk: a link that delivers a chunk every ``step`` s."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step
        self.stats: dict[str, int] = {}
        self.seen = 0

    def __call__(self) -> float:
        landed = self.stats.get("overflow_bytes", 0)
        if landed > self.seen:
            self.now += self.step * ((landed - self.seen) // stream.CHUNK)
            self.seen = landed
        return self.now


@pytest.mark.parametrize("spec", SOCKETS, **_ids)
def test_an_input_that_keeps_moving_outlives_the_overflow_timeout(spec: Spec) -> None:
    """A chunk lands every 1.5 s (fake): the 12 MiB input takes 4.5 s in all, more than the
    2 s ``overflow_timeout``, which it never exceeds between two chunks; it is served (a
    total timeout would have cut it off at 2 s). Then a pull that stops moving is cut off."""
    clock = ChunkClock(1.5)
    size = 3 * stream.CHUNK
    with hg.Engine(spec.uri, listen=True, overflow_timeout=2.0, clock=clock,
                   max_overflow_per_peer=size + MiB, **spec.options) as server, \
            hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as client:
        clock.stats = server.context.stats
        server.register(take, len)
        client.declare(take)
        start = clock.now
        call = client.lookup(server.uri).take.future(bytes(size - 4), timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not call.done:
            assert time.monotonic() < deadline, "the call never finished"
            for party in (server.context, client.context):
                party.progress(0)
                party.trigger()
        assert client.wait(call) == size - 4
        assert clock.now - start == 4.5 and server.statistics()["overflow_timeouts"] == 0


# -- 5. a failed pull lets go of its memory at once ------------------------------------------------
@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _Landing(bytearray):
    """A bytearray that a weak reference can watch."""


@pytest.mark.parametrize("spec", SOCKETS, **_ids)
def test_a_failed_pull_frees_its_buffer_without_the_garbage_collector(spec: Spec) -> None:
    """The handle's registration is withdrawn before the pull, which fails. With the
    collector off, the landing buffer must go when its last user lets go of it: a stored
    exception whose traceback reaches the op (sm's process_vm path kept three failed
    256 MiB pulls, 814 MB, until the collector ran) or the waiting frame would keep it."""
    owner = hg.Engine(spec.uri, listen=True, **spec.options)  # it refuses the reads
    with _no_gc(), serving(owner), hg.Engine(spec.uri, timeout=TIMEOUT,
                                              **spec.options) as puller:
        exposed = owner.bulk(bytes(MiB), bulk.READ_ONLY, eager=False)
        gone = bulk.RemoteBulk.from_bytes(exposed.to_bytes())
        exposed.close()
        refs: list[weakref.ref[_Landing]] = []

        def handler() -> None:  # a handler's frame holds its buffer and its transfer
            landing = _Landing(16 * MiB)
            refs.append(weakref.ref(landing))
            with puller.bulk(landing, bulk.WRITE_ONLY) as local:
                transfer = local.pull_from(gone, MiB)
                transfer.wait(TIMEOUT)

        for _ in range(3):
            with pytest.raises(na.AccessError):
                handler()
            assert refs[-1]() is None, "the failed pull's buffer outlived it"


@pytest.mark.parametrize("spec", SOCKETS, **_ids)
def test_a_failed_overflow_pull_unmaps_its_landing_at_once(spec: Spec) -> None:
    """The overflow input's key is withdrawn before the server pulls it: three times the
    pull fails, the caller is told, and each landing buffer (80 MiB, above the one kept for
    reuse) is unmapped at once, with the collector off: none is left pinned by a cycle."""
    with _no_gc(), serving(_server(spec)) as server:
        hostile = Hostile(spec, server.uri)
        try:
            for _ in range(3):
                wire = hostile.handle(80 * MiB)
                memory, key = hostile.regions.pop()
                hostile.na.mem_deregister(key)
                ret, body = hostile.answer(*hostile.declare(wire))
                memory.close()
                assert ret == hd.OVERFLOW and b"could not be pulled" in body
            # The last reply goes out just before the pull's completion gives the landing
            # back; the progress pass after it unmaps what the completion still viewed.
            wait_served(server, lambda: server.statistics()["overflow_landings"] == 0, "the unmaps")
            stats = server.statistics()
            assert stats["overflow_pinned"] == 0 and stats["overflow_held"] == 0
        finally:
            hostile.close()


@pytest.mark.parametrize("spec", [s for s in SOCKETS if isinstance(s, Spec) and not _stalls(s)],
                         **_ids)
def test_a_large_sm_pull_does_not_hold_another_clients_call_until_it_ends(spec: Spec) -> None:
    """Over sm the server copies the peer's memory itself, one pass at a time; one test
    thread drives every party, so the order is the test's. A small call that arrives while a
    64 MiB input is being pulled is answered between two chunks, long before the last one:
    the old single copy of the whole input ran before the server read another message."""
    size = 64 * MiB
    with hg.Engine(spec.uri, listen=True, **spec.options) as server, \
            hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as good:
        server.register(add, lambda x, y: x + y)
        server.register(take, len)
        good.declare(add)
        remote = good.lookup(server.uri)

        warm = remote.add.future(1, 1)  # the good client's connection, set up
        pump(lambda: warm.done, server.context, good.context)
        hostile = Hostile(spec, server.uri, drive=lambda: (server.context.progress(0),
                                                           server.context.trigger()))
        try:
            hostile.declare(hostile.handle(size))  # its answer: a decode error, unread
            pump(lambda: server.statistics()["overflow_held"] == size, server.context)
            call = remote.add.future(40, 2)
            pump(lambda: call.done, server.context, good.context)
            assert good.wait(call) == 42
            assert server.statistics()["overflow_held"] == size  # the pull is still moving
            assert server.statistics()["overflow_bytes"] < size // 2
            pump(lambda: server.statistics()["overflow_held"] == 0, server.context)
        finally:
            hostile.close()


# -- results a peer asks for and never takes -------------------------------------------------------
@hg.declare
def produce(n: hg.uint32) -> bytes: ...


@pytest.mark.parametrize("spec", SOCKETS, **_ids)
def test_results_a_peer_never_takes_hold_at_most_its_share(spec: Spec) -> None:
    """A peer calls for 6 MiB results and neither pulls nor acknowledges them: each stays
    exposed for ``overflow_timeout``. Its share (8 MiB of a 32 MiB budget) holds one; the
    next is refused with the reason, and another client's large results are served."""
    engine = _server(spec, max_overflow=32 * MiB, max_overflow_per_peer=8 * MiB)
    engine.register(produce, bytes)
    hostile = None
    with serving(engine) as server:
        try:
            hostile = Hostile(spec, server.uri)
            answers = []
            for _ in range(3):
                tag = next(hostile.tags)
                reply = bytearray(hostile.na.msg_get_max_expected_size())
                recv = hostile.na.msg_recv_expected(hostile.addr, reply, tag)
                hostile.na.msg_send_unexpected(
                    hostile.addr, hd.encode_request(hd.rpc_id(produce.name))
                    + produce.in_proc.dumps((6 * MiB,)), tag)
                answers.append(hostile.answer(recv, reply))
            assert [ret for ret, _body in answers] == [hd.SUCCESS, hd.OVERFLOW, hd.OVERFLOW]
            assert answers[0][1][3] & hd.MORE_DATA  # a handle to the result, never pulled
            assert b"max_overflow_per_peer" in answers[1][1]
            assert 6 * MiB <= server.statistics()["overflow_exposed"] < 7 * MiB  # encoded
            with hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as good:
                good.declare(produce)
                remote = good.lookup(server.uri)
                for _ in range(3):
                    assert remote.produce(6 * MiB) == bytes(6 * MiB)
        finally:
            if hostile is not None:
                hostile.close()
        # The hostile peer's result goes once its connection does (the ack fails).
        wait_served(server, lambda: server.statistics()["overflow_exposed"] == 0,
                    "the exposed result to be released")
