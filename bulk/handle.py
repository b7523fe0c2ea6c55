"""Bulk handles: local memory exposed for one-sided transfers, and descriptions of remote ones.

``Bulk`` registers one or several buffer-protocol segments with the NA plugin and presents them
as one offset space. ``RemoteBulk`` is what a peer receives (through an RPC argument or
``from_bytes``): rights, the owner's address and the segments' keys, or, for a small read-only
handle, the bytes themselves (eager), so that pulling from it is a local copy.

Rights are what *remote* peers may do: READ_ONLY handles may be pulled from, WRITE_ONLY ones
pushed into. Every range, size and right is checked before a byte moves; the target checks
again against its own registrations, never against what the wire claims.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

from petasus import na
from petasus.na.types import access_of, as_byte_view

from . import layout as lo
from .transfer import Driver, Transfer, driver_for

READ_ONLY = na.Access.READ_ONLY
WRITE_ONLY = na.Access.WRITE_ONLY
# The rights as plain ints, for checks on the transfer path: IntFlag's own & (and int & IntFlag,
# through its __rand__) builds a member, ~1 us each.
_READ, _WRITE = int(READ_ONLY), int(WRITE_ONLY)
READ_WRITE = na.Access.READ_WRITE


def eager_limit(plugin: na.Plugin) -> int:
    """The largest read-only handle that carries its bytes by default.

    bench/bulk.py's eager rows (docs/bulk.md has the figures): an RPC carrying S bytes inside
    its handle beats one whose target pulls them at every S that still fits in the request
    (1.7x at 1 KiB, 1.3-1.7x at 60 KiB, over tcp and sm), and loses 2.5-5x as soon as the
    request overflows into bulk itself. So the crossover is the message size; three quarters of
    it leave the other arguments room. ``PETASUS_EAGER_BYTES`` overrides it.
    """
    forced = os.environ.get("PETASUS_EAGER_BYTES")
    if forced is not None:
        return int(forced)
    return plugin.msg_get_max_unexpected_size() * 3 // 4


class Bulk:
    """Local memory exposed to peers: ``Bulk(engine_or_plugin, buffers, access)``.

    ``buffers`` is one buffer-protocol object or a list of them (bytes, bytearray, memoryview,
    mmap, numpy arrays; each C-contiguous). ``eager``: None carries the bytes of a read-only
    handle of at most ``eager_limit()`` inside its serialized form; True always does (read-only
    only); False never does. Eager bytes are captured when the handle is serialized.
    """

    def __init__(self, owner: Any, buffers: Any, access: na.Access, *,
                 eager: bool | None = None) -> None:
        self._driver: Driver = driver_for(owner)
        self.na: na.Plugin = self._driver.na
        self.access = access_of(access)
        segments = list(buffers) if isinstance(buffers, list | tuple) else [buffers]
        views = [as_byte_view(b, "Bulk") for b in segments]
        if int(self.access) & _WRITE:
            for i, v in enumerate(views):
                if v.readonly:
                    raise ValueError(f"Bulk: segment {i} is read-only and cannot take remote "
                                     "writes (use READ_ONLY)")
        self.views = views
        self.layout = lo.Layout([len(v) for v in views])
        self.size = self.layout.total
        if eager and self.access != READ_ONLY:
            raise ValueError("Bulk: only a READ_ONLY handle can carry its bytes (eager=True)")
        if eager is None:
            eager = self.access == READ_ONLY and self.size <= eager_limit(self.na)
        self.eager = bool(eager)
        self._handles: list[na.MemHandle | None] | None = None
        self._transfers: list[Transfer] = []  # those that may still be moving (see close)
        self._moving = threading.Lock()  # pulls on one handle from several threads
        self._closed = False
        if not self.eager:
            self._register()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("eager" if self.eager else "registered")
        return (f"<Bulk {self.size} B in {len(self.views)} segment(s) {self.access.name} "
                f"{state}>")

    def __enter__(self) -> Bulk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_handles", None):
            warnings.warn(f"{self!r} was not closed", ResourceWarning, stacklevel=2)

    def __len__(self) -> int:
        return self.size

    def _register(self) -> list[na.MemHandle | None]:
        if self._handles is None:
            handles: list[na.MemHandle | None] = []
            try:
                for v in self.views:
                    handles.append(self.na.mem_register(v, self.access) if len(v) else None)
            except BaseException:
                for h in handles:
                    if h is not None:
                        self.na.mem_deregister(h)
                raise
            self._handles = handles
        return self._handles

    def close(self) -> None:
        """Cancel transfers still moving and withdraw the registrations (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self._moving:
            moving, self._transfers = self._transfers, []
        for t in moving:
            if not t.done:
                t.cancel()
        handles, self._handles = self._handles, None
        for h in handles or ():
            if h is not None:
                try:
                    self.na.mem_deregister(h)
                except (ValueError, RuntimeError):
                    pass  # the plugin is already closed, and took the registration with it
        # Let go of the buffers, so that an mmap, say, can be closed or resized after us.
        views, self.views = self.views, []
        for v in views:
            try:
                v.release()
            except BufferError:
                pass  # a view of it is still in use elsewhere; it goes with its last user

    # -- what peers receive -----------------------------------------------------------------------
    def _owner(self) -> bytes:
        if self._closed:
            raise ValueError(f"serialize: {self!r} is closed")
        return self.na.addr_serialize(self.na.addr_self())

    def wire(self) -> lo.Wire:
        owner = self._owner()
        if self.eager:
            return lo.Wire(int(self.access), owner, (self.size,), (), b"".join(self.views))
        handles = self._register()
        return lo.Wire(int(self.access), owner, tuple(self.layout.sizes),
                       tuple(self.na.mem_handle_serialize(h) if h is not None else b""
                             for h in handles))

    def to_bytes(self) -> bytes:
        """The serialized handle (what the bulk proc puts on the wire)."""
        if self.eager:
            return lo.encode_eager(int(self.access), self._owner(), self.views)
        return lo.encode(self.wire())

    def remote(self) -> RemoteBulk:
        """This handle as a peer sees it (what ``RemoteBulk.from_bytes(to_bytes())`` gives)."""
        return RemoteBulk(self.wire())

    # -- transfers --------------------------------------------------------------------------------
    def select(self, offset: int, size: int) -> Region:
        lo.check_range("select", offset, size, self.size)
        return Region(self, offset, size)

    def pull_from(self, source: Any, size: int | None = None, *, offset: int = 0,
                  local_offset: int = 0, callback: Any = None,
                  addr: na.Addr | None = None) -> Transfer:
        """Copy ``size`` bytes from ``source`` (a RemoteBulk or a region of one) at ``offset``
        into this handle at ``local_offset``. ``size`` defaults to the rest of the source."""
        return _transfer("pull_from", self, local_offset, source, offset, size, callback, addr)

    def push_to(self, dest: Any, size: int | None = None, *, offset: int = 0,
                local_offset: int = 0, callback: Any = None,
                addr: na.Addr | None = None) -> Transfer:
        """Copy ``size`` bytes of this handle from ``local_offset`` into ``dest`` (a RemoteBulk
        or a region of one) at ``offset``. ``size`` defaults to the rest of the destination."""
        return _transfer("push_to", self, local_offset, dest, offset, size, callback, addr)


class RemoteBulk:
    """A peer's bulk handle: rights, size, owner, and segment keys or eager bytes.

    The owner is only what the bytes claim. A handle that came in a message is *bound* to
    the peer that sent it (``bind``; the RPC layer binds every handle it decodes): its
    transfers then go to that peer, over the connection the message came on, and a handle
    naming another owner is refused unless the binding allows that owner, so a peer can
    never make us connect to, or read from, a third party. An unbound handle (one the
    program decoded itself with ``from_bytes``, say from a directory it trusts) reaches the
    owner it names.
    """

    __slots__ = ("_resolved", "allow", "peer", "wire")

    def __init__(self, wire: lo.Wire) -> None:
        self.wire = wire
        self.peer: na.Addr | None = None
        self.allow: Callable[[str], bool] | None = None
        self._resolved: tuple[Any, na.Addr, list[na.MemHandle | None]] | None = None

    def bind(self, peer: na.Addr, allow: Callable[[str], bool] | None = None) -> RemoteBulk:
        """Tie the handle to ``peer``, which sent it; ``allow(owner_uri)`` says which other
        owners its transfers may reach (none by default)."""
        self.peer = peer
        self.allow = allow
        self._resolved = None
        return self

    @property
    def owner(self) -> str:
        """The owner's URI, as the handle claims it."""
        return bytes(self.wire.owner).decode("utf-8", "replace")

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> RemoteBulk:
        handle, end = cls.decode(data)
        if end != len(data):
            raise lo.LayoutError(f"bulk handle: {len(data) - end} trailing bytes")
        return handle

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[RemoteBulk, int]:
        """Decode the handle at ``pos``; return it and the offset just past it."""
        wire, end = lo.decode(buf, pos)
        return cls(wire), end

    def to_bytes(self) -> bytes:
        """Serialized again, as is (to hand it on to a third process)."""
        return lo.encode(self.wire)

    @property
    def size(self) -> int:
        return self.wire.total

    @property
    def access(self) -> na.Access:
        return access_of(self.wire.access)

    @property
    def eager(self) -> bool:
        return self.wire.data is not None

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        kind = "eager" if self.eager else f"{len(self.wire.sizes)} segment(s)"
        return f"<RemoteBulk {self.size} B {kind} {self.access.name}>"

    def select(self, offset: int, size: int) -> Region:
        lo.check_range("select", offset, size, self.size)
        return Region(self, offset, size)

    def resolve(self, plugin: na.Plugin, op: str, addr: na.Addr | None = None,
                ) -> tuple[na.Addr, list[na.MemHandle | None]]:
        """The owner's address (unless given) and the NA handles, as ``plugin`` knows them.
        A bound handle resolves to the peer it came from; one naming another owner raises
        ``AccessError`` naming both, unless its binding allows that owner."""
        cached = self._resolved
        if cached is not None and cached[0] is plugin:
            return addr or cached[1], cached[2]
        wire = self.wire
        if addr is None and self.peer is not None:
            addr = self._bound(plugin, op, self.peer)
        try:
            if addr is None:
                addr = plugin.addr_deserialize(wire.owner)
            handles = [plugin.mem_handle_deserialize(h) if h else None for h in wire.handles]
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{op}: the handle's owner or keys do not belong to "
                             f"{plugin!r}: {exc}") from None
        for i, (h, size) in enumerate(zip(handles, wire.sizes, strict=True)):
            if (h.length if h is not None else 0) != size:
                raise ValueError(f"{op}: segment {i} of {size} B carries a key for "
                                 f"{h.length if h is not None else 0} B")
        self._resolved = (plugin, addr, handles)
        return addr, handles


    def _bound(self, plugin: na.Plugin, op: str, peer: na.Addr) -> na.Addr | None:
        """The peer itself if it owns the handle; None (the named owner) if the binding
        allows that owner; otherwise the refusal."""
        if bytes(self.wire.owner) == plugin.addr_serialize(peer):
            return peer
        owner = self.owner
        if self.allow is not None and self.allow(owner):
            return None
        raise na.AccessError(op, peer.uri, f"the handle names {owner[:200]!r} as its owner, "
                             f"not {peer.uri}, which sent it; transfers with a third party "
                             "must be allowed (Engine(bulk_peers=...))")


class Region:
    """A range of a local or remote handle: ``handle.select(offset, size)``."""

    __slots__ = ("bulk", "offset", "size")

    def __init__(self, bulk: Bulk | RemoteBulk, offset: int, size: int) -> None:
        self.bulk = bulk
        self.offset = offset
        self.size = size

    def __repr__(self) -> str:
        return f"<Region {self.offset}+{self.size} of {self.bulk!r}>"

    def __len__(self) -> int:
        return self.size

    def select(self, offset: int, size: int) -> Region:
        lo.check_range("select", offset, size, self.size)
        return Region(self.bulk, self.offset + offset, size)

    def pull_from(self, source: Any, size: int | None = None, *, offset: int = 0,
                  local_offset: int = 0, callback: Any = None,
                  addr: na.Addr | None = None) -> Transfer:
        return _transfer("pull_from", self, local_offset, source, offset, size, callback, addr)

    def push_to(self, dest: Any, size: int | None = None, *, offset: int = 0,
                local_offset: int = 0, callback: Any = None,
                addr: na.Addr | None = None) -> Transfer:
        return _transfer("push_to", self, local_offset, dest, offset, size, callback, addr)


def _span(what: str, obj: Any, offset: int, local: bool) -> tuple[Any, int, int]:
    """(handle, start, length available) of a handle or region, for one side of a transfer."""
    if isinstance(obj, Region):
        base, start, avail = obj.bulk, obj.offset, obj.size
    else:
        base, start, avail = obj, 0, getattr(obj, "size", None)
    if local and not isinstance(base, Bulk):
        raise TypeError(f"{what}: the local side must be a Bulk, not {type(base).__name__}")
    if not local and not isinstance(base, Bulk | RemoteBulk):
        raise TypeError(f"{what}: expected a RemoteBulk (or a region of one), "
                        f"got {type(obj).__name__}")
    if offset < 0 or offset > avail:
        raise ValueError(f"{what}: offset {offset} is outside the {avail} B "
                         f"{'local' if local else 'remote'} range")
    return base, start + offset, avail - offset


def _transfer(what: str, local_obj: Any, local_offset: int, remote_obj: Any, remote_offset: int,
              size: int | None, callback: Any, addr: na.Addr | None) -> Transfer:
    """Check everything, then start the pieces. Whatever fails once a piece may have moved is
    the transfer's error (reported on completion), never an exception from here."""
    local, loff, lavail = _span(what, local_obj, local_offset, True)
    remote, roff, ravail = _span(what, remote_obj, remote_offset, False)
    pull = what == "pull_from"
    if local._closed:
        raise ValueError(f"{what}: {local!r} is closed")
    if size is None:
        size = ravail
    if size < 0:
        raise ValueError(f"{what}: size {size} is negative")
    if size > ravail:
        raise ValueError(f"{what}: {size} B at remote offset {remote_offset} exceed the "
                         f"{ravail + remote_offset} B remote range")
    if size > lavail:
        raise ValueError(f"{what}: {size} B at local offset {local_offset} exceed the "
                         f"{lavail + local_offset} B local range")
    if not int(remote.access) & (_READ if pull else _WRITE):
        raise na.AccessError(what, None, f"the remote handle is {remote.access.name}: peers "
                             f"may not {'read' if pull else 'write'} it")
    rsizes = remote.layout.sizes if isinstance(remote, Bulk) else remote.wire.sizes
    pieces = lo.plan(local.layout, loff, lo.Layout(rsizes), roff, size)
    if pull:
        for li, *_rest in pieces:
            if local.views[li].readonly:
                raise ValueError(f"{what}: local segment {li} is read-only and cannot receive")
    driver = local._driver
    if isinstance(remote, Bulk) or remote.eager:
        # Both sides in this process, or the bytes came with the handle: a local copy, no
        # round trip. It completes before this returns (its callback runs here).
        if isinstance(remote, Bulk):
            if remote._closed:
                raise ValueError(f"{what}: {remote!r} is closed")
            rviews = remote.views
        else:
            rviews = [memoryview(remote.wire.data)]  # type: ignore[arg-type]
        transfer = Transfer(what, None, size, driver)
        for li, lo_, ri, ro, n in pieces:
            if pull:
                local.views[li][lo_:lo_ + n] = rviews[ri][ro:ro + n]
            else:
                rviews[ri][ro:ro + n] = local.views[li][lo_:lo_ + n]
        if callback is not None:
            transfer.add_done_callback(callback)
        transfer._complete()
        return transfer
    plugin = local.na
    addr, rhandles = remote.resolve(plugin, what, addr)
    lhandles = local._register()
    transfer = Transfer(what, addr.uri, size, driver, (local, remote))
    if callback is not None:
        transfer.add_done_callback(callback)
    if not pieces:
        transfer._complete()
        return transfer
    transfer.remaining = len(pieces)
    with local._moving:
        moving = local._transfers
        if moving:
            # Only those still moving are kept: a WeakSet did this at ~2 us per pull (its
            # creation, add, iteration and callbacks), and a long-lived Bulk must not grow.
            moving[:] = [t for t in moving if not t.done]
        moving.append(transfer)
    post = plugin.get if pull else plugin.put
    on_op = transfer._on_op
    for i, (li, lo_, ri, ro, n) in enumerate(pieces):
        try:
            op = post(lhandles[li], lo_, rhandles[ri], ro, n, addr, on_op)  # type: ignore[arg-type]
        except Exception as exc:
            # The pieces already posted are canceled and complete the transfer, failed; with
            # none posted it completes now. Either way the error reaches wait() and callbacks.
            transfer._fail(exc, len(pieces) - i)
            break
        transfer._track(op)
    return transfer
