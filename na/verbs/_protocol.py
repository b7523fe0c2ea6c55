"""The protocol of the verbs plugin, with no I/O: credits, the send queue of a connection,
slot pools, the registration cache, the two-sided/one-sided choice, RMA splitting, access
flags and the meaning of work-completion statuses. ``plugin.py`` feeds these from pyverbs
completions and performs what they decide; tests/test_verbs_core.py runs them everywhere,
including a two-ends simulation that checks that credits never let a sender overrun a
receiver and never deadlock.

Credits. A receiver posts its receive slots into one shared receive queue (SRQ), sized for
every connection: ``data`` slots per connection for messages and RMA frames, plus ``ctrl`` for
credit frames. A sender may have at most ``data`` data frames and ``ctrl`` credit frames not
yet freed by the receiver; a send without a posted slot would be an RNR NAK (and past the
retry count an error that kills the QP), so credits replace RNR retries as the flow control.
Every frame header returns credits as cumulative counts of the peer's frames freed, so the
common request-reply traffic needs no credit frames at all; a receiver sends a credit frame
only when it owes half its grant and has nothing else to send. Credit frames use credits of
their own (``ctrl``) and need none back explicitly: the argument in ``Credits.credit_due``
shows why that cannot deadlock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import AccessError, NAError, PeerError, ProtocolError
from ..types import Access
from ._wire import CREDIT, MASK32

T = TypeVar("T")

# The Plasma-over-RDMA thesis measured the crossover between copying through pre-registered
# buffers and one-sided RDMA from memory registered in place at 32 KiB. Not re-measured here:
# this project's test hosts have no RDMA device (bench/ has no verbs rows yet).
TWO_SIDED_MAX = 32 * 1024
DATA_CREDITS = 32  # data frames in flight per connection and direction (hg posts 64 receives)
CTRL_CREDITS = 2
SQ_DEPTH = 256  # send work requests in flight per QP (a per-connection cap of the driver)

# ibv_access_flags (infiniband/verbs.h; part of the ABI, checked against pyverbs.enums).
IBV_ACCESS_LOCAL_WRITE = 1
IBV_ACCESS_REMOTE_WRITE = 2
IBV_ACCESS_REMOTE_READ = 4


def access_flags(access: Access, writable: bool) -> int:
    """The IBV access flags of a registration with NA rights ``access``: remote read exactly
    for READ_ONLY, remote write exactly for WRITE_ONLY, and local write where the buffer is
    writable (an RDMA READ lands there; verbs also requires it for remote write, which
    ``register_view`` only allows on writable buffers). The NIC then enforces the rights."""
    if access & Access.WRITE_ONLY and not writable:
        raise ValueError("remote write access needs a writable buffer")
    flags = IBV_ACCESS_LOCAL_WRITE if writable else 0
    if access & Access.READ_ONLY:
        flags |= IBV_ACCESS_REMOTE_READ
    if access & Access.WRITE_ONLY:
        flags |= IBV_ACCESS_REMOTE_WRITE
    return flags


def two_sided(length: int, threshold: int) -> bool:
    """Whether an RMA of ``length`` bytes goes two-sided (copied through the registered slots,
    checked by the target's table) rather than one-sided (RDMA from and into the user's
    memory, checked by the NIC)."""
    return length <= threshold


def split(length: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, size) pieces of at most ``chunk`` bytes covering ``length``; one RDMA work
    request each, so that no transfer exceeds the port's max_msg_sz (mercury #648)."""
    if chunk < 1:
        raise ValueError(f"chunk {chunk} must be positive")
    return [(off, min(chunk, length - off)) for off in range(0, length, chunk)]


# -- work completions ----------------------------------------------------------------------------
# enum ibv_wc_status (infiniband/verbs.h), by what it means for the operation.
WC_SUCCESS, WC_FLUSH = 0, 5
WC_NAMES = {
    0: "IBV_WC_SUCCESS", 1: "IBV_WC_LOC_LEN_ERR", 2: "IBV_WC_LOC_QP_OP_ERR",
    3: "IBV_WC_LOC_EEC_OP_ERR", 4: "IBV_WC_LOC_PROT_ERR", 5: "IBV_WC_WR_FLUSH_ERR",
    6: "IBV_WC_MW_BIND_ERR", 7: "IBV_WC_BAD_RESP_ERR", 8: "IBV_WC_LOC_ACCESS_ERR",
    9: "IBV_WC_REM_INV_REQ_ERR", 10: "IBV_WC_REM_ACCESS_ERR", 11: "IBV_WC_REM_OP_ERR",
    12: "IBV_WC_RETRY_EXC_ERR", 13: "IBV_WC_RNR_RETRY_EXC_ERR", 14: "IBV_WC_LOC_RDD_VIOL_ERR",
    15: "IBV_WC_REM_INV_RD_REQ_ERR", 16: "IBV_WC_REM_ABORT_ERR", 17: "IBV_WC_INV_EECN_ERR",
    18: "IBV_WC_INV_EEC_STATE_ERR", 19: "IBV_WC_FATAL_ERR", 20: "IBV_WC_RESP_TIMEOUT_ERR",
    21: "IBV_WC_GENERAL_ERR",
}
_ACCESS_STATUS = frozenset((10,))
_PEER_STATUS = frozenset((7, 12, 13, 16, 20))
_PROTOCOL_STATUS = frozenset((9, 11, 15))


def wc_error(status: int, op: str, peer: str | None) -> NAError:
    """The NA error for a failed work completion: the NIC's refusal of a remote access is an
    AccessError, an unreachable or vanished peer a PeerError."""
    name = WC_NAMES.get(status, f"status {status}")
    if status in _ACCESS_STATUS:
        return AccessError(op, peer, "refused by the target's NIC: unknown key (forged, or "
                           "deregistered), out of bounds, or not allowed by the registration's "
                           f"access rights ({name})")
    if status in _PEER_STATUS:
        return PeerError(op, peer, f"the peer did not answer or went away ({name})")
    if status in _PROTOCOL_STATUS:
        return ProtocolError(op, peer, f"the peer's NIC rejected the request ({name})")
    return NAError(op, peer, f"the local NIC failed the work request ({name})")


# -- credits -------------------------------------------------------------------------------------
def _diff(a: int, b: int) -> int:
    return (a - b) & MASK32


class CreditError(ValueError):
    """The peer broke the credit protocol (sent past its grant, or acknowledged frames never
    sent): its connection is closed."""


class Credits:
    """The credit state of one connection, both directions.

    Counts are cumulative mod 2**32: ``sent`` frames we sent, ``acked`` how many of them the
    peer says it freed, ``received`` its frames that reached us, ``freed`` how many of those
    we took out of their slots, ``advertised`` the ``freed`` count our last header carried.
    """

    __slots__ = ("acked", "advertised", "freed", "grant", "limit", "received", "sent",
                 "withheld")

    def __init__(self, limit: tuple[int, int], grant: tuple[int, int]) -> None:
        self.limit = limit  # (data, ctrl) frames the peer lets us have in flight
        self.grant = grant  # (data, ctrl) frames we let the peer have in flight
        self.sent = [0, 0]
        self.acked = [0, 0]
        self.received = [0, 0]
        self.freed = [0, 0]
        self.advertised = [0, 0]
        self.withheld = False  # back-pressure: our slots are free, but we do not say so

    def can_send(self, kind: int) -> bool:
        i = kind == CREDIT
        return _diff(self.sent[i], self.acked[i]) < self.limit[i]

    def on_send(self, kind: int) -> tuple[int, int]:
        """Account for one frame of ``kind`` going out; the (acked_data, acked_ctrl) its
        header carries."""
        i = kind == CREDIT
        if not self.can_send(kind):
            raise RuntimeError("on_send without a credit")
        self.sent[i] = (self.sent[i] + 1) & MASK32
        if not self.withheld:
            self.advertised[0] = self.freed[0]
        self.advertised[1] = self.freed[1]
        return self.advertised[0], self.advertised[1]

    def on_receive(self, kind: int, acked_data: int, acked_ctrl: int) -> None:
        """A frame arrived: check it against our grant and take the credits it returns."""
        i = kind == CREDIT
        if _diff((self.received[i] + 1) & MASK32, self.advertised[i]) > self.grant[i]:
            raise CreditError(f"the peer sent past its grant of {self.grant[i]} "
                              f"{'credit' if i else 'data'} frames")
        for j, acked in enumerate((acked_data, acked_ctrl)):
            if _diff(acked, self.acked[j]) > _diff(self.sent[j], self.acked[j]):
                raise CreditError(f"the peer acknowledged {_diff(acked, self.acked[j])} "
                                  f"frames of {_diff(self.sent[j], self.acked[j])} in flight")
        self.received[i] = (self.received[i] + 1) & MASK32
        self.acked[0], self.acked[1] = acked_data, acked_ctrl

    def on_freed(self, kind: int) -> None:
        """One of the peer's frames left its slot, which is posted again."""
        i = kind == CREDIT
        self.freed[i] = (self.freed[i] + 1) & MASK32

    def credit_due(self) -> bool:
        """Whether to send a credit frame now (when nothing else is going to the peer).

        Never a deadlock: a sender blocked for data credits has ``grant`` frames unfreed at
        us; we free them (back-pressure aside), so we owe at least half the grant. We can send
        the credit frame unless ``ctrl`` of ours are unconfirmed; but each of those returned
        credits to the peer, and either it has sent since (and its headers confirmed them) or
        it still has those credits and is not blocked.
        """
        if self.withheld:
            return False
        owed = _diff(self.freed[0], self.advertised[0])
        return owed >= max(1, self.grant[0] // 2) and self.can_send(CREDIT)


# -- the send side of a connection ---------------------------------------------------------------
@dataclass
class Out:
    """One send work request waiting for its turn: a frame (``kind`` > 0: it takes a credit
    and a send slot) or an RDMA piece (``kind`` 0)."""

    kind: int
    op: Any
    data: Any = None  # frames: the parts after the header
    piece: tuple[int, int] = (0, 0)  # RDMA: (offset in the op, size)
    extra: Any = None


@dataclass
class SendQueue:
    """Work of one connection in order: nothing overtakes, so frames to a peer keep the order
    they were sent in, and nothing goes out past the peer's credits or the QP's depth."""

    credits: Credits
    depth: int = SQ_DEPTH
    inflight: int = 0
    queue: deque[Out] = field(default_factory=deque)

    def push(self, out: Out) -> None:
        self.queue.append(out)

    def pop_ready(self, have_slot: Callable[[], bool]) -> Out | None:
        """The next work to post, or None while the head must wait (credits, QP depth, or
        ``have_slot()`` False: no free registered send slot for a frame)."""
        if not self.queue or self.inflight >= self.depth:
            return None
        head = self.queue[0]
        if head.kind and (not self.credits.can_send(head.kind) or not have_slot()):
            return None
        self.inflight += 1
        return self.queue.popleft()

    def done(self) -> None:
        """A posted work request completed (successfully or not)."""
        self.inflight -= 1


# -- slots ------------------------------------------------------------------------------------
class SlotPool:
    """Fixed-size slots in equal chunks of registered memory: slot ``i`` lives in chunk
    ``i // per_chunk``. The driver registers a chunk once and never on the message path."""

    __slots__ = ("free", "per_chunk", "size", "total")

    def __init__(self, size: int, per_chunk: int) -> None:
        if size < 1 or per_chunk < 1:
            raise ValueError("slot size and slots per chunk must be positive")
        self.size = size
        self.per_chunk = per_chunk
        self.total = 0
        self.free: list[int] = []

    def grow(self) -> range:
        """Add one chunk; its new slot indices (free)."""
        new = range(self.total, self.total + self.per_chunk)
        self.total += self.per_chunk
        self.free.extend(reversed(new))
        return new

    def take(self) -> int | None:
        return self.free.pop() if self.free else None

    def give(self, i: int) -> None:
        if not 0 <= i < self.total or i in self.free:
            raise ValueError(f"slot {i} is not taken")
        self.free.append(i)

    def where(self, i: int) -> tuple[int, int]:
        """(chunk, byte offset in it) of slot ``i``."""
        return i // self.per_chunk, (i % self.per_chunk) * self.size


class ReceiveBudget:
    """How many receive slots the SRQ must hold: each connection reserves its grant while it
    lives; the pool never shrinks (posted SRQ work requests cannot be withdrawn), so a new
    connection reuses what an old one left before more slots are posted."""

    __slots__ = ("limit", "posted", "reserved")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.posted = 0
        self.reserved = 0

    def reserve(self, n: int) -> int:
        """Reserve ``n`` slots; how many more must be posted. ValueError past the SRQ's size."""
        if self.reserved + n > self.limit:
            raise ValueError(f"the shared receive queue holds {self.limit} slots and "
                             f"{self.reserved} are reserved: no room for {n} more")
        self.reserved += n
        more = max(0, self.reserved - self.posted)
        self.posted += more
        return more

    def release(self, n: int) -> None:
        if n > self.reserved:
            raise ValueError(f"releasing {n} of {self.reserved} reserved slots")
        self.reserved -= n


# -- the registration cache ----------------------------------------------------------------------
class RegCache(Generic[T]):
    """Live registrations by (address, length, IBV flags): registering a buffer that is
    registered already, with the same rights, takes a reference to the same memory region
    instead of pinning it again (ibv_reg_mr costs tens of microseconds per MiB).

    An entry is released with its last reference. Released regions are not kept for reuse: a
    region outlives neither ``mem_deregister`` nor its buffer, because its rkey would stay
    valid in the NIC and a peer holding an old handle could still reach memory that is no
    longer registered for it (DESIGN, security model), or that Python has reused.
    """

    __slots__ = ("_entries", "_release", "hits")

    def __init__(self, release: Callable[[T], None]) -> None:
        self._release = release
        self._entries: dict[tuple[int, int, int], list[Any]] = {}
        self.hits = 0

    def acquire(self, addr: int, length: int, flags: int, register: Callable[[], T]) -> T:
        """The region of (addr, length, flags), made by ``register()`` if there is none."""
        key = (addr, length, flags)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = [register(), 0]
        else:
            self.hits += 1
        entry[1] += 1
        return entry[0]  # type: ignore[no-any-return]

    def release(self, addr: int, length: int, flags: int) -> None:
        key = (addr, length, flags)
        entry = self._entries.get(key)
        if entry is None:
            raise ValueError(f"no registration of {length} B at {addr:#x} with flags {flags}")
        entry[1] -= 1
        if entry[1] == 0:
            del self._entries[key]
            self._release(entry[0])

    def records(self) -> list[T]:
        return [entry[0] for entry in self._entries.values()]

    def clear(self) -> None:
        """Release everything (the plugin is closing)."""
        entries, self._entries = self._entries, {}
        for record, _count in entries.values():
            self._release(record)

    def __len__(self) -> int:
        return len(self._entries)
