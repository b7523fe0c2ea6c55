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
the budget of bytes all overflowing calls being pulled may hold at once, checked, with the
handle itself, before anything is allocated.

The protocol is one table (``TABLE``, bottom): an ``Overflow`` takes events (begin, pulled,
failed, timeout, cancel, acked, closed) and returns the actions its driver performs (pull,
cancel the pull, ack, reply error, dispatch, deliver, fail, withdraw, release); it does no
I/O, and it owns the budget: reserved when a pull begins, released by whichever transition
leaves the pulling phase. ``tests/test_overflow_table.py`` drives it without sockets.
"""

from __future__ import annotations

import enum
import threading
from typing import Any

from .scalars import LARGE
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


class Landing:
    """Landing buffers for overflows and the budget of bytes peers may make us hold.

    Decoders copy out of the landing buffer (as they do out of a receive buffer), so the
    buffer of a finished overflow lands the next one: a fresh large allocation is zero-filled
    and faults in every page, which costs more than the transfer into it.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._spare: bytearray | None = None
        self._lock = threading.Lock()

    def reserve(self, size: int) -> str | None:
        """Count ``size`` bytes against the budget, or say why not."""
        with self._lock:
            if size > self.budget:
                return f"exceeds the limit of {self.budget} B (max_overflow)"
            if self.held + size > self.budget:
                return (f"does not fit: {self.held} B of other overflowing calls are held, "
                        f"the limit is {self.budget} B (max_overflow)")
            self.held += size
            return None

    def release(self, size: int) -> None:
        with self._lock:
            self.held -= size

    def take(self, size: int) -> tuple[bytearray, memoryview]:
        with self._lock:
            buf = self._spare
            if buf is not None and len(buf) >= size:
                self._spare = None
            else:
                buf = None
        if buf is None:
            buf = bytearray(size)
        return buf, memoryview(buf)[:size]

    def give(self, buf: bytearray) -> None:
        """Keep ``buf`` for the next overflow; only once nothing can write into it any more."""
        with self._lock:
            if len(buf) <= LANDING_MAX and (self._spare is None or len(buf) > len(self._spare)):
                self._spare = buf


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
    unpaired; ``reason`` says why a pull was refused."""

    __slots__ = ("budget", "held", "phase", "reason", "role", "size")

    def __init__(self, role: str, budget: Landing | None = None) -> None:
        self.role = role
        self.phase = _START[role]
        self.budget = budget
        self.size = 0
        self.held = False
        self.reason: str | None = None

    def __repr__(self) -> str:
        return f"<Overflow {self.role} {self.phase.value} {self.size} B>"

    def begin(self, size: int, refused: str | None = None) -> tuple[Action, ...]:
        """Start a pull of ``size`` bytes unless ``refused`` (the handle did not resolve) or
        the budget says no."""
        self.size = size
        if refused is None and self.budget is not None:
            refused = self.budget.reserve(size)
            self.held = refused is None
        self.reason = refused
        return self.handle("begin" if refused is None else "refused")

    def handle(self, event: str) -> tuple[Action, ...]:
        """The actions ``event`` calls for; StateError if the table has no such transition."""
        try:
            phase, actions = TABLE[(self.role, self.phase, event)]
        except KeyError:
            raise StateError(self.role, self.phase.value, event) from None
        if self.held and phase not in _PULLING:
            self.held = False
            self.budget.release(self.size)  # type: ignore[union-attr]
        self.phase = phase
        return actions
