"""One stream to one peer (tcp or Unix socket), and the send queue of the socket plugins.

``Conn`` is the ``FrameReader``'s handler: each frame kind is routed through a table (kind ->
handler) that the plugin builds once, so adding a kind is a row, not a branch, and the
connection knows nothing of matching or RMA. ``Outbox`` owns every connection's send queue:
frames queued during a progress or trigger pass leave together in one ``sendmsg`` when the
pass ends; outside a pass they leave at once.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import framing as fr
from .errors import ProtocolError
from .types import Addr, Op

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRD = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_IOV_MAX = 512
# Queued items (a frame is two: header and payload) that force a flush before the end of the
# pass: every 8 frames. Flushing every frame costs a syscall per message; flushing once per
# pass puts the two ends in lockstep, each idle while the other works through its batch of 16
# (16 calls in flight, 2 cores, tcp: callback window 90K/s at 64 or at 32, 117K/s at 16 and at
# 8, 104K/s at 4; the asyncio window, whose woken tasks' sends are held the same way, 69K/s
# at 64 and 86K/s at 16; bench/rpc.py and its patterns).
_FLUSH_AT = int(os.environ.get("PETASUS_FLUSH_AT", "16"))

# Why a connection's reads are paused (bits of ``Conn.paused``).
PAUSE_MATCHER = 1  # the matcher holds too many unmatched messages
PAUSE_BACKLOG = 2  # too many bytes queued to this peer (``na._limits.Backlog``)
# What a queued frame is counted for beyond its bytes: the queue entry, its header and its op
# cost memory too (measured ~300 B of RSS per queued small reply; bench/conn_limits.py).
FRAME_COST = 256

Route = Callable[["Conn", int, "memoryview | None"], None]


class Routing(NamedTuple):
    """What a connection hands its frames to, built once by the plugin for all of them: the
    table of frame kinds, the handshake, and where direct payloads land."""

    table: dict[int, Route]
    hello: Callable[[Conn, int, int, bytes], None]
    landing: Callable[[Conn, int, int, int], memoryview | None]


class Conn:
    """A socket, its frame reader, its send queue and the RMA it has in flight."""

    __slots__ = (
        "accepted",
        "active",
        "addr",
        "closed",
        "connecting",
        "dirty",
        "fd",
        "head_partial",
        "held",
        "hello",
        "landing",
        "last",
        "name",
        "paused",
        "put_target",
        "queued",
        "reader",
        "rma",
        "routes",
        "sendq",
        "shake",
        "sock",
        "writing",
    )

    def __init__(self, sock: socket.socket, name: str, connecting: bool, routing: Routing,
                 max_msg: int, max_direct: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.addr: Addr | None = None
        self.name = name
        self.routes, self.hello, self.landing = routing
        self.reader = fr.FrameReader(self, max_msg, max_direct, name)
        self.sendq: deque[list[Any]] = deque()
        self.connecting = self.writing = connecting  # EPOLLOUT says when the connect is done
        self.head_partial = self.dirty = self.closed = False
        # Why reads are off: a bit per reason (PAUSE_*), so that one resuming leaves the other.
        self.paused = 0
        # Connection limits (``na._limits``): whether the peer dialled us, traffic since the
        # last sweep and when it was last seen, and the bytes queued while EPOLLOUT is armed.
        self.accepted = self.active = False
        self.last = 0.0
        self.queued = 0
        # RMA chunks in flight from here: operation id -> (op, where a get's data lands).
        self.rma: dict[int, tuple[Op, memoryview | None]] = {}
        # The put request whose data is next on the stream: (id, destination, refusal).
        self.put_target: tuple[int, memoryview | None, int] | None = None
        # The handshake in progress (``na._peering.Shake``), and the frames a dialler holds
        # until its peer has proven it holds the auth_key.
        self.shake: Any = None
        self.held: list[tuple[list[Any], Op | None]] | None = None

    def mask(self) -> int:
        return (0 if self.paused else EPOLLRD) | (EPOLLOUT if self.writing else 0)

    def frame(self, kind: int, flags: int, tag: int, payload: memoryview | None) -> None:
        if self.addr is None:
            # The peer is not known yet: only its handshake frames are read (na._peering).
            self.hello(self, kind, flags, bytes(payload or b""))
            return
        route = self.routes.get(kind)
        if route is None:
            raise ProtocolError("read frame", self.addr.uri, f"unexpected frame kind {kind}")
        route(self, tag, payload)

    def frame_header(self, kind: int, flags: int, length: int, tag: int) -> memoryview | None:
        if self.addr is None or kind not in self.routes:
            # Not a frame this connection takes now (before the handshake, or while a
            # dialler waits for its peer's proof): its payload is discarded, never landed
            # in anyone's memory, and ``frame`` then refuses it.
            return None
        return self.landing(self, kind, length, tag)

    def __repr__(self) -> str:
        return f"<Conn {self.name}{' closed' if self.closed else ''}>"


@dataclass(eq=False, slots=True)
class Outbox:
    """The send queues: whole frames in, ``sendmsg`` scatter-gather out, coalesced per pass.

    ``sent(op)`` runs when the last byte of an op's frames has left; ``failed(conn, cause)``
    when the socket refuses; ``rearm(conn)`` when EPOLLOUT must be armed or disarmed;
    ``waking.polling`` counts the threads asleep in the plugin's poll (the completion queue's
    count, read as an attribute: it is checked on every send); ``backlog(conn)`` runs when an
    accepted connection's queue crosses ``high`` bytes or, paused, drains below ``low``
    (``na._guard.ConnGuard.backlog``).

    Queued bytes are counted only while EPOLLOUT is armed (``conn.writing``): a connection
    that keeps up flushes every pass, so its count is never needed and the fast path pays
    nothing for it; the count starts from the queue itself when a send first falls short.
    """

    sent: Callable[[Op], None]
    failed: Callable[[Conn, str], None]
    rearm: Callable[[Conn], None]
    waking: Any
    high: int = 1 << 62
    low: int = field(init=False)
    backlog: Callable[[Conn], None] | None = field(default=None, init=False)  # set by ConnGuard
    dirty: list[Conn] = field(default_factory=list, init=False)
    in_pass: int = field(default=0, init=False)  # >0 while progress dispatches or trigger runs
    # A small trigger pass's first message leaves at once (``EventLoop.hold``): set when the
    # pass begins, cleared by the first message sent directly.
    lead: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.low = self.high // 2

    def enqueue(self, conn: Conn, bufs: list[Any], op: Op | None, size: int = -1) -> None:
        """Queue whole frames for ``conn`` and send them now, or at the end of the pass.

        A trigger pass that answers 16 requests makes two syscalls (one per ``_FLUSH_AT``
        items), not 16; a pass of a few sends its first at once (``lead``). Outside a pass, or
        while another thread sleeps in epoll (nobody would flush soon), they leave at once.
        ``size``: the bytes of ``bufs`` in all, when the caller has counted them already.
        """
        if conn.held is not None:
            conn.held.append((bufs, op))  # until the peer has proven it holds the key
            return
        q = conn.sendq
        if not q and not self.dirty and not conn.writing and not conn.connecting and \
                (not self.in_pass or self.lead or self.waking.polling):
            # Nothing ahead of these frames and nothing to coalesce them with: one sendmsg,
            # no queue entries (the per-message path of a blocking call).
            try:
                n = conn.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                for buf in bufs:
                    q.append([buf, None])
                q[-1][1] = op
                self.failed(conn, f"send failed: {exc}")
                return
            conn.active = True
            self.lead = False
            if n == (size if size >= 0 else sum(map(len, bufs))):
                if op is not None:
                    self.sent(op)
                return
            self._queue_rest(conn, bufs, n, op)
            return
        for buf in bufs:
            q.append([buf, None])
        q[-1][1] = op
        if conn.writing or conn.connecting:
            # EPOLLOUT is armed; writable() sends it. The peer is not keeping up: count.
            conn.queued += sum(map(len, bufs)) + FRAME_COST * len(bufs)
            if conn.queued > self.high and conn.accepted and not conn.paused & PAUSE_BACKLOG:
                self.backlog(conn)  # type: ignore[misc]
            return
        if not conn.dirty:
            conn.dirty = True
            self.dirty.append(conn)
        if not self.in_pass or self.waking.polling or len(q) >= _FLUSH_AT:
            self.flush_dirty()

    def _queue_rest(self, conn: Conn, bufs: list[Any], n: int, op: Op | None) -> None:
        """Queue what the kernel did not take of a direct send, and wait for EPOLLOUT."""
        q = conn.sendq
        for buf in bufs:
            ln = len(buf)
            if not q and n >= ln:
                n -= ln  # sent whole
                continue
            if n:
                q.append([memoryview(buf)[n:], None])
                conn.head_partial = True
                n = 0
            else:
                q.append([buf, None])
        q[-1][1] = op
        conn.writing = True
        conn.queued = sum(len(item[0]) for item in q) + FRAME_COST * len(q)
        self.rearm(conn)
        if conn.queued > self.high and conn.accepted:
            self.backlog(conn)  # type: ignore[misc]

    def flush_dirty(self) -> None:
        dirty = self.dirty
        while dirty:
            conn = dirty.pop()
            conn.dirty = False
            if not conn.closed and not conn.writing and not conn.connecting:
                self.flush(conn)

    def writable(self, conn: Conn) -> None:
        if conn.connecting:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.failed(conn, f"could not connect: {os.strerror(err)}")
                return
            conn.connecting = False
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        """Send what the kernel takes; arm EPOLLOUT only while something is left."""
        q, sock = conn.sendq, conn.sock
        while q:
            bufs = [q[0][0]] if len(q) == 1 else [item[0] for item in itertools.islice(q, _IOV_MAX)]
            try:
                n = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                if not conn.writing:
                    conn.writing = True
                    conn.queued = sum(len(item[0]) for item in q) + FRAME_COST * len(q)
                    self.rearm(conn)
                if conn.accepted and (conn.queued > self.high) != bool(
                        conn.paused & PAUSE_BACKLOG):
                    self.backlog(conn)  # type: ignore[misc]
                return
            except OSError as exc:
                self.failed(conn, f"send failed: {exc}")
                return
            conn.active = True
            if conn.writing:
                conn.queued -= n
                before = len(q)
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
                        self.sent(op)
                else:
                    item[0] = item[0][n:]
                    conn.head_partial = True
                    n = 0
            if conn.writing:
                conn.queued -= FRAME_COST * (before - len(q))
        if conn.writing:
            conn.writing = False
            conn.queued = 0
            if conn.paused & PAUSE_BACKLOG:
                self.backlog(conn)  # type: ignore[misc]
            self.rearm(conn)

    @staticmethod
    def withdraw(conn: Conn, op: Op) -> bool:
        """Take a message send off the queue; False if its first byte has already left.
        A message is two items (header, payload), the op on the second."""
        held = conn.held
        if held:
            for i, (_bufs, held_op) in enumerate(held):
                if held_op is op:
                    del held[i]
                    return True
        q = conn.sendq
        for i, item in enumerate(q):
            if item[1] is op:
                if i == 0 or (i == 1 and conn.head_partial):
                    return False
                if conn.writing:
                    conn.queued -= len(q[i][0]) + len(q[i - 1][0]) + 2 * FRAME_COST
                del q[i]
                del q[i - 1]
                return True
        return True
