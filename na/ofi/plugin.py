"""The ofi plugin: NA over a libfabric FI_EP_RDM endpoint (tcp;ofi_rxm, shm, sockets, verbs).

Messages. Every message is a tagged send whose 64-bit tag carries the kind (unexpected,
expected, liveness probe) above the user's 32-bit tag, and whose payload starts with the
sender's fi_getname() bytes (one length byte, then the name), as Mercury does for providers
without FI_SOURCE: the receiver learns who wrote without relying on FI_SOURCE support, and
inserts unknown senders into its address vector. A pool of internal receive buffers is always
posted for any source and any tag; Python matches what lands there against the posted NA
receives and copies the payload (at most ``max_msg_size``) into the user's buffer. That gives
exactly the NA semantics on every provider: unexpected messages queue (bounded: past
``max_queued`` bytes the pool is not reposted, and the provider's flow control pushes back),
expected messages need a pre-posted receive and late ones are dropped and counted, a receive
that is too small fails instead of truncating, and cancel of a receive never involves the
provider. (FI_DIRECTED_RECV is then not needed; tcp;ofi_rxm does not offer it.)

RMA. ``put``/``get`` are fi_write/fi_read straight from/into the registered user memory,
split into pieces of at most ``rma_chunk`` bytes and never more than the provider's
max_msg_size (Mercury #648). Registrations honor the provider's mr_mode: FI_MR_VIRT_ADDR
(remote addresses are virtual addresses, else offsets), FI_MR_PROV_KEY (the provider's key,
else a random one of mr_key_size bytes), FI_MR_LOCAL (descriptors for local buffers; sends then
register their staging copy), FI_MR_ENDPOINT (fi_mr_bind + fi_mr_enable). READ_ONLY and
WRITE_ONLY become FI_REMOTE_READ and FI_REMOTE_WRITE, which the *target's provider* enforces
along with the key and the bounds; a refusal surfaces as an AccessError at the initiator.
A started fi_read/fi_write cannot be withdrawn from libfabric: canceling one completes it as
Canceled only when the provider gives the buffer back, so bytes may have landed by then.

Progress. fi_cq_read in batches of 64. ``poll_fd()`` is an epoll set holding an eventfd
(completions made by another thread) and, where the CQ has a wait object (tcp, sockets, verbs:
fi_control(FI_GETWAIT)), its descriptor; blocking is guarded by fi_trywait(). shm has no wait
object (its peers write shared memory, nothing a descriptor can wait on), so there the set
holds a 1 ms periodic timerfd instead: an asyncio loop waiting on poll_fd() polls the CQ every
millisecond, and ``progress()`` spins ``spin_us`` and then sleeps in 1 ms slices.

Peer failure. Error completions with a connection-level code fail every pending operation with
that peer. An expected receive produces no completion at all if its sender dies, so while
operations with a peer are pending the plugin checks it every ``probe_interval`` seconds: a
small probe message on connection-based providers (its error completion reports the death),
and on shm, whose sends to a dead process succeed silently, the process id in the address.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import mmap
import os
import secrets
import select
import socket
import struct
import threading
import time
import warnings
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from ..errors import AccessError, Canceled, NAError, PeerError
from ..types import Access, Addr, Callback, MemHandle, Op, OpKind, as_byte_view
from ._fabric import ffi, lib
from .errors import PEER_FAILURES, FabricError, check_rc, error_for

log = logging.getLogger("petasus.na.ofi")

PROVIDERS = {"tcp": "tcp;ofi_rxm", "shm": "shm", "sockets": "sockets", "verbs": "verbs;ofi_rxm"}
MAX_MSG_SIZE = 64 * 1024  # the tcp plugin's eager size, so hg behaves the same on every plugin
RMA_CHUNK = 64 * 1024 * 1024  # one fi_read/fi_write at most; the provider's limit when lower
MAX_QUEUED = 64 * 1024 * 1024  # unmatched unexpected bytes held before the pool stops reposting
# Receive slots always posted. On shm the pool is half the provider's receive queue
# (rx_attr.size, 1024 in 1.17), because libfabric 1.17's shm keeps at most as many *unexpected* messages
# as there are posted receives and silently discards the rest of a burst (measured: with K slots
# posted, a burst of N > 2K sends delivers exactly 2K, every send completing successfully), so
# its unexpected path must stay unused. Elsewhere 64 slots absorb a burst without reposting.
RX_BUFFERS = 64
CQ_BATCH = 64
PROBE_INTERVAL = 0.5  # seconds between liveness checks of a peer with pending operations
SHM_TICK_US = 1000
SPIN_US = int(os.environ.get("PETASUS_SPIN_US", "200"))  # DESIGN: spin, then block

# Tag bits 32-35: the kind of a pool message; bit 40/41: RMA data, matched by a receive posted
# for it (the pool ignores bits 0-35 and so never takes those); bits 44-59: a per-instance salt
# that keeps two initiators' RMA ids apart at a common target.
_UNEXP, _EXP, _PROBE, _GET_REQ, _PUT_REQ, _RMA_ACK, _RMA_NAK = (k << 32 for k in range(1, 8))
_KIND_MASK = 0xF << 32
_POOL_IGNORE = (1 << 36) - 1
_GET_DATA, _PUT_DATA = 1 << 40, 1 << 41
_RMA_DESC = struct.Struct("<QQQ")  # key, offset, length
_NAK_KEY, _NAK_BOUNDS, _NAK_ACCESS, _NAK_PROTOCOL = 1, 2, 3, 4
_NAK_TEXT = {_NAK_KEY: "unknown key (forged, or deregistered)", _NAK_BOUNDS: "out of bounds",
             _NAK_ACCESS: "not allowed by the registration's access rights",
             _NAK_PROTOCOL: "malformed request"}
_MAX_TAG = 0xFFFFFFFF
_IGNORE_ALL = 0xFFFFFFFFFFFFFFFF
_PENDING, _FINISHED, _CANCELING = 0, 1, 2
_RX, _SEND, _RMA, _PROBE_REQ, _SERVE, _PUT_SINK = 0, 1, 2, 3, 4, 5
_HANDLE = struct.Struct("<BBQQQ")  # version, access, key, length, remote base address
_HANDLE_VERSION = 1
_DEFAULT_HOST = {"tcp": "127.0.0.1", "sockets": "127.0.0.1"}


class _Req:
    """One posted libfabric operation and what must stay alive until it completes."""

    __slots__ = ("addr", "args", "ctx", "fn", "keep", "kind", "op", "owner", "rma_id", "slot")

    def __init__(self, kind: int, op: Op | None, addr: Addr | None, fn: Any, args: tuple[Any, ...],
                 keep: Any = None, slot: int = -1) -> None:
        self.kind = kind
        self.op = op
        self.addr = addr
        self.fn = fn
        self.args = args
        self.keep = keep
        self.slot = slot
        self.rma_id = 0
        self.owner = op  # the NA op a failure of this request fails
        self.ctx = ffi.new("struct fi_context2 *")


class _Reg:
    """The libfabric side of a local registration."""

    __slots__ = ("base", "cbuf", "desc", "mr")

    def __init__(self, mr: Any, cbuf: Any, base: int, desc: Any) -> None:
        self.mr = mr
        self.cbuf = cbuf
        self.base = base
        self.desc = desc


def _recv_view(buf: Any, op: str) -> memoryview:
    view = as_byte_view(buf, op)
    if view.readonly:
        raise ValueError(f"{op}: the receive buffer is read-only")
    return view


class OfiPlugin:
    """One endpoint, its CQ and AV, a posted receive pool, and Python-side matching."""

    def __init__(self, uri: str, listen: bool = False, *, max_msg_size: int = MAX_MSG_SIZE,
                 spin_us: int = SPIN_US, rma_chunk: int = RMA_CHUNK,
                 max_queued: int = MAX_QUEUED, rx_buffers: int | None = None,
                 probe_interval: float = PROBE_INTERVAL, rma: str = "checked") -> None:
        scheme, _, rest = uri.partition("://")
        self.scheme = scheme
        self.transport = scheme.partition("+")[2]
        if self.transport not in PROVIDERS:
            raise ValueError(f"{uri!r}: unknown ofi transport {self.transport!r}; known: "
                             f"{', '.join('ofi+' + t for t in PROVIDERS)}")
        if max_msg_size < 1 or rma_chunk < 1 or (rx_buffers is not None and rx_buffers < 1):
            raise ValueError("max_msg_size, rma_chunk and rx_buffers must be positive")
        if rma not in ("checked", "native"):
            raise ValueError(f"rma={rma!r}: expected 'checked' or 'native'")
        self._rma_mode = rma
        self._max_msg = max_msg_size
        self._spin = max(spin_us, 0) / 1e6
        self._max_queued = max_queued
        self._probe_interval = probe_interval
        self._lock = threading.Lock()
        self._closed = False
        self._fids: list[Any] = []  # opened libfabric objects, closed in reverse order
        self._info: Any = None
        self._ep_fd: Any = None
        self._timer_fd = -1
        self._wait_fd = -1
        self._ep_poll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep_poll.register(self._wake_fd, select.EPOLLIN)
        self._cq: deque[Op] = deque()
        self._completed = 0
        self._polling = 0
        self._in_pass = 0
        self._reqs: dict[int, _Req] = {}
        self._backlog: deque[_Req] = deque()
        self._unexp_posted: deque[Op] = deque()
        self._unexp_queue: deque[tuple[Addr, int, bytes]] = deque()
        self._exp_posted: dict[tuple[Addr, int], deque[Op]] = {}
        self._queued = 0
        self._held_slots: list[int] = []
        self._peers: dict[str, Addr] = {}
        self._by_name: dict[bytes, Addr] = {}
        self._probing: set[Addr] = set()
        self._next_probe = 0.0
        self._regs: dict[int, MemHandle] = {}
        self._keys: dict[int, MemHandle] = {}  # checked mode: our keys, checked per request
        self._rma_wait: dict[int, _Req] = {}  # RMA id -> the request its answer completes
        self._rma_ids = itertools.count(1)
        self._salt = secrets.randbits(16) << 44
        self.stats = dict.fromkeys(
            ("msgs_sent", "msgs_received", "bytes_sent", "bytes_received", "rma_ops",
             "rma_bytes", "peer_failures", "protocol_errors", "canceled", "expected_dropped",
             "probes", "eagain", "rma_served", "rma_refused"), 0)
        try:
            self._open(rest, listen, rx_buffers, rma_chunk)
        except BaseException:
            self._release()
            raise
        self._listening = listen

    # -- opening and closing --------------------------------------------------------------------
    def _open(self, rest: str, listen: bool, rx_buffers: int | None, rma_chunk: int) -> None:
        prov = PROVIDERS[self.transport]
        hints = lib.fi_allocinfo()
        if hints == ffi.NULL:
            raise MemoryError("fi_allocinfo failed")
        try:
            hints.ep_attr.type = lib.FI_EP_RDM
            hints.caps = lib.FI_MSG | lib.FI_TAGGED | lib.FI_RMA
            hints.mode = lib.FI_CONTEXT | lib.FI_CONTEXT2
            hints.domain_attr.mr_mode = (lib.FI_MR_LOCAL | lib.FI_MR_VIRT_ADDR
                                         | lib.FI_MR_ALLOCATED | lib.FI_MR_PROV_KEY
                                         | lib.FI_MR_ENDPOINT)
            hints.domain_attr.threading = lib.FI_THREAD_DOMAIN
            # fi_freeinfo frees prov_name: it must come from libfabric's allocator.
            hints.fabric_attr.prov_name = _strdup(prov)
            node, service, flags = self._source(rest, listen)
            if self.transport == "shm":
                name = f"fi_shm://{os.getpid()}_{secrets.token_hex(4)}"
                hints.addr_format = lib.FI_ADDR_STR
                hints.src_addr = _strdup(name)
                hints.src_addrlen = len(name) + 1
            out = ffi.new("struct fi_info **")
            rc = lib.fi_getinfo(lib.petasus_fi_version(), node, service, flags, hints, out)
            if rc == -lib.FI_ENODATA:
                hint = (" (no RDMA device on this host?)" if self.transport == "verbs" else "")
                raise error_for(rc, "fi_getinfo", op="initialize", provider=prov,
                                node=_s(node), service=_s(service),
                                detail=f"no {prov} endpoint with FI_MSG|FI_TAGGED|FI_RMA{hint}")
            check_rc(rc, "fi_getinfo", op="initialize", provider=prov, node=_s(node),
                     service=_s(service))
        finally:
            lib.fi_freeinfo(hints)
        info = self._info = out[0]
        self.provider = ffi.string(info.fabric_attr.prov_name).decode()
        self._mr_mode = info.domain_attr.mr_mode
        self._key_size = info.domain_attr.mr_key_size
        self._rma_chunk = min(rma_chunk, info.ep_attr.max_msg_size)
        if self._max_msg + 256 > info.ep_attr.max_msg_size:
            raise ValueError(f"max_msg_size {self._max_msg} exceeds {self.provider}'s limit")
        if self._mr_mode & lib.FI_MR_RAW:
            raise FabricError("initialize", None, f"{self.provider} needs raw memory keys "
                              "(FI_MR_RAW), which petasus does not support")

        fabric = ffi.new("struct fid_fabric **")
        check_rc(lib.fi_fabric(info.fabric_attr, fabric, ffi.NULL), "fi_fabric", op="initialize")
        self._fabric = fabric[0]
        self._fids.append(self._fabric)
        domain = ffi.new("struct fid_domain **")
        check_rc(lib.fi_domain(self._fabric, info, domain, ffi.NULL), "fi_domain",
                 op="initialize")
        self._domain = domain[0]
        self._fids.append(self._domain)
        av_attr = ffi.new("struct fi_av_attr *")
        av_attr.type = lib.FI_AV_MAP
        av = ffi.new("struct fid_av **")
        check_rc(lib.fi_av_open(self._domain, av_attr, av, ffi.NULL), "fi_av_open",
                 op="initialize")
        self._av = av[0]
        self._fids.append(self._av)
        self._open_cq(info)
        ep = ffi.new("struct fid_ep **")
        check_rc(lib.fi_endpoint(self._domain, info, ep, ffi.NULL), "fi_endpoint",
                 op="initialize")
        self._ep = ep[0]
        self._fids.append(self._ep)
        check_rc(lib.fi_ep_bind(self._ep, _fid(self._av), 0), "fi_ep_bind", op="initialize",
                 what="av")
        check_rc(lib.fi_ep_bind(self._ep, _fid(self._cq_fid), lib.FI_SEND | lib.FI_RECV),
                 "fi_ep_bind", op="initialize", what="cq")
        check_rc(lib.fi_enable(self._ep), "fi_enable", op="initialize")
        size = ffi.new("size_t *", 256)
        name = ffi.new("char[]", 256)
        check_rc(lib.fi_getname(_fid(self._ep), name, size), "fi_getname", op="initialize")
        self._name = bytes(ffi.buffer(name, size[0]))
        if self.addr_format == lib.FI_ADDR_STR:
            self._name = self._name.rstrip(b"\0")
        if len(self._name) > 255:
            raise FabricError("initialize", None, f"address of {len(self._name)} B is too long")
        self._hdr = bytes((len(self._name),)) + self._name
        self._self_addr = Addr(self._uri_of(self._name), listen)
        self._peers[self._self_addr.uri] = self._self_addr
        self._by_name[self._name] = self._self_addr
        self._self_addr.extra = self._insert(self._name, self._self_addr.uri)
        if rx_buffers is None:
            # shm: half its receive queue; the other half is for the tagged receives of RMA
            # data (posting all rx_attr.size entries makes the next fi_trecv fail FI_ENOMEM).
            rx_buffers = int(info.rx_attr.size) // 2 if self.transport == "shm" else RX_BUFFERS
        self._open_rx_pool(rx_buffers)

    @property
    def addr_format(self) -> int:
        return self._info.addr_format  # type: ignore[no-any-return]

    def _source(self, rest: str, listen: bool) -> tuple[Any, Any, int]:
        """(node, service, flags) of fi_getinfo for this instance's own address."""
        if self.transport not in _DEFAULT_HOST:
            return ffi.NULL, ffi.NULL, 0
        host, port = _DEFAULT_HOST[self.transport], 0
        if rest:
            parts = urlsplit("x://" + rest)
            try:
                host, port = parts.hostname or host, parts.port or 0
            except ValueError as exc:
                raise ValueError(f"{self.scheme}://{rest}: {exc}") from None
        if not listen:
            port = 0  # a client's URI may name its peer; it only picks the interface
        return host.encode(), str(port).encode(), lib.FI_SOURCE

    def _open_cq(self, info: Any) -> None:
        cq_attr = ffi.new("struct fi_cq_attr *")
        cq_attr.format = lib.FI_CQ_FORMAT_TAGGED
        cq_attr.size = 0
        cq = ffi.new("struct fid_cq **")
        # shm's completions come from shared memory, which no descriptor signals.
        waits = ((lib.FI_WAIT_NONE,) if self.transport == "shm"
                 else (lib.FI_WAIT_FD, lib.FI_WAIT_NONE))
        for wait in waits:
            cq_attr.wait_obj = wait
            rc = lib.fi_cq_open(self._domain, cq_attr, cq, ffi.NULL)
            if rc == 0:
                break
        check_rc(rc, "fi_cq_open", op="initialize", wait_obj=int(cq_attr.wait_obj))
        self._cq_fid = cq[0]
        self._fids.append(self._cq_fid)
        self._cq_entries = ffi.new("struct fi_cq_tagged_entry[]", CQ_BATCH)
        self._cq_fids = ffi.new("struct fid *[1]", [_fid(self._cq_fid)])
        if cq_attr.wait_obj == lib.FI_WAIT_FD:
            fd = ffi.new("int *", -1)
            rc = lib.fi_control(_fid(self._cq_fid), lib.FI_GETWAIT, fd)
            if rc == 0 and fd[0] >= 0:
                self._wait_fd = fd[0]
                self._ep_poll.register(self._wait_fd, select.EPOLLIN)
                return
        self._timer_fd = lib.petasus_timerfd(SHM_TICK_US)
        if self._timer_fd < 0:
            raise OSError(ffi.errno, f"timerfd_create: {os.strerror(ffi.errno)}")
        self._ep_poll.register(self._timer_fd, select.EPOLLIN)

    def _open_rx_pool(self, n: int) -> None:
        self._slot = self._max_msg + 1 + 256
        # Anonymous memory: pages are mapped on first touch, so a 1024-slot pool costs about one
        # page per slot used, not 64 MiB up front.
        self._rx = mmap.mmap(-1, self._slot * n)
        self._rx_view = memoryview(self._rx)
        self._rx_c = ffi.from_buffer(self._rx)
        self._rx_desc = ffi.NULL
        if self._mr_mode & lib.FI_MR_LOCAL:
            self._rx_reg = self._mr_reg(self._rx_c, len(self._rx), lib.FI_RECV)
            self._rx_desc = self._rx_reg.desc
        for i in range(n):
            self._post_slot(i)

    def _release(self) -> None:
        """Close what was opened, newest first; safe on a half-opened instance."""
        for handle in list(self._regs.values()):
            lib.fi_close(_fid(handle.extra.mr))
        self._regs.clear()
        rx_reg = getattr(self, "_rx_reg", None)
        if rx_reg is not None:
            lib.fi_close(_fid(rx_reg.mr))
        while self._fids:
            fid = self._fids.pop()
            rc = lib.fi_close(_fid(fid))
            if rc:
                log.warning("fi_close failed while closing %s: %s", self.scheme,
                            error_for(rc, "fi_close"))
        if self._info is not None:
            lib.fi_freeinfo(self._info)
            self._info = None
        self._ep_poll.close()
        os.close(self._wake_fd)
        if self._timer_fd >= 0:
            os.close(self._timer_fd)
            self._timer_fd = -1
        self._reqs.clear()
        self._backlog.clear()

    def close(self) -> None:
        """Close the endpoint; pending operations complete as canceled (run trigger())."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reason = "the plugin was closed"
            for op in self._unexp_posted:
                self._fail(op, Canceled(op.kind.name.lower(), None, reason))
            self._unexp_posted.clear()
            for ops in self._exp_posted.values():
                for op in ops:
                    self._fail(op, Canceled(op.kind.name.lower(), _uri(op.addr), reason))
            self._exp_posted.clear()
            for req in itertools.chain(self._reqs.values(), self._backlog):
                if req.op is not None:
                    self._fail(req.op, Canceled(req.op.kind.name.lower(), _uri(req.addr),
                                                reason))
            self._release()

    def __enter__(self) -> OfiPlugin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A warning only: libfabric objects are released by close(), never here.
        if not getattr(self, "_closed", True):
            warnings.warn(f"{self!r} was not closed", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._by_name)} peers"
        uri = self._self_addr.uri if hasattr(self, "_self_addr") else self.scheme
        return f"<OfiPlugin {uri} provider={getattr(self, 'provider', '?')} {state}>"

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        out.update(uri=self._self_addr.uri, provider=self.provider,
                   open_connections=len(self._by_name), registrations=len(self._regs),
                   queued_bytes=self._queued, spin_us=int(self._spin * 1e6),
                   wait="fd" if self._wait_fd >= 0 else "spin+timer", mr_mode=self._mr_mode,
                   in_flight=len(self._reqs) - len(self._rx) // self._slot)
        return out

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise RuntimeError(f"{op}: {self!r} is closed")

    # -- addresses ------------------------------------------------------------------------------
    def _uri_of(self, name: bytes) -> str:
        fmt = self.addr_format
        if fmt == lib.FI_SOCKADDR_IN and len(name) >= 8:
            port = int.from_bytes(name[2:4], "big")
            return f"{self.scheme}://{socket.inet_ntop(socket.AF_INET, name[4:8])}:{port}"
        if fmt == lib.FI_SOCKADDR_IN6 and len(name) >= 24:
            port = int.from_bytes(name[2:4], "big")
            host = socket.inet_ntop(socket.AF_INET6, name[8:24])
            return f"{self.scheme}://[{host}]:{port}"
        if fmt == lib.FI_ADDR_STR:
            text = name.decode("utf-8", "replace")
            return f"{self.scheme}://{text.partition('://')[2] or text}"
        return f"{self.scheme}://{name.hex()}"

    def _name_of(self, uri: str) -> bytes:
        scheme, _, rest = uri.partition("://")
        if scheme != self.scheme or not rest:
            raise ValueError(f"{uri!r} is not a {self.scheme}:// address")
        fmt = self.addr_format
        if fmt in (lib.FI_SOCKADDR_IN, lib.FI_SOCKADDR_IN6):
            parts = urlsplit("x://" + rest)
            try:
                host, port = parts.hostname, parts.port
            except ValueError as exc:
                raise ValueError(f"{uri!r}: {exc}") from None
            if not host or port is None:
                raise ValueError(f"{uri!r}: expected {self.scheme}://HOST:PORT")
            ip = ipaddress.ip_address(socket.gethostbyname(host) if not _is_ip(host) else host)
            if ip.version == 4:
                return (socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big")
                        + ip.packed + bytes(8))
            return (socket.AF_INET6.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4)
                    + ip.packed + bytes(4))
        if fmt == lib.FI_ADDR_STR:
            return f"fi_{self.transport}://{rest}".encode()
        try:
            return bytes.fromhex(rest)
        except ValueError:
            raise ValueError(f"{uri!r}: expected a hexadecimal address") from None

    def _insert(self, name: bytes, uri: str) -> int | None:
        """fi_av_insert ``name``; None (the peer is unreachable) if the provider refuses it."""
        if self.transport == "shm" and not _shm_region_exists(name):
            # libfabric 1.17's smr_av_insert dereferences the peer's region without checking
            # that shm_open found it: inserting the name of a closed endpoint is a SIGSEGV (the
            # crash of the combined NA+RPC run, in test_nobody_listening). A region that
            # vanishes between this check and the insert can still hit it; see the docstring.
            log.info("fi_av_insert of %s skipped: its shared-memory region does not exist", uri)
            return None
        fi_addr = ffi.new("fi_addr_t *")
        raw = name + b"\0" if self.addr_format == lib.FI_ADDR_STR else name
        rc = lib.fi_av_insert(self._av, raw, 1, fi_addr, 0, ffi.NULL)
        if rc != 1:
            log.info("fi_av_insert of %s failed (%d)", uri, rc)
            return None
        return int(fi_addr[0])

    def _addr_for(self, name: bytes, uri: str | None = None) -> Addr:
        """The one Addr of a peer (caller holds the lock)."""
        addr = self._by_name.get(name)
        if addr is None:
            uri = self._uri_of(name) if uri is None else uri
            addr = self._peers.get(uri)
            if addr is None:
                addr = self._peers[uri] = Addr(uri, True)
                addr.extra = self._insert(name, uri)
                if addr.extra is None:
                    addr.dead = "could not connect: the provider cannot resolve the address"
            self._by_name[name] = addr
        return addr

    def addr_self(self) -> Addr:
        return self._self_addr

    def addr_lookup(self, uri: str) -> Addr:
        self._check_open("addr_lookup")
        name = self._name_of(uri)
        with self._lock:
            self._check_open("addr_lookup")
            return self._addr_for(name, self._uri_of(name))

    def addr_to_string(self, addr: Addr) -> str:
        return addr.uri

    def addr_serialize(self, addr: Addr) -> bytes:
        return addr.uri.encode()

    def addr_deserialize(self, data: bytes) -> Addr:
        return self.addr_lookup(bytes(data).decode("utf-8", "replace"))

    # -- messages -------------------------------------------------------------------------------
    def msg_get_max_unexpected_size(self) -> int:
        return self._max_msg

    def msg_get_max_expected_size(self) -> int:
        return self._max_msg

    def msg_send_unexpected(self, addr: Addr, buf: Any, tag: int,
                            callback: Callback | None = None) -> Op:
        return self._send_msg(OpKind.SEND_UNEXPECTED, _UNEXP, addr, buf, tag, callback)

    def msg_send_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op:
        return self._send_msg(OpKind.SEND_EXPECTED, _EXP, addr, buf, tag, callback)

    def _send_msg(self, kind: OpKind, bits: int, addr: Addr, buf: Any, tag: int,
                  callback: Callback | None) -> Op:
        view = buf if type(buf) is bytes else as_byte_view(buf, kind.name.lower())
        n = len(view)
        if n > self._max_msg:
            raise ValueError(f"{kind.name.lower()}: message of {n} B exceeds the maximum of "
                             f"{self._max_msg} B")
        if not 0 <= tag <= _MAX_TAG:
            raise ValueError(f"{kind.name.lower()}: tag {tag} is not a u32")
        op = Op(kind, callback, view, addr, tag)
        data = self._hdr + view  # one staging copy: sender name + payload in one send
        with self._lock:
            self._check_open(kind.name.lower())
            if addr.dead or addr.extra is None:
                self._fail(op, PeerError(kind.name.lower(), addr.uri,
                                         addr.dead or "the peer's address is unusable"))
                return op
            self.stats["msgs_sent"] += 1
            self.stats["bytes_sent"] += n
            self._start(self._send_req(_SEND, op, addr, data, bits | tag))
        return op

    def _send_req(self, kind: int, op: Op | None, addr: Addr, data: bytes, tag: int,
                  owner: Op | None = None) -> _Req:
        if tag & _KIND_MASK in (_GET_REQ, _PUT_REQ):
            # Requests carry their id's salt right after the sender header.
            data = data[: len(self._hdr)] + _rma_salt(tag) + data[len(self._hdr):]
            tag &= _KIND_MASK | _MAX_TAG
        cbuf = ffi.from_buffer(data)
        desc = ffi.NULL
        keep: Any = (data, cbuf)
        if self._mr_mode & lib.FI_MR_LOCAL:
            reg = self._mr_reg(cbuf, len(data), lib.FI_SEND)
            desc, keep = reg.desc, (data, cbuf, reg)
        req = _Req(kind, op, addr, lib.fi_tsend,
                   (self._ep, cbuf, len(data), desc, addr.extra, tag), keep)
        if owner is not None:
            req.owner = owner
        return req

    def msg_recv_unexpected(self, buf: Any, callback: Callback | None = None) -> Op:
        op = Op(OpKind.RECV_UNEXPECTED, callback, _recv_view(buf, "msg_recv_unexpected"))
        with self._lock:
            self._check_open("msg_recv_unexpected")
            if self._unexp_queue:
                addr, tag, data = self._unexp_queue.popleft()
                self._unqueue(len(data))
                self._fill(op, addr, tag, data)
                self._post(op)
            else:
                self._unexp_posted.append(op)
        return op

    def msg_recv_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op:
        if not 0 <= tag <= _MAX_TAG:
            raise ValueError(f"msg_recv_expected: tag {tag} is not a u32")
        op = Op(OpKind.RECV_EXPECTED, callback, _recv_view(buf, "msg_recv_expected"), addr, tag)
        with self._lock:
            self._check_open("msg_recv_expected")
            if addr.dead:
                self._fail(op, PeerError("recv_expected", addr.uri, addr.dead))
            else:
                self._exp_posted.setdefault((addr, tag), deque()).append(op)
        return op

    def _fill(self, op: Op, addr: Addr, tag: int, data: Any) -> None:
        n = len(data)
        op.source = addr
        op.tag = tag
        if n > len(op.buffer):
            op.error = NAError(op.kind.name.lower(), addr.uri,
                               f"message of {n} B does not fit the {len(op.buffer)} B buffer")
        else:
            op.buffer[:n] = data
            op.size = n

    def _post_slot(self, i: int) -> None:
        off = i * self._slot
        req = _Req(_RX, None, None, lib.fi_trecv,
                   (self._ep, self._rx_c + off, self._slot, self._rx_desc, _IGNORE_ALL, 0,
                    _POOL_IGNORE), slot=i)
        self._start(req)

    def _on_message(self, req: _Req, length: int, tag: int) -> None:
        off = req.slot * self._slot
        rx = self._rx_view
        n = rx[off] if length else 0
        if length < 1 + n or n == 0:
            self.stats["protocol_errors"] += 1
            log.warning("%s: dropped a %d B message without a sender header", self.scheme, length)
            self._post_slot(req.slot)
            return
        name = bytes(rx[off + 1: off + 1 + n])
        addr = self._by_name.get(name)
        if addr is None:
            addr = self._addr_for(name)
        kind = tag & _KIND_MASK
        utag = tag & _MAX_TAG
        payload = rx[off + 1 + n: off + length]
        if kind == _UNEXP:
            self.stats["msgs_received"] += 1
            self.stats["bytes_received"] += len(payload)
            if self._unexp_posted:
                op = self._unexp_posted.popleft()
                self._fill(op, addr, utag, payload)
                self._post(op)
            else:
                self._unexp_queue.append((addr, utag, bytes(payload)))
                self._queued += len(payload)
                if self._queued > self._max_queued and self.transport != "shm":
                    # Back-pressure: leave the slot unposted; the provider holds the rest
                    # (not on shm, which would discard them: see RX_BUFFERS).
                    self._held_slots.append(req.slot)
                    return
        elif kind == _EXP:
            self.stats["msgs_received"] += 1
            self.stats["bytes_received"] += len(payload)
            waiting = self._exp_posted.get((addr, utag))
            if waiting:
                op = waiting.popleft()
                if not waiting:
                    del self._exp_posted[(addr, utag)]
                self._fill(op, addr, utag, payload)
                self._post(op)
            else:
                # As in Mercury: an expected message needs a pre-posted receive; one without
                # is a late reply to something canceled or timed out.
                self.stats["expected_dropped"] += 1
                log.debug("dropped an expected message from %s, tag %d: no receive posted",
                          addr.uri, utag)
        elif kind in (_GET_REQ, _PUT_REQ):
            self._serve_rma(addr, kind, utag, payload)
        elif kind in (_RMA_ACK, _RMA_NAK):
            self._rma_answer(addr, kind, utag, payload)
        elif kind != _PROBE:
            self.stats["protocol_errors"] += 1
            log.warning("%s: dropped a message of unknown kind %#x from %s", self.scheme,
                        kind >> 32, addr.uri)
        self._post_slot(req.slot)

    def _unqueue(self, n: int) -> None:
        self._queued -= n
        if self._held_slots and self._queued <= self._max_queued // 2:
            held, self._held_slots = self._held_slots, []
            for slot in held:
                self._post_slot(slot)

    # -- memory ---------------------------------------------------------------------------------
    def _mr_reg(self, cbuf: Any, length: int, access: int) -> _Reg:
        mr = ffi.new("struct fid_mr **")
        for _attempt in range(8):
            key = 0
            if not self._mr_mode & lib.FI_MR_PROV_KEY:
                key = secrets.randbits(8 * min(self._key_size, 8)) or 1
            rc = lib.fi_mr_reg(self._domain, cbuf, length, access, 0, key, 0, mr, ffi.NULL)
            if rc != -lib.FI_ENOKEY:
                break
        check_rc(rc, "fi_mr_reg", op="mem_register", length=length, access=hex(access))
        if self._mr_mode & lib.FI_MR_ENDPOINT:
            try:
                check_rc(lib.fi_mr_bind(mr[0], _fid(self._ep), 0), "fi_mr_bind",
                         op="mem_register")
                check_rc(lib.fi_mr_enable(mr[0]), "fi_mr_enable", op="mem_register")
            except FabricError:
                lib.fi_close(_fid(mr[0]))
                raise
        return _Reg(mr[0], cbuf, int(ffi.cast("uintptr_t", cbuf)), lib.fi_mr_desc(mr[0]))

    def mem_register(self, buffer: Any, access: Access) -> MemHandle:
        access = Access(access)
        view = as_byte_view(buffer, "mem_register")
        if access & Access.WRITE_ONLY and view.readonly:
            raise ValueError("mem_register: a read-only buffer cannot be registered for remote "
                             "writes (use Access.READ_ONLY)")
        # Zero bytes still need an address: register one byte of a private buffer instead.
        cbuf = ffi.from_buffer(view if len(view) else bytearray(1))
        flags = lib.FI_READ | lib.FI_SEND
        if not view.readonly:
            flags |= lib.FI_WRITE | lib.FI_RECV
        if access & Access.READ_ONLY:
            flags |= lib.FI_REMOTE_READ
        if access & Access.WRITE_ONLY:
            flags |= lib.FI_REMOTE_WRITE
        with self._lock:
            self._check_open("mem_register")
            reg = self._mr_reg(cbuf, max(len(view), 1), flags)
            if self._rma_mode == "native":
                key = int(lib.fi_mr_key(reg.mr))
            else:
                key = secrets.randbits(64) | 1
                while key in self._keys:
                    key = secrets.randbits(64) | 1
            handle = MemHandle(view, len(view), access, key, True, reg)
            self._regs[id(handle)] = handle
            if self._rma_mode == "checked":
                self._keys[key] = handle
        return handle

    def mem_deregister(self, handle: MemHandle) -> None:
        with self._lock:
            if not handle.local or self._regs.get(id(handle)) is not handle:
                raise ValueError(f"mem_deregister: {handle!r} is not registered here")
            del self._regs[id(handle)]
            self._keys.pop(handle.key, None)
            check_rc(lib.fi_close(_fid(handle.extra.mr)), "fi_close", op="mem_deregister")
            handle.registered = False
            handle.view = None

    def mem_handle_serialize(self, handle: MemHandle) -> bytes:
        if not handle.local:
            base = handle.extra  # a deserialized handle keeps the remote base as is
        else:
            base = handle.extra.base if self._mr_mode & lib.FI_MR_VIRT_ADDR else 0
        return _HANDLE.pack(_HANDLE_VERSION, handle.access, handle.key, handle.length, base)

    def mem_handle_deserialize(self, data: bytes) -> MemHandle:
        data = bytes(data)
        if len(data) != _HANDLE.size:
            raise ValueError(f"mem_handle_deserialize: {len(data)} B is not a {_HANDLE.size} B "
                             f"{self.scheme} handle")
        version, access, key, length, base = _HANDLE.unpack(data)
        if version != _HANDLE_VERSION or access not in (1, 2, 3):
            raise ValueError(f"mem_handle_deserialize: bad version {version} or access {access}")
        return MemHandle(None, length, Access(access), key, False, base)

    # -- RMA ------------------------------------------------------------------------------------
    def put(self, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
            length: int, addr: Addr, callback: Callback | None = None) -> Op:
        return self._rma(OpKind.PUT, local, local_off, remote, remote_off, length, addr, callback)

    def get(self, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
            length: int, addr: Addr, callback: Callback | None = None) -> Op:
        return self._rma(OpKind.GET, local, local_off, remote, remote_off, length, addr, callback)

    def _rma(self, kind: OpKind, local: MemHandle, local_off: int, remote: MemHandle,
             remote_off: int, length: int, addr: Addr, callback: Callback | None) -> Op:
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
        with self._lock:
            self._check_open(name)
            self.stats["rma_ops"] += 1
            self.stats["rma_bytes"] += length
            if addr.dead or addr.extra is None:
                self._fail(op, PeerError(name, addr.uri, addr.dead or "unusable address"))
                return op
            if length == 0:
                self._post(op)
                return op
            chunk = self._rma_chunk
            op.remaining = -(-length // chunk)
            start = self._start_native if self._rma_mode == "native" else self._start_checked
            for off in range(0, length, chunk):
                start(op, off, min(chunk, length - off))
        return op

    def _start_native(self, op: Op, off: int, n: int) -> None:
        """One fi_read/fi_write; the target's provider checks key, bounds and rights."""
        reg, remote = op.local.extra, op.remote
        base = remote.extra if not remote.local else (
            reg.base if self._mr_mode & lib.FI_MR_VIRT_ADDR else 0)
        fn = lib.fi_read if op.kind == OpKind.GET else lib.fi_write
        self._start(_Req(_RMA, op, op.addr, fn,
                         (self._ep, reg.cbuf + op.local_off + off, n, reg.desc, op.addr.extra,
                          base + op.remote_off + off, remote.key), keep=reg))

    def _start_checked(self, op: Op, off: int, n: int) -> None:
        """One piece of checked RMA: a request the target's progress loop checks against its
        own registrations, and the data as one tagged message between the two registered
        buffers (libfabric moves it without a copy: rendezvous on rxm, CMA on shm).

        get: post the receive into our memory, then ask; the target sends from its memory.
        put: ask and send the data at once; the target receives it into its memory once the
        request passes (until then the provider holds it as unexpected) and acknowledges.
        """
        reg, addr = op.local.extra, op.addr
        rma_id = self._salt | (next(self._rma_ids) & _MAX_TAG)
        desc = _RMA_DESC.pack(op.remote.key, op.remote_off + off, n)
        local = reg.cbuf + op.local_off + off
        if op.kind == OpKind.GET:
            # keep=reg: pointer arithmetic on cdata does not keep the buffer alive.
            data = _Req(_RMA, op, addr, lib.fi_trecv,
                        (self._ep, local, n, reg.desc, _IGNORE_ALL, _GET_DATA | rma_id, 0),
                        keep=reg)
            data.rma_id = rma_id
            self._rma_wait[rma_id] = data
            self._start(data)
            self._start(self._send_req(_SEND, None, addr, self._hdr + desc, _GET_REQ | rma_id,
                                       owner=op))
        else:
            wait = _Req(_RMA, op, addr, None, ())
            wait.rma_id = rma_id
            self._rma_wait[rma_id] = wait
            self._start(self._send_req(_SEND, None, addr, self._hdr + desc, _PUT_REQ | rma_id,
                                       owner=op))
            data = _Req(_SEND, None, addr, lib.fi_tsend,
                        (self._ep, local, n, reg.desc, addr.extra, _PUT_DATA | rma_id),
                        keep=reg)
            data.owner = op
            self._start(data)

    def _serve_rma(self, addr: Addr, kind: int, utag: int, payload: memoryview) -> None:
        """A peer's get or put request: check it against our own table, never the claim."""
        rma_id = self._rma_id_of(utag, payload)
        if len(payload) != _RMA_DESC.size + 2:
            self._rma_refuse(addr, rma_id, _NAK_PROTOCOL, kind, 0)
            return
        key, off, n = _RMA_DESC.unpack_from(payload, 2)
        handle = self._keys.get(key)
        need = Access.READ_ONLY if kind == _GET_REQ else Access.WRITE_ONLY
        nak = 0
        if handle is None:
            nak = _NAK_KEY
        elif off + n > handle.length:
            nak = _NAK_BOUNDS
        elif not handle.access & need:
            nak = _NAK_ACCESS
        if nak:
            self._rma_refuse(addr, rma_id, nak, kind, n)
            return
        self.stats["rma_served"] += 1
        reg = handle.extra  # type: ignore[union-attr]
        if kind == _GET_REQ:
            self._start(_Req(_SERVE, None, addr, lib.fi_tsend,
                             (self._ep, reg.cbuf + off, n, reg.desc, addr.extra,
                              _GET_DATA | rma_id), keep=handle))
        else:
            sink = _Req(_PUT_SINK, None, addr, lib.fi_trecv,
                        (self._ep, reg.cbuf + off, n, reg.desc, _IGNORE_ALL,
                         _PUT_DATA | rma_id, 0), keep=handle)
            sink.rma_id = rma_id
            self._start(sink)

    def _rma_id_of(self, utag: int, payload: memoryview) -> int:
        # The salt travels in the first two payload bytes (the tag's bits above 35 are the
        # data tags'); see _send_req.
        salt = int.from_bytes(payload[:2], "little") if len(payload) >= 2 else 0
        return (salt << 44) | utag

    def _rma_refuse(self, addr: Addr, rma_id: int, nak: int, kind: int, n: int) -> None:
        self.stats["rma_refused"] += 1
        log.warning("%s: refused an RMA request from %s: %s", self.scheme, addr.uri,
                    _NAK_TEXT[nak])
        if kind == _PUT_REQ:
            # Take the refused data off the provider's unexpected queue into scratch memory of
            # its size (tcp;ofi_rxm stalls the connection on a truncated receive); a claim
            # above one RMA piece gets a zero-byte receive (never from an honest initiator).
            scratch = bytearray(n if n <= self._rma_chunk else 0)
            cscratch = ffi.from_buffer(scratch) if n else self._rx_c
            sink = _Req(_PUT_SINK, None, addr, lib.fi_trecv,
                        (self._ep, cscratch, len(scratch), ffi.NULL, _IGNORE_ALL,
                         _PUT_DATA | rma_id, 0), keep=(scratch, cscratch))
            sink.rma_id = -1
            self._start(sink)
        self._send_answer(addr, rma_id, _RMA_NAK, bytes((nak,)))

    def _rma_answer(self, addr: Addr, kind: int, utag: int, payload: memoryview) -> None:
        rma_id = self._rma_id_of(utag, payload)
        req = self._rma_wait.pop(rma_id, None)
        if req is None or req.addr is not addr:
            return  # the answer to something canceled, failed or forged
        op = req.op
        if kind == _RMA_ACK:
            op.remaining -= 1  # type: ignore[union-attr]
            if op.remaining == 0:  # type: ignore[union-attr]
                self._complete(op)  # type: ignore[arg-type]
            return
        reason = payload[2] if len(payload) > 2 else _NAK_PROTOCOL
        what = op.kind.name.lower()  # type: ignore[union-attr]
        self._cancel_chunks(op)  # type: ignore[arg-type]
        error: BaseException = AccessError(what, addr.uri,
                                           _NAK_TEXT.get(reason, f"refused ({reason})"))
        if op.state == _CANCELING:  # type: ignore[union-attr]
            error = Canceled(what, addr.uri, "canceled")
        self._fail(op, error)  # type: ignore[arg-type]

    # -- posting and completions ----------------------------------------------------------------
    def _start(self, req: _Req) -> None:
        """Post ``req`` (caller holds the lock); EAGAIN queues it for the next progress pass."""
        if self._backlog:
            self._backlog.append(req)  # keep the order of what the caller posted
            return
        key = int(ffi.cast("uintptr_t", req.ctx))
        self._reqs[key] = req
        rc = req.fn(*req.args, req.ctx)
        if rc == 0:
            if self._polling:
                os.eventfd_write(self._wake_fd, 1)  # the sleeping poller must drive it
            return
        del self._reqs[key]
        if rc == -lib.FI_EAGAIN:
            self.stats["eagain"] += 1
            self._backlog.append(req)
            return
        self._req_failed(req, rc, "")

    def _retry_backlog(self) -> None:
        backlog = self._backlog
        while backlog:
            req = backlog[0]
            if req.op is not None and req.op.state == _FINISHED:
                backlog.popleft()  # failed or canceled while it waited
                continue
            key = int(ffi.cast("uintptr_t", req.ctx))
            self._reqs[key] = req
            rc = req.fn(*req.args, req.ctx)
            if rc == -lib.FI_EAGAIN:
                del self._reqs[key]
                return
            backlog.popleft()
            if rc:
                del self._reqs[key]
                self._req_failed(req, rc, "")

    def _call_name(self, req: _Req) -> str:
        if req.kind == _RMA:
            return "fi_read" if req.op.kind == OpKind.GET else "fi_write"  # type: ignore[union-attr]
        return "fi_trecv" if req.kind == _RX else "fi_tsend"

    def _req_failed(self, req: _Req, code: int, detail: str) -> None:
        code = abs(code)
        kind = req.kind
        if kind == _RX:
            if code != lib.FI_ECANCELED:
                self.stats["protocol_errors"] += 1
                log.warning("%s: receive slot failed: %s", self.scheme,
                            error_for(code, "fi_trecv", detail=detail))
                if not self._closed:
                    self._post_slot(req.slot)
            return
        if kind == _PUT_SINK:
            if req.rma_id != -1 and req.addr is not None and not self._closed:
                self._send_answer(req.addr, req.rma_id, _RMA_NAK, bytes((_NAK_PROTOCOL,)))
            return
        addr = req.addr
        op = req.owner
        if kind == _RMA:
            self._rma_wait.pop(req.rma_id, None)
        name = op.kind.name.lower() if op is not None else "probe"
        exc: BaseException = error_for(code, self._call_name(req), op=name, peer=_uri(addr),
                                       detail=detail)
        if kind == _PROBE_REQ:
            self._probing.discard(addr)  # type: ignore[arg-type]
        if code in PEER_FAILURES and addr is not None:
            self._peer_failed(addr, exc.cause)  # type: ignore[attr-defined]
        if kind == _SERVE:
            log.info("%s: serving an RMA request failed: %s", self.scheme, exc)
            return
        if op is not None:
            if op.state == _CANCELING:
                exc = Canceled(name, _uri(addr), "canceled")
            if op.state != _FINISHED:
                self._cancel_chunks(op)
            self._fail(op, exc)

    def _cancel_chunks(self, op: Op) -> None:
        """Withdraw the receives still posted into ``op``'s memory (get data)."""
        for req in list(self._rma_wait.values()):
            if req.op is op and req.fn is lib.fi_trecv:
                lib.fi_cancel(_fid(self._ep), req.ctx)

    def _send_answer(self, addr: Addr, rma_id: int, kind: int, extra: bytes) -> None:
        self._start(self._send_req(_SERVE, None, addr, self._hdr + _rma_salt(rma_id) + extra,
                                   kind | (rma_id & _MAX_TAG)))

    def _read_cq(self) -> int:
        """One batch of completions (caller holds the lock); returns how many were read."""
        entries = self._cq_entries
        n = lib.fi_cq_read(self._cq_fid, entries, CQ_BATCH)
        if n > 0:
            reqs = self._reqs
            for i in range(n):
                e = entries[i]
                req = reqs.pop(int(ffi.cast("uintptr_t", e.op_context)), None)
                if req is None:
                    continue
                kind = req.kind
                if kind == _RX:
                    self._on_message(req, e.len, e.tag)
                elif kind == _SEND:
                    if req.op is not None:
                        self._complete(req.op)
                elif kind == _RMA:
                    if req.rma_id:
                        self._rma_wait.pop(req.rma_id, None)
                    op = req.op
                    op.remaining -= 1  # type: ignore[union-attr]
                    if op.remaining == 0:  # type: ignore[union-attr]
                        self._complete(op)  # type: ignore[arg-type]
                elif kind == _PUT_SINK:
                    if req.rma_id != -1:
                        self._send_answer(req.addr, req.rma_id, _RMA_ACK, b"")  # type: ignore[arg-type]
                elif kind == _PROBE_REQ:
                    self._probing.discard(req.addr)  # type: ignore[arg-type]
            return n
        if n == -lib.FI_EAVAIL:
            err = ffi.new("struct fi_cq_err_entry *")
            if lib.fi_cq_readerr(self._cq_fid, err, 0) != 1:
                return 0
            req = self._reqs.pop(int(ffi.cast("uintptr_t", err.op_context)), None)
            if req is not None:
                self._req_failed(req, err.err, self._cq_detail(err))
            return 1
        if n != -lib.FI_EAGAIN:
            check_rc(n, "fi_cq_read", op="progress", count=CQ_BATCH)
        return 0

    def _cq_detail(self, err: Any) -> str:
        buf = ffi.new("char[]", 256)
        text = lib.fi_cq_strerror(self._cq_fid, err.prov_errno, err.err_data, buf, 256)
        return ffi.string(text).decode("utf-8", "replace") if text != ffi.NULL else ""

    def _complete(self, op: Op) -> None:
        if op.state == _CANCELING:
            op.error = Canceled(op.kind.name.lower(), _uri(op.addr), "canceled")
            self._post(op)
        elif op.state == _PENDING:
            self._post(op)

    def _post(self, op: Op) -> None:
        op.state = _FINISHED
        if op.callback is None:
            op.done = True
            self._completed += 1
        else:
            self._cq.append(op)
        if self._polling:
            os.eventfd_write(self._wake_fd, 1)

    def _fail(self, op: Op, error: BaseException) -> None:
        if op.state != _FINISHED:
            op.error = error
            self._post(op)

    # -- peer failure ---------------------------------------------------------------------------
    def _peer_failed(self, addr: Addr, cause: str) -> None:
        """Fail every pending operation with ``addr``: none of them will complete normally."""
        self.stats["peer_failures"] += 1
        log.info("%s: peer %s failed: %s", self.scheme, addr.uri, cause)
        for key in [k for k in self._exp_posted if k[0] is addr]:
            for op in self._exp_posted.pop(key):
                self._fail(op, PeerError(op.kind.name.lower(), addr.uri, cause))
        for req in itertools.chain(list(self._reqs.values()), self._backlog,
                                   list(self._rma_wait.values())):
            op = req.owner
            if req.addr is addr and op is not None and op.state != _FINISHED:
                # The provider may still hold the buffer: the request stays in _reqs (its
                # late completion is ignored) so that the memory stays alive.
                self._cancel_chunks(op)
                self._fail(op, PeerError(op.kind.name.lower(), addr.uri, cause))

    def _check_peers(self) -> None:
        """Probe the peers that pending operations wait for (caller holds the lock)."""
        busy = {k[0] for k in self._exp_posted}
        busy.update(r.addr for r in itertools.chain(self._reqs.values(), self._rma_wait.values())
                    if r.owner is not None and r.owner.state != _FINISHED)
        busy.discard(None)  # type: ignore[arg-type]
        for addr in busy:
            if addr.dead or addr is self._self_addr:
                continue
            if self.transport == "shm":
                cause = _shm_gone(addr.uri)
                if cause:
                    addr.dead = cause  # a process id never comes back
                    self._peer_failed(addr, cause)
            elif addr not in self._probing and addr.extra is not None:
                self._probing.add(addr)
                self.stats["probes"] += 1
                self._start(self._send_req(_PROBE_REQ, None, addr, self._hdr, _PROBE))

    # -- progress -------------------------------------------------------------------------------
    def poll_fd(self) -> int:
        return self._ep_poll.fileno()

    def progress(self, timeout: float = 0.0) -> bool:
        """Drive libfabric for up to ``timeout`` seconds; True once completions are ready.

        Spins (CQ polls with ``sched_yield`` in between) for ``spin_us`` after any event, then
        blocks on the CQ's wait descriptor (guarded by fi_trywait), or on shm in 1 ms slices.
        """
        self._check_open("progress")
        cq, lock = self._cq, self._lock
        if cq:
            return True
        done = self._completed
        now = time.monotonic()
        deadline = now + timeout
        spin_end = now + self._spin
        while True:
            with lock:
                if self._closed:
                    return bool(cq)
                if self._backlog:
                    self._retry_backlog()
                got = self._read_cq()
                while got == CQ_BATCH:
                    got = self._read_cq()
                now = time.monotonic()
                if now >= self._next_probe:
                    self._next_probe = now + self._probe_interval
                    self._check_peers()
            if cq or self._completed != done:
                return True
            if got:
                spin_end = now + self._spin
            if now >= deadline:
                return False
            if now < spin_end:
                os.sched_yield()
                continue
            wait = min(deadline - now, self._probe_interval)
            if self._wait_fd >= 0:
                with lock:
                    if self._closed:
                        return False
                    rc = lib.fi_trywait(self._fabric, self._cq_fids, 1)
                if rc != 0:
                    continue  # something is ready to read (or the provider wants progress)
            else:
                wait = min(wait, SHM_TICK_US / 1e6)
            self._polling += 1
            try:
                if cq or self._completed != done:
                    continue
                events = self._ep_poll.poll(wait)
            finally:
                self._polling -= 1
            for fd, _ev in events:
                if fd in (self._wake_fd, self._timer_fd):
                    try:
                        os.read(fd, 8)
                    except (BlockingIOError, OSError):
                        pass
            spin_end = time.monotonic() + self._spin

    def trigger(self, max_count: int = 1 << 30) -> int:
        cq = self._cq
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

    def cancel(self, op: Op) -> None:
        with self._lock:
            if op.state != _PENDING:
                return
            self.stats["canceled"] += 1
            error = Canceled(op.kind.name.lower(), _uri(op.addr), "canceled")
            if op.kind == OpKind.RECV_UNEXPECTED:
                self._unexp_posted.remove(op)
            elif op.kind == OpKind.RECV_EXPECTED:
                key = (op.addr, op.tag)
                waiting = self._exp_posted[key]  # type: ignore[index]
                waiting.remove(op)
                if not waiting:
                    del self._exp_posted[key]  # type: ignore[arg-type]
            elif op.kind == OpKind.GET and self._rma_mode == "checked":
                # The data receives are withdrawn (fi_cancel); each reports FI_ECANCELED, or
                # completes if its data was already landing, and the op then ends as canceled.
                op.state = _CANCELING
                self._cancel_chunks(op)
                return
            elif any(r.owner is op for r in itertools.chain(self._reqs.values(),
                                                             self._rma_wait.values())):
                # Posted to libfabric, which cannot withdraw sends or RMA: it completes as
                # canceled once the provider hands the buffer back.
                op.state = _CANCELING
                return
            op.error = error
            self._post(op)  # still in the backlog (never posted): skipped when retried


def _rma_salt(rma_id: int) -> bytes:
    return ((rma_id >> 44) & 0xFFFF).to_bytes(2, "little")


def _fid(obj: Any) -> Any:
    return ffi.cast("struct fid *", obj)


def _uri(addr: Addr | None) -> str | None:
    return addr.uri if addr is not None else None


def _s(value: Any) -> str | None:
    return None if value == ffi.NULL else bytes(value).decode()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _strdup(text: str) -> Any:
    """A malloc'ed copy, for fi_info fields that fi_freeinfo frees."""
    out = lib.strdup(text.encode())
    if out == ffi.NULL:
        raise MemoryError("strdup")
    return out


def _shm_region_exists(name: bytes) -> bool:
    """Whether the shm endpoint ``fi_shm://REGION`` exists (its region is /dev/shm/REGION)."""
    region = name.partition(b"://")[2]
    if not region or b"/" in region or region.startswith(b"."):
        return False
    return os.path.exists(b"/dev/shm/" + region)


def _shm_gone(uri: str) -> str | None:
    """Why an ofi+shm peer is gone (its process exited), or None while it lives."""
    pid_text = uri.partition("://")[2].partition("_")[0]
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return "the peer process has exited (connection closed)"
    except (ValueError, PermissionError):
        return None
    return None
