"""The stream-socket plugins (tcp over IP, sm over Unix sockets), by composition.

``SocketPlugin`` is the NA interface over five parts: a ``Transport`` (how to listen, connect
and name peers: tcp and Unix sockets implement it), the ``EventLoop`` (epoll, spin, wake),
``Conn`` (one stream, a table routing frame kinds), the ``Outbox`` (send queues, coalesced per
pass) and ``EmulatedRma`` (put/get served by the target's loop). Matching, completions and
registrations are the shared NA core (``na.core``), as on every plugin.
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import Any

from . import auth
from . import framing as fr
from ._conn import EPOLLIN, EPOLLOUT, EPOLLRD, PAUSE_MATCHER, Conn, Outbox, Routing
from ._guard import ConnGuard
from ._limits import Limits
from ._loop import LEAD_MAX, EventLoop
from ._peering import AuthFailed, Peering
from ._regs import Registrations, pack_handle, register_view, unpack_handle
from ._rma import EmulatedRma
from ._transport import Transport
from .core import ADAPTIVE_SPIN_US, MAX_MSG_SIZE, MAX_QUEUED, MAX_QUEUED_PEER, MAX_TAG
from .errors import Canceled, PeerError, ProtocolError
from .generic import PluginCore
from .types import Access, Addr, MemHandle, Op, OpKind, OpState

_HDR = fr.HEADER
_MAGIC = fr.MAGIC
_EXPECTED = fr.EXPECTED  # per message: module constants, not the module's attributes
_UNEXPECTED = fr.UNEXPECTED
RMA_CHUNK = 8 * 1024 * 1024  # per-frame data; keeps a stream fair between messages and bulk


class SocketPlugin(PluginCore):
    """The NA plugin over a stream ``Transport``. Its connection limits (``handshake_timeout``,
    ``idle_timeout``, ``max_connections``, ``max_queued_bytes``, ``max_queued_peer``) are
    ``na._limits``'s, tabled in docs/architecture.md. ``auth_key`` (at least 16 bytes) makes
    every connection prove the shared secret both ways before anything else (``na._peering``).
    """

    log = logging.getLogger("petasus.na")
    # One connection per peer, whose RMA requests the peer serves in arrival order: a put's
    # bytes land as they arrive, and a get's answer leaves (its bytes read from memory as
    # they are sent) behind the answers before it (na._rma; na.interface.Plugin).
    rma_ordered = True
    _gathers = True  # a message's parts go into one sendmsg as they are

    def __init__(self, transport: Transport, listen: bool, *, max_msg_size: int = MAX_MSG_SIZE,
                 spin_us: int = ADAPTIVE_SPIN_US, rma_chunk: int = RMA_CHUNK,
                 max_queued: int = MAX_QUEUED, max_queued_peer: int = MAX_QUEUED_PEER,
                 auth_key: bytes | str | None = None, **limits: Any) -> None:
        if max_msg_size < 1 or rma_chunk < 1:
            raise ValueError("max_msg_size and rma_chunk must be positive")
        try:
            self._limits = Limits(**limits)
        except TypeError as exc:
            raise TypeError(f"{type(self).__name__}: {exc}") from None
        self.transport = transport
        self.scheme = transport.scheme
        key = auth.check_key(auth_key)
        self._rma_chunk = rma_chunk
        self._open_core(max_msg_size, spin_us, ("connections",), self.log, max_queued,
                        self._resume, min(max_queued_peer, max_queued))
        self._regs = Registrations()
        self._outbox = Outbox(self._cq.complete, self._send_failed, self._rearm, self._cq,
                              high=self._limits.max_queued_bytes)
        self._loop = EventLoop(self._cq, self._outbox, self._lock, self._spin)
        self._conns: set[Conn] = set()
        self._guard = ConnGuard(self, self._limits)
        self._rma = EmulatedRma(self._cq, self._regs, self._outbox, self.stats, self.log,
                                rma_chunk)
        self._peering = Peering(self, key)
        self._routing = Routing({fr.UNEXPECTED: self._on_unexpected,
                                 fr.EXPECTED: self._on_expected,
                                 fr.AUTH_CHALLENGE: self._peering.on_challenge,
                                 **self._rma.routes()},
                                self._peering.on_frame, self._rma.landing)
        self._paused: set[Conn] = set()
        self._listener: socket.socket | None = None
        try:
            uri, listener = transport.open(listen)
            if listener is not None:
                listener.setblocking(False)
                listener.listen(socket.SOMAXCONN)
                self._listener = listener
                self._loop.add(listener.fileno(), EPOLLIN, self._guard.accept)
        except BaseException:
            self._closed = True  # nothing to close later, nothing to warn about
            self._loop.close()
            self._cq.close()
            raise
        self._self_addr = Addr(uri, listen)
        self._listening = listen

    # -- repr, introspection -------------------------------------------------------------------
    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._conns)} connections"
        uri = self._self_addr.uri if hasattr(self, "_self_addr") else self.scheme
        return f"<{type(self).__name__} {uri} {state}>"

    def _statistics(self) -> dict[str, Any]:
        return {"open_connections": len(self._conns),
                "max_connections": self._limits.max_connections,
                "reads_paused_now": self._guard.paused(), **self._loop.policy.statistics()}

    def hold_sends(self, lead: bool = False) -> None:
        """Queue what is sent until ``release_sends()``, flushed every few frames meanwhile
        (an optional NA operation: na/interface.py); ``lead``: the first leaves at once."""
        self._loop.hold(lead)

    def release_sends(self) -> None:
        self._loop.release()

    # -- addresses ------------------------------------------------------------------------------
    def addr_self(self) -> Addr:
        return self._self_addr

    def addr_lookup(self, uri: str) -> Addr:
        self._check_open("addr_lookup")
        with self._lock:
            anon = self._peering.known(uri)
        if anon is not None:
            return anon
        canonical = self.transport.canonical(uri)  # may resolve a name: not under the lock
        with self._lock:
            return self._peering.lookup(canonical)

    def addr_to_string(self, addr: Addr) -> str:
        return addr.uri

    def addr_serialize(self, addr: Addr) -> bytes:
        return addr.uri.encode()

    def addr_deserialize(self, data: bytes) -> Addr:
        uri = bytes(data).decode("utf-8", "replace")
        with self._lock:
            known = self._peering.peers.get(uri)
        return known if known is not None else self.addr_lookup(uri)

    # -- messages (matching is the core's) ------------------------------------------------------
    def _send(self, op: Op, view: Any, expected: bool) -> None:
        gathered = type(view) is list
        n = sum(map(len, view)) if gathered else len(view)
        lock = self._lock
        lock.acquire()  # (not ``with``: per message, its two bound methods cost ~30 ns)
        try:
            if self._closed:
                self._check_open(op.kind.name.lower())
            addr = op.addr
            conn = addr.conn  # type: ignore[union-attr]
            if conn is None:
                conn = self._conn_for(addr, op)  # type: ignore[arg-type]
            if conn is not None:
                self.stats["msgs_sent"] += 1
                self.stats["bytes_sent"] += n
                kind = _EXPECTED if expected else _UNEXPECTED
                header = _HDR.pack(_MAGIC, kind, 0, n, op.tag)
                self._outbox.enqueue(conn, [header, *view] if gathered else [header, view], op,
                                     n + _HDR.size)
        finally:
            lock.release()

    def _on_unexpected(self, conn: Conn, tag: int, payload: memoryview | None) -> None:
        if tag > MAX_TAG:
            _refuse_peer_tag(conn, tag)
        if self._matcher.deliver_unexpected(conn.addr, tag, payload) and \
                not conn.paused & PAUSE_MATCHER:  # type: ignore[arg-type]
            # Back-pressure instead of unbounded memory: stop reading this peer until drained.
            conn.paused |= PAUSE_MATCHER
            self._paused.add(conn)
            self._rearm(conn)

    def _on_expected(self, conn: Conn, tag: int, payload: memoryview | None) -> None:
        if tag > MAX_TAG:
            _refuse_peer_tag(conn, tag)
        self._matcher.deliver_expected(conn.addr, tag, payload)  # type: ignore[arg-type]

    def _resume(self) -> None:
        for conn in self._paused:
            conn.paused &= ~PAUSE_MATCHER
            if not conn.closed:
                self._rearm(conn)
        self._paused.clear()

    # -- memory and RMA -------------------------------------------------------------------------
    def mem_register(self, buffer: Any, access: Access) -> MemHandle:
        view, access = register_view(buffer, access)
        with self._lock:
            self._check_open("mem_register")
            handle = MemHandle(view, len(view), access, self._regs.new_key(), True)
            self._publish(handle)
            self._regs.add(handle)
        return handle

    def mem_deregister(self, handle: MemHandle) -> None:
        with self._lock:
            self._regs.remove(handle)
            self._withdraw(handle)
            self._rma.withdraw(handle, self._conns)
            handle.registered = False
            handle.view = None

    def _publish(self, handle: MemHandle) -> None:
        """Plugin hook: publish a registration beyond the key table (sm's table file)."""

    def _withdraw(self, handle: MemHandle) -> None:
        """Plugin hook: withdraw what ``_publish`` published."""

    def _handle_tail(self, handle: MemHandle) -> bytes:
        return b""

    def _parse_handle_tail(self, tail: bytes) -> Any:
        return None

    _TAIL_SIZE = 0

    def mem_handle_serialize(self, handle: MemHandle) -> bytes:
        return pack_handle(handle, self._handle_tail(handle))

    def mem_handle_deserialize(self, data: bytes) -> MemHandle:
        access, key, length, tail = unpack_handle(data, self.scheme, self._TAIL_SIZE)
        return MemHandle(None, length, access, key, False, self._parse_handle_tail(tail))

    def _start_transfer(self, op: Op) -> None:
        """Emulated RMA over the peer's stream; sm's process_vm path overrides it."""
        self._emulate_rma(op)

    def _emulate_rma(self, op: Op) -> None:
        conn = self._conn_for(op.addr, op)  # type: ignore[arg-type]
        if conn is not None:
            self._rma.start(op, conn)

    # -- completion, cancel, progress -----------------------------------------------------------
    def trigger(self, max_count: int = 1 << 30) -> int:
        ready = len(self._cq.ops)
        if not ready:
            return 0  # (an asyncio loop's every poll asks)
        # What the callbacks of this pass send leaves together, at its end (a small pass's
        # first message at once).
        self._loop.hold(ready <= LEAD_MAX)
        try:
            return self._cq.trigger(max_count)
        finally:
            self._loop.release()

    def _cancel_transfer(self, op: Op) -> bool:
        conn = op.addr.conn if op.addr is not None else None
        if op.kind == OpKind.PUT or (op.kind in (OpKind.SEND_UNEXPECTED, OpKind.SEND_EXPECTED)
                                     and conn is not None and not Outbox.withdraw(conn, op)):
            # Bytes of it may be on their way: it finishes once sent (or acked).
            op.state = OpState.CANCELING
            return True
        if op.kind == OpKind.GET:
            self._rma.stop_landing(op, conn)
        return False

    def poll_fd(self) -> int:
        return self._loop.fileno()

    def progress(self, timeout: float = 0.0) -> bool:
        """Move bytes for up to ``timeout`` seconds (see ``EventLoop.progress``)."""
        if self._closed:
            self._check_open("progress")
        try:
            return self._loop.progress(timeout)
        except (OSError, ValueError):
            # Closed by another thread under our poll: the caller's error is "closed", not
            # the dead descriptor it met.
            if self._closed:
                self._check_open("progress")
            raise

    # -- connections ----------------------------------------------------------------------------
    def _new_conn(self, sock: socket.socket, name: str, connecting: bool, *,
                  accepted: bool = False, handshaking: bool | None = None) -> Conn:
        """A connection; ``handshaking`` (default: ``accepted``) puts it under the handshake
        deadline until ``_handshake_done(conn)``."""
        self.transport.tune(sock)
        conn = Conn(sock, name, connecting, self._routing, self._max_msg, self._rma_chunk)
        self.stats["connections"] += 1
        self._conns.add(conn)
        self._guard.opened(conn, accepted, accepted if handshaking is None else handshaking)
        self._loop.add(conn.fd, conn.mask(), partial(self._on_event, conn))
        return conn

    def _conn_for(self, addr: Addr, op: Op) -> Conn | None:
        """The live connection to ``addr``, connecting on first use; None after failing ``op``."""
        conn = addr.conn
        if conn is not None:
            return conn  # type: ignore[no-any-return]
        name = op.kind.name.lower()
        if addr.dead or not addr.listening:
            self._cq.fail(op, PeerError(name, addr.uri, addr.dead or "the peer does not listen "
                                        "and its connection is gone"))
            return None
        try:
            sock, connecting = self.transport.connect(addr.uri)
        except OSError as exc:
            cause = f"could not connect: {exc}"
            self._cq.fail(op, PeerError(name, addr.uri, cause))
            self._matcher.fail_expected(
                addr, lambda o: PeerError(o.kind.name.lower(), addr.uri, cause))
            return None
        conn = self._new_conn(sock, addr.uri, connecting,
                              handshaking=self._peering.key is not None)
        conn.addr = addr
        addr.conn = conn
        self._peering.dialled(conn)
        return conn

    def _handshake_done(self, conn: Conn) -> None:
        """The peer on ``conn`` is who it says (its HELLO, and its auth where required):
        the handshake deadline no longer applies."""
        self._guard.policy.handshake_done(conn)

    def _rearm(self, conn: Conn) -> None:
        self._loop.modify(conn.fd, conn.mask())

    def _on_event(self, conn: Conn, ev: int) -> None:
        if ev & EPOLLOUT:
            self._outbox.writable(conn)
        if ev & EPOLLRD and not conn.closed:
            self._on_readable(conn)

    def _on_readable(self, conn: Conn) -> None:
        reader, recv_into = conn.reader, conn.sock.recv_into
        conn.active = True
        for _ in range(256):
            buf = reader.get_buffer()
            try:
                n = recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._conn_failed(conn, f"receive failed: {exc}")
                return
            if n == 0:
                self._conn_failed(conn, "connection closed by the peer")
                return
            self.stats["bytes_received"] += n
            try:
                reader.buffer_updated(n)
            except AuthFailed as exc:  # logged by the handshake, once
                self._conn_failed(conn, exc.cause)
                return
            except Exception as exc:  # malformed bytes must cost one connection, never more
                self.stats["protocol_errors"] += 1
                self.log.error("closing the connection to %s: %s", conn.name, exc,
                               exc_info=not isinstance(exc, ProtocolError))
                self._conn_failed(conn, str(exc))
                return
            if conn.closed or conn.paused:
                return
            # A short read of small frames means the socket is drained: skip the EAGAIN call.
            # In the middle of a bulk payload the rest is still arriving: keep reading.
            if n < len(buf) and not reader.in_payload:
                return

    def _send_failed(self, conn: Conn, cause: str) -> None:
        """A send was refused (EPIPE, ECONNRESET): the peer closed. It may have said why
        first (a refusal of our handshake), in bytes still unread: a connection that is read
        fails from the read path, which runs next (epoll reports the hang-up at once), so its
        ops fail with the peer's reason; one whose reads are paused, or that never
        connected, or that has nothing to read (a peer that shut down only its reading
        side, a send error that leaves the socket open) fails now."""
        if not (conn.paused or conn.connecting or conn.closed):
            try:
                conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                return  # bytes, or the end of the stream: the read path reports them
            except OSError:
                pass  # nothing to read (EAGAIN), or the error itself (a reset)
        self._conn_failed(conn, cause)

    def _conn_failed(self, conn: Conn, cause: str, closing: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        self._guard.closed(conn)
        self._peering.closed(conn)
        self._paused.discard(conn)
        self._loop.remove(conn.fd)
        conn.sock.close()
        peer = conn.addr.uri if conn.addr is not None else conn.name
        if not closing:
            self.stats["peer_failures"] += 1
            self.log.info("connection to %s lost: %s", peer, cause)

        def error(op: Op) -> BaseException:
            name = op.kind.name.lower()
            if closing or op.state == OpState.CANCELING:
                return Canceled(name, peer, cause)
            return PeerError(name, peer, cause)

        for _buf, op in (*conn.sendq, *(conn.held or ())):
            if op is not None:
                self._cq.fail(op, error(op))
        conn.sendq.clear()
        conn.held = None
        for op, _dest in list(conn.rma.values()):
            self._cq.fail(op, error(op))
        conn.rma.clear()
        addr = conn.addr
        if addr is not None and addr.conn is conn:
            addr.conn = None
            if not addr.listening:
                addr.dead = cause
                self._peering.lost(addr)
            self._matcher.fail_expected(addr, error)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection; pending operations complete as canceled (run trigger())."""
        with self._lock:
            if self._closed:
                return
            self._outbox.flush_dirty()  # best effort: what the kernel takes now still leaves
            for conn in list(self._conns):
                self._conn_failed(conn, "the plugin was closed", closing=True)
            self._matcher.close("the plugin was closed")
            self._closed = True
            if self._listener is not None:
                self._listener.close()
            self._loop.close()
            self._cq.close()
            self._on_close()

    def _on_close(self) -> None:
        """Release plugin-specific resources."""


def _refuse_peer_tag(conn: Conn, tag: int) -> None:
    """Message tags are u32 on every plugin, while the frame header carries 64 bits (RMA frames
    put operation ids there): a wider tag is a malformed message, refused where it enters,
    before any reply is addressed to it."""
    raise ProtocolError("read frame", conn.name, f"message tag {tag:#x} is wider than u32")
