"""The verbs plugin: NA over RC queue pairs through pyverbs.

One class, ``VerbsPlugin``; the connections (handshake, credits, frames, retiring) are in
``_links``, the verbs calls in ``_driver``, and every protocol rule with no I/O in
``_protocol`` and ``_wire`` (tested on their own, everywhere).

Messages: a SEND of one frame (``_wire``) into a slot of the shared receive queue, copied in
from the user's buffer at the sender and out into the posted NA receive at the receiver, so
the message path registers nothing. Credits (``_protocol.Credits``) keep every SEND within a
posted slot, and the matcher's back-pressure withholds them. Messages and replies to one peer
go out in order on one QP.

RMA, the hybrid of the Plasma-over-RDMA thesis: up to ``two_sided_max`` bytes (32 KiB, the
thesis's crossover) a put or get is two-sided, the data copied through the registered slots
and checked by the target's table like tcp's; above it, RDMA READ or WRITE straight between
the two registrations, split at the port's max_msg_sz, with the NIC enforcing the rkey,
bounds and access flags (NA rights map to IBV flags exactly: ``_protocol.access_flags``). A
refused one-sided access is an AccessError; it also puts the QP in error, so the connection
is retired and the peer's other work goes on over a new one (``_links``). ``two_sided_max=0``
makes every transfer one-sided (the suite runs the access checks both ways).

Registrations go through a cache (``_protocol.RegCache``): a buffer registered twice with the
same rights shares one memory region, released with its last handle.

Progress: the CQ is polled in batches of ``CQ_BATCH``; ``poll_fd()`` is an epoll set of the
completion channel's descriptor, the out-of-band sockets and the wake-up eventfd. After any
event progress spins ``spin_us`` (polls with sched_yield between), then arms the CQ (after a
last poll, so no completion slips between) and sleeps in epoll.

What ran where: the sans-I/O core runs in CI on every host; this file and ``_driver`` need a
device and have not run on one yet (no RDMA device, and ``rdma link add`` for soft-RoCE fails
in the sandbox the plugin was written in: "Failed to open NETLINK_RDMA socket").
"""

from __future__ import annotations

import itertools
import mmap
import select
import socket
from dataclasses import dataclass
from typing import Any

from .. import _regs, core
from .._polled import PolledPlugin
from ..errors import PeerError
from ..types import Access, Addr, MemHandle, Op, OpKind, OpState
from . import _protocol as p
from . import _wire as w
from ._driver import Device, pin
from ._links import Links, log
from ._progress import Progress

SEND_CHUNK = 32  # send slots registered at a time
MAX_SEND_SLOTS = 1024  # past this, frames wait for a send to complete
SRQ_SIZE = 4096  # receive slots: 120 connections of 34 (DATA_CREDITS + CTRL_CREDITS)


@dataclass
class Region:
    """A registered memory region, shared by the handles of one (buffer, rights) pair."""

    mr: Any
    addr: int
    mr_length: int  # at least 1: a zero-byte buffer registers a private byte instead
    flags: int
    length: int  # what peers may reach
    access: Access
    view: memoryview
    holder: Any


class VerbsPlugin(Progress, Links, PolledPlugin):
    """An RDMA device port, its SRQ and CQ, an out-of-band listener, and RC connections."""

    scheme = "verbs"

    def __init__(self, uri: str, listen: bool = False, *, max_msg_size: int = core.MAX_MSG_SIZE,
                 spin_us: int = core.SPIN_US, rma_chunk: int = 1 << 30,
                 max_queued: int = core.MAX_QUEUED, two_sided_max: int = p.TWO_SIDED_MAX,
                 gid_index: int = 0, srq_size: int = SRQ_SIZE) -> None:
        parts = w.parse_uri(uri)
        if max_msg_size < 1 or rma_chunk < 1 or two_sided_max < 0:
            raise ValueError("max_msg_size and rma_chunk must be positive, two_sided_max >= 0")
        if parts.host in ("0.0.0.0", "::"):
            raise ValueError(f"{uri!r}: name the address peers reach this one at, not "
                             f"{parts.host}")
        self._open_core(max_msg_size, spin_us, ("rma_two_sided", "connections", "retired"), log,
                        max_queued, lambda: self._withhold(False))
        self._two_sided = min(two_sided_max, max_msg_size)
        self._slot_body = max(max_msg_size, self._two_sided)
        self._slot = w.HEADER_SIZE + w.RMA_REQ.size + self._slot_body
        self._poll_set = select.epoll()
        self._fds: dict[int, Any] = {}
        self._conns: list[Any] = []
        self._by_qpn: dict[int, Any] = {}
        self._peers: dict[str, Addr] = {}
        self._work: dict[int, tuple[Any, p.Out, int]] = {}
        self._next_wr = 0
        self._rma_wait: dict[int, tuple[Op, Addr]] = {}
        self._rma_ids = itertools.count(1)
        self._regs: dict[int, MemHandle] = {}
        self._by_rkey: dict[int, Region] = {}
        self._recv_chunks: list[tuple[mmap.mmap, Any]] = []
        self._recv_views: list[memoryview] = []
        self._recv_bases: list[int] = []
        self._send_chunks: list[tuple[int, Any]] = []
        self._send_views: list[memoryview] = []
        self._send_maps: list[mmap.mmap] = []
        self._recv_pool = p.SlotPool(self._slot, p.DATA_CREDITS + p.CTRL_CREDITS)
        self._send_pool = p.SlotPool(self._slot, SEND_CHUNK)
        self._max_send_slots = MAX_SEND_SLOTS
        self._dev: Device | None = None
        self._cache: p.RegCache[Region] = p.RegCache(self._dereg_region)
        self._listener = socket.socket(socket.AF_INET6 if ":" in parts.host else socket.AF_INET,
                                       socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            host = self._bind(parts, uri, listen)
            self._listener.listen(128)
            bound = str(w.VerbsUri(parts.device, parts.port, host,
                                   self._listener.getsockname()[1]))
            self._self_addr = Addr(bound, listen)
            self._peers[bound] = self._self_addr
            self._dev = Device(parts.device, parts.port, gid_index, srq_size)
            self._budget = p.ReceiveBudget(self._dev.srq_size)
            self._rma_chunk = min(rma_chunk, self._dev.limits.port_max_msg)
            for fd in (self._cq.wake_fd, self._dev.fd, self._listener.fileno()):
                self._poll_set.register(fd, select.EPOLLIN)
        except BaseException:
            self._release()
            raise

    def _bind(self, parts: w.VerbsUri, uri: str, listen: bool) -> str:
        """Bind the out-of-band listener; the host peers reach it at.

        A listener takes the URI's address. Every other instance listens too (a peer dials
        back to reconnect after an error), but at a port of its own: a client may be opened
        with its peer's URI, as on the other plugins, whose host may not even be local, in
        which case it listens on every interface and names the host's address.
        """
        if listen:
            try:
                self._listener.bind((parts.host, parts.tcp_port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen at {uri}: {exc.strerror}") from None
            return parts.host
        try:
            self._listener.bind((parts.host, 0))
            return parts.host
        except OSError:
            self._listener.bind(("", 0))
            return socket.gethostbyname(socket.gethostname())

    # -- resources --------------------------------------------------------------------------
    def _grow_recv(self) -> None:
        n = self._recv_pool.per_chunk
        memory = mmap.mmap(-1, n * self._slot, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _holder, base = pin(memoryview(memory))
        mr = self._dev.register(base, len(memory), p.IBV_ACCESS_LOCAL_WRITE)  # type: ignore[union-attr]
        self._recv_chunks.append((memory, mr))
        self._recv_views.append(memoryview(memory))
        self._recv_bases.append(base)
        for slot in self._recv_pool.grow():
            self._post_recv(slot)

    def _post_recv(self, slot: int) -> None:
        chunk, off = self._recv_pool.where(slot)
        self._dev.post_recv(slot, self._recv_bases[chunk] + off, self._slot,  # type: ignore[union-attr]
                            self._recv_chunks[chunk][1].lkey)

    def _grow_send(self) -> None:
        memory = mmap.mmap(-1, SEND_CHUNK * self._slot,
                           flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = memoryview(memory)
        _holder, base = pin(view)
        mr = self._dev.register(base, len(memory), 0)  # type: ignore[union-attr]
        self._send_maps.append(memory)
        self._send_views.append(view)
        self._send_chunks.append((base, mr))
        self._send_pool.grow()

    def _dereg_region(self, region: Region) -> None:
        self._by_rkey.pop(int(region.mr.rkey), None)
        region.mr.close()

    def _release(self) -> None:
        """Close what was opened, newest first; safe on a half-opened instance."""
        self._work.clear()
        self._rma_wait.clear()
        for conn in list(self._conns):
            self._close_socket(conn)
            if conn.qp is not None and self._dev is not None:
                self._dev.close_qp(conn.qp)
                conn.qp = None
        self._conns.clear()
        self._by_qpn.clear()
        if self._dev is not None:
            self._cache.clear()
            for _memory, mr in self._recv_chunks:
                mr.close()
            for _base, mr in self._send_chunks:
                mr.close()
            self._dev.close()
            self._dev = None
        for view in self._send_views:
            view.release()
        self._send_views.clear()
        for view in self._recv_views:
            view.release()
        self._recv_views.clear()
        self._poll_set.close()
        self._listener.close()
        self._cq.close()

    def __repr__(self) -> str:
        uri = self._self_addr.uri if hasattr(self, "_self_addr") else self.scheme
        state = "closed" if self._closed else f"{len(self._conns)} connections"
        return f"<VerbsPlugin {uri} {state}>"

    def _statistics(self) -> dict[str, Any]:
        return {"regions": len(self._cache) if self._dev else 0,
                "cache_hits": self._cache.hits if self._dev else 0,
                "two_sided_max": self._two_sided, "rma_chunk": self._rma_chunk,
                "in_flight": len(self._work), "send_slots": self._send_pool.total,
                "receive_slots": self._recv_pool.total}

    # -- addresses ------------------------------------------------------------------------------
    def _lookup(self, uri: str) -> Addr:
        addr = self._peers.get(uri)
        if addr is None:
            addr = self._peers[uri] = Addr(uri, False)
        return addr

    def addr_self(self) -> Addr:
        return self._self_addr

    def addr_lookup(self, uri: str) -> Addr:
        canonical = str(w.parse_uri(uri))
        with self._lock:
            self._check_open("addr_lookup")
            return self._lookup(canonical)

    def addr_to_string(self, addr: Addr) -> str:
        return addr.uri

    def addr_serialize(self, addr: Addr) -> bytes:
        return addr.uri.encode()

    def addr_deserialize(self, data: bytes) -> Addr:
        try:
            return self.addr_lookup(bytes(data).decode())
        except UnicodeDecodeError:
            raise ValueError("addr_deserialize: not a UTF-8 URI") from None

    # -- memory ---------------------------------------------------------------------------------
    def mem_register(self, buffer: Any, access: Access) -> MemHandle:
        view, access = _regs.register_view(buffer, access)
        # Zero bytes still need a region: one byte of a private buffer stands in.
        target = view if len(view) else memoryview(bytearray(1))
        holder, addr = pin(target)
        flags = p.access_flags(access, not target.readonly)
        size = len(target)

        def register() -> Region:
            mr = self._dev.register(addr, size, flags)  # type: ignore[union-attr]
            region = Region(mr, addr, size, flags, len(view), access, target, holder)
            self._by_rkey[int(mr.rkey)] = region
            return region

        with self._lock:
            self._check_open("mem_register")
            region = self._cache.acquire(addr, size, flags, register)
            handle = MemHandle(view, len(view), access, int(region.mr.rkey), True, region)
            self._regs[id(handle)] = handle
        return handle

    def mem_deregister(self, handle: MemHandle) -> None:
        with self._lock:
            self._unregister(self._regs, handle)
            region: Region = handle.record  # type: ignore[assignment]
            self._cache.release(region.addr, region.mr_length, region.flags)
            handle.registered = False
            handle.view = None

    def mem_handle_serialize(self, handle: MemHandle) -> bytes:
        base = handle.record.addr if handle.local else handle.record  # type: ignore[union-attr]
        return _regs.pack_handle(handle, w.HANDLE_TAIL.pack(base))

    def mem_handle_deserialize(self, data: bytes) -> MemHandle:
        access, key, length, tail = _regs.unpack_handle(data, self.scheme, w.HANDLE_TAIL.size)
        return MemHandle(None, length, access, key, False, w.HANDLE_TAIL.unpack(tail)[0])

    # -- messages and RMA -----------------------------------------------------------------------
    def _send(self, op: Op, view: memoryview | bytes, expected: bool) -> None:
        addr: Addr = op.addr  # type: ignore[assignment]
        with self._lock:
            self._check_open(op.kind.name.lower())
            if addr.dead:
                self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, addr.dead))
                return
            self.stats["msgs_sent"] += 1
            self.stats["bytes_sent"] += len(view)
            conn = self._conn_for(addr)
            if addr.dead:  # the dial failed at once
                self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, addr.dead))
                return
            conn.sq.push(p.Out(w.EXPECTED if expected else w.UNEXPECTED, op, view))
            self._flush(conn)

    def _start_transfer(self, op: Op) -> None:
        addr: Addr = op.addr  # type: ignore[assignment]
        length = op.length
        conn = self._conn_for(addr)
        if addr.dead:  # the dial failed at once
            self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, addr.dead))
            return
        if p.two_sided(length, self._two_sided):
            self.stats["rma_two_sided"] += 1
            rma_id = next(self._rma_ids)
            self._rma_wait[rma_id] = (op, addr)
            if op.kind == OpKind.GET:
                conn.sq.push(p.Out(w.GET_REQ, op, None, extra=rma_id))
            else:
                data = op.local.view[op.local_off:op.local_off + length]  # type: ignore[union-attr]
                conn.sq.push(p.Out(w.PUT_REQ, op, data, extra=rma_id))
        else:
            pieces = p.split(length, self._rma_chunk)
            op.remaining = len(pieces)
            for piece in pieces:
                conn.sq.push(p.Out(0, op, piece=piece))
        self._flush(conn)

    def _cancel_transfer(self, op: Op) -> bool:
        """Withdraw what is queued of ``op``; True if the NIC still holds its memory.

        Frames were copied into send slots when posted, so a message or two-sided RMA is
        canceled at once (a reply that comes later finds no id and is dropped). RDMA pieces
        read or write the user's memory: posted ones cannot be withdrawn, and the op ends as
        Canceled when the last of them completes or flushes.
        """
        for rma_id, (waiting, _addr) in list(self._rma_wait.items()):
            if waiting is op:
                del self._rma_wait[rma_id]
        for conn in self._conns:
            for out in [out for out in conn.sq.queue if out.op is op]:
                conn.sq.queue.remove(out)
        posted = sum(1 for _c, out, _s in self._work.values() if out.op is op and out.kind == 0)
        if posted:
            op.state = OpState.CANCELING
            op.remaining = posted  # the queued pieces just withdrawn will not report
            return True
        return False
