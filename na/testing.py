"""A conformance kit for NA plugins: the checks every plugin must pass, reusable by a
third-party plugin (as trio's ``testing.check_*_stream`` are).

    from petasus.na import testing

    def test_my_plugin():
        testing.check_plugin(lambda listen: MyPlugin("my://", listen=listen))

``open_plugin(listen)`` must return a fresh instance; a check opens a listening one and a
client, drives both from the calling thread (so plugins whose RMA needs the target's progress
pass too) and closes them. Each check is a plain function in ``CHECKS``, so a suite can
report them one by one (``tests/test_na_kit.py`` does, for every plugin of petasus). The
checks need no second process and no raw sockets; the suite's own tests add those.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import AccessError, Canceled, NAError
from .interface import Plugin
from .types import Access, Op

Opener = Callable[[bool], Plugin]
TIMEOUT = 10.0


class ConformanceError(AssertionError):
    """A plugin broke the NA contract; the message names the check and what differed."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ConformanceError(what)


def drive(plugins: tuple[Plugin, ...], until: Callable[[], bool], timeout: float = TIMEOUT,
          what: str = "operations") -> None:
    """Progress and trigger every plugin until ``until()``; ConformanceError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() >= deadline:
            raise ConformanceError(f"{what} did not complete within {timeout} s")
        for plugin in plugins:
            plugin.progress(0.001)
            plugin.trigger()


@contextmanager
def pair(open_plugin: Opener) -> Iterator[tuple[Plugin, Plugin]]:
    """A listening plugin and a client, closed (and their cancellations triggered) after."""
    server = open_plugin(True)
    try:
        client = open_plugin(False)
        try:
            yield server, client
        finally:
            client.close()
            client.trigger()
    finally:
        server.close()
        server.trigger()


def _raises(kind: type[BaseException], what: str, call: Callable[[], object]) -> BaseException:
    try:
        call()
    except kind as exc:
        return exc
    except Exception as exc:
        raise ConformanceError(f"{what}: raised {type(exc).__name__}: {exc}, "
                               f"expected {kind.__name__}") from exc
    raise ConformanceError(f"{what}: accepted, expected {kind.__name__}")


# -- the checks ----------------------------------------------------------------------------------
def check_messages(open_plugin: Opener) -> None:
    """Unexpected and expected messages arrive whole, with their source, tag and size."""
    with pair(open_plugin) as (server, client):
        round_trip(server, client)


def round_trip(server: Plugin, client: Plugin) -> None:
    """One unexpected message to ``server`` and its expected reply, checked byte for byte."""
    addr = client.addr_lookup(server.addr_self().uri)
    inbox = bytearray(server.msg_get_max_unexpected_size())
    recv = server.msg_recv_unexpected(inbox)
    send = client.msg_send_unexpected(addr, b"hello", 7)
    drive((server, client), lambda: recv.done and send.done, what="an unexpected message")
    recv.result()
    send.result()
    _expect((bytes(inbox[:recv.size]), recv.tag) == (b"hello", 7),
            f"unexpected message arrived as {bytes(inbox[:recv.size])!r}, tag {recv.tag}")
    back = bytearray(64)
    reply_recv = client.msg_recv_expected(addr, back, 7)
    source = recv.source
    _expect(source is not None, "a received message has no source address")
    reply = server.msg_send_expected(source, b"world", 7)  # type: ignore[arg-type]
    drive((server, client), lambda: reply_recv.done and reply.done,
          what="an expected message")
    reply_recv.result()
    _expect(bytes(back[:reply_recv.size]) == b"world", "the expected reply differs")


def check_gathered_messages(open_plugin: Opener) -> None:
    """A message given as a list of buffers arrives as their concatenation, both kinds, at
    the largest size allowed; a list over that size is refused with ValueError at the call."""
    with pair(open_plugin) as (server, client):
        addr = client.addr_lookup(server.addr_self().uri)
        limit = min(server.msg_get_max_unexpected_size(), client.msg_get_max_expected_size())
        parts = [b"head", memoryview(bytes(range(256)) * 3), bytearray(b"mid"), b""]
        parts.append(bytes(limit - sum(map(len, parts))))
        whole = b"".join(parts)
        inbox = bytearray(limit)
        recv = server.msg_recv_unexpected(inbox)
        send = client.msg_send_unexpected(addr, parts, 3)
        drive((server, client), lambda: recv.done and send.done, what="a gathered message")
        send.result()
        recv.result()
        _expect(bytes(inbox[:recv.size]) == whole, "a gathered unexpected message arrived "
                f"as {recv.size} B that differ from the {len(whole)} B sent")
        back = bytearray(limit)
        reply_recv = client.msg_recv_expected(addr, back, 3)
        reply = server.msg_send_expected(recv.source, parts, 3)  # type: ignore[arg-type]
        drive((server, client), lambda: reply_recv.done and reply.done,
              what="a gathered expected message")
        reply.result()
        reply_recv.result()
        _expect(bytes(back[:reply_recv.size]) == whole, "a gathered expected message differs")
        _raises(ValueError, "a gathered message over the maximum size",
                lambda: client.msg_send_unexpected(addr, [*parts, b"x"], 3))
        round_trip(server, client)


def check_tags_outside_u32_are_refused(open_plugin: Opener) -> None:
    """Every tagged call refuses a tag outside 0..2**32-1 with ValueError, posting nothing."""
    with pair(open_plugin) as (server, client):
        addr = client.addr_lookup(server.addr_self().uri)
        for tag in (-1, 1 << 32):
            calls: dict[str, Callable[[int], object]] = {
                "msg_send_unexpected": lambda t: client.msg_send_unexpected(addr, b"", t),
                "msg_send_expected": lambda t: client.msg_send_expected(addr, b"", t),
                "msg_recv_expected": lambda t: client.msg_recv_expected(addr, bytearray(1), t),
            }
            for name, call in calls.items():
                _raises(ValueError, f"{name}(tag={tag})", lambda call=call, tag=tag: call(tag))
        _expect(client.trigger() == 0, "a refused call posted a completion")


def check_local_misuse_raises_at_the_call(open_plugin: Opener) -> None:
    """Local misuse is ValueError/TypeError at the call, never a failed completion later."""
    with pair(open_plugin) as (_server, client):
        _raises(ValueError, "msg_recv_unexpected(read-only buffer)",
                lambda: client.msg_recv_unexpected(b"immutable"))
        _raises(ValueError, "mem_register(read-only buffer, WRITE_ONLY)",
                lambda: client.mem_register(b"immutable", Access.WRITE_ONLY))
        _raises(TypeError, "mem_register(12)", lambda: client.mem_register(12, Access.READ_ONLY))
        too_big = bytes(client.msg_get_max_unexpected_size() + 1)
        _raises(ValueError, "a message above the maximum size",
                lambda: client.msg_send_unexpected(client.addr_self(), too_big, 1))
        _raises(ValueError, "mem_handle_deserialize(2 bytes)",
                lambda: client.mem_handle_deserialize(b"\x01\x02"))
        handle = client.mem_register(bytearray(8), Access.READ_WRITE)
        _raises(ValueError, "a get past the end of the local registration",
                lambda: client.get(handle, 4, handle, 0, 8, client.addr_self()))
        client.mem_deregister(handle)
        _raises(ValueError, "a second mem_deregister", lambda: client.mem_deregister(handle))


def check_unexpected_messages_queue(open_plugin: Opener) -> None:
    """Unexpected messages sent before any receive is posted wait, in order."""
    with pair(open_plugin) as (server, client):
        addr = client.addr_lookup(server.addr_self().uri)
        sends = [client.msg_send_unexpected(addr, bytes([i]) * i, i) for i in range(1, 6)]
        drive((server, client), lambda: all(op.done for op in sends), what="the sends")
        got: list[tuple[int, bytes]] = []
        for _ in range(5):
            buf = bytearray(16)
            op = server.msg_recv_unexpected(buf)
            drive((server, client), lambda op=op: op.done, what="a queued message")
            op.result()
            got.append((op.tag, bytes(buf[:op.size])))
        _expect(got == [(i, bytes([i]) * i) for i in range(1, 6)],
                f"queued messages arrived as {got}")


def check_a_receive_that_is_too_small_fails(open_plugin: Opener) -> None:
    """A message larger than the posted buffer fails that receive; nothing is truncated."""
    with pair(open_plugin) as (server, client):
        addr = client.addr_lookup(server.addr_self().uri)
        recv = server.msg_recv_unexpected(bytearray(2))
        client.msg_send_unexpected(addr, b"too long", 1)
        drive((server, client), lambda: recv.done, what="the receive")
        _expect(isinstance(recv.error, NAError) and "does not fit" in str(recv.error),
                f"a too-small receive ended with {recv.error!r}")


def check_cancel_and_close(open_plugin: Opener) -> None:
    """A canceled receive completes as Canceled; close cancels what is still posted, and an
    op without a callback is done as it completes."""
    with pair(open_plugin) as (server, _client):
        seen: list[Op] = []
        canceled = server.msg_recv_unexpected(bytearray(8), seen.append)
        server.cancel(canceled)
        drive((server,), lambda: canceled.done, what="the canceled receive")
        _raises(Canceled, "a canceled receive", canceled.result)
        _expect(seen == [canceled], "the canceled receive's callback did not run once")
        pending = server.msg_recv_unexpected(bytearray(8))
        server.close()
        _expect(pending.done, "close() left a callback-less receive pending")
        _raises(Canceled, "a receive pending at close", pending.result)
        _raises(RuntimeError, "a call on a closed plugin",
                lambda: server.msg_recv_unexpected(bytearray(1)))


def check_rma(open_plugin: Opener) -> None:
    """get and put move the bytes of a registration, within its bounds."""
    with pair(open_plugin) as (server, client):
        addr = client.addr_lookup(server.addr_self().uri)
        data = bytearray(range(256)) * 64
        exposed = server.mem_register(data, Access.READ_WRITE)
        remote = client.mem_handle_deserialize(server.mem_handle_serialize(exposed))
        mine = bytearray(len(data))
        local = client.mem_register(mine, Access.READ_WRITE)
        get = client.get(local, 0, remote, 0, len(data), addr)
        drive((server, client), lambda: get.done, what="a get")
        get.result()
        _expect(mine == data, "a get brought other bytes")
        mine[:] = bytes(len(mine))
        put = client.put(local, 100, remote, 200, 1000, addr)
        drive((server, client), lambda: put.done, what="a put")
        put.result()
        _expect(data[200:1200] == bytes(1000) and data[199] == 199 % 256,
                "a put wrote other bytes, or outside its range")
        client.mem_deregister(local)
        server.mem_deregister(exposed)


def check_rma_order_as_promised(open_plugin: Opener) -> None:
    """A plugin that sets ``rma_ordered`` keeps its promise: a get started right behind a put
    (neither waited for) reads what the put wrote, and gets complete in the order they were
    started, a large one before the small one behind it. A plugin that promises nothing is
    not checked."""
    with pair(open_plugin) as (server, client):
        if not getattr(client, "rma_ordered", False):
            return
        addr = client.addr_lookup(server.addr_self().uri)
        # Several sends' worth on a socket, so an overtaking op would show; sizes either side
        # of a plugin's own thresholds (sm copies up to 1 MiB inside the call, queues above).
        sizes = (1 << 20, (2 << 20) + 3, 1 << 20)
        target = bytearray(max(sizes))
        exposed = server.mem_register(target, Access.READ_WRITE)
        remote = client.mem_handle_deserialize(server.mem_handle_serialize(exposed))
        for round_, size in enumerate(sizes, 1):
            new = bytes([round_]) * size
            source, seen, tail = bytearray(new), bytearray(size), bytearray(8)
            handles = [client.mem_register(source, Access.READ_ONLY),
                       client.mem_register(seen, Access.WRITE_ONLY),
                       client.mem_register(tail, Access.WRITE_ONLY)]
            src, large, small = handles
            ops = [client.put(src, 0, remote, 0, size, addr),  # none waited for
                   client.get(large, 0, remote, 0, size, addr),
                   client.get(small, 0, remote, size - 8, 8, addr)]
            overtaken: list[bool] = []

            def settled(ops: list[Op] = ops, overtaken: list[bool] = overtaken) -> bool:
                if ops[2].done and not ops[1].done:
                    overtaken.append(True)
                return all(op.done for op in ops)

            drive((server, client), settled, what="put, get, get")
            for op in ops:
                op.result()
            _expect(seen == new, f"round {round_}: a get overtook the put ahead of it")
            _expect(not overtaken, f"round {round_}: a small get completed before the large "
                    "get ahead of it")
            for handle in handles:
                client.mem_deregister(handle)
        server.mem_deregister(exposed)


def check_rma_is_checked_by_the_target(open_plugin: Opener) -> None:
    """A forged key, a claim past the end and rights the registration lacks are refused with
    AccessError: the target's table decides, never the handle's claims."""
    with pair(open_plugin) as (server, client):
        addr = client.addr_lookup(server.addr_self().uri)
        data = bytearray(4096)
        exposed = server.mem_register(data, Access.READ_ONLY)
        wire = bytearray(server.mem_handle_serialize(exposed))
        mine = client.mem_register(bytearray(8192), Access.READ_WRITE)
        forged_rights = bytearray(wire)
        forged_rights[1] = int(Access.READ_WRITE)
        forged_key = bytearray(wire)
        forged_key[2] ^= 0xFF
        forged_size = bytearray(wire)
        forged_size[10:18] = (8192).to_bytes(8, "little")
        attempts = {
            "a put into READ_ONLY memory": (forged_rights, "put", 0, 8),
            "a get with a forged key": (forged_key, "get", 0, 8),
            "a get past the registration's end": (forged_size, "get", 4000, 200),
        }
        for what, (handle_bytes, kind, offset, length) in attempts.items():
            remote = client.mem_handle_deserialize(bytes(handle_bytes))
            start = client.put if kind == "put" else client.get
            op = start(mine, 0, remote, offset, length, addr)
            drive((server, client), lambda op=op: op.done, what=what)
            _expect(isinstance(op.error, AccessError),
                    f"{what} ended with {op.error!r}, expected AccessError")
        _expect(data == bytearray(4096), "refused RMA changed the target's memory")
        client.mem_deregister(mine)
        server.mem_deregister(exposed)


def check_hostile_handles_are_refused(open_plugin: Opener) -> None:
    """Every truncation of a serialized handle, and handles of a wrong version or rights, are
    ValueError (never another exception, never a handle); the plugin serves on."""
    with pair(open_plugin) as (server, client):
        exposed = server.mem_register(bytearray(64), Access.READ_ONLY)
        wire = server.mem_handle_serialize(exposed)
        bad = [wire[:cut] for cut in range(len(wire))]
        bad += [bytes([wire[0] ^ 0xFF]) + wire[1:], wire[:1] + b"\x00" + wire[2:],
                wire[:1] + b"\x07" + wire[2:], wire + b"\x00"]
        for data in bad:
            _raises(ValueError, f"mem_handle_deserialize of a hostile {len(data)} B handle",
                    lambda data=data: client.mem_handle_deserialize(data))
        server.mem_deregister(exposed)
        round_trip(server, client)  # and both still talk


CHECKS: tuple[Callable[[Opener], None], ...] = (
    check_messages,
    check_gathered_messages,
    check_tags_outside_u32_are_refused,
    check_local_misuse_raises_at_the_call,
    check_unexpected_messages_queue,
    check_a_receive_that_is_too_small_fails,
    check_cancel_and_close,
    check_rma,
    check_rma_order_as_promised,
    check_rma_is_checked_by_the_target,
    check_hostile_handles_are_refused,
)


def check_plugin(open_plugin: Opener) -> None:
    """Run every check of the kit against the plugin ``open_plugin`` opens."""
    for check in CHECKS:
        check(open_plugin)
