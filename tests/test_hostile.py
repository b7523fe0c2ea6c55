"""A server survives what a peer sends it: the first classes of issue 11, over every plugin
where they apply. Each test attacks, then shows that a good client is still served."""

from __future__ import annotations

import mmap
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from conftest import SOCKET_SPECS, SPECS, TIMEOUT, Spec

from petasus import bulk, hg, na
from petasus.hg import header as hd
from petasus.na import framing as fr


def _open(spec: Spec, listen: bool) -> na.Plugin:
    return na.initialize(spec.uri, listen=listen, **spec.options)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id if isinstance(s, Spec) else None)
def test_trigger_carries_on_after_a_raising_callback(spec: Spec) -> None:
    server, client = _open(spec, True), _open(spec, False)
    try:
        addr = client.addr_lookup(server.addr_self().uri)
        got: list[bytes] = []

        def explode(op: na.Op) -> None:
            raise RuntimeError("a callback that a message drove into an error")

        def keep(op: na.Op) -> None:
            got.append(bytes(op.buffer[: op.size]))

        first = server.msg_recv_unexpected(bytearray(64), explode)
        second = server.msg_recv_unexpected(bytearray(64), keep)
        client.msg_send_unexpected(addr, b"one", tag=1)
        client.msg_send_unexpected(addr, b"two", tag=2)
        before = server.statistics()["callback_errors"]
        for _ in range(10_000):
            if first.done and second.done:
                break
            for p in (client, server):
                p.progress(0.01)
                p.trigger()  # never raises: the failing callback is counted and logged
        assert first.done and second.done
        assert got == [b"two"]
        assert server.statistics()["callback_errors"] == before + 1
    finally:
        client.close()
        server.close()


@hg.declare
def add(x: hg.int32, y: hg.int32) -> hg.int32: ...


@hg.declare
def take(data: bytes) -> hg.uint64: ...


@pytest.fixture(params=SPECS[:4], ids=lambda s: s.id if isinstance(s, Spec) else None)
def server(request: pytest.FixtureRequest) -> Iterator[hg.Engine]:
    spec: Spec = request.param
    engine = hg.Engine(spec.uri, listen=True, **spec.options)
    engine.register(add, lambda x, y: x + y)
    engine.register(take, len)
    thread = threading.Thread(target=engine.serve, kwargs={"handle_signals": False},
                              daemon=True)
    thread.start()
    yield engine
    engine.shutdown()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "serve() did not return after shutdown"


def _still_serves(engine: hg.Engine) -> None:
    with hg.Engine(engine.uri) as good:
        good.declare(add, take)
        remote = good.lookup(engine.uri)
        assert remote.add.call(40, 2, timeout=TIMEOUT) == 42
        assert remote.take.call(bytes(200_000), timeout=TIMEOUT) == 200_000  # overflow path


def test_an_overflow_request_with_a_write_only_handle_is_refused(server: hg.Engine) -> None:
    """The input "to pull" is a handle the origin exposed WRITE_ONLY: the target cannot pull
    it, says so, and keeps serving (it used to raise out of the trigger loop)."""
    with hg.Engine(server.uri) as hostile:
        plugin = hostile.na
        addr = plugin.addr_lookup(server.uri)
        with hostile.bulk(bytearray(200_000), bulk.WRITE_ONLY, eager=False) as handle:
            request = hd.REQUEST.pack(hd.IDENTIFIER, hd.PROTOCOL, hd.rpc_id(take.name),
                                      hd.MORE_DATA, 0) + handle.to_bytes()
            reply = bytearray(plugin.msg_get_max_expected_size())
            recv = plugin.msg_recv_expected(addr, reply, 77)
            plugin.msg_send_unexpected(addr, request, 77)
            na.wait(plugin, recv, timeout=TIMEOUT)
            assert recv.done and recv.error is None
            _ident, _proto, ret, _flags, _cookie = hd.RESPONSE.unpack_from(reply)
            assert ret == hd.OVERFLOW
            assert b"WRITE_ONLY" in bytes(reply[: recv.size])
    _still_serves(server)


@pytest.mark.parametrize("spec", [s for s in SOCKET_SPECS if isinstance(s, Spec)
                                  and s.uri.startswith("tcp://127")],
                         ids=lambda s: s.id)
def test_a_message_tag_wider_than_u32_closes_only_that_connection(spec: Spec) -> None:
    engine = hg.Engine(spec.uri, listen=True)
    engine.register(add, lambda x, y: x + y)
    engine.register(take, len)
    thread = threading.Thread(target=engine.serve, kwargs={"handle_signals": False},
                              daemon=True)
    thread.start()
    try:
        host, port = engine.uri.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw:
            me = b"tcp://127.0.0.1:1"
            raw.sendall(fr.encode_header(fr.HELLO, len(me)) + me)
            request = hd.REQUEST.pack(hd.IDENTIFIER, hd.PROTOCOL, hd.rpc_id(add.name), 0, 0)
            body = request + struct.pack("!ii", 1, 2)
            raw.sendall(fr.encode_header(fr.UNEXPECTED, len(body), tag=1 << 40) + body)
            raw.settimeout(TIMEOUT)
            received = b""
            while chunk := _recv(raw):
                received += chunk
            # The server closed this connection (after its own HELLO, perhaps), without a
            # reply: a tag it cannot answer on was refused where it entered.
            assert fr.encode_header(fr.EXPECTED, 0)[:2] not in received[fr.HEADER.size:]
        assert thread.is_alive()
        _still_serves(engine)
    finally:
        engine.shutdown()
        thread.join(TIMEOUT)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (ConnectionResetError, TimeoutError):
        return b""




@hg.declare
def fetch() -> bytes: ...


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.id if isinstance(s, Spec) else None)
def test_a_hostile_write_only_result_handle_leaves_nothing_held(spec: Spec) -> None:
    """A server answers "the result continues in this handle" with a WRITE_ONLY handle: the
    call fails at once, and the client gives back the overflow budget and the landing
    buffer, so later large results (here from the same peer) still fit in the budget."""
    size = 24 << 20
    hostile = na.initialize(spec.uri, listen=True, **spec.options)
    exposed = mmap.mmap(-1, size)  # never touched: no memory is spent on it
    try:
        handle = hostile.mem_register(exposed, na.Access.WRITE_ONLY)
        with hg.Engine(spec.uri, max_overflow=size + (size // 2), **spec.options) as client:
            client.declare(fetch)
            remote = client.lookup(hostile.addr_self().uri)
            wire = bulk_wire(hostile, handle, size)
            for _ in range(4):  # four times the budget, if anything stayed held
                inbox = bytearray(hostile.msg_get_max_unexpected_size())
                recv = hostile.msg_recv_unexpected(inbox)
                call = remote.fetch.future(timeout=TIMEOUT)
                while not recv.done:
                    client.context.progress(0.001)
                    hostile.progress(0.001)
                    hostile.trigger()
                reply = hd.RESPONSE.pack(hd.IDENTIFIER, hd.PROTOCOL, hd.SUCCESS, hd.MORE_DATA,
                                         0) + wire
                hostile.msg_send_expected(recv.source, reply, recv.tag)
                while not call.done:
                    hostile.progress(0.001)
                    hostile.trigger()
                    client.context.progress(0.001)
                    client.context.trigger()
                with pytest.raises(hg.RPCError, match="WRITE_ONLY"):
                    client.wait(call)
            assert client.statistics()["overflow_held"] == 0
        hostile.mem_deregister(handle)
    finally:
        hostile.close()
        exposed.close()


def bulk_wire(plugin: na.Plugin, handle: na.MemHandle, size: int) -> bytes:
    """The serialized bulk handle a peer would send for one registered segment."""
    from petasus.bulk import layout

    owner = plugin.addr_serialize(plugin.addr_self())
    return layout.encode(layout.Wire(int(na.Access.WRITE_ONLY), owner, (size,), (
        plugin.mem_handle_serialize(handle),)))
