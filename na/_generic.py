"""What every plugin checks the same way at the call: message and RMA arguments.

Local misuse is a ValueError raised before anything is posted, worded the same on every
plugin, so the conformance suite can hold them all to one contract.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .types import Addr, Callback, MemHandle, Op, OpKind, as_byte_view

MAX_TAG = 0xFFFFFFFF  # NA tags are u32 on every plugin


def message_view(kind: OpKind, buf: Any, tag: int, max_size: int) -> memoryview | bytes:
    """The bytes of a message to send, once its size and tag are checked."""
    if type(buf) is bytes or (type(buf) is memoryview and buf.format == "B" and buf.ndim == 1):
        view = buf
    else:
        view = as_byte_view(buf, kind.name.lower())
    n = len(view)
    if n > max_size:
        raise ValueError(f"{kind.name.lower()}: message of {n} B exceeds the maximum of "
                         f"{max_size} B")
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"{kind.name.lower()}: tag {tag} is not a u32")
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


def run_completions(cq: deque[Op], max_count: int) -> int:
    """trigger(): mark each completed op done and run its callback, oldest first."""
    n = 0
    while n < max_count:
        try:
            op = cq.popleft()
        except IndexError:
            break
        op.done = True
        n += 1
        if op.callback is not None:
            op.callback(op)
    return n
