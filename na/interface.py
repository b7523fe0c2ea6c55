"""The one interface every NA plugin implements, close to Mercury's ``struct na_class_ops``.

Operations never wait and never call back from inside the call: each completes by posting its
``Op`` to the plugin's completion queue, and ``trigger()`` runs the callbacks. An op posted
without a callback has nothing to run: it is marked ``done`` as it completes. ``progress()``
moves bytes; ``poll_fd()`` becomes readable when progress has something to do, so a selector or
an asyncio loop can wait on it. Work bounded by the call itself may be done inside it: sm makes
a process_vm copy of up to 1 MiB in ``get``/``put`` (na/sm.py), as Mercury's na+sm does, and
the op then completes through the queue like any other.

A message to send is one buffer, or a list of buffers sent as one message (what arrives is
their concatenation): a transport with an iovec sends the parts as they are, so a layer above
need not join a large encoded value to its header.

Optional: ``hold_sends(lead=False)`` / ``release_sends()`` (tcp, sm) let a driver coalesce what
several callers send in one turn of an event loop into a few syscalls (``lead``: the first
leaves at once); a plugin without them sends each message as it comes.

Unexpected messages that arrive before a receive is posted are queued (bounded; past the bound
the plugin stops reading that peer). Expected messages must be pre-posted, as in Mercury: one
that finds no matching receive is a late reply and is dropped (counted in ``statistics()`` as
``expected_dropped``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .types import Access, Addr, Callback, MemHandle, Op


@runtime_checkable
class Plugin(Protocol):
    scheme: str
    # True when gets to one peer read its memory in the order they were started, each after
    # every put started before it (libfabric's FI_ORDER_RAR | FI_ORDER_RAW), so a caller may
    # start a read and, without waiting, a second read that validates the first (a seqlock's
    # epoch). A put started behind a get may still land before that get's bytes are read.
    # False promises nothing: wait for one op before starting the next. Plugins without the
    # attribute are taken as False.
    rma_ordered: bool

    # addresses
    def addr_self(self) -> Addr: ...
    def addr_lookup(self, uri: str) -> Addr: ...
    def addr_to_string(self, addr: Addr) -> str: ...
    def addr_serialize(self, addr: Addr) -> bytes: ...
    def addr_deserialize(self, data: bytes) -> Addr: ...

    # two-sided messages
    def msg_get_max_unexpected_size(self) -> int: ...
    def msg_get_max_expected_size(self) -> int: ...
    def msg_send_unexpected(self, addr: Addr, buf: Any, tag: int,
                            callback: Callback | None = None) -> Op: ...
    def msg_recv_unexpected(self, buf: Any, callback: Callback | None = None) -> Op: ...
    def msg_send_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op: ...
    def msg_recv_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op: ...

    # memory and one-sided access
    def mem_register(self, buffer: Any, access: Access) -> MemHandle: ...
    def mem_deregister(self, handle: MemHandle) -> None: ...
    def mem_handle_serialize(self, handle: MemHandle) -> bytes: ...
    def mem_handle_deserialize(self, data: bytes) -> MemHandle: ...
    def put(self, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
            length: int, addr: Addr, callback: Callback | None = None) -> Op: ...
    def get(self, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
            length: int, addr: Addr, callback: Callback | None = None) -> Op: ...

    # progress
    def poll_fd(self) -> int: ...
    def progress(self, timeout: float) -> bool: ...
    def trigger(self, max_count: int = ...) -> int: ...
    def cancel(self, op: Op) -> None: ...
    def statistics(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
