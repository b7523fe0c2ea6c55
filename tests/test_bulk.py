"""Bulk conformance: handles, pull/push, rights, cancel, overflow and pipelining over every
plugin, against a process and a thread; properties of the planner and the handle format."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
import rpc_api as api
from conftest import TIMEOUT, RpcPeer, Spec, pump
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_peer import start_in_thread
from test_hg_core import FakeClock

from petasus import bulk, hg, na
from petasus.bulk import layout
from petasus.hg import adopt
from petasus.hg import header as hd

MiB = 1 << 20
RO, WO, RW = bulk.READ_ONLY, bulk.WRITE_ONLY, bulk.READ_WRITE


def sha(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


# -- the server pulls from and pushes into the client's memory --------------------------------
@pytest.mark.parametrize("eager", [False, None], ids=["rma", "auto"])
def test_server_pulls_ranges_across_segments(rpc: RpcPeer, eager: bool | None) -> None:
    data = api.pattern(1, 3 * MiB + 123)
    segments = api.split(data, 4)
    with rpc.engine.bulk(segments, RO, eager=eager) as handle:
        assert handle.size == len(data) and not handle.eager
        for offset, size in [(0, -1), (0, 1), (len(segments[0]) - 7, 4096),
                             (MiB, 2 * MiB), (len(data) - 1, 1), (5, 0)]:
            want = data[offset:] if size < 0 else data[offset:offset + size]
            assert rpc.remote.pull(handle, offset, size) == sha(want), (offset, size)


def test_eager_handles_carry_their_bytes(rpc: RpcPeer) -> None:
    data = api.pattern(2, 3000)
    with rpc.engine.bulk(api.split(data, 3), RO) as handle:
        assert handle.eager and len(handle.to_bytes()) > len(data)
        assert rpc.remote.pull(handle, 10, 2000) == sha(data[10:2010])
    # Serialized in one copy of the segments (to_bytes) or through the decoded form (wire):
    # the same bytes, taken when serialized.
    segments = [bytearray(api.pattern(i, 1000 + i)) for i in range(3)]
    with bulk.Bulk(rpc.engine, segments, RO, eager=True) as handle:
        first = handle.to_bytes()
        assert first == bulk.layout.encode(handle.wire())
        segments[1][:4] = b"XXXX"
        again = bulk.RemoteBulk.from_bytes(handle.to_bytes())
        assert again.wire.data == b"".join(segments) != bulk.RemoteBulk.from_bytes(first).wire.data
    with rpc.engine.bulk(bytes(bulk.eager_limit(rpc.engine.na) + 1), RO) as big:
        assert not big.eager, "above the threshold a handle is registered instead"
    with pytest.raises(ValueError, match="only a READ_ONLY handle"):
        rpc.engine.bulk(bytearray(10), RW, eager=True)


def test_server_pushes_into_client_segments(rpc: RpcPeer) -> None:
    before = api.pattern(3, 2 * MiB)
    segments = api.split(before, 3)
    with rpc.engine.bulk(segments, WO) as handle:
        rpc.remote.push(handle, 1000, MiB + 5, 4)
        after = b"".join(segments)
    want = before[:1000] + api.pattern(4, MiB + 5) + before[1000 + MiB + 5:]
    assert after == want


# -- the client pulls from and pushes into the server's memory ---------------------------------
def test_client_pulls_regions_of_a_server_handle(rpc: RpcPeer) -> None:
    size = 2 * MiB + 77
    remote = rpc.remote.expose(size, 5, int(RW), 3, False)
    assert isinstance(remote, bulk.RemoteBulk) and remote.size == size
    want = api.pattern(5, size)
    first, second = bytearray(1000), bytearray(size)
    with rpc.engine.bulk([first, second], WO) as local:
        local.pull_from(remote).wait()
        assert (first + second)[:size] == want
        region = remote.select(MiB - 3, MiB)
        local.select(500, MiB).pull_from(region).wait()
        assert (first + second)[500:500 + MiB] == want[MiB - 3: 2 * MiB - 3]


def test_client_pushes_into_a_server_handle(rpc: RpcPeer) -> None:
    size = MiB + 1
    remote = rpc.remote.expose(size, 6, int(WO), 2, None)
    patch = api.pattern(7, 4096)
    with rpc.engine.bulk(patch, RO) as local:  # eager locally: registered when pushed from
        local.push_to(remote.select(size - 5000, 4096)).wait()
    want = bytearray(api.pattern(6, size))
    want[size - 5000: size - 904] = patch
    assert rpc.remote.exposed_digest() == sha(want)


def test_numpy_and_mmap_segments(rpc: RpcPeer) -> None:
    np = pytest.importorskip("numpy")
    import mmap

    array = np.arange(100_000, dtype=np.float64)
    mapped = mmap.mmap(-1, 8192)
    mapped[:] = api.pattern(8, 8192)
    with rpc.engine.bulk([array, mapped], RO) as handle:
        assert rpc.remote.pull(handle, 0, -1) == sha(array.tobytes() + mapped[:])
    mapped.close()


# -- rights and ranges: errors before any byte moves ------------------------------------------
def test_rights_are_checked_before_bytes_move(rpc: RpcPeer) -> None:
    write_only = rpc.remote.expose(4096, 9, int(WO), 1, None)
    dest = bytearray(4096)
    with rpc.engine.bulk(dest, WO) as local, \
            pytest.raises(na.AccessError, match=r"pull_from.*WRITE_ONLY"):
        local.pull_from(write_only)
    assert dest == bytearray(4096)
    read_only = rpc.remote.expose(4096, 9, int(RO), 1, False)
    with rpc.engine.bulk(bytes(4096), RO) as local, \
            pytest.raises(na.AccessError, match=r"push_to.*READ_ONLY"):
        local.push_to(read_only)
    with rpc.engine.bulk(bytes(4096), RO) as local, \
            pytest.raises(ValueError, match="read-only and cannot receive"):
        local.pull_from(read_only)


def test_forged_rights_are_refused_by_the_target(rpc: RpcPeer) -> None:
    remote = rpc.remote.expose(65536, 10, int(RO), 2, False)
    forged = bulk.RemoteBulk(dataclasses.replace(remote.wire, access=int(RW)))
    with rpc.engine.bulk(bytes(65536), RO, eager=False) as local, \
            pytest.raises(na.AccessError):
        local.push_to(forged).wait()
    assert rpc.remote.exposed_digest() == sha(api.pattern(10, 65536))
    assert rpc.remote.sum(1, 2) == 3


def test_range_errors_name_the_operation(rpc: RpcPeer) -> None:
    remote = rpc.remote.expose(1000, 11, int(RW), 2, False)
    dest = bytearray(1000)
    with rpc.engine.bulk(dest, WO) as local:
        for kwargs, match in [
            ({"size": 1001}, "exceed the 1000 B remote range"),
            ({"size": 10, "offset": 995}, "at remote offset 995 exceed the 1000 B remote"),
            ({"offset": -1}, "outside"),
            ({"size": 100, "local_offset": 950}, "at local offset 950 exceed the 1000 B local"),
            ({"size": -5}, "negative"),
        ]:
            with pytest.raises(ValueError, match=match):
                local.pull_from(remote, **kwargs)
        with pytest.raises(ValueError, match="select"):
            remote.select(900, 200)
        with pytest.raises(TypeError, match="RemoteBulk"):
            local.pull_from(b"not a handle")
    assert dest == bytearray(1000)
    local.close()
    with pytest.raises(ValueError, match="closed"):
        local.pull_from(remote)


def test_a_small_local_handle_never_truncates(rpc: RpcPeer) -> None:
    remote = rpc.remote.expose(5000, 12, int(RO), 1, False)
    with rpc.engine.bulk(bytearray(4999), WO) as local, \
            pytest.raises(ValueError, match="exceed the 4999 B local range"):
        local.pull_from(remote)


# -- concurrency, completion styles, cancel ----------------------------------------------------
def test_many_transfers_in_flight(rpc: RpcPeer) -> None:
    size = 4 * MiB
    remote = rpc.remote.expose(size, 13, int(RO), 5, False)
    dest = bytearray(size)
    piece = size // 16
    with rpc.engine.bulk(dest, WO) as local:
        transfers = [local.pull_from(remote, piece, offset=i * piece, local_offset=i * piece)
                     for i in range(16)]
        for t in transfers:
            t.wait()
    assert dest == api.pattern(13, size)


def test_callbacks_and_asyncio(rpc: RpcPeer) -> None:
    remote = rpc.remote.expose(MiB, 14, int(RO), 2, False)
    want = api.pattern(14, MiB)
    dest = bytearray(MiB)
    seen: list[bulk.Transfer] = []
    with rpc.engine.bulk(dest, WO) as local:
        t = local.pull_from(remote, callback=seen.append)
        assert rpc.engine.wait_until(lambda: bool(seen), TIMEOUT)
        assert seen == [t] and t.done and t.error is None and dest == want

        async def main() -> bytes:
            dest[:] = bytes(MiB)
            await local.pull_from(remote.select(0, MiB // 2))
            await local.pull_from(remote.select(MiB // 2, MiB // 2), offset=0,
                                  local_offset=MiB // 2)
            return bytes(dest)

        assert asyncio.run(main()) == want


def test_cancel_before_progress(rpc: RpcPeer, spec: Spec) -> None:
    remote = rpc.remote.expose(8 * MiB, 15, int(RO), 1, False)
    dest = bytearray(8 * MiB)
    with rpc.engine.bulk(dest, WO) as local:
        t = local.pull_from(remote)
        t.cancel()
        with pytest.raises(na.Canceled, match="pull_from"):
            t.wait()
    assert dest == bytearray(8 * MiB)
    assert rpc.remote.sum(2, 3) == 5


def test_peer_killed_mid_transfer(fresh_rpc: RpcPeer, spec: Spec) -> None:
    remote = fresh_rpc.remote.expose(32 * MiB, 16, int(RO), 1, False)
    with fresh_rpc.engine.bulk(bytearray(32 * MiB), WO) as local:
        # Stopped first, so that it cannot serve the pull before it dies: killed mid-transfer
        # on every plugin, however loaded the machine (a loaded CI once let ofi+tcp finish).
        fresh_rpc.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        t = local.pull_from(remote)
        fresh_rpc.kill()
        # sm's process_vm copy of more than 1 MiB waits for progress like every other op:
        # the target is gone by then, on every plugin.
        with pytest.raises(na.PeerError, match="pull_from"):
            t.wait()


def test_closing_a_handle_cancels_its_transfers(rpc: RpcPeer, spec: Spec) -> None:
    remote = rpc.remote.expose(4 * MiB, 17, int(RO), 1, False)
    local = rpc.engine.bulk(bytearray(4 * MiB), WO)
    t = local.pull_from(remote)
    local.close()
    with pytest.raises(na.Canceled):
        t.wait()
    assert "closed" in repr(local)


def test_an_unclosed_handle_warns(rpc: RpcPeer) -> None:
    handle = rpc.engine.bulk(bytearray(1 << 17), RW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del handle
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


# -- third parties and pipelining ---------------------------------------------------------------
def test_a_third_process_pulls_from_the_owner(spec: Spec, rpc: RpcPeer) -> None:
    """The handle travels owner -> rpc peer -> other, which pulls it from the owner: a third
    party, so ``other`` must allow the owner (``bulk_peers``); tests/test_hostile_hg.py shows
    the refusal without it."""
    data = api.pattern(18, MiB + 3)
    with hg.Engine(spec.uri, listen=True, timeout=TIMEOUT, **spec.options) as owner:
        other, thread = start_in_thread(spec.uri, bulk_peers=[owner.uri], **spec.options)
        try:
            owner.declare(api)
            with owner.bulk(api.split(data, 2), RO, eager=False) as handle:
                remote = owner.lookup(rpc.uri)
                future = remote.relay_pull.future(other.uri, handle)
                assert owner.wait(future) == sha(data)
        finally:
            other.shutdown()
            thread.join(TIMEOUT)
            other.close()


def test_pipelined_pull_on_the_server(rpc: RpcPeer) -> None:
    data = api.pattern(19, 5 * MiB + 11)
    with rpc.engine.bulk(api.split(data, 3), RO) as handle:
        assert rpc.remote.pipelined_digest(handle, MiB, 3) == sha(data)
        assert rpc.remote.pipelined_digest(handle, 4096, 1) == sha(data)


def test_chunks_in_order(rpc: RpcPeer) -> None:
    size = 3 * MiB + 5
    remote = rpc.remote.expose(size, 20, int(RO), 2, False)
    want = api.pattern(20, size)
    got = bytearray()
    offsets = []
    for offset, view in bulk.chunks(rpc.engine, remote, chunk_size=MiB // 2, depth=3,
                                    offset=7):
        offsets.append(offset)
        got += view
    assert got == want[7:]
    assert offsets == list(range(7, size, MiB // 2))


def test_pipeline_failures_are_raised(rpc: RpcPeer) -> None:
    remote = rpc.remote.expose(2 * MiB, 21, int(RO), 1, False)

    def consume(offset: int, view: memoryview) -> None:
        if offset >= MiB:
            raise RuntimeError("disk full")

    before = rpc.engine.na.statistics()["registrations"]
    with pytest.raises(RuntimeError, match="disk full"):
        bulk.pipeline(rpc.engine, remote, consume, chunk_size=MiB // 4)
    assert rpc.engine.na.statistics()["registrations"] == before  # the ring is released
    assert rpc.remote.sum(1, 1) == 2


# -- RPC overflow ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [65536 - 30, 65536, MiB, 9 * MiB])
def test_large_inputs_and_outputs_just_work(rpc: RpcPeer, size: int) -> None:
    data = api.pattern(22, size)
    assert rpc.remote.digest(data) == sha(data)
    assert rpc.remote.make(size, 23) == api.pattern(23, size)
    assert rpc.remote.echo_bytes(data) == data


def test_a_64_mib_argument(rpc: RpcPeer) -> None:
    data = api.pattern(24, 64 * MiB)
    assert rpc.remote.digest(data) == sha(data)


def test_large_one_way_calls(rpc: RpcPeer) -> None:
    data = api.pattern(25, 3 * MiB)
    rpc.remote.deposit(data)
    assert hashlib.sha256(data).hexdigest() in rpc.remote.notes()


def test_overflow_from_asyncio_and_futures(rpc: RpcPeer) -> None:
    data = api.pattern(26, 2 * MiB)

    async def main() -> list[bytes]:
        return list(await asyncio.gather(*(rpc.remote.echo_bytes.async_(data)
                                           for _ in range(4))))

    assert asyncio.run(main()) == [data] * 4
    futures = [rpc.remote.digest.future(data) for _ in range(4)]
    assert [rpc.engine.wait(f) for f in futures] == [sha(data)] * 4


@contextlib.contextmanager
def thread_server(spec: Spec) -> Iterator[tuple[hg.Engine, hg.Engine]]:
    """A server serving in a thread of this process, and a client. The server stops before
    the client closes: closing an ofi+shm engine while another one in the same process
    progresses after large messages crashed in libfabric (pthread_spin_trylock, seen with
    and without hg/adopt.py), which is not what these tests are about."""
    server, thread = start_in_thread(spec.uri, **spec.options)
    client = hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options)
    try:
        client.declare(api)
        yield server, client
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        client.close()
        server.close()


def test_large_bytes_values_land_in_objects_reused_once_let_go(spec: Spec) -> None:
    """A 2 MiB bytes result arrives as the bytes object its pull wrote into (hg/adopt.py).
    One the caller still holds is never written again; one it let go of takes the next
    result of its size, its cached hash forgotten. ``PETASUS_ADOPT=0``: copies, no reuse."""
    with thread_server(spec) as (server, client):
        remote = client.lookup(server.uri)
        a, b, c = (api.pattern(k, 2 * MiB) for k in (31, 32, 33))
        first = remote.echo_bytes(a)
        stale = hash(first)
        second = remote.echo_bytes(b)
        assert type(first) is bytes and first == a and second == b
        assert client.statistics()["overflow_reused"] == 0
        del first
        third = remote.echo_bytes(c)
        assert third == c and second == b
        assert hash(third) == hash(bytes(bytearray(c))) != stale
        assert client.statistics()["overflow_reused"] == (1 if adopt.ENABLED else 0)
        assert client.statistics()["overflow_kept"] <= adopt.POOL_BYTES
        client.context.landing.close()
        assert client.statistics()["overflow_kept"] == 0  # what closing the engine does


def test_an_overflow_no_bytes_value_can_take_lands_in_plain_memory(spec: Spec) -> None:
    """Only a call whose input (or result) may hold a ``bytes`` value lands large segments in
    objects of their own: the same 2 MiB through the msgpack proc, which builds its own
    values, keeps nothing on either side."""
    with thread_server(spec) as (server, client):
        remote = client.lookup(server.uri)
        data = api.pattern(37, 2 * MiB)
        assert remote.echo_any(data) == data
        assert [e.statistics()["overflow_kept"] for e in (server, client)] == [0, 0]
        assert remote.echo_bytes(data) == data
        kept = [e.statistics()["overflow_kept"] for e in (server, client)]
        assert kept == ([2 * MiB, 2 * MiB] if adopt.ENABLED else [0, 0])


def test_kept_objects_are_let_go_when_idle(spec: Spec) -> None:
    """The pool's objects go ``POOL_IDLE`` s (fake) after their last use, on each side,
    through the context's timers; not before."""
    clock = FakeClock()
    with hg.Engine(spec.uri, listen=True, clock=clock, **spec.options) as server, \
            hg.Engine(spec.uri, timeout=TIMEOUT, clock=clock, **spec.options) as client:
        server.register(api.echo_bytes, lambda data: data)
        client.declare(api)
        engines = (server.context, client.context)
        data = api.pattern(36, 2 * MiB)
        call = client.lookup(server.uri).echo_bytes.future(data)
        pump(lambda: call.done and server.statistics()["overflows"] == 2, *engines)
        assert client.wait(call) == data
        kept = [e.statistics()["overflow_kept"] for e in (server, client)]
        assert kept == ([2 * MiB, 2 * MiB] if adopt.ENABLED else [0, 0])
        clock.now += adopt.POOL_IDLE / 2
        for party in engines:
            party.progress(0)
        assert [e.statistics()["overflow_kept"] for e in (server, client)] == kept
        clock.now += adopt.POOL_IDLE / 2
        pump(lambda: server.statistics()["overflow_kept"] ==
             client.statistics()["overflow_kept"] == 0, *engines)


def test_a_landing_that_cannot_be_registered_keeps_nothing(spec: Spec,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Registering the landing of an input (on the server) or of a result (on the client)
    fails: the call fails with that reason, and the budget, the landing and the pool are
    all given back; the next call works."""
    with thread_server(spec) as (server, client):
        remote = client.lookup(server.uri)
        data = api.pattern(34, 2 * MiB)
        for engine, call in ((server, lambda: remote.digest(data)),
                             (client, lambda: remote.make(2 * MiB, 35))):
            register = engine.na.mem_register

            def refuse(buf: object, access: na.Access,
                       register: Callable[..., object] = register) -> object:
                if access == WO and len(memoryview(buf)) >= MiB:  # type: ignore[arg-type]
                    raise ValueError("no registrations left")
                return register(buf, access)

            monkeypatch.setattr(engine.na, "mem_register", refuse)
            with pytest.raises(hg.RPCError, match="cannot land: no registrations left"):
                call()
            monkeypatch.undo()
            stats = engine.statistics()
            assert stats["overflow_held"] == stats["overflow_landings"] == 0
            assert stats["overflow_kept"] == 0
        assert remote.digest(data) == sha(data)
        assert remote.make(2 * MiB, 35) == api.pattern(35, 2 * MiB)


def test_the_server_caps_what_a_peer_makes_it_allocate(spec: Spec) -> None:
    # One peer may hold the whole budget here: this is the budget's test; the per-peer
    # share's is in tests/test_hostile_hg.py.
    server = hg.Engine(spec.uri, listen=True, max_overflow=MiB, max_overflow_per_peer=MiB,
                       **spec.options)
    server.register(api.digest, sha)
    server.register(api.make, lambda size, seed: api.pattern(seed, size))
    server.register(api.deposit, lambda data: None)
    thread = threading.Thread(target=server.serve, kwargs={"handle_signals": False})
    thread.start()
    try:
        with hg.Engine(spec.uri, timeout=TIMEOUT, max_overflow=MiB, max_overflow_per_peer=MiB,
                       **spec.options) as client:
            client.declare(api)
            remote = client.lookup(server.uri)
            with pytest.raises(hg.RPCError, match="max_overflow"):
                remote.digest(bytes(MiB + 1))
            with pytest.raises(hg.RPCError, match="max_overflow"):
                remote.deposit(bytes(MiB + 1))  # one way, and still told
            with pytest.raises(hg.RPCError, match="max_overflow"):
                remote.make(MiB + 100, 1)  # the result: the client's own cap
            assert remote.digest(bytes(MiB - 100)) == sha(bytes(MiB - 100))
            assert server.statistics()["na"]["registrations"] == 0
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.close()


def test_overflow_to_a_killed_server_fails_cleanly(fresh_rpc: RpcPeer) -> None:
    fresh_rpc.kill()
    with pytest.raises(hg.PeerError):
        fresh_rpc.remote.digest(bytes(2 * MiB))
    assert fresh_rpc.engine.na.statistics()["registrations"] == 0


# -- properties: the planner and the handle format ----------------------------------------------
sizes_st = st.lists(st.integers(0, 300), min_size=1, max_size=6)


@st.composite
def transfers(draw: st.DrawFn) -> tuple[list[int], int, list[int], int, int]:
    local, remote = draw(sizes_st), draw(sizes_st)
    lt, rt = sum(local), sum(remote)
    size = draw(st.integers(0, min(lt, rt)))
    loff = draw(st.integers(0, lt - size))
    roff = draw(st.integers(0, rt - size))
    return local, loff, remote, roff, size


@settings(max_examples=300, deadline=None)
@given(transfers())
def test_plans_cover_exactly_the_reference_slice(case: tuple[list[int], int, list[int], int,
                                                             int]) -> None:
    local, loff, remote, roff, size = case
    src = bytes(i % 251 for i in range(sum(remote)))
    rsegs = [src[a:b] for a, b in itertools.pairwise(
        [0, *itertools.accumulate(remote)])]
    lsegs = [bytearray(n) for n in local]
    for li, lo_, ri, ro, n in layout.plan(layout.Layout(local), loff, layout.Layout(remote),
                                          roff, size):
        assert n > 0 and lo_ + n <= local[li] and ro + n <= remote[ri]
        lsegs[li][lo_:lo_ + n] = rsegs[ri][ro:ro + n]
    flat = b"".join(lsegs)
    assert flat[loff:loff + size] == src[roff:roff + size]
    assert flat[:loff] == bytes(loff) and flat[loff + size:] == bytes(len(flat) - loff - size)


wires = st.builds(
    lambda access, owner, segs, data: layout.Wire(
        1 if data is not None else access, owner, tuple(s for s, _h in segs) if data is None
        else (len(data),), tuple(h for _s, h in segs) if data is None else (), data),
    st.sampled_from([1, 2, 3]), st.binary(max_size=40),
    st.lists(st.tuples(st.integers(0, 2**40), st.binary(max_size=30)), max_size=5),
    st.none() | st.binary(max_size=200))


@settings(max_examples=200, deadline=None)
@given(wires)
def test_handle_format_round_trips_and_rejects_every_truncation(wire: layout.Wire) -> None:
    data = layout.encode(wire)
    assert layout.decode(data) == (wire, len(data))
    assert layout.decode(b"xx" + data, 2) == (wire, len(data) + 2)
    for cut in range(len(data)):
        with pytest.raises(layout.LayoutError):
            layout.decode(data[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_handles_raise_layout_errors_only(garbage: bytes) -> None:
    try:
        wire, end = layout.decode(garbage)
    except layout.LayoutError:
        return
    assert end <= len(garbage) and wire.total >= 0


def test_the_bulk_proc_rejects_hostile_handles() -> None:
    proc = hg.proc_for(bulk.Bulk)
    good = layout.encode(layout.Wire(1, b"tcp://x", (5,), (b"k",)))
    for bad in (good[:-1], b"\xb7\x02" + good[2:], good[:4] + b"\xff\xff\xff\xff" + good[8:]):
        with pytest.raises(hg.DecodeError):
            proc.decode(bad, 0)
    with pytest.raises(TypeError, match="Bulk"):
        proc.encode(b"bytes are not a handle")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=transfers(), eager=st.booleans(), push=st.booleans())
def test_random_layouts_move_exactly_the_reference_slice(
        loopback: na.Plugin, case: tuple[list[int], int, list[int], int, int], eager: bool,
        push: bool) -> None:
    local_sizes, loff, remote_sizes, roff, size = case
    src = api.pattern(sum(remote_sizes), sum(remote_sizes))
    if push:
        local_sizes, remote_sizes = remote_sizes, local_sizes
        loff, roff = roff, loff
        src = api.pattern(sum(local_sizes), sum(local_sizes))
        lsegs, rsegs = api_split(src, local_sizes), [bytearray(n) for n in remote_sizes]
        with bulk.Bulk(loopback, lsegs, RO, eager=eager) as lb, \
                bulk.Bulk(loopback, rsegs, WO) as rb:
            lb.push_to(rb.remote(), size, offset=roff, local_offset=loff).wait(TIMEOUT)
        got = b"".join(rsegs)
        assert got[roff:roff + size] == src[loff:loff + size]
        assert got[:roff] == bytes(roff)
        return
    rsegs, lsegs = api_split(src, remote_sizes), [bytearray(n) for n in local_sizes]
    with bulk.Bulk(loopback, rsegs, RO, eager=eager) as rb, \
            bulk.Bulk(loopback, lsegs, WO) as lb:
        remote = bulk.RemoteBulk.from_bytes(rb.to_bytes())
        assert remote.eager == eager
        lb.pull_from(remote, size, offset=roff, local_offset=loff).wait(TIMEOUT)
    got = b"".join(lsegs)
    assert got[loff:loff + size] == src[roff:roff + size]
    assert got[:loff] == bytes(loff)


def api_split(data: bytes, sizes: list[int]) -> list[bytearray]:
    bounds = [0, *itertools.accumulate(sizes)]
    return [bytearray(data[a:b]) for a, b in itertools.pairwise(bounds)]


@pytest.fixture(scope="module")
def loopback(spec: Spec) -> Iterator[na.Plugin]:
    """One listening plugin that transfers between its own registrations (through NA)."""
    with na.initialize(spec.uri, listen=True, **spec.options) as plugin:
        yield plugin


# -- hostile peers and the overflow path's bookkeeping -----------------------------------------
def _raw_call(client: na.Plugin, uri: str, payload: bytes, tag: int,
              expect_reply: bool = True) -> tuple[int, bytes] | None:
    """Send a hand-made request; return (return code, body) of the answer on its tag."""
    addr = client.addr_lookup(uri)
    buf = bytearray(client.msg_get_max_expected_size())
    recv = client.msg_recv_expected(addr, buf, tag) if expect_reply else None
    send = client.msg_send_unexpected(addr, payload, tag)
    na.wait(client, send, *([recv] if recv else []), timeout=TIMEOUT)
    send.result()
    if recv is None:
        return None
    recv.result()
    return buf[2], bytes(buf[8:recv.size])


def _more_data(name: str, wire: layout.Wire) -> bytes:
    return hd.encode_request(hd.rpc_id(name), hd.MORE_DATA) + layout.encode(wire)


def test_a_forged_overflow_handle_gets_an_error_and_nothing_else(spec: Spec,
                                                                 rpc: RpcPeer) -> None:
    with na.initialize(spec.uri, **spec.options) as client:
        owner = client.addr_serialize(client.addr_self())
        for wire in (layout.Wire(1, owner, (300_000,), (b"",)),          # a segment without key
                     layout.Wire(1, owner, (300_000,), (b"\x01" * 18,))):  # a key that lies
            ret, body = _raw_call(client, rpc.uri, _more_data("digest", wire), 7)
            assert ret == hd.OVERFLOW, body
        # One answer per request: a second one on the same tag would be dropped and counted.
        assert client.statistics()["expected_dropped"] == 0
    assert rpc.remote.sum(2, 2) == 4


def test_an_acknowledgement_is_never_taken_for_a_response(spec: Spec) -> None:
    """Both peers number their calls from 1: the target's ack channel must not meet the
    origin's response channel when two listening engines call each other."""
    b_engine, b_thread = start_in_thread(spec.uri, **spec.options)
    a_engine = hg.Engine(spec.uri, listen=True, timeout=TIMEOUT, **spec.options)
    a_engine.register(api.make, lambda size, seed: api.pattern(seed, size))
    a_thread = threading.Thread(target=a_engine.serve, kwargs={"handle_signals": False})
    a_thread.start()
    try:
        a_engine.declare(api)
        b_engine.declare(api)
        held = a_engine.lookup(b_engine.uri).hold.future(TIMEOUT)   # A's call 1, held by B
        big = b_engine.wait(b_engine.lookup(a_engine.uri).make.future(200_000, 3))  # B's call 1
        assert big == api.pattern(3, 200_000)
        assert not held.done, "B's acknowledgement must not answer A's call"
        a_engine.lookup(b_engine.uri).release()
        assert a_engine.wait(held) == TIMEOUT
    finally:
        for engine, thread in ((a_engine, a_thread), (b_engine, b_thread)):
            engine.shutdown()
            thread.join(TIMEOUT)
            engine.close()


def test_an_anonymous_peer_cannot_take_a_listeners_address() -> None:
    from petasus.na import framing

    with na.initialize("tcp://127.0.0.1:0", listen=True) as server, \
            na.initialize("tcp://127.0.0.1:0", listen=True) as honest:
        victim = honest.addr_self().uri
        with socket.create_connection(server.addr_self().uri[6:].rsplit(":", 1)) as raw:
            hello = victim.encode()
            raw.sendall(framing.HEADER.pack(framing.MAGIC, framing.HELLO, 0, len(hello), 0)
                        + hello)
            op = server.msg_recv_unexpected(bytearray(64))
            raw.sendall(framing.HEADER.pack(framing.MAGIC, framing.UNEXPECTED, 0, 2, 1) + b"hi")
            na.wait(server, op, timeout=TIMEOUT)
            assert op.source.uri == victim and not op.source.listening
            assert server.addr_lookup(victim) is not op.source


def test_overflow_memory_is_budgeted_and_stalled_pulls_time_out(spec: Spec) -> None:
    """One thread drives every party, so the test decides who progresses (the staller only
    when it may) and waits on conditions, never on time."""
    if spec.options.get("rma") == "process_vm":
        pytest.skip("process_vm pulls do not need the owner's progress: nothing stalls")
    clock = FakeClock()  # the stalled pull times out when the test says so, not before
    with hg.Engine(spec.uri, listen=True, max_overflow=4 * MiB, max_overflow_per_peer=4 * MiB,
                   overflow_timeout=2.0, clock=clock, **spec.options) as server, \
            na.initialize(spec.uri, **spec.options) as staller, \
            hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options) as client:
        server.register(api.digest, sha)
        client.declare(api)
        remote = client.lookup(server.uri)
        engines = (server.context, client.context)

        memory = bytearray(3 * MiB)
        handle = staller.mem_register(memory, na.Access.READ_ONLY)
        wire = layout.Wire(1, staller.addr_serialize(staller.addr_self()), (3 * MiB,),
                           (staller.mem_handle_serialize(handle),))
        addr = staller.addr_lookup(server.uri)
        # A first exchange sets the path up (ofi makes first contact in both progress loops).
        hello = staller.msg_recv_expected(addr, bytearray(4096), 9)
        staller.msg_send_unexpected(addr, hd.encode_request(hd.rpc_id("nothing")), 9)
        pump(lambda: hello.done, *engines, staller)
        # From here the staller runs no progress: the server's pull of its input stalls.
        reply = bytearray(4096)
        answer = staller.msg_recv_expected(addr, reply, 1)
        staller.msg_send_unexpected(addr, _more_data("digest", wire), 1)
        pump(lambda: server.context.landing.held == 3 * MiB, *engines)
        refused = remote.digest.future(bytes(2 * MiB))
        pump(lambda: refused.done, *engines)
        with pytest.raises(hg.RPCError, match="does not fit"):
            client.wait(refused)
        assert server.context.landing.held == 3 * MiB
        # overflow_timeout without a byte landing, the stalled pull is given up (canceled),
        # the staller is told so, and the budget is back.
        clock.now += 2.0
        pump(lambda: server.statistics()["overflow_timeouts"] == 1, *engines)
        pump(lambda: answer.done and server.context.landing.held == 0, *engines, staller)
        assert reply[2] == hd.OVERFLOW and b"no bytes moved for 2 s" in reply[:answer.size]
        data = api.pattern(4, 3 * MiB)
        fine = remote.digest.future(data)
        pump(lambda: fine.done, *engines)
        assert client.wait(fine) == sha(data)


@pytest.mark.parametrize("serve", ["sync", "async"])
def test_an_unacknowledged_result_is_withdrawn(spec: Spec, serve: str) -> None:
    clock = FakeClock()  # the withdrawal comes when the test moves time, never before
    server = hg.Engine(spec.uri, listen=True, overflow_timeout=60.0, clock=clock,
                       **spec.options)
    server.register(api.make, lambda size, seed: api.pattern(seed, size))
    if serve == "async":
        server.register(api.async_double, _async_double)  # serve() then runs an event loop
    thread = threading.Thread(target=server.serve, kwargs={"handle_signals": False})
    thread.start()
    try:
        with na.initialize(spec.uri, **spec.options) as client:
            request = hd.encode_request(hd.rpc_id("make")) + api.make.in_proc.encode((MiB, 1))
            ret, body = _raw_call(client, server.uri, request, 5)
            assert ret == hd.SUCCESS and bulk.RemoteBulk.from_bytes(body).size == MiB + 4
            exposed = server.na.statistics()["registrations"]  # the result's segments
            assert exposed > 0
            small = hd.encode_request(hd.rpc_id("make")) + api.make.in_proc.encode((16, 1))
            # The client never pulls nor acknowledges. Before its deadline the memory stays;
            # a small call makes the server progress (an event loop sleeps until its timer,
            # which is set on the real clock).
            clock.now += 59.0
            assert _raw_call(client, server.uri, small, 6)[0] == hd.SUCCESS  # type: ignore[index]
            assert server.na.statistics()["registrations"] == exposed
            clock.now += 2.0
            tag = 7
            deadline = time.monotonic() + TIMEOUT
            while server.na.statistics()["registrations"] and time.monotonic() < deadline:
                assert _raw_call(client, server.uri, small, tag)[0] == hd.SUCCESS  # type: ignore[index]
                tag += 1
            assert server.na.statistics()["registrations"] == 0
            assert server.statistics()["overflow_timeouts"] == 1
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.close()


async def _async_double(x: int) -> int:
    return 2 * x


def test_mutable_results_are_snapshotted_immutable_ones_exposed_in_place() -> None:
    from petasus.hg.overflow import segments

    frozen, mutable = bytes(MiB), bytearray(MiB)
    out = segments([b"head", memoryview(frozen), b"mid", memoryview(mutable), b"tail"])
    assert out[0] == b"head" and out[1].obj is frozen and out[2] == b"mid"
    assert isinstance(out[3], bytes) and out[4] == b"tail"
    mutable[0] = 1
    assert out[3][0] == 0  # the copy is what the peer gets


def test_a_chunk_that_fails_releases_the_ring(rpc: RpcPeer) -> None:
    remote = rpc.remote.expose(10 * 65536, 27, int(RO), 1, False)
    before = rpc.engine.na.statistics()["registrations"]
    with pytest.raises(na.AccessError):
        for i, (_offset, _view) in enumerate(bulk.chunks(rpc.engine, remote, chunk_size=65536,
                                                         depth=2)):
            if i == 0:
                rpc.remote.expose(16, 28, int(RO), 1, False)  # withdraws the first region
    assert rpc.engine.na.statistics()["registrations"] == before


def test_concurrent_awaits_on_a_bare_plugin(spec: Spec) -> None:
    with na.initialize(spec.uri, listen=True, **spec.options) as owner, \
            na.initialize(spec.uri, **spec.options) as puller:
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                owner.progress(0.01)
                owner.trigger()

        thread = threading.Thread(target=serve)
        thread.start()
        sources = [bulk.Bulk(owner, api.pattern(i, (i + 1) * MiB), RO, eager=False)
                   for i in range(3)]
        dests = [bulk.Bulk(puller, bytearray((i + 1) * MiB), WO) for i in range(3)]

        async def main() -> None:
            await asyncio.wait_for(asyncio.gather(*(d.pull_from(s.remote())
                                                    for d, s in zip(dests, sources))), TIMEOUT)

        try:
            asyncio.run(main())
            for i, d in enumerate(dests):
                assert d.views[0] == api.pattern(i, (i + 1) * MiB)
        finally:
            stop.set()
            thread.join(TIMEOUT)
            for h in (*sources, *dests):
                h.close()


def test_transfers_between_two_local_handles_are_copies(spec: Spec) -> None:
    with hg.Engine(spec.uri, **spec.options) as engine:  # not listening: no NA loopback
        data = api.pattern(29, 100_000)
        with engine.bulk(api.split(data, 3), RW) as src, \
                engine.bulk(bytearray(100_000), RW) as dst:
            dst.pull_from(src).wait()
            assert dst.views[0] == data
            dst.push_to(src.select(10, 20), 20, local_offset=0).wait()
            assert b"".join(src.views)[10:30] == data[:20]
