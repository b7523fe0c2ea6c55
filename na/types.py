"""Values shared by every plugin: access rights, operations, addresses, memory handles."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Generic, TypeVar

R = TypeVar("R")  # a plugin's record of a registration (sm: SmRegion; ofi: its MR or base)


class Access(enum.IntFlag):
    """What a *remote* peer may do with a registration (checked by the target, not the wire)."""

    READ_ONLY = 1  # peers may get from it
    WRITE_ONLY = 2  # peers may put into it
    READ_WRITE = 3


# Access(value) through the enum machinery costs ~0.5 us, and a pull converts several times
# (bench/handle_rpc.py's server: 11 enum calls per pull, 6% of its handler): members by value.
_ACCESS = {int(a): a for a in (Access(0), Access.READ_ONLY, Access.WRITE_ONLY, Access.READ_WRITE)}


def access_of(value: int) -> Access:
    """``Access(value)``, the members looked up instead of constructed."""
    member = _ACCESS.get(value)
    return member if member is not None and type(value) in (int, Access) else Access(value)


class OpKind(enum.IntEnum):
    SEND_UNEXPECTED = 1
    RECV_UNEXPECTED = 2
    SEND_EXPECTED = 3
    RECV_EXPECTED = 4
    PUT = 5
    GET = 6


Callback = Callable[["Op"], Any]


class OpState(enum.IntEnum):
    """Where an op is in the plugin: the one set of state names every plugin uses."""

    PENDING = 0  # posted, not finished
    FINISHED = 1  # its completion is posted (queued for trigger(), or done)
    CANCELING = 2  # cancel() asked; the transport still holds its buffer, it finishes later


# The members read per message, as module constants: a member read through its enum class is a
# lookup through the enum's metaclass (~45 ns a read here, several reads a message). The
# modules of this package import these.
_PENDING = OpState.PENDING
_FINISHED = OpState.FINISHED
_CANCELING = OpState.CANCELING
_RECV_EXPECTED = OpKind.RECV_EXPECTED
_RECV_UNEXPECTED = OpKind.RECV_UNEXPECTED


class Op:
    """One operation, from post to completion; also the completion record its callback receives.

    A single object serves as both so the per-message path allocates one thing. After completion:
    ``error`` is None or the exception; for receives, ``source``, ``tag`` and ``size`` describe the
    message, which is in ``buffer[:size]``.
    """

    __slots__ = (
        "__weakref__",
        "addr",
        "buffer",
        "callback",
        "done",
        "error",
        "kind",
        "length",
        "local",
        "local_off",
        "op_id",
        "remaining",
        "remote",
        "remote_off",
        "size",
        "source",
        "state",
        "tag",
    )

    def __init__(self, kind: OpKind, callback: Callback | None, buffer: Any = None,
                 addr: Addr | None = None, tag: int = 0) -> None:
        self.kind = kind
        self.callback = callback
        self.buffer = buffer
        self.addr = addr
        self.tag = tag
        self.size = 0
        self.source: Addr | None = None
        self.error: BaseException | None = None
        self.done = False
        self.state = _PENDING
        self.op_id = 0
        self.remaining = 0

    def result(self) -> Op:
        """Raise the operation's error, if any; return the op for chaining."""
        if not self.done:
            raise RuntimeError(f"{self!r} has not completed")
        if self.error is not None:
            raise self.error
        return self

    def __repr__(self) -> str:
        status = "done" if self.done else self.state.name.lower()
        if self.error is not None:
            status = f"failed: {self.error}"
        peer = f" peer={self.addr.uri}" if self.addr is not None else ""
        return f"<Op {self.kind.name} tag={self.tag}{peer} {status}>"


class Addr:
    """A peer address. Each plugin keeps one Addr per peer, so identity is equality."""

    __slots__ = ("__weakref__", "conn", "dead", "fabric_addr", "listening", "uri")

    def __init__(self, uri: str, listening: bool) -> None:
        self.uri = uri
        self.listening = listening
        self.conn: Any = None  # the socket plugins' live connection to the peer
        self.dead: str | None = None
        self.fabric_addr: int | None = None  # ofi: the peer's fi_addr_t in the address vector

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        state = "connected" if self.conn is not None else ("dead" if self.dead else "idle")
        return f"<Addr {self.uri} {state}>"


class MemHandle(Generic[R]):
    """A registration: local handles hold the memory, remote (deserialized) ones describe it.

    ``record`` is the plugin's typed record of it: an ``sm.SmRegion`` (where it lives in the
    owner's process), ofi's registered MR (local) or remote base address, None on tcp.
    """

    __slots__ = ("access", "key", "length", "local", "record", "registered", "view")

    def __init__(self, view: memoryview | None, length: int, access: Access, key: int,
                 local: bool, record: R | None = None) -> None:
        self.view = view
        self.length = length
        self.access = access_of(access)
        self.key = key
        self.local = local
        self.record = record
        self.registered = local

    def __repr__(self) -> str:
        where = "local" if self.local else "remote"
        state = "" if self.registered or not self.local else " deregistered"
        return f"<MemHandle {where} {self.length} B {self.access.name}{state}>"


def as_byte_view(buf: Any, op: str) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer-protocol object."""
    try:
        view = memoryview(buf)
    except TypeError:
        raise TypeError(f"{op}: expected a buffer-protocol object, "
                        f"got {type(buf).__name__}") from None
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            raise ValueError(f"{op}: the buffer is not C-contiguous")
        view = view.cast("B")
    return view
