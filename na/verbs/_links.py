"""Connections of the verbs plugin: the out-of-band TCP handshake, RC queue pairs, sending
frames and RDMA pieces within credits, receiving frames from the SRQ, retiring a queue pair
that hit an error and failing a peer that went away.

A connection is one TCP socket and one RC QP pair. The dialer creates its QP, connects and
sends its hello (QP number, PSN, LID, GID, MTU, credits, URI); the listener creates a QP for
it, moves it to RTS towards the dialer's and answers with its own hello; the dialer moves its
QP to RTS and the queued work goes out. The socket stays open as the liveness channel: end of
stream means the peer is gone (``PeerError`` for everything pending with it, at once), unless
a retire record came first. An RC QP moves to the error state when the NIC refuses a remote
access (forged key, bounds, rights): the side that sees the error retires that connection (a
retire record to the peer, the QP flushed and destroyed) and the next work to the peer dials
a fresh one, so one refused RMA fails only itself. Work a flushed QP gave back is posted
again on the new connection (an RC QP executes in order: flushed work did not happen).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections.abc import Callable
from typing import Any

from ..errors import NAError, PeerError
from ..types import Addr, Op, OpKind, OpState
from . import _protocol as p
from . import _wire as w

log = logging.getLogger("petasus.na.verbs")

DIALING, WAITING, ACCEPTING, UP, RETIRED, DEAD = range(6)
_STATES = ("dialing", "waiting", "accepting", "up", "retired", "dead")


class Conn:
    """One RC connection to a peer (``addr`` None while an accepted one is still unnamed)."""

    __slots__ = ("addr", "credits", "dialed", "out", "psn", "qp", "qpn", "reader", "reserved",
                 "sock", "sq", "state")

    def __init__(self, addr: Addr | None, sock: socket.socket, state: int,
                 dialed: bool) -> None:
        self.addr = addr
        self.sock: socket.socket | None = sock
        self.state = state
        self.dialed = dialed
        self.reader = w.OobReader()
        self.out = b""  # out-of-band bytes not yet written
        self.qp: Any = None
        self.qpn = 0
        self.psn = 0
        self.reserved = 0  # receive slots reserved for it in the SRQ budget
        self.credits = p.Credits((1, 1), (p.DATA_CREDITS, p.CTRL_CREDITS))
        self.sq = p.SendQueue(self.credits)

    def __repr__(self) -> str:
        peer = self.addr.uri if self.addr is not None else "?"
        return f"<Conn {peer} qpn={self.qpn} {_STATES[self.state]}>"


class Links:
    """Mixin of ``VerbsPlugin`` (its state is created in ``VerbsPlugin.__init__``)."""

    # -- connections ----------------------------------------------------------------------------
    def _conn_for(self, addr: Addr) -> Conn:
        """The connection new work to ``addr`` goes to: the current one, or a new dial."""
        conn: Conn | None = addr.conn
        if conn is not None and conn.state not in (RETIRED, DEAD):
            return conn
        parts = w.parse_uri(addr.uri)
        family = socket.AF_INET6 if ":" in parts.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        conn = Conn(addr, sock, DIALING, True)
        addr.conn = conn
        self._conns.append(conn)
        rc = sock.connect_ex((parts.host, parts.tcp_port))
        self._fds[sock.fileno()] = conn
        if rc not in (0, errno.EINPROGRESS):
            self._peer_failed(addr, f"could not connect to {parts.host}:{parts.tcp_port}: "
                                    f"{errno.errorcode.get(rc, rc)}")
            return conn
        self._poll_set.register(sock.fileno(), select.EPOLLOUT)
        return conn

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(None, sock, ACCEPTING, False)
            self._conns.append(conn)
            self._fds[sock.fileno()] = conn
            self._poll_set.register(sock.fileno(), select.EPOLLIN)

    def _my_hello(self, conn: Conn, status: int = w.ACCEPT, reason: str = "") -> bytes:
        dev = self._dev
        return w.encode_hello(w.Hello(status, dev.mtu, dev.lid, conn.qpn, conn.psn,
                                      dev.port, dev.gid, p.DATA_CREDITS, p.CTRL_CREDITS,
                                      self._max_msg, reason or self._self_addr.uri))

    def _new_qp(self, conn: Conn) -> None:
        """Reserve the connection's receive slots and create its QP (INIT)."""
        grant = p.DATA_CREDITS + p.CTRL_CREDITS
        more = self._budget.reserve(grant)
        conn.reserved = grant
        try:
            while more > 0:
                self._grow_recv()
                more -= self._recv_pool.per_chunk
        except NAError:
            self._budget.posted -= more  # never posted: a later connection posts them
            raise
        conn.qp, conn.psn = self._dev.new_qp()
        conn.qpn = int(conn.qp.qp_num)
        conn.sq.depth = self._dev.sq_depth
        self._by_qpn[conn.qpn] = conn

    def _on_socket(self, conn: Conn, events: int) -> None:
        if conn.state == DIALING and events & (select.EPOLLOUT | select.EPOLLERR):
            self._dialed(conn)
            return
        if events & select.EPOLLOUT and conn.out:
            self._write(conn, b"")
        if not events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = conn.sock.recv(4096) if conn.sock is not None else b""
        except BlockingIOError:
            return
        except OSError as exc:
            data, cause = b"", f"connection reset ({exc.strerror})"
        else:
            cause = "the peer closed its connection"
        if not data:
            self._socket_closed(conn, cause)
            return
        try:
            records = conn.reader.feed(data)
        except w.WireError as exc:
            self._protocol_error(conn, f"out-of-band stream: {exc}")
            return
        for record in records:
            if isinstance(record, w.Retire):
                self._retire(conn, "the peer retired it", tell=False)
            elif conn.state == ACCEPTING:
                self._on_hello(conn, record)
            elif conn.state == WAITING:
                self._on_reply(conn, record)
            else:
                self._protocol_error(conn, "a second hello")

    def _dialed(self, conn: Conn) -> None:
        sock, addr = conn.sock, conn.addr
        rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
        if rc:
            parts = w.parse_uri(addr.uri)  # type: ignore[union-attr]
            self._peer_failed(addr, f"could not connect to {parts.host}:{parts.tcp_port}: "  # type: ignore[arg-type]
                                    f"{errno.errorcode.get(rc, rc)}")
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        try:
            self._new_qp(conn)
        except (ValueError, NAError) as exc:
            self._peer_failed(addr, f"no room for a connection here: {exc}")  # type: ignore[arg-type]
            return
        conn.state = WAITING
        self._poll_set.modify(sock.fileno(), select.EPOLLIN)  # type: ignore[union-attr]
        self._write(conn, self._my_hello(conn))

    def _on_hello(self, conn: Conn, hello: w.Hello) -> None:
        try:
            uri = str(w.parse_uri(hello.uri))
        except ValueError as exc:
            self._protocol_error(conn, f"hello: {exc}")
            return
        addr = conn.addr = self._lookup(uri)
        try:
            self._check_compatible(hello)
            self._new_qp(conn)
            self._dev.connect(conn.qp, conn.psn, hello)
        except (ValueError, NAError, OSError) as exc:
            log.warning("%s: refused a connection from %s: %s", self._self_addr.uri, uri, exc)
            self._write(conn, self._my_hello(conn, w.REFUSE, f"refused: {exc}"[:w.MAX_URI]))
            self._retire(conn, str(exc), tell=False)
            return
        self._write(conn, self._my_hello(conn))
        self._up(conn, hello)
        addr.dead = None  # a new incarnation at that address
        current: Conn | None = addr.conn
        if current is None or current.state in (RETIRED, DEAD):
            addr.conn = conn

    def _on_reply(self, conn: Conn, hello: w.Hello) -> None:
        addr: Addr = conn.addr  # type: ignore[assignment]
        if hello.status == w.REFUSE:
            self._peer_failed(addr, f"the peer refused the connection: {hello.uri}")
            return
        try:
            self._check_compatible(hello)
            self._dev.connect(conn.qp, conn.psn, hello)
        except (ValueError, NAError, OSError) as exc:
            self._peer_failed(addr, f"could not connect the queue pairs: {exc}")
            return
        self._up(conn, hello)
        self._flush(conn)

    def _check_compatible(self, hello: w.Hello) -> None:
        """Both ends' receive slots hold max_msg_size bytes of payload: a frame sized for a
        larger slot would fail the peer's receive (IBV_WC_LOC_LEN_ERR) and kill the QP."""
        if hello.max_msg != self._max_msg:
            raise ValueError(f"the peer's max_msg_size is {hello.max_msg} B, ours "
                             f"{self._max_msg} B: both ends must use the same")

    def _up(self, conn: Conn, hello: w.Hello) -> None:
        conn.credits.limit = (hello.credits, hello.ctrl)
        conn.credits.withheld = self._matcher.throttled
        conn.state = UP
        self.stats["connections"] += 1

    def _write(self, conn: Conn, data: bytes) -> None:
        conn.out += data
        sock = conn.sock
        if sock is None or not conn.out:
            return
        try:
            n = sock.send(conn.out)
        except BlockingIOError:
            n = 0
        except OSError:
            return  # the read side reports the failure
        conn.out = conn.out[n:]
        mask = select.EPOLLIN | (select.EPOLLOUT if conn.out else 0)
        self._poll_set.modify(sock.fileno(), mask)

    # -- ending connections ---------------------------------------------------------------------
    def _socket_closed(self, conn: Conn, cause: str) -> None:
        if conn.state in (RETIRED, DEAD) or conn.addr is None:
            self._close_socket(conn)
            if conn.state == ACCEPTING:
                conn.state = DEAD
                self._conns.remove(conn)
            return
        self._peer_failed(conn.addr, cause)

    def _protocol_error(self, conn: Conn, cause: str) -> None:
        self.stats["protocol_errors"] += 1
        peer = conn.addr.uri if conn.addr is not None else "an unnamed peer"
        log.warning("%s: closing the connection with %s: %s", self._self_addr.uri, peer, cause)
        if conn.addr is None:
            self._close_socket(conn)
            conn.state = DEAD
            self._conns.remove(conn)
        else:
            self._peer_failed(conn.addr, f"protocol error: {cause}")

    def _close_socket(self, conn: Conn) -> None:
        if conn.sock is not None:
            self._fds.pop(conn.sock.fileno(), None)
            try:
                self._poll_set.unregister(conn.sock.fileno())
            except (OSError, ValueError):
                pass
            conn.sock.close()
            conn.sock = None

    def _retire(self, conn: Conn, why: str, tell: bool = True) -> None:
        """Stop using ``conn``: its posted work flushes and is posted again elsewhere."""
        if conn.state in (RETIRED, DEAD):
            return
        log.info("%s: retiring %r: %s", self._self_addr.uri, conn, why)
        self.stats["retired"] += 1
        conn.state = RETIRED
        if tell and conn.sock is not None:
            try:  # a few bytes into an idle socket: a short blocking send is enough
                conn.sock.settimeout(1.0)
                conn.sock.sendall(conn.out + w.encode_retire(conn.qpn))
                conn.sock.setblocking(False)
            except OSError:
                pass
            conn.out = b""
        addr = conn.addr
        if addr is not None and addr.conn is conn:
            addr.conn = None
        waiting = list(conn.sq.queue)
        conn.sq.queue.clear()
        if conn.qp is not None:
            self._dev.fail_qp(conn.qp)
        for out in waiting:
            self._requeue(conn, out)
        self._maybe_destroy(conn)

    def _maybe_destroy(self, conn: Conn) -> None:
        """Release a retired or dead connection once its QP has given all its work back."""
        if conn.state not in (RETIRED, DEAD) or conn.sq.inflight:
            return
        self._close_socket(conn)
        if conn.qp is not None:
            self._by_qpn.pop(conn.qpn, None)
            self._dev.close_qp(conn.qp)
            conn.qp = None
        self._budget.release(conn.reserved)
        conn.reserved = 0
        if conn in self._conns:
            self._conns.remove(conn)

    def _peer_failed(self, addr: Addr, cause: str) -> None:
        """Fail everything pending with ``addr`` now; later work fails at once."""
        self.stats["peer_failures"] += 1
        log.info("%s: peer %s failed: %s", self._self_addr.uri, addr.uri, cause)
        addr.dead = cause
        addr.conn = None
        self._matcher.fail_expected(
            addr, lambda op: PeerError(op.kind.name.lower(), addr.uri, cause))
        for conn in [c for c in self._conns if c.addr is addr]:
            was = conn.state
            conn.state = DEAD
            for out in conn.sq.queue:
                self._fail_out(out, PeerError, cause)
            conn.sq.queue.clear()
            if conn.qp is not None and was != RETIRED:
                self._dev.fail_qp(conn.qp)
            self._maybe_destroy(conn)
        for wr_conn, out, _slot in self._work.values():
            if wr_conn.addr is addr:
                self._fail_out(out, PeerError, cause)
        for rma_id, (op, peer) in list(self._rma_wait.items()):
            if peer is addr:
                del self._rma_wait[rma_id]
                self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, cause))

    def _fail_out(self, out: p.Out, kind: Callable[[str, str | None, str], NAError],
                  cause: str) -> None:
        """Fail the op of ``out`` with ``kind`` unless it already finished."""
        op: Op | None = out.op
        if op is not None and op.state != OpState.FINISHED:
            self._cq.fail(op, kind(op.kind.name.lower(), op.addr.uri if op.addr else None,
                                   cause))

    def _requeue(self, conn: Conn, out: p.Out) -> None:
        """Post again, on the peer's current connection, work a retired one gave back."""
        op: Op | None = out.op
        if out.kind == w.CREDIT or (op is not None and op.state == OpState.FINISHED):
            return
        addr = conn.addr
        if addr is None or addr.dead:
            if op is not None:
                self._fail_out(out, PeerError, addr.dead if addr else "no connection")
            return
        target = self._conn_for(addr)
        target.sq.push(out)
        self._flush(target)

    # -- sending --------------------------------------------------------------------------------
    def _have_slot(self) -> bool:
        if self._send_pool.free:
            return True
        if self._send_pool.total >= self._max_send_slots:
            return False
        try:
            self._grow_send()
        except NAError as exc:  # out of registrable memory: frames wait for a free slot
            log.warning("%s: cannot add send slots: %s", self._self_addr.uri, exc)
            self._max_send_slots = self._send_pool.total
            return bool(self._send_pool.free)
        return True

    def _flush(self, conn: Conn) -> None:
        """Post what the connection's credits and depth allow, then a credit frame if due."""
        if conn.state != UP:
            return
        sq = conn.sq
        while True:
            out = sq.pop_ready(self._have_slot)
            if out is None:
                break
            self._post(conn, out)
        if (conn.state == UP and conn.credits.credit_due() and sq.inflight < sq.depth
                and self._have_slot()):
            sq.inflight += 1
            self._post(conn, p.Out(w.CREDIT, None))

    def _post(self, conn: Conn, out: p.Out) -> None:
        wr_id = self._next_wr = self._next_wr + 1
        slot = -1
        try:
            if out.kind:
                slot = self._send_pool.take()  # type: ignore[assignment]
                acked = conn.credits.on_send(out.kind)
                n = self._fill_slot(slot, out, acked)
                chunk, off = self._send_pool.where(slot)
                base, mr = self._send_chunks[chunk]
                self._work[wr_id] = (conn, out, slot)
                self._dev.post_send(conn.qp, wr_id, base + off, n, mr.lkey)
            else:
                self._work[wr_id] = (conn, out, slot)
                op: Op = out.op
                off, size = out.piece
                reg, remote = op.local.record, op.remote
                base = remote.record.addr if remote.local else remote.record
                self._dev.post_rdma(conn.qp, wr_id, op.kind == OpKind.GET,
                                    reg.addr + op.local_off + off, size, reg.mr.lkey,
                                    base + op.remote_off + off, remote.key)
        except NAError as exc:  # the QP cannot take it (error state): flush it ourselves
            log.info("%s: posting to %r failed: %s", self._self_addr.uri, conn, exc)
            self._work.pop(wr_id, None)
            conn.sq.done()
            if slot >= 0:
                self._send_pool.give(slot)
            self._retire(conn, f"post failed: {exc}")
            self._requeue(conn, out)

    def _fill_slot(self, slot: int, out: p.Out, acked: tuple[int, int]) -> int:
        """Copy a frame into its registered send slot; its length."""
        chunk, off = self._send_pool.where(slot)
        view = self._send_views[chunk]
        kind = out.kind
        if kind in (w.GET_REQ, w.PUT_REQ):
            op: Op = out.op
            head = w.encode_rma_req(kind, *acked, out.extra, op.remote.key, op.remote_off,
                                    op.length)
        elif kind in (w.GET_REP, w.PUT_REP):
            head = w.encode_rma_rep(kind, *acked, *out.extra)
        else:
            tag = out.op.tag if out.op is not None else 0
            head = w.encode_header(kind, tag, *acked)
        view[off:off + len(head)] = head
        n = len(head)
        data = out.data
        if data is not None:
            view[off + n:off + n + len(data)] = data
            n += len(data)
        return n
