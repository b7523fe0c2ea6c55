"""The generic half of every NA plugin: the operations all plugins implement alike, over the
shared core (``na/core.py``). A plugin adds only its transport (``_send``, ``_start_transfer``,
``_cancel_transfer``): Mercury's generic NA functions over ``struct na_class_ops``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sized
from typing import Any, TypeVar

from .core import (
    MAX_TAG,
    CompletionQueue,
    Matcher,
    canceled,
    check_open,
    check_tag,
    message_view,
    recv_view,
    rma_op,
)
from .errors import PeerError
from .types import _RECV_EXPECTED, _RECV_UNEXPECTED, Addr, Callback, MemHandle, Op, OpKind, OpState

_P = TypeVar("_P", bound="PluginCore")

# What the core and this half count, under the same names on every plugin (statistics()).
COUNTERS = ("msgs_sent", "msgs_received", "bytes_sent", "bytes_received", "rma_ops", "rma_bytes",
            "rma_served", "rma_refused", "peer_failures", "protocol_errors", "canceled",
            "expected_dropped")


def _sender(kind: OpKind) -> Callable[..., Op]:
    """``msg_send_unexpected`` or ``msg_send_expected`` (``kind``): the two differ only in
    the kind, bound here, so one body serves both without a second call per message."""
    expected = kind == OpKind.SEND_EXPECTED

    def send(self: PluginCore, addr: Addr, buf: Any, tag: int,
             callback: Callback | None = None) -> Op:
        max_msg = self._max_msg
        view = buf if type(buf) is bytes and len(buf) <= max_msg and 0 <= tag <= MAX_TAG \
            else self._gathered(kind, buf, tag)
        op = Op(kind, callback, view, addr, tag)
        self._send(op, view, expected)
        return op

    send.__name__ = f"msg_{kind.name.lower()}"
    send.__qualname__ = f"PluginCore.{send.__name__}"
    send.__doc__ = (f"Send ``buf`` to ``addr`` as an {'' if expected else 'un'}expected message "
                    "with ``tag``; ``callback(op)`` runs in trigger() once it has left.")
    return send


class PluginCore:
    """The generic half of a plugin: messages posted to the matcher, argument checks and
    accounting of put and get, trigger, cancel of receives, statistics. A plugin calls
    ``_open_core`` and creates ``_regs`` and ``_self_addr``, and supplies its transport in
    three methods: ``_send`` (submit a checked message), ``_start_transfer`` (move a checked,
    non-empty put or get) and ``_cancel_transfer`` (withdraw a send or RMA)."""

    _lock: Any
    _closed: bool
    _cq: CompletionQueue
    _matcher: Matcher
    _max_msg: int
    _regs: Sized  # the local registrations
    _self_addr: Addr
    _spin: float  # seconds progress spins after an event (the configured limit)
    stats: dict[str, int]
    # Whether ``_send`` takes a list of buffers as one message (an iovec); else PluginCore
    # joins a gathered message before handing it over.
    _gathers = False
    rma_ordered = False  # na.interface.Plugin: nothing promised unless a transport says so

    def _open_core(self, max_msg_size: int, spin_us: int, counters: tuple[str, ...],
                   log: logging.Logger, max_queued: int, on_drained: Callable[[], None],
                   max_peer: int | None = None) -> None:
        """Create the state this half works on: first in a plugin's ``__init__``, once its
        arguments are checked. ``counters`` are the plugin's own, besides ``COUNTERS``;
        ``max_queued``, ``on_drained`` and ``max_peer`` are the matcher's back-pressure."""
        self._max_msg = max_msg_size
        self._spin = max(spin_us, 0) / 1e6
        self._lock = threading.Lock()
        self._closed = False
        self.stats = dict.fromkeys(COUNTERS + counters, 0)
        self._cq = CompletionQueue()
        self._matcher = Matcher(self._cq, self.stats, log, max_queued, on_drained, max_peer)

    def _send(self, op: Op, view: memoryview | bytes, expected: bool) -> None:
        raise NotImplementedError  # each plugin's transport; PluginCore is never used alone

    def _cancel_transfer(self, op: Op) -> bool:
        """Withdraw a send or RMA (lock held); True if it will finish later, as canceled."""
        raise NotImplementedError

    def _start_transfer(self, op: Op) -> None:
        """Move a checked put or get of at least one byte to a peer not known dead (lock
        held); its completion, or its failure, is posted to the completion queue."""
        raise NotImplementedError

    def _start_op(self, op: Op) -> Op:
        """Start a checked put or get (``rma_op``). A peer known dead fails it at once, on
        every plugin alike, and an empty one completes without touching the transport."""
        addr = op.addr
        with self._lock:
            if self._closed:
                check_open(True, op.kind.name.lower(), self)
            self.stats["rma_ops"] += 1
            self.stats["rma_bytes"] += op.length
            if addr.dead:  # type: ignore[union-attr]
                self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, addr.dead))  # type: ignore[union-attr]
            elif op.length == 0:
                self._cq.post(op)
            else:
                self._start_transfer(op)
        return op

    def statistics(self) -> dict[str, Any]:
        """The counters, what every plugin reports of its state, then its transport's own
        (``_statistics``): one set of names whatever the plugin (STYLE 14)."""
        out: dict[str, Any] = dict(self.stats)
        out.update(uri=self._self_addr.uri, registrations=len(self._regs),
                   queued_bytes=self._matcher.queued, spin_us=int(self._spin * 1e6),
                   callback_errors=self._cq.callback_errors)
        out.update(self._statistics())
        return out

    def _statistics(self) -> dict[str, Any]:
        """What the transport adds to ``statistics()``."""
        return {}

    def _check_open(self, name: str) -> None:
        check_open(self._closed, name, self)

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]  # each plugin releases its own transport

    def __del__(self) -> None:
        # A warning only: network resources are released by close(), never here.
        if not getattr(self, "_closed", True):
            warnings.warn(f"{self!r} was not closed", ResourceWarning, stacklevel=2)

    @staticmethod
    def _unregister(regs: dict[int, MemHandle], handle: MemHandle) -> None:
        """Take ``handle`` out of a plugin's table of local registrations, or refuse it."""
        if not handle.local or regs.get(id(handle)) is not handle:
            raise ValueError(f"mem_deregister: {handle!r} is not registered here")
        del regs[id(handle)]

    def msg_get_max_unexpected_size(self) -> int:
        return self._max_msg

    def msg_get_max_expected_size(self) -> int:
        return self._max_msg

    def _gathered(self, kind: OpKind, buf: Any, tag: int) -> Any:
        view = message_view(kind, buf, tag, self._max_msg)
        return b"".join(view) if type(view) is list and not self._gathers else view

    # The message calls are the per-message hot path: the common case (a flat byte buffer, a
    # u32 tag, an open plugin) is checked inline, the rest in the shared helpers.
    msg_send_unexpected = _sender(OpKind.SEND_UNEXPECTED)
    msg_send_expected = _sender(OpKind.SEND_EXPECTED)

    def msg_recv_unexpected(self, buf: Any, callback: Callback | None = None) -> Op:
        view = buf if type(buf) is memoryview and buf.format == "B" and buf.ndim == 1 and \
            not buf.readonly else recv_view(buf, "msg_recv_unexpected")
        op = Op(_RECV_UNEXPECTED, callback, view)
        with self._lock:
            if self._closed:
                check_open(True, "msg_recv_unexpected", self)
            self._matcher.post_unexpected(op)
        return op

    def msg_recv_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op:
        if not 0 <= tag <= MAX_TAG:
            check_tag("msg_recv_expected", tag)
        view = buf if type(buf) is memoryview and buf.format == "B" and buf.ndim == 1 and \
            not buf.readonly else recv_view(buf, "msg_recv_expected")
        op = Op(_RECV_EXPECTED, callback, view, addr, tag)
        lock = self._lock
        lock.acquire()  # (not ``with``: per message, its two bound methods cost ~30 ns)
        try:
            if self._closed:
                check_open(True, "msg_recv_expected", self)
            self._matcher.post_expected(op)
        finally:
            lock.release()
        return op

    def put(self, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
            length: int, addr: Addr, callback: Callback | None = None) -> Op:
        return self._start_op(rma_op(OpKind.PUT, local, local_off, remote, remote_off, length,
                                     addr, callback))

    def get(self, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
            length: int, addr: Addr, callback: Callback | None = None) -> Op:
        return self._start_op(rma_op(OpKind.GET, local, local_off, remote, remote_off, length,
                                     addr, callback))

    def trigger(self, max_count: int = 1 << 30) -> int:
        return self._cq.trigger(max_count)

    def cancel(self, op: Op) -> None:
        """Finish ``op`` as Canceled: at once if nothing holds its buffer, else once the
        transport gives it back."""
        with self._lock:
            if op.state != OpState.PENDING:
                return
            self.stats["canceled"] += 1
            if self._matcher.cancel(op) or not self._cancel_transfer(op):
                self._cq.fail(op, canceled(op))
