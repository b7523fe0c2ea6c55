"""What every NA plugin shares: argument checks, the completion queue and the matcher (the
registration table is ``na/_regs.py``).

A plugin keeps only its transport. Everything here is written once so that the plugins cannot
disagree: a tag outside 0..2**32-1, a read-only receive buffer or an out-of-range RMA is the
same ValueError on tcp, sm and ofi, a message is matched and queued by the same code, and a
peer's RMA request is checked against the same table. Nothing here does I/O except the one
eventfd write that wakes a thread asleep in the plugin's poll.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import Canceled, NAError, PeerError
from .types import (
    _CANCELING,
    _FINISHED,
    _PENDING,
    Addr,
    Callback,
    MemHandle,
    Op,
    OpKind,
    as_byte_view,
)

_log = logging.getLogger("petasus.na")

MAX_TAG = 0xFFFFFFFF  # NA tags are u32 on every plugin
# 64 KiB messages: big enough that most RPCs need no overflow, and the same on every plugin
# so that hg behaves the same whatever carries it.
MAX_MSG_SIZE = 64 * 1024
MAX_QUEUED = 64 * 1024 * 1024  # unmatched messages peers can make us hold before we push back
# One peer's share of it: 16 largest messages or ~5,800 small requests. Past it only that peer
# waits (lossless back-pressure), so a good client is never queued behind more than this.
MAX_QUEUED_PEER = 1024 * 1024
# What a queued unmatched message is counted for beyond its bytes: its entry (a tuple, the
# tag, the bytes object) costs memory too; counted at its bytes alone, 64 MiB of 20-byte
# requests would have been 3 million entries.
_QUEUED_COST = 160
SPIN_US = int(os.environ.get("PETASUS_SPIN_US", "200"))  # DESIGN: ~70 us wake-up vs ~6 us poll
# The limit of the socket plugins' adaptive spin (na/_spin.py), which stops spinning where it
# does not pay and so can afford a longer one: a wait just past the limit pays a wake-up on
# top. An RPC whose handler pulls 1 MiB over sm waited ~210 us and ran at 0.73-0.82x the old
# fixed 200 us spin (whose handler was quicker); at 400 us, 1.06x (1 MiB over tcp: 1.17x),
# small calls unchanged (bench/handle_rpc.py, five alternations against ad4be3a).
ADAPTIVE_SPIN_US = int(os.environ.get("PETASUS_SPIN_US", "400"))


# -- argument checks (local misuse: ValueError before anything is posted) ------------------------
def check_tag(name: str, tag: int) -> None:
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"{name}: tag {tag} is not a u32")


def message_view(kind: OpKind, buf: Any, tag: int,
                 max_size: int) -> memoryview | bytes | list[memoryview | bytes]:
    """The bytes of a message to send, once its size and tag are checked: one buffer, or a
    list of them sent as one message (gathered: the parts of an encoded value, never joined
    where the transport takes an iovec)."""
    if type(buf) is bytes or (type(buf) is memoryview and buf.format == "B" and buf.ndim == 1):
        view = buf
    elif type(buf) is list:
        view = [part if type(part) is bytes else as_byte_view(part, kind.name.lower())
                for part in buf]
    else:
        view = as_byte_view(buf, kind.name.lower())
    n = len(view) if type(view) is not list else sum(map(len, view))
    if n > max_size:
        raise ValueError(f"{kind.name.lower()}: message of {n} B exceeds the maximum of "
                         f"{max_size} B")
    if not 0 <= tag <= MAX_TAG:
        check_tag(kind.name.lower(), tag)
    return view


def recv_view(buf: Any, name: str) -> memoryview:
    """A writable flat view of a receive buffer."""
    if type(buf) is memoryview and buf.format == "B" and buf.ndim == 1 and not buf.readonly:
        return buf
    view = as_byte_view(buf, name)
    if view.readonly:
        raise ValueError(f"{name}: the receive buffer is read-only")
    return view


def rma_op(kind: OpKind, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
           length: int, addr: Addr, callback: Callback | None) -> Op:
    """A checked put/get: both ranges inside their registrations, a live local one, and a
    destination that can be written."""
    name = kind.name.lower()
    view = local.view
    if not local.local or view is None or not local.registered:
        raise ValueError(f"{name}: the local handle {local!r} is not a live local registration")
    if min(local_off, remote_off, length) < 0:
        raise ValueError(f"{name}: offsets and length must be non-negative")
    if local_off + length > local.length:
        raise ValueError(f"{name}: local range {local_off}+{length} exceeds the "
                         f"{local.length} B registration")
    if remote_off + length > remote.length:
        raise ValueError(f"{name}: remote range {remote_off}+{length} exceeds the "
                         f"{remote.length} B registration")
    if kind == OpKind.GET and view.readonly:
        raise ValueError(f"{name}: the local registration is read-only and cannot receive")
    op = Op(kind, callback, view, addr)
    op.local, op.local_off, op.remote, op.remote_off, op.length = (
        local, local_off, remote, remote_off, length)
    return op


def check_open(closed: bool, name: str, owner: object) -> None:
    """Using a closed plugin is the caller's bug, not a peer's: RuntimeError."""
    if closed:
        raise RuntimeError(f"{name}: {owner!r} is closed")


def detached(error: BaseException) -> BaseException:
    """``error`` without the frames that raised it, nor those of the exceptions it chains to.

    A failed op keeps its error until the op is dropped; a traceback would keep every frame
    that handled the op, and with them the op and its buffer, in a reference cycle that only
    the garbage collector breaks (three failed 256 MiB pulls held 814 MB until it ran). The
    message names the operation, the peer and the cause: the frames add nothing for the user.
    """
    seen = 0
    link: BaseException | None = error
    while link is not None and seen < 16:  # a chain is short; a loop in it must not hang us
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
        seen += 1
    return error


def canceled(op: Op, cause: str = "canceled") -> Canceled:
    return Canceled(op.kind.name.lower(), op.addr.uri if op.addr is not None else None, cause)


# -- the completion queue ------------------------------------------------------------------------
class CompletionQueue:
    """Finished ops waiting for ``trigger()``, and the wake-up of a thread asleep in poll.

    An op without a callback has nothing to run, so it is marked done as it finishes and only
    counted (``completed``): progress() returns as soon as that count moves.
    """

    __slots__ = ("callback_errors", "completed", "ops", "polling", "reported", "wake_fd")

    def __init__(self) -> None:
        self.ops: deque[Op] = deque()
        self.completed = 0
        self.callback_errors = 0  # callbacks that raised (trigger carried on)
        self.reported: set[str] = set()  # peers whose callback failure was logged already
        self.polling = 0  # threads asleep in the plugin's poll: a completion must wake them
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def post(self, op: Op) -> None:
        """``op`` has finished (its error, if any, is set)."""
        op.state = _FINISHED
        if op.callback is None:
            op.done = True
            self.completed += 1
        else:
            self.ops.append(op)
        if self.polling:
            os.eventfd_write(self.wake_fd, 1)

    def fail(self, op: Op, error: BaseException) -> None:
        """Finish ``op`` with ``error`` unless it already finished."""
        if op.state != _FINISHED:
            op.error = detached(error)
            self.post(op)

    def complete(self, op: Op) -> None:
        """The transport is done with ``op``: success, or Canceled if a cancel was waiting."""
        state = op.state
        if state == _PENDING:
            self.post(op)
        elif state == _CANCELING:
            op.error = canceled(op)
            self.post(op)

    def drain_wake(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass

    def trigger(self, max_count: int) -> int:
        """Mark each finished op done and run its callback, oldest first."""
        ops = self.ops
        n = 0
        while n < max_count:
            try:
                op = ops.popleft()
            except IndexError:
                break
            op.done = True
            n += 1
            if op.callback is not None:
                try:
                    op.callback(op)
                except Exception:
                    # One failing callback (most often one that a peer's message drove into
                    # an error) must not take the ops behind it, or the serving loop, down.
                    self._callback_failed(op)
        return n

    def _callback_failed(self, op: Op) -> None:
        self.callback_errors += 1
        peer = op.addr.uri if op.addr is not None else "(no peer)"
        if peer in self.reported or len(self.reported) > 4096:
            return
        self.reported.add(peer)
        _log.exception("the callback of a %s op with %s raised; trigger carried on (logged "
                       "once per peer, counted in statistics()['callback_errors'])",
                       op.kind.name.lower(), peer)

    def close(self) -> None:
        os.close(self.wake_fd)


# -- the matcher ---------------------------------------------------------------------------------
class Matcher:
    """Posted receives, queued unexpected messages, delivery, back-pressure and cancel.

    Unexpected messages that find no receive are copied and queued, up to ``max_queued``
    bytes in all and ``max_peer`` from one peer; past either ``deliver_unexpected`` answers
    True and the plugin stops taking messages from that peer until ``on_drained`` is called
    (both below half their bound). The share per peer keeps the queue fair: one peer's burst
    cannot fill it, stall every other peer behind it, or (each queued request turning into a
    reply) multiply into replies faster than its reads can be paused.

    Expected messages must be pre-posted, as in Mercury: one without a receive is a late reply
    and is dropped.
    """

    __slots__ = ("by_peer", "cq", "exp_posted", "held", "log", "max_peer", "max_queued",
                 "on_drained", "queued", "stats", "throttled", "unexp_posted", "unexp_queue")

    def __init__(self, cq: CompletionQueue, stats: dict[str, int], log: logging.Logger,
                 max_queued: int, on_drained: Callable[[], None],
                 max_peer: int | None = None) -> None:
        self.cq = cq
        self.stats = stats
        self.log = log
        self.max_queued = max_queued
        self.max_peer = max_queued if max_peer is None else max_peer
        self.by_peer: dict[Addr, int] = {}  # what each peer's queued messages cost
        self.on_drained = on_drained
        self.unexp_posted: deque[Op] = deque()
        self.unexp_queue: deque[tuple[Addr, int, bytes]] = deque()
        # The receive posted for a (peer, tag), or a deque of them when several are (rare: a
        # deque per call cost its allocation and two calls on the per-reply path).
        self.exp_posted: dict[tuple[Addr, int], Op | deque[Op]] = {}
        self.queued = 0  # their bytes (statistics()["queued_bytes"])
        self.held = 0  # what they cost, bounded by max_queued
        self.throttled = False

    def post_unexpected(self, op: Op) -> None:
        if self.unexp_queue:
            addr, tag, data = self.unexp_queue.popleft()
            self._fill(op, addr, tag, data)
            self.cq.post(op)
            cost = len(data) + _QUEUED_COST
            self.queued -= len(data)
            self.held -= cost
            left = self.by_peer[addr] - cost
            if left:
                self.by_peer[addr] = left
            else:
                del self.by_peer[addr]
            if self.throttled and self.held <= self.max_queued // 2 and \
                    left <= self.max_peer // 2:
                self.throttled = False
                self.on_drained()
        else:
            self.unexp_posted.append(op)

    def post_expected(self, op: Op) -> None:
        addr = op.addr
        if addr.dead:  # type: ignore[union-attr]
            self.cq.fail(op, PeerError("msg_recv_expected", addr.uri, addr.dead))  # type: ignore[union-attr]
        else:
            key = (addr, op.tag)
            posted = self.exp_posted
            waiting = posted.get(key)  # type: ignore[arg-type]
            if waiting is None:
                posted[key] = op  # type: ignore[index]
            elif type(waiting) is Op:
                posted[key] = deque((waiting, op))  # type: ignore[index]
            else:
                waiting.append(op)  # type: ignore[union-attr]

    def deliver_unexpected(self, addr: Addr, tag: int, payload: Any) -> bool:
        """Match or queue a message; True when the plugin should stop taking more."""
        self.stats["msgs_received"] += 1
        posted = self.unexp_posted
        if posted:
            op = posted.popleft()
            self._fill(op, addr, tag, payload)
            self.cq.post(op)
            return False
        data = bytes(payload)
        self.unexp_queue.append((addr, tag, data))
        cost = len(data) + _QUEUED_COST
        self.queued += len(data)
        self.held += cost
        mine = self.by_peer[addr] = self.by_peer.get(addr, 0) + cost
        if self.held > self.max_queued or mine > self.max_peer:
            self.throttled = True
            return True
        return False

    def deliver_expected(self, addr: Addr, tag: int, payload: Any) -> None:
        self.stats["msgs_received"] += 1
        key = (addr, tag)
        posted = self.exp_posted
        op = posted.pop(key, None)
        if op is not None:
            if type(op) is not Op:
                waiting, op = op, op.popleft()  # type: ignore[union-attr]
                if waiting:
                    posted[key] = _one_or_all(waiting)
            self._fill(op, addr, tag, payload)  # type: ignore[arg-type]
            self.cq.post(op)  # type: ignore[arg-type]
        else:
            # A late reply to something canceled or timed out; holding it would let such
            # replies pile up until they stall the connection.
            self.stats["expected_dropped"] += 1
            self.log.debug("dropped an expected message from %s, tag %d: no receive posted",
                           addr.uri, tag)

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

    def cancel(self, op: Op) -> bool:
        """Withdraw a posted receive; False if ``op`` is not one."""
        if op.kind == OpKind.RECV_UNEXPECTED:
            self.unexp_posted.remove(op)
        elif op.kind == OpKind.RECV_EXPECTED:
            key = (op.addr, op.tag)
            posted = self.exp_posted
            waiting = posted.get(key)  # type: ignore[arg-type]
            if waiting is op:
                del posted[key]  # type: ignore[arg-type]
            elif type(waiting) is deque and op in waiting:
                waiting.remove(op)
                posted[key] = _one_or_all(waiting)  # type: ignore[index]
            else:
                return False  # not posted (any more)
        else:
            return False
        return True

    def expected_peers(self) -> set[Addr]:
        return {key[0] for key in self.exp_posted}

    def fail_expected(self, addr: Addr, error: Callable[[Op], BaseException]) -> None:
        """Fail the receives posted for replies from ``addr``: none will come."""
        for key in [k for k in self.exp_posted if k[0] is addr]:
            for op in _each(self.exp_posted.pop(key)):
                self.cq.fail(op, error(op))

    def close(self, reason: str) -> None:
        for op in self.unexp_posted:
            self.cq.fail(op, Canceled(op.kind.name.lower(), None, reason))
        self.unexp_posted.clear()
        for ops in self.exp_posted.values():
            for op in _each(ops):
                self.cq.fail(op, canceled(op, reason))
        self.exp_posted.clear()


def _one_or_all(waiting: deque[Op]) -> Op | deque[Op]:
    """What ``Matcher.exp_posted`` holds for receives still posted (at least one): a lone
    one as itself."""
    return waiting if len(waiting) > 1 else waiting[0]


def _each(posted: Op | deque[Op]) -> tuple[Op, ...] | deque[Op]:
    """The receives of one ``Matcher.exp_posted`` entry."""
    return (posted,) if type(posted) is Op else posted  # type: ignore[return-value]
