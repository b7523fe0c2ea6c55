"""Constants, request records and small helpers shared by the ofi plugin's modules."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from .._pinning import pin
from ..types import Addr, Op
from ._fabric import ffi, lib

log = logging.getLogger("petasus.na.ofi")

PROVIDERS = {"tcp": "tcp;ofi_rxm", "shm": "shm", "sockets": "sockets", "verbs": "verbs;ofi_rxm"}
RMA_CHUNK = 64 * 1024 * 1024  # one fi_read/fi_write at most; the provider's limit when lower
# Receive slots always posted. On shm the pool is half the provider's receive-request pool
# (FI_SHM_RX_SIZE, which plugin.py raises to SHM_RX_SIZE: 4096 slots, in private anonymous
# memory touched only where messages land). libfabric 1.17's shm silently discards messages
# that take its unexpected path beyond what it can hold (with K slots posted, a burst of N > 2K
# sends delivers exactly 2K, every send completing successfully), so that path must stay
# unused, and how many receives that takes grows with the number of senders: back-to-back
# bursts of 3000 messages from 4 processes lost 500 of 12000 with 512 slots and none with 2048;
# from 8 processes, 688 of 24000 with 2048 and none with 4096. Elsewhere 64 slots absorb a
# burst and the provider's flow control does the rest.
RX_BUFFERS = 64
SHM_RX_SIZE = 8192
CQ_BATCH = 64
PROBE_INTERVAL = 0.5  # seconds between liveness checks of a peer with pending operations
SHM_TICK_US = 1000

# Tag bits 32-35: the kind of a pool message; bit 40/41: RMA data, matched by a receive posted
# for it (the pool ignores bits 0-35 and so never takes those); bits 44-59: a per-instance salt
# that keeps two initiators' RMA ids apart at a common target.
_UNEXP, _EXP, _PROBE, _GET_REQ, _PUT_REQ, _RMA_ACK, _RMA_NAK = (k << 32 for k in range(1, 8))
# The handshake's kinds (see _handshake), above every other so that one comparison sends them
# off the per-message path.
_HELLO, _CHALLENGE, _RESPONSE, _WELCOME, _REFUSE = (k << 32 for k in range(8, 13))
SHAKE_KINDS = {"HELLO": _HELLO, "CHALLENGE": _CHALLENGE, "RESPONSE": _RESPONSE,
               "WELCOME": _WELCOME, "REFUSE": _REFUSE}
_KIND_MASK = 0xF << 32
_POOL_IGNORE = (1 << 36) - 1
_GET_DATA, _PUT_DATA = 1 << 40, 1 << 41
_RMA_DESC = struct.Struct("<QQQ")  # key, offset, length
_IGNORE_ALL = 0xFFFFFFFFFFFFFFFF
_RX, _SEND, _RMA, _PROBE_REQ, _SERVE, _PUT_SINK, _SHAKE = 0, 1, 2, 3, 4, 5, 6
_BASE = struct.Struct("<Q")  # a handle's tail: the registration's base address (native mode)
_DEFAULT_HOST = {"tcp": "127.0.0.1", "sockets": "127.0.0.1"}


@dataclass(eq=False, slots=True)
class _Req:
    """One posted libfabric operation and what must stay alive until it completes."""

    kind: int
    op: Op | None
    addr: Addr | None
    fn: Any
    args: tuple[Any, ...]
    keep: Any = None
    slot: int = -1
    rma_id: int = 0
    owner: Op | None = None  # the NA op a failure of this request fails (default: ``op``)
    ctx: Any = None

    def __post_init__(self) -> None:
        if self.owner is None:
            self.owner = self.op
        # fi_tinject takes no context (and writes no completion).
        if self.fn is not lib.fi_tinject:
            self.ctx = ffi.new("struct fi_context2 *")


class _Reg:
    """The libfabric side of a local registration."""

    __slots__ = ("base", "cbuf", "desc", "holder", "mr")

    def __init__(self, mr: Any, cbuf: Any, base: int, desc: Any, holder: Any = None) -> None:
        self.mr = mr
        self.cbuf = cbuf
        self.holder = holder  # what keeps cbuf's memory alive when cbuf is a bare char *
        self.base = base
        self.desc = desc


class _Remote(NamedTuple):
    """The ofi record of a peer's registration: its base address (native RMA needs it)."""

    base: int


def _pin(view: memoryview) -> tuple[Any, Any]:
    """(owner, char *) for ``view``'s bytes, where ``owner`` holds the view's exporter
    (``na._pinning`` says why the exporter and not the view)."""
    owner, addr = pin(ffi, view)
    if owner is not None:
        return owner, ffi.cast("char *", addr)
    # An exporter that cannot be pinned as bytes: copy-free, but the GC caveat applies.
    owner = ffi.from_buffer(view)
    return owner, owner


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
    if _pid_exited(uri.partition("://")[2].partition("_")[0]):
        return "the peer process has exited (connection closed)"
    return None


def _pid_exited(pid_text: str) -> bool:
    """Whether the process an shm name starts with no longer exists; a pid we may not signal,
    or not a pid, is taken for alive."""
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OverflowError, OSError):
        return False
    return False


def _tcp_refused(uri: str) -> str | None:
    """Why nobody listens at an ofi+tcp peer's address any more, or None if someone does.

    Asked only once a probe to the peer cannot even be posted (rxm answers FI_EAGAIN while it
    retries a connection the kernel refuses, and never reports that to the application). A
    refused TCP connect to the port the peer's endpoint listens on is that same refusal.
    """
    parts = urlsplit("x://" + uri.partition("://")[2])
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or not port:
        return None
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return None
    except ConnectionRefusedError:
        return ("could not connect: connection refused at its address (the peer's endpoint is "
                "closed or its process has exited)")
    except OSError:
        return None


def _bell_address(region_name: bytes) -> bytes:
    """The abstract-namespace name of the doorbell of shm endpoint ``fi_shm://REGION``."""
    return b"\0petasus-ofi-shm/" + region_name.partition(b"://")[2]


def _doorbell(name: bytes) -> socket.socket:
    """This shm endpoint's doorbell: a datagram socket its peers poke after posting to it.

    shm has no wait object, so without it a peer blocked in progress() would only notice a
    message at its next 1 ms tick. Datagrams are empty and only wake the poller; the abstract
    namespace needs no file and vanishes with the process.
    """
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC)
    try:
        bell.bind(_bell_address(name))
    except OSError:
        bell.close()
        raise
    return bell
