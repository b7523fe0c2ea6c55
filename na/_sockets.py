"""Message and emulated-RMA engine of the stream-socket plugins (tcp over IP, sm over Unix sockets).

One epoll set holds the listener, a wake-up eventfd and every connection; its fd is the plugin's
``poll_fd()``. Sends go straight to the socket when its queue is empty and are coalesced with
``sendmsg`` scatter-gather when it is not. Reads land in a reusable buffer that yields several
frames per ``recv_into``; bulk payloads land directly in registered memory (see ``framing``).

RMA is emulated with frames served by the *target's* progress loop, never by user code: the target
checks key, bounds and rights of every request against its own registrations and answers from, or
receives into, the registered memory in place.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import framing as fr
from ._generic import message_view, run_completions
from ._rma import _CANCELING, _FINISHED, _NAK_TEXT, _PENDING, RmaMixin
from .errors import AccessError, Canceled, NAError, PeerError, ProtocolError
from .types import Addr, Callback, MemHandle, Op, OpKind, as_byte_view

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EPOLLRD = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_IOV_MAX = 512
_ACCEPT_PAUSE = 0.1
# Queued frames that force a flush before the next progress pass (measured: flushing once per
# pass beats flushing every frame at 16 calls in flight; bench/rpc.py).
_FLUSH_AT = int(os.environ.get("PETASUS_FLUSH_AT", "64"))
_HDR = fr.HEADER
_MAGIC = fr.MAGIC
_UNEXPECTED = fr.UNEXPECTED
_EXPECTED = fr.EXPECTED

# Defaults, each overridable per instance.
MAX_MSG_SIZE = 64 * 1024  # sockets have no slot size; big enough that most RPCs need no overflow
RMA_CHUNK = 8 * 1024 * 1024  # per-frame data; keeps a stream fair between messages and bulk
MAX_QUEUED = 64 * 1024 * 1024  # unmatched messages a peer can make us hold before we stop reading
SPIN_US = int(os.environ.get("PETASUS_SPIN_US", "200"))  # see DESIGN: ~70 us wake-up vs ~6 us poll


def _recv_view(buf: Any, op: str) -> memoryview:
    if type(buf) is memoryview and buf.format == "B" and buf.ndim == 1 and not buf.readonly:
        return buf
    view = as_byte_view(buf, op)
    if view.readonly:
        raise ValueError(f"{op}: the receive buffer is read-only")
    return view


class _Conn:
    """One stream to one peer; it is the FrameReader's handler, so frames arrive as method calls."""

    __slots__ = (
        "addr",
        "closed",
        "connecting",
        "dirty",
        "fd",
        "head_partial",
        "name",
        "paused",
        "plugin",
        "put_target",
        "reader",
        "rma",
        "sendq",
        "sock",
        "writing",
    )

    def __init__(self, plugin: SocketPlugin, sock: socket.socket, name: str,
                 connecting: bool) -> None:
        self.plugin = plugin
        self.sock = sock
        self.fd = sock.fileno()
        self.addr: Addr | None = None
        self.name = name
        self.reader = fr.FrameReader(self, plugin._max_msg, plugin._rma_chunk, name)
        self.sendq: deque[list[Any]] = deque()
        self.head_partial = False
        self.connecting = connecting
        self.writing = connecting
        self.paused = False
        self.dirty = False
        self.closed = False
        self.rma: dict[int, tuple[Op, memoryview | None]] = {}
        self.put_target: tuple[int, memoryview | None, int] | None = None

    def on_event(self, ev: int) -> None:
        if ev & _EPOLLOUT:
            self.plugin._on_writable(self)
        if ev & _EPOLLRD and not self.closed:
            self.plugin._on_readable(self)

    def frame(self, kind: int, flags: int, tag: int, payload: memoryview | None) -> None:
        p = self.plugin
        addr = self.addr
        if addr is None:
            if kind != fr.HELLO:
                raise ProtocolError("handshake", self.name, f"frame kind {kind} before hello")
            p._on_hello(self, flags, bytes(payload))  # type: ignore[arg-type]
        elif kind == _EXPECTED:
            p._deliver(self, addr, tag, payload, False)  # type: ignore[arg-type]
        elif kind == _UNEXPECTED:
            p._deliver(self, addr, tag, payload, True)  # type: ignore[arg-type]
        elif kind in (fr.GET_RESP, fr.RMA_ACK):
            entry = self.rma.pop(tag, None)
            if entry is not None:
                p._chunk_done(entry[0], None)
        elif kind == fr.GET_REQ:
            p._serve_get(self, tag, payload)  # type: ignore[arg-type]
        elif kind == fr.PUT_REQ:
            if self.put_target is not None:
                raise ProtocolError("put", addr.uri, "two put requests without data between")
            self.put_target = p._check_put(self, tag, payload)  # type: ignore[arg-type]
        elif kind == fr.PUT_DATA:
            op_id, _dest, nak = self.put_target  # type: ignore[misc]
            self.put_target = None
            if nak:
                p._send_nak(self, op_id, nak)
            else:
                p._enqueue(self, [_HDR.pack(_MAGIC, fr.RMA_ACK, 0, 0, op_id)], fr.HEADER_SIZE, None)
        elif kind == fr.RMA_NAK:
            entry = self.rma.pop(tag, None)
            reason = payload[0] if payload else fr.NAK_PROTOCOL  # type: ignore[index]
            if entry is not None:
                op = entry[0]
                what = "get" if op.kind == OpKind.GET else "put"
                p._chunk_done(op, AccessError(what, addr.uri,
                                              _NAK_TEXT.get(reason, f"refused ({reason})")))
        else:
            raise ProtocolError("read frame", addr.uri, f"unexpected frame kind {kind}")

    def frame_header(self, kind: int, flags: int, length: int, tag: int) -> memoryview | None:
        if kind == fr.GET_RESP:
            entry = self.rma.get(tag)
            if entry is None or entry[0].state != _PENDING:
                return None
            dest = entry[1]
            if dest is None:
                raise ProtocolError("get", self.name, f"data for operation {tag}, which is a put")
            if len(dest) != length:  # type: ignore[arg-type]
                raise ProtocolError("get", self.name, f"reply of {length} B to a {len(dest)} B get")  # type: ignore[arg-type]
            return dest
        target = self.put_target
        if target is None:
            raise ProtocolError("put", self.name, "put data without a put request")
        dest = target[1]
        if dest is not None and len(dest) != length:
            raise ProtocolError("put", self.name, f"{length} B of data for a {len(dest)} B put")
        return dest


class SocketPlugin(RmaMixin):
    """The generic implementation; subclasses supply addressing and socket creation."""

    scheme = ""
    log = logging.getLogger("petasus.na")

    def __init__(self, listen: bool, *, max_msg_size: int = MAX_MSG_SIZE,
                 spin_us: int = SPIN_US, rma_chunk: int = RMA_CHUNK,
                 max_queued: int = MAX_QUEUED) -> None:
        if max_msg_size < 1 or rma_chunk < 1:
            raise ValueError("max_msg_size and rma_chunk must be positive")
        self._max_msg = max_msg_size
        self._spin = max(spin_us, 0) / 1e6
        self._rma_chunk = rma_chunk
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, _EPOLLIN)
        self._fdmap: dict[int, Callable[[int], None]] = {self._wake_fd: self._drain_wake}
        self._polling = 0  # threads asleep in epoll: senders then flush and wake at once
        self._in_pass = 0  # >0 while progress dispatches or trigger runs callbacks (nesting)
        self._accept_resume = 0.0  # when accepting resumes after running out of descriptors
        self._completed = 0  # ops finished without a callback: progress all the same
        self._closed = False
        self._cq: deque[Op] = deque()
        self._unexp_posted: deque[Op] = deque()
        self._unexp_queue: deque[tuple[Addr, int, bytes, _Conn]] = deque()
        self._exp_posted: dict[tuple[Addr, int], deque[Op]] = {}
        self._queued = 0
        self._paused: set[_Conn] = set()
        self._dirty: list[_Conn] = []
        self._conns: set[_Conn] = set()
        self._peers: dict[str, Addr] = {}
        # Peers that do not listen, by the URI their HELLO gave: a lookup of that URI (say, the
        # owner of a bulk handle they sent) reaches them over their live connection.
        self._anon: dict[str, Addr] = {}
        self._regs: dict[int, MemHandle] = {}
        self._ids = itertools.count(1)
        self._listener: socket.socket | None = None
        self.stats = dict.fromkeys(
            ("msgs_sent", "msgs_received", "bytes_sent", "bytes_received", "rma_ops",
             "rma_bytes", "rma_served", "rma_refused", "connections", "peer_failures",
             "protocol_errors", "canceled", "expected_dropped"), 0)
        try:
            uri = self._open(listen)
        except BaseException:
            self._ep.close()
            os.close(self._wake_fd)
            raise
        self._self_addr = Addr(uri, listen)
        self._listening = listen

    # -- subclass hooks -------------------------------------------------------------------------
    def _open(self, listen: bool) -> str:
        """Create the listener (when listening); return this instance's URI."""
        raise NotImplementedError

    def _canonical(self, uri: str) -> str:
        """Validate a peer URI and return its canonical spelling (raise ValueError if malformed)."""
        raise NotImplementedError

    def _connect(self, addr: Addr) -> tuple[socket.socket, bool]:
        """Start a non-blocking connection; return the socket and whether it is still connecting."""
        raise NotImplementedError

    def _tune(self, sock: socket.socket) -> None:
        """Per-socket options (TCP_NODELAY and the like)."""

    def _on_close(self) -> None:
        """Release plugin-specific resources."""

    def _owns_anonymous(self, conn: _Conn, uri: str) -> bool:
        """Whether the peer on ``conn`` may be looked up by ``uri`` (see _on_hello)."""
        return False

    # -- context manager, repr, introspection ---------------------------------------------------
    def __enter__(self) -> SocketPlugin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._conns)} connections"
        return f"<{type(self).__name__} {self._self_addr.uri} {state}>"

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        out.update(uri=self._self_addr.uri, open_connections=len(self._conns),
                   registrations=len(self._regs), queued_bytes=self._queued,
                   spin_us=int(self._spin * 1e6))
        return out

    # -- addresses ------------------------------------------------------------------------------
    def addr_self(self) -> Addr:
        return self._self_addr

    def addr_lookup(self, uri: str) -> Addr:
        self._check_open("addr_lookup")
        with self._lock:
            anon = self._anon.get(uri) if uri not in self._peers else None
        if anon is not None:
            return anon
        canonical = self._canonical(uri)
        with self._lock:
            addr = self._peers.get(canonical)
            if addr is None:
                addr = self._peers[canonical] = Addr(canonical, True)
            return addr

    def addr_to_string(self, addr: Addr) -> str:
        return addr.uri

    def addr_serialize(self, addr: Addr) -> bytes:
        return addr.uri.encode()

    def addr_deserialize(self, data: bytes) -> Addr:
        uri = bytes(data).decode("utf-8", "replace")
        with self._lock:
            known = self._peers.get(uri)
        return known if known is not None else self.addr_lookup(uri)

    # -- messages -------------------------------------------------------------------------------
    def msg_get_max_unexpected_size(self) -> int:
        return self._max_msg

    def msg_get_max_expected_size(self) -> int:
        return self._max_msg

    def msg_send_unexpected(self, addr: Addr, buf: Any, tag: int,
                            callback: Callback | None = None) -> Op:
        return self._send_msg(OpKind.SEND_UNEXPECTED, _UNEXPECTED, addr, buf, tag, callback)

    def msg_send_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op:
        return self._send_msg(OpKind.SEND_EXPECTED, _EXPECTED, addr, buf, tag, callback)

    def _send_msg(self, kind: OpKind, frame_kind: int, addr: Addr, buf: Any, tag: int,
                  callback: Callback | None) -> Op:
        view = message_view(kind, buf, tag, self._max_msg)
        n = len(view)
        op = Op(kind, callback, view, addr, tag)
        with self._lock:
            if self._closed:
                self._check_open(kind.name.lower())
            conn = addr.conn
            if conn is None:
                conn = self._conn_for(addr, op)
            if conn is not None:
                self.stats["msgs_sent"] += 1
                self.stats["bytes_sent"] += n
                self._enqueue(conn, [_HDR.pack(_MAGIC, frame_kind, 0, n, tag), view],
                              n + fr.HEADER_SIZE, op)
        return op

    def msg_recv_unexpected(self, buf: Any, callback: Callback | None = None) -> Op:
        op = Op(OpKind.RECV_UNEXPECTED, callback, _recv_view(buf, "msg_recv_unexpected"))
        with self._lock:
            self._check_open("msg_recv_unexpected")
            if self._unexp_queue:
                addr, tag, data, conn = self._unexp_queue.popleft()
                self._unqueue(len(data), conn)
                self._fill(op, addr, tag, data)
                self._post(op)
            else:
                self._unexp_posted.append(op)
        return op

    def msg_recv_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op:
        op = Op(OpKind.RECV_EXPECTED, callback, _recv_view(buf, "msg_recv_expected"), addr, tag)
        key = (addr, tag)
        with self._lock:
            self._check_open("msg_recv_expected")
            if addr.dead:
                self._fail(op, PeerError("msg_recv_expected", addr.uri, addr.dead))
            else:
                self._exp_posted.setdefault(key, deque()).append(op)
        return op

    def _deliver(self, conn: _Conn, addr: Addr, tag: int, payload: memoryview,
                 unexpected: bool) -> None:
        self.stats["msgs_received"] += 1
        if unexpected:
            posted = self._unexp_posted
            if posted:
                op = posted.popleft()
                self._fill(op, addr, tag, payload)
                self._post(op)
                return
            data = bytes(payload)
            self._unexp_queue.append((addr, tag, data, conn))
        else:
            key = (addr, tag)
            waiting = self._exp_posted.get(key)
            if waiting:
                op = waiting.popleft()
                if not waiting:
                    del self._exp_posted[key]
                self._fill(op, addr, tag, payload)
                self._post(op)
            else:
                # As in Mercury, expected messages must be pre-posted; one without a receive is
                # a late reply to something canceled or timed out, and holding it would let such
                # replies pile up until they stall the connection.
                self.stats["expected_dropped"] += 1
                self.log.debug("dropped an expected message from %s, tag %d: no receive posted",
                               addr.uri, tag)
            return
        self._queued += len(data)
        if self._queued > self._max_queued and not conn.paused:
            # Back-pressure instead of unbounded memory: stop reading this peer until drained.
            conn.paused = True
            self._paused.add(conn)
            self._set_mask(conn)

    def _fill(self, op: Op, addr: Addr, tag: int, data: Any) -> None:
        n = len(data)
        op.source = addr
        op.tag = tag
        if n > len(op.buffer):
            op.error = NAError(op.kind.name.lower(), addr.uri,
                               f"message of {n} B does not fit the {len(op.buffer)} B buffer")
        else:
            op.buffer[:n] = data
            op.size = n

    def _unqueue(self, n: int, conn: _Conn) -> None:
        self._queued -= n
        if self._paused and self._queued <= self._max_queued // 2:
            for c in self._paused:
                c.paused = False
                if not c.closed:
                    self._set_mask(c)
            self._paused.clear()

    # -- completion, cancel, progress -----------------------------------------------------------
    def _post(self, op: Op) -> None:
        op.state = _FINISHED
        if op.callback is None:
            # Nothing to run in trigger(): done now, without a trip through the queue.
            op.done = True
            self._completed += 1
            if self._polling:
                os.eventfd_write(self._wake_fd, 1)  # a thread asleep in epoll waits on it
            return
        self._cq.append(op)
        if self._polling:
            os.eventfd_write(self._wake_fd, 1)

    _finish = _post

    def _fail(self, op: Op, error: BaseException) -> None:
        if op.state != _FINISHED:
            op.error = error
            self._post(op)

    def trigger(self, max_count: int = 1 << 30) -> int:
        self._in_pass += 1
        try:
            n = run_completions(self._cq, max_count)
        finally:
            self._in_pass -= 1
        if self._dirty and not self._in_pass:
            # What the callbacks of this pass sent leaves together, now.
            with self._lock:
                self._flush_dirty()
        return n

    def cancel(self, op: Op) -> None:
        with self._lock:
            if op.state != _PENDING:
                return
            self.stats["canceled"] += 1
            peer = op.addr.uri if op.addr is not None else None
            error = Canceled(op.kind.name.lower(), peer, "canceled")
            kind = op.kind
            if kind == OpKind.RECV_UNEXPECTED:
                self._unexp_posted.remove(op)
            elif kind == OpKind.RECV_EXPECTED:
                key = (op.addr, op.tag)
                waiting = self._exp_posted[key]  # type: ignore[index]
                waiting.remove(op)
                if not waiting:
                    del self._exp_posted[key]  # type: ignore[arg-type]
            elif kind == OpKind.PUT:
                # The data may still be on its way out of our queue; finish once it is acked.
                op.state = _CANCELING
                return
            elif (kind in (OpKind.SEND_UNEXPECTED, OpKind.SEND_EXPECTED)
                  and not self._unqueue_send(op)):
                op.state = _CANCELING
                return
            elif kind == OpKind.GET:
                # Later chunks are discarded by frame_header; one arriving right now must stop
                # landing in the user's memory before the cancel completes.
                conn = op.addr.conn if op.addr is not None else None
                landing = conn.reader.landing_in() if conn is not None else None
                if landing is not None:
                    entry = conn.rma.get(landing[0])  # type: ignore[union-attr]
                    if entry is not None and entry[0] is op:
                        conn.reader.discard_rest()  # type: ignore[union-attr]
            op.error = error
            self._post(op)

    def _unqueue_send(self, op: Op) -> bool:
        """Withdraw a send whose first byte has not left; False if it is already partly sent."""
        conn = op.addr.conn if op.addr is not None else None
        if conn is None:
            return True
        q = conn.sendq
        for i, item in enumerate(q):
            if item[1] is op:
                if i == 0 or (i == 1 and conn.head_partial):
                    return False
                del q[i]
                del q[i - 1]
                return True
        return True

    def poll_fd(self) -> int:
        return self._ep.fileno()

    def progress(self, timeout: float = 0.0) -> bool:
        """Move bytes for up to ``timeout`` seconds; True once it sent what was queued or
        completions are ready to trigger.

        Spins (non-blocking polls, yielding the CPU in between) for the spin budget after any
        event before blocking in epoll: a blocking wake-up costs ~10x a polled round trip here.
        """
        self._check_open("progress")
        cq, dirty, lock = self._cq, self._dirty, self._lock
        if dirty:
            # Sending what callers queued is progress: return, so that a caller driving
            # several plugins (or waiting for the answer) gets on with it.
            with lock:
                self._flush_dirty()
            return True
        if cq:
            return True
        if self._accept_resume and time.monotonic() >= self._accept_resume:
            self._accept_resume = 0.0
            with lock:
                if self._listener is not None and not self._closed:
                    self._ep.modify(self._listener.fileno(), _EPOLLIN)
        done = self._completed
        poll, dispatch, spin = self._ep.poll, self._dispatch, self._spin
        now = time.monotonic()
        deadline = now + timeout
        spin_end = now + spin
        while True:
            if dirty:
                with lock:
                    self._flush_dirty()
            if cq or self._completed != done:
                return True
            events = poll(0)
            if events:
                dispatch(events)
                if cq or self._completed != done:
                    return True
                now = time.monotonic()
                if now >= deadline:
                    return False  # busy with work that completes nothing here: still bounded
                spin_end = now + spin
                continue
            now = time.monotonic()
            if now >= deadline:
                return False
            if now < spin_end:
                os.sched_yield()
                continue
            self._polling += 1  # a count: several threads may sleep here at once
            try:
                if cq or dirty or self._completed != done:
                    continue
                events = poll(deadline - now)
            finally:
                self._polling -= 1
            if events:
                dispatch(events)
                if cq or self._completed != done:
                    return True
                spin_end = time.monotonic() + spin

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        fdmap = self._fdmap
        with self._lock:
            self._in_pass += 1
            try:
                for fd, ev in events:
                    handler = fdmap.get(fd)
                    if handler is not None:
                        handler(ev)
            finally:
                self._in_pass -= 1

    def _drain_wake(self, ev: int) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    # -- connections ----------------------------------------------------------------------------
    def _conn_for(self, addr: Addr, op: Op) -> _Conn | None:
        """The live connection to ``addr``, connecting on first use; None after failing ``op``."""
        conn = addr.conn
        if conn is not None:
            return conn  # type: ignore[no-any-return]
        name = op.kind.name.lower()
        if addr.dead:
            self._fail(op, PeerError(name, addr.uri, addr.dead))
            return None
        if not addr.listening:
            self._fail(op, PeerError(name, addr.uri, "the peer does not listen and its "
                                     "connection is gone"))
            return None
        try:
            sock, connecting = self._connect(addr)
        except OSError as exc:
            cause = f"could not connect: {exc}"
            self._fail(op, PeerError(name, addr.uri, cause))
            self._fail_expected(addr, lambda o: PeerError(o.kind.name.lower(), addr.uri, cause))
            return None
        self._tune(sock)
        conn = _Conn(self, sock, addr.uri, connecting)
        conn.addr = addr
        addr.conn = conn
        self._add_conn(conn)
        hello = self._self_addr.uri.encode()
        self._enqueue(conn, [_HDR.pack(_MAGIC, fr.HELLO, int(self._listening), len(hello), 0),
                             hello], fr.HEADER_SIZE + len(hello), None)
        return conn

    def _add_conn(self, conn: _Conn) -> None:
        self.stats["connections"] += 1
        self._conns.add(conn)
        self._fdmap[conn.fd] = conn.on_event
        self._ep.register(conn.fd, _EPOLLRD | (_EPOLLOUT if conn.writing else 0))

    def _accept(self, ev: int) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors or memory: stop listening for a moment instead of
                # spinning on a listener that stays readable.
                self.log.warning("%s: accept failed (%s); pausing accepts for %.1f s",
                                 self._self_addr.uri, exc, _ACCEPT_PAUSE)
                self._ep.modify(self._listener.fileno(), 0)  # type: ignore[union-attr]
                self._accept_resume = time.monotonic() + _ACCEPT_PAUSE
                return
            sock.setblocking(False)
            self._tune(sock)
            self._add_conn(_Conn(self, sock, f"{self.scheme} peer {peer or 'local'}", False))

    def _on_hello(self, conn: _Conn, flags: int, payload: bytes) -> None:
        uri = payload.decode("utf-8", "replace")
        if not uri.startswith(self.scheme + "://") or len(uri) > 1024:
            raise ProtocolError("handshake", conn.name, f"bad peer URI {uri[:80]!r}")
        if flags & 1:
            # A listener is one peer however many connections reach us from it.
            addr = self._peers.get(uri)
            if addr is None:
                addr = self._peers[uri] = Addr(uri, True)
            if addr.conn is None:
                addr.conn = conn
            addr.dead = None
        else:
            # A peer that does not listen is reachable only over this very connection: one Addr
            # per connection, so a reconnect (or an impostor) never takes over another's replies.
            addr = Addr(uri, False)
            addr.conn = conn
            known = self._anon.get(uri)
            # First come, and only a URI of the anonymous kind that this connection can own:
            # a peer cannot take over a listener's address, or another peer's.
            if (known is None or known.conn is None) and self._owns_anonymous(conn, uri):
                self._anon[uri] = addr
        conn.addr = addr
        conn.name = uri
        conn.reader.peer = uri

    def _set_mask(self, conn: _Conn) -> None:
        mask = (0 if conn.paused else _EPOLLRD) | (_EPOLLOUT if conn.writing else 0)
        self._ep.modify(conn.fd, mask)

    def _enqueue(self, conn: _Conn, bufs: list[Any], total: int, op: Op | None) -> None:
        """Queue whole frames for ``conn`` and send them now, or at the end of the current pass.

        Inside a progress or trigger pass sends are coalesced: what the pass queues leaves in
        one ``sendmsg`` when it ends (a trigger pass that answers 16 requests makes one
        syscall, not 16). Outside a pass, or while another thread sleeps in epoll, they leave
        at once.
        """
        q = conn.sendq
        for buf in bufs:
            q.append([buf, None])
        q[-1][1] = op
        if conn.writing or conn.connecting:
            return  # EPOLLOUT is armed; _on_writable sends it
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)
        if not self._in_pass or self._polling or len(q) >= _FLUSH_AT:
            # Outside a progress or trigger pass nobody would flush soon: send now.
            self._flush_dirty()

    def _flush_dirty(self) -> None:
        dirty = self._dirty
        while dirty:
            conn = dirty.pop()
            conn.dirty = False
            if not conn.closed and not conn.writing and not conn.connecting:
                self._flush(conn)

    def _on_writable(self, conn: _Conn) -> None:
        if conn.connecting:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._conn_failed(conn, f"could not connect: {os.strerror(err)}")
                return
            conn.connecting = False
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        """Send what the kernel takes; arm EPOLLOUT only while something is left."""
        q, sock = conn.sendq, conn.sock
        while q:
            bufs = [q[0][0]] if len(q) == 1 else [item[0] for item in itertools.islice(q, _IOV_MAX)]
            try:
                n = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                if not conn.writing:
                    conn.writing = True
                    self._set_mask(conn)
                return
            except OSError as exc:
                self._conn_failed(conn, f"send failed: {exc}")
                return
            # Consume what was sent; zero-length items (an empty payload) go with it.
            while q and (n or not len(q[0][0])):
                item = q[0]
                ln = len(item[0])
                if n >= ln:
                    n -= ln
                    q.popleft()
                    conn.head_partial = False
                    op = item[1]
                    if op is not None:
                        self._send_done(op)
                else:
                    item[0] = item[0][n:]
                    conn.head_partial = True
                    n = 0
        if conn.writing:
            conn.writing = False
            self._set_mask(conn)

    def _send_done(self, op: Op) -> None:
        if op.state == _CANCELING:
            op.error = Canceled(op.kind.name.lower(), op.addr.uri if op.addr else None, "canceled")
        self._post(op)

    def _on_readable(self, conn: _Conn) -> None:
        reader, recv_into = conn.reader, conn.sock.recv_into
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

    def _conn_failed(self, conn: _Conn, cause: str, canceled: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        self._paused.discard(conn)
        self._fdmap.pop(conn.fd, None)
        try:
            self._ep.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()
        peer = conn.addr.uri if conn.addr is not None else conn.name
        if not canceled:
            self.stats["peer_failures"] += 1
            self.log.info("connection to %s lost: %s", peer, cause)

        def error(op: Op) -> BaseException:
            name = op.kind.name.lower()
            if canceled or op.state == _CANCELING:
                return Canceled(name, peer, cause)
            return PeerError(name, peer, cause)

        for _buf, op in conn.sendq:
            if op is not None and op.state != _FINISHED:
                op.error = error(op)
                self._post(op)
        conn.sendq.clear()
        for op, _dest in list(conn.rma.values()):
            if op.state != _FINISHED:
                op.error = error(op)
                self._post(op)
        conn.rma.clear()
        addr = conn.addr
        if addr is not None and addr.conn is conn:
            addr.conn = None
            if not addr.listening:
                addr.dead = cause
                if self._anon.get(addr.uri) is addr:
                    del self._anon[addr.uri]
            self._fail_expected(addr, error)

    def _fail_expected(self, addr: Addr, error: Callable[[Op], BaseException]) -> None:
        """Fail the receives posted for replies from ``addr``: none will come."""
        for key in [k for k in self._exp_posted if k[0] is addr]:
            for op in self._exp_posted.pop(key):
                op.error = error(op)
                self._post(op)

    # -- lifecycle ------------------------------------------------------------------------------
    def _check_open(self, op: str) -> None:
        if self._closed:
            raise RuntimeError(f"{op}: {self!r} is closed")

    def close(self) -> None:
        """Close every connection; pending operations complete as canceled (run trigger())."""
        with self._lock:
            if self._closed:
                return
            self._flush_dirty()  # best effort: what the kernel takes now still leaves
            for conn in list(self._conns):
                self._conn_failed(conn, "the plugin was closed", canceled=True)
            for op in self._unexp_posted:
                self._fail(op, Canceled(op.kind.name.lower(), None, "the plugin was closed"))
            self._unexp_posted.clear()
            for ops in self._exp_posted.values():
                for op in ops:
                    self._fail(op, Canceled(op.kind.name.lower(), op.addr.uri, "closed"))
            self._exp_posted.clear()
            self._closed = True
            if self._listener is not None:
                self._listener.close()
            self._ep.close()
            os.close(self._wake_fd)
            self._on_close()

    def _listen_on(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.listen(socket.SOMAXCONN)
        self._listener = sock
        self._fdmap[sock.fileno()] = self._accept
        self._ep.register(sock.fileno(), _EPOLLIN)
