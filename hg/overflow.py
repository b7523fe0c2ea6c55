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
"""

from __future__ import annotations

import threading
from typing import Any

ACK_BIT = 0x80000000
TAG_MASK = 0x7FFFFFFF  # call tags: the acknowledgement bit is never set
OWN_SEGMENT = 64 << 10  # parts from this size on are exposed as segments of their own
LANDING_MAX = 64 << 20  # the largest landing buffer kept for the next overflow


def segments(parts: list[Any]) -> list[Any]:
    """An encoding's parts as bulk segments. Large immutable parts (``bytes``) are exposed in
    place, without a copy; large mutable ones are copied, so that what the peer pulls is what
    was passed or returned, whatever the caller does with its buffer afterwards. Runs of small
    parts are joined."""
    out: list[Any] = []
    small: list[Any] = []
    for part in parts:
        if len(part) >= OWN_SEGMENT:
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
