"""A socket plugin's connection as a peer reaches it: the HELLO handshake payload, then the
routed frames (messages, and RMA requests served from a real registration).

The input is what a peer writes on a fresh connection to a tcp (or, by the first byte, sm)
plugin, fed to the connection's reader in chunk splits the fuzzer picks, under the plugin's
lock, as ``SocketPlugin._on_readable`` does. Contract: malformed bytes raise ``ProtocolError``
(``_on_readable`` then closes that one connection and logs it as the peer's fault; any other
exception is logged as our bug). Invariants: unexpected messages queued stay within the
plugin's ``max_queued`` (plus the one read that crossed it); whatever the plugin sends back
is well-formed frames (parsed with the same codec), an RMA reply moves only bytes of the
registration the request named and never more than asked, and a refused request gets a known
refusal code.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from petasus import na

# sm and tcp are imported here, not on first use, so that atheris instruments them.
from petasus.na import _regs, core, sm, tcp  # noqa: F401
from petasus.na import framing as fr
from petasus.na._peering import REFUSALS
from petasus.na.errors import ProtocolError

from ._kit import Harness, check, cuts, pieces, with_cuts

AUTH_KEY = b"fuzz-key-0123456789"
KEY_RO, KEY_RW = 0x5EED0001, 0x5EED0003  # the registrations' keys, fixed so seeds can use them
SIZE = 64
MAX_MSG = 1024
MAX_QUEUED = 4 * MAX_MSG


class _Replies:
    """Parses what the plugin sends back on the connection."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, int, bytes | None]] = []

    def frame(self, kind: int, flags: int, tag: int, payload: memoryview | None) -> None:
        self.frames.append((kind, flags, tag, None if payload is None else bytes(payload)))

    def frame_header(self, kind: int, flags: int, length: int, tag: int) -> memoryview | None:
        check(length <= SIZE, f"a {length} B RMA reply from a {SIZE} B registration")
        self.frames.append((kind, flags, tag, b"direct"))
        return None


def _rekey(plugin: Any, handle: na.MemHandle, key: int) -> None:
    plugin._regs.remove(handle)
    handle.key = key
    plugin._regs.add(handle)


_listener: list[socket.socket] = []


def _pair(scheme: str) -> tuple[socket.socket, socket.socket]:
    """Two ends of a connection of the plugin's kind (tcp options fail on a Unix socket)."""
    if scheme.startswith("sm"):
        return socket.socketpair()
    if not _listener:
        lst = socket.create_server(("127.0.0.1", 0))
        _listener.append(lst)
    lst = _listener[0]
    theirs = socket.create_connection(lst.getsockname())
    ours, _peer = lst.accept()
    return ours, theirs


def one_input(data: bytes) -> bool:
    scheme = "sm://" if data[:1] == b"s" else "tcp://127.0.0.1:0"
    key = AUTH_KEY if data[:1] == b"k" else None  # a keyed tcp plugin: the handshake's frames
    sizes, stream = cuts(data[1:])
    plugin: Any = na.initialize(scheme, listen=False, max_msg_size=MAX_MSG, rma_chunk=SIZE,
                                max_queued=MAX_QUEUED, spin_us=0, auth_key=key)
    ours, theirs = _pair(scheme)
    refused = False
    try:
        ro = plugin.mem_register(bytes(range(SIZE)), na.Access.READ_ONLY)
        rw = plugin.mem_register(bytearray(SIZE), na.Access.READ_WRITE)
        _rekey(plugin, ro, KEY_RO)
        _rekey(plugin, rw, KEY_RW)
        plugin.msg_recv_unexpected(bytearray(MAX_MSG))
        ours.setblocking(False)
        theirs.setblocking(False)
        conn = plugin._new_conn(ours, "fuzz peer", False, accepted=True)
        reader = conn.reader
        with plugin._lock:
            plugin._outbox.in_pass += 1
            try:
                for piece in pieces(stream, sizes):
                    if conn.closed or conn.paused:  # the loop stops reading a paused peer
                        break
                    _feed(reader, piece)
            except ProtocolError:
                refused = True
            finally:
                plugin._outbox.in_pass -= 1
                plugin._outbox.flush_dirty()
        # Back-pressure: what a peer can make us queue is the bound, plus what one read held.
        check(plugin._matcher.queued <= MAX_QUEUED + 256 * 1024 + MAX_MSG,
              f"{plugin._matcher.queued} B of unexpected messages queued")
        plugin.trigger()
        replies = bytearray()
        try:
            while chunk := theirs.recv(1 << 16):
                replies += chunk
        except BlockingIOError:
            pass
        _check_replies(bytes(replies))
    finally:
        plugin.close()
        plugin.trigger()
        ours.close()
        theirs.close()
    return not refused


def _feed(reader: fr.FrameReader, data: bytes) -> None:
    """One read's worth of bytes, landed where the reader asks, as ``_on_readable`` does."""
    at = 0
    while at < len(data):
        buf = reader.get_buffer()
        n = min(len(buf), len(data) - at)
        buf[:n] = data[at:at + n]
        at += n
        reader.buffer_updated(n)


def _check_replies(replies: bytes) -> None:
    rec = _Replies()
    reader = fr.FrameReader(rec, 1 << 16, SIZE, "fuzz target")
    view = reader.get_buffer()
    check(len(replies) <= len(view), f"{len(replies)} B of replies")
    view[:len(replies)] = replies
    try:
        reader.buffer_updated(len(replies))
    except ProtocolError as exc:
        raise AssertionError(f"the plugin sent a malformed frame: {exc}") from None
    for kind, _flags, _tag, payload in rec.frames:
        check(kind in (fr.HELLO, fr.GET_RESP, fr.RMA_ACK, fr.RMA_NAK, fr.AUTH_CHALLENGE),
              f"the plugin answered with frame kind {kind}")
        if kind == fr.AUTH_CHALLENGE:
            check(payload is not None and ((len(payload) == 1 and payload[0] in REFUSALS) or
                                           (len(payload) == 1 + 2 * 16 + 16 and not payload[0])),
                  f"challenge {payload!r}")
        if kind == fr.RMA_NAK:
            check(payload is not None and len(payload) == 1 and payload[0] in _regs.REFUSALS,
                  f"refusal {payload!r}")


def seeds() -> list[bytes]:
    uri = b"tcp://anonymous-0123456789abcdef"
    hello = fr.encode_header(fr.HELLO, len(uri), 0, 0) + uri
    lhello = fr.encode_header(fr.HELLO, 20, 0, 1) + b"tcp://127.0.0.1:7000"
    msg = fr.encode_header(fr.UNEXPECTED, 5, 7) + b"hello"
    exp = fr.encode_header(fr.EXPECTED, 3, 8) + b"abc"
    get = fr.encode_header(fr.GET_REQ, 24, 3) + fr.RMA_DESC.pack(KEY_RO, 8, 16)
    bad_get = fr.encode_header(fr.GET_REQ, 24, 4) + fr.RMA_DESC.pack(KEY_RO, 60, 16)
    put = (fr.encode_header(fr.PUT_REQ, 24, 5) + fr.RMA_DESC.pack(KEY_RW, 0, 8)
           + fr.encode_header(fr.PUT_DATA, 8, 5) + b"12345678")
    ro_put = (fr.encode_header(fr.PUT_REQ, 24, 6) + fr.RMA_DESC.pack(KEY_RO, 0, 8)
              + fr.encode_header(fr.PUT_DATA, 8, 6) + b"12345678")
    answers = (fr.encode_header(fr.RMA_ACK, 0, 99) + fr.encode_header(fr.RMA_NAK, 1, 98)
               + b"\x01" + fr.encode_header(fr.GET_RESP, 4, 97) + b"data")
    sm_uri = f"sm://{os.getpid()}/2".encode()  # the kernel says who is on the socket: us
    sm_hello = fr.encode_header(fr.HELLO, len(sm_uri), 0, 1) + sm_uri
    rest = msg + exp + get + bad_get + put + ro_put + answers
    # A keyed HELLO is answered with a challenge; no input can forge the proof that follows.
    keyed = fr.encode_header(fr.HELLO, 16 + len(uri), 0, 2) + bytes(16) + uri
    return [b"t" + with_cuts(hello + rest), b"t" + with_cuts(lhello + rest, (5, 40)),
            b"k" + with_cuts(keyed, (7,)),
            b"t" + with_cuts(hello + get + put, (1,)), b"s" + with_cuts(sm_hello + rest),
            b"t" + with_cuts(hello + msg * 8, (64,))]


HARNESS = Harness("conn", one_input, seeds, __doc__ or "")
