"""Inputs and results larger than a message, carried by bulk (Mercury's more-data path).

The origin of an overflowing call exposes the encoded input as a read-only bulk handle and
sends the handle in the request (flag MORE_DATA); the target pulls it, then runs the handler.
A result too large for a message goes the other way: the target answers with a handle, the
origin pulls and acknowledges, and the target withdraws the memory on the acknowledgement (or
when ``overflow_timeout`` passes without one). One-way calls that overflow are acknowledged
once the target has the input, so the origin knows when to let go of it.

Acknowledgements travel as expected messages on the call's tag with ``ACK_BIT`` set; call tags
never have it, so an acknowledgement can never be taken for a response (both peers number
their calls from 1).

Peers choose these sizes, so what they can make a process hold is capped: ``max_overflow`` is
the budget of bytes all overflowing calls being pulled may hold at once, and
``max_overflow_per_peer`` the part of it one peer's calls may hold (so one peer declaring
1 GiB cannot refuse everyone else's large calls), both checked, with the handle itself,
before anything is allocated. A pull that lands nothing for ``overflow_timeout`` seconds is
given up; one that keeps moving is not, however long it takes.

The protocol is one table (``TABLE``, bottom): an ``Overflow`` takes events (begin, moved,
pulled, failed, timeout, cancel, acked, closed) and returns the actions its driver performs (pull,
cancel the pull, ack, reply error, dispatch, deliver, fail, withdraw, release); it does no
I/O, and it owns the budget: reserved when a pull begins, released by whichever transition
leaves the pulling phase. ``tests/test_overflow_table.py`` drives it without sockets.
"""

from __future__ import annotations

import enum
import mmap
import threading
from collections.abc import Callable, Hashable
from typing import Any

from . import adopt
from .scalars import _U32, LARGE
from .state import StateError

ACK_BIT = 0x80000000
TAG_MASK = 0x7FFFFFFF  # call tags: the acknowledgement bit is never set
LANDING_MAX = 64 << 20  # the largest landing buffer kept for the next overflow


def segments(parts: list[Any]) -> list[Any]:
    """An encoding's parts as bulk segments. Large immutable parts (``bytes``) are exposed in
    place, without a copy; large mutable ones are copied, so that what the peer pulls is what
    was passed or returned, whatever the caller does with its buffer afterwards. Runs of small
    parts are joined."""
    out: list[Any] = []
    small: list[Any] = []
    for part in parts:
        if len(part) >= LARGE:
            if small:
                out.append(b"".join(small))
                small = []
            immutable = isinstance(part, bytes) or (isinstance(part, memoryview)
                                                     and isinstance(part.obj, bytes))
            out.append(part if immutable else bytes(part))
        else:
            small.append(part)
    if small:
        out.append(b"".join(small))
    return out


def share(budget: int) -> int:
    """The default part of ``max_overflow`` one peer may hold: a quarter. Four peers can then
    each have a full share in flight whatever a fifth declares, and one peer may still send
    an input of a quarter of the budget (256 MiB by default); larger ones need
    ``max_overflow_per_peer``. A peer's claim is refused at the request, before anything is
    allocated, so a share that is too small costs a clear error, never memory."""
    return max(1, budget // 4)


class Lease:
    """The memory one overflow lands in. ``view`` is the encoding's offset space, over an
    untouched mapping; each large segment of the exposer's layout (``adopt.ADOPT_MIN`` and
    up) lands instead in a ``bytes`` object of its own (``slots``), which the decoder hands
    out as the value when the segment is exactly one ``bytes`` value (``decode``), so that
    the bytes are written once, by the pull, into memory the pool already faulted in."""

    __slots__ = ("buf", "segments", "slots", "view")

    def __init__(self, buf: mmap.mmap, size: int, slots: list[tuple[int, bytes]]) -> None:
        self.buf = buf
        self.view = memoryview(buf)[:size]
        self.slots = [(off, obj, adopt.writable(obj)) for off, obj in slots]
        segments: list[memoryview] = []
        pos = 0
        for off, obj, into in self.slots:
            if off > pos:
                segments.append(self.view[pos:off])
            segments.append(into)
            pos = off + len(obj)
        if pos < size or not segments:
            segments.append(self.view[pos:])
        self.segments = segments  # the local bulk's, in the order of the offset space

    def decode(self, loads: Callable[[memoryview, dict[int, bytes] | None], Any]) -> Any:
        """``loads(view, adoptable)`` once the pull is complete. A slot whose every byte
        the decode took as one ``bytes`` value is that value; otherwise (another type, a
        custom proc, a layout a peer chose) the slots are copied into ``view`` and the
        decode runs again on the contiguous bytes, as it always did."""
        table: dict[int, bytes] = {}
        for off, obj, into in self.slots:
            # The length prefix just before it must say exactly its size; else it cannot be
            # one bytes value, and is copied without a first try.
            if off >= 4 and self.view[off - 4:off] == _U32.pack(len(obj)):
                table[off] = obj
            else:
                self.view[off:off + len(obj)] = into
        if table:
            tried = list(table)
            try:
                value = loads(self.view, table)
            except Exception:  # bytes the decoder read in a slot's range were not there
                value = None
            else:
                if not table:  # every slot was taken whole, by a bytes value
                    return value
            for off, obj, into in self.slots:
                if off in tried:
                    self.view[off:off + len(obj)] = into
        return loads(self.view, None)

    def release(self) -> None:
        """Drop the views this lease made (the mapping and the slots' writable views)."""
        for _off, _obj, into in self.slots:
            try:
                into.release()
            except BufferError:
                pass  # a view still viewed: its array keeps the object alive meanwhile
        self.slots = []
        self.segments = []
        self.view.release()


class Budget:
    """Bytes peers may make us hold: all of them together (``budget``) and each one
    (``per_peer``). A peer is its address object (``na.Addr``), not the URI it claims: a
    socket peer that has not proven a URI has an address of its own, so a peer claiming
    another's URI cannot use up that one's share."""

    def __init__(self, budget: int, per_peer: int | None = None) -> None:
        self.budget = budget
        self.per_peer = share(budget) if per_peer is None else per_peer
        self.held = 0
        self.peers: dict[Hashable, int] = {}  # bytes held per peer, only while nonzero
        self._lock = threading.Lock()

    def reserve(self, size: int, peer: Hashable = "", *, lone: bool = False) -> str | None:
        """Count ``size`` bytes against the budget and ``peer``'s share, or say why not.
        With ``lone``, a peer that holds nothing may take more than its share (the budget
        still applies): one result at a time whatever its size, up to ``max_overflow``."""
        with self._lock:
            mine = self.peers.get(peer, 0)
            shared = not (lone and mine == 0)
            if size > self.budget:
                return f"exceeds the limit of {self.budget} B (max_overflow)"
            if shared and size > self.per_peer:
                return (f"exceeds the share of {self.per_peer} B one peer may hold "
                        "(max_overflow_per_peer)")
            if self.held + size > self.budget:
                return (f"does not fit: {self.held} B of other overflowing calls are held, "
                        f"the limit is {self.budget} B (max_overflow)")
            if shared and mine + size > self.per_peer:
                return (f"does not fit in the share of {self.per_peer} B one peer may hold "
                        f"(max_overflow_per_peer): {mine} B of its other calls are held")
            self.held += size
            self.peers[peer] = mine + size
            return None

    def release(self, size: int, peer: Hashable = "") -> None:
        with self._lock:
            self.held -= size
            left = self.peers.get(peer, 0) - size
            if left > 0:
                self.peers[peer] = left
            else:
                self.peers.pop(peer, None)

    def by_uri(self) -> dict[str, int]:
        """Bytes held per peer URI (``statistics()``)."""
        with self._lock:
            out: dict[str, int] = {}
            for peer, n in self.peers.items():
                uri = str(peer)
                out[uri] = out.get(uri, 0) + n
            return out


class Landing(Budget):
    """Landing memory for overflows, and the budget of bytes peers may make us hold: all of
    them together (``budget``) and each one (``per_peer``, keyed by the peer's URI).

    A landing buffer is an anonymous mapping that nothing touches before the pull writes
    into it: the kernel supplies zero pages as the bytes arrive, so a peer that declares
    1 GiB costs neither a 0.45 s memset on the progress thread nor resident memory until it
    sends. Decoders copy small values out of it (as they do out of a receive buffer), so it
    is unmapped as soon as the call is decoded. One buffer of up to ``LANDING_MAX`` is kept
    for the next overflow, its pages already faulted in: that costs less than faulting in
    new ones. Large segments land in ``bytes`` objects instead (``Lease``, ``adopt``),
    recycled by a bounded ``adopt.Pool``: at most ``min(budget, POOL_BYTES)`` of them, let
    go when idle, only from pulls that completed.
    """

    def __init__(self, budget: int, per_peer: int | None = None) -> None:
        super().__init__(budget, per_peer)
        self.mapped = 0  # landing buffers in use
        self.pinned = 0  # left to a user that kept a view of them (a leak's sign)
        self.pool = adopt.Pool(min(budget, adopt.POOL_BYTES))
        self._spare: mmap.mmap | None = None
        self._unmap: list[mmap.mmap] = []


    def take(self, size: int, sizes: tuple[int, ...] = (), now: float = 0.0) -> Lease:
        """Memory for a pull of ``size`` bytes from a handle whose segments are ``sizes``."""
        slots: list[tuple[int, bytes]] = []
        pos = 0
        for n in sizes:
            if n >= adopt.ADOPT_MIN and len(slots) < adopt.POOL_SLOTS and pos + n <= size:
                obj = self.pool.lend(n, now)
                if obj is not None:
                    slots.append((pos, obj))
            pos += n
        with self._lock:
            buf = self._spare
            if buf is not None and len(buf) >= size:
                self._spare = None
            else:
                buf = None
            self.mapped += 1
        if buf is None:
            buf = mmap.mmap(-1, max(size, 1))  # untouched: no page is spent before bytes land
        return Lease(buf, size, slots)

    def give(self, lease: Lease, complete: bool = True, now: float = 0.0) -> bool:
        """Once nothing can write into ``lease`` any more: keep its mapping for the next
        overflow, or unmap it now (not when the garbage collector gets to it); keep its
        slots if the pull was ``complete``, else let go of them. False if the mapping could
        not be unmapped yet: given back from a completion callback, the op being completed
        still holds a view of it until the callback returns, and the driver must ``sweep``
        then."""
        for _off, obj, _into in lease.slots:
            if complete:
                self.pool.keep(obj, now)
            else:
                self.pool.forget(obj)
        buf = lease.buf
        lease.release()
        with self._lock:
            self.mapped -= 1
            if len(buf) <= LANDING_MAX and (self._spare is None or len(buf) > len(self._spare)):
                buf, self._spare = self._spare, buf  # type: ignore[assignment]
            if buf is not None:
                self._unmap.append(buf)
        return self.sweep()

    def sweep(self, final: bool = False) -> bool:
        """Unmap the buffers given back; True when none is left waiting. ``final``: one that
        still cannot be (a decoder kept a view of it) is left to its last user and counted."""
        with self._lock:
            pending, self._unmap = self._unmap, []
        left = []
        for buf in pending:
            try:
                buf.close()
            except BufferError:
                left.append(buf)
        with self._lock:
            if final:
                self.pinned += len(left)
            else:
                self._unmap += left
            return not self._unmap

    @property
    def landings(self) -> int:
        """Landing buffers in use or waiting to be unmapped (the spare is not counted)."""
        return self.mapped + len(self._unmap)

    def close(self) -> None:
        self.pool.close()
        with self._lock:
            spare, self._spare = self._spare, None
            if spare is not None:
                self._unmap.append(spare)
        self.sweep(final=True)


# -- the overflow state table (sans I/O: events in, actions out) -------------------------------
class Phase(enum.Enum):
    """Where one overflow is. A pull holds budget exactly while it is in a pulling phase."""

    NEW = "new"
    PULLING_INPUT = "pulling input"
    RECEIVED = "received"
    FORWARDED = "forwarded"
    PULLING_OUTPUT = "pulling output"
    COMPLETED = "completed"
    EXPOSED = "exposed"
    ACKED = "acked"
    WITHDRAWN = "withdrawn"


class Action(enum.Enum):
    """What the driver (target.py, origin.py) must do after an event."""

    PULL = "pull"  # start the transfer into a landing buffer
    CANCEL_PULL = "cancel pull"  # the transfer ends later, as "failed"
    ACK = "ack"  # tell the exposer it may let go of its memory
    REPLY_ERROR = "reply error"  # the target answers the call with an overflow error
    DISPATCH = "dispatch"  # the target decodes the input and runs the handler
    DELIVER = "deliver"  # the origin decodes the result and finishes the call
    FAIL = "fail"  # the origin finishes the call with the error
    WITHDRAW = "withdraw"  # the exposer stops waiting for the ack (cancels its receive)
    RELEASE = "release"  # the exposer closes the exposed handle


# Roles: the target pulling an input (one-way calls acknowledge it), the origin pulling a
# result, and whoever exposes memory for the peer to pull.
TARGET, TARGET_ONE_WAY, ORIGIN, EXPOSER = "target", "one-way target", "origin", "exposer"
_P, _A = Phase, Action
_PULLS_INPUT = {
    (_P.NEW, "begin"): (_P.PULLING_INPUT, (_A.PULL,)),
    (_P.NEW, "refused"): (_P.COMPLETED, (_A.REPLY_ERROR,)),
    (_P.PULLING_INPUT, "failed"): (_P.COMPLETED, (_A.REPLY_ERROR,)),
    (_P.PULLING_INPUT, "moved"): (_P.PULLING_INPUT, ()),  # a chunk landed: not stalled
    (_P.PULLING_INPUT, "timeout"): (_P.PULLING_INPUT, (_A.CANCEL_PULL,)),
    (_P.PULLING_INPUT, "closed"): (_P.COMPLETED, ()),  # the engine shuts down: drop it
}
TABLE: dict[tuple[str, Phase, str], tuple[Phase, tuple[Action, ...]]] = {
    **{(TARGET, *key): value for key, value in _PULLS_INPUT.items()},
    (TARGET, _P.PULLING_INPUT, "pulled"): (_P.RECEIVED, (_A.DISPATCH,)),
    **{(TARGET_ONE_WAY, *key): value for key, value in _PULLS_INPUT.items()},
    (TARGET_ONE_WAY, _P.PULLING_INPUT, "pulled"): (_P.RECEIVED, (_A.ACK, _A.DISPATCH)),
    (ORIGIN, _P.FORWARDED, "begin"): (_P.PULLING_OUTPUT, (_A.PULL,)),
    (ORIGIN, _P.FORWARDED, "refused"): (_P.COMPLETED, (_A.ACK, _A.FAIL)),
    (ORIGIN, _P.PULLING_OUTPUT, "moved"): (_P.PULLING_OUTPUT, ()),
    (ORIGIN, _P.PULLING_OUTPUT, "pulled"): (_P.COMPLETED, (_A.ACK, _A.DELIVER)),
    (ORIGIN, _P.PULLING_OUTPUT, "failed"): (_P.COMPLETED, (_A.ACK, _A.FAIL)),
    (ORIGIN, _P.PULLING_OUTPUT, "cancel"): (_P.PULLING_OUTPUT, (_A.CANCEL_PULL,)),
    (ORIGIN, _P.COMPLETED, "cancel"): (_P.COMPLETED, ()),  # the call ended first
    (EXPOSER, _P.EXPOSED, "acked"): (_P.ACKED, (_A.RELEASE,)),
    (EXPOSER, _P.EXPOSED, "timeout"): (_P.WITHDRAWN, (_A.WITHDRAW,)),
    (EXPOSER, _P.WITHDRAWN, "acked"): (_P.WITHDRAWN, (_A.RELEASE,)),  # the withdrawn receive
}
_PULLING = frozenset((_P.PULLING_INPUT, _P.PULLING_OUTPUT))
_START = {TARGET: _P.NEW, TARGET_ONE_WAY: _P.NEW, ORIGIN: _P.FORWARDED, EXPOSER: _P.EXPOSED}


class Overflow:
    """One overflow's state. The budget is reserved by ``begin`` and released by the
    transition that leaves the pulling phase, whichever it is, so the two cannot come
    unpaired; ``reason`` says why a pull was refused.

    ``stall`` makes the pull's timeout a stall timeout: the pull is given up once ``stall``
    seconds pass with no chunk landing (``moved``), however long it has been moving, so a
    4 GiB input over a slow link is not cut off while its bytes flow. The driver asks
    ``deadline`` when to call ``expire(now)`` and arms its timer again if that returns
    nothing (aioquic's ``get_timer``/``handle_timer``).
    """

    __slots__ = ("budget", "held", "last", "peer", "phase", "reason", "role", "size", "stall",
                 "timed_out")

    def __init__(self, role: str, budget: Landing | None = None,
                 stall: float | None = None) -> None:
        self.role = role
        self.phase = _START[role]
        self.budget = budget
        self.stall = stall
        self.size = 0
        self.peer: Hashable = ""
        self.held = False
        self.last = 0.0  # when the pull began or last moved
        self.timed_out = False
        self.reason: str | None = None

    def __repr__(self) -> str:
        return f"<Overflow {self.role} {self.phase.value} {self.size} B>"

    def begin(self, size: int, refused: str | None = None, *, peer: Hashable = "",
              now: float = 0.0) -> tuple[Action, ...]:
        """Start a pull of ``size`` bytes from ``peer`` unless ``refused`` (the handle did not
        resolve) or the budget, or the peer's share of it, says no."""
        self.size = size
        self.peer = peer
        self.last = now
        if refused is None and self.budget is not None:
            refused = self.budget.reserve(size, peer)
            self.held = refused is None
        self.reason = refused
        return self.handle("begin" if refused is None else "refused")

    def moved(self, now: float) -> tuple[Action, ...]:
        """Part of the pull landed at ``now``: the stall timer starts over."""
        actions = self.handle("moved")
        self.last = now
        return actions

    @property
    def deadline(self) -> float | None:
        """When the pull counts as stalled unless it moves first (None: no timer needed)."""
        if self.stall is None or self.timed_out or self.phase not in _PULLING:
            return None
        return self.last + self.stall

    def expire(self, now: float) -> tuple[Action, ...]:
        """The timer fired at ``now``: cancel a stalled pull; nothing if it moved meanwhile
        (the driver then arms the timer again, for ``deadline``)."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return ()
        self.timed_out = True
        return self.handle("timeout")

    def handle(self, event: str) -> tuple[Action, ...]:
        """The actions ``event`` calls for; StateError if the table has no such transition."""
        try:
            phase, actions = TABLE[(self.role, self.phase, event)]
        except KeyError:
            raise StateError(self.role, self.phase.value, event) from None
        if self.held and phase not in _PULLING:
            self.held = False
            self.budget.release(self.size, self.peer)  # type: ignore[union-attr]
        self.phase = phase
        return actions
