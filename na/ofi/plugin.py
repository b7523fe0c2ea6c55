"""The ofi plugin: NA over a libfabric FI_EP_RDM endpoint (tcp;ofi_rxm, shm, sockets, verbs).

One class, ``OfiPlugin``, behind the NA interface; its parts live in sibling modules:
``_addressing`` (names, URIs, address vector), ``_messages`` (tagged sends, the receive pool,
matching), ``_rma`` (registrations, put/get), ``_progress`` (posting with the FI_EAGAIN
backlog, completions, peer failure, progress, cancel), ``_lifecycle`` (opening and closing the
endpoint), ``_local`` (shm endpoints of this process), ``_common`` (constants, records).

Messages. Every message is a tagged send whose 64-bit tag carries the kind (unexpected,
expected, liveness probe, handshake) above the user's 32-bit tag, and whose payload starts with
a length byte and the session token its receiver gave us: the receiver knows who wrote by that
token, never by a name the sender claims. A peer's token comes from ``_handshake``: a sender
we do not know claims its name in a HELLO, we check the name's length and form, insert it and
send a challenge to it, and only the owner of that address can answer (libfabric 1.17 cannot
say who sent a message: see there). Our messages to a peer wait until it is established; its
messages until then are dropped and counted. With ``auth_key`` the handshake is mutual
shared-secret proof. A pool of internal receive buffers is always
posted for any source and any tag; Python matches what lands there against the posted NA
receives and copies the payload (at most ``max_msg_size``) into the user's buffer. That gives
exactly the NA semantics on every provider: unexpected messages queue (bounded: past
``max_queued`` bytes the pool is not reposted and the provider's flow control pushes back;
not on shm, see below), expected messages need a pre-posted receive and late ones are dropped
and counted, a receive that is too small fails instead of truncating, and cancel of a receive
never involves the provider. (FI_DIRECTED_RECV is then not needed; tcp;ofi_rxm lacks it.)

shm (libfabric 1.17) needs four workarounds, each measured: (1) it silently discards the part
of a burst that exceeds its posted receives by more than their number (K slots posted, N > 2K
sends: exactly 2K delivered, every send completing successfully; several senders at once
need more), so its pool is 4096 slots (FI_SHM_RX_SIZE raised to 8192; anonymous memory
touched only where messages land) and slots are never held back; (2) fi_av_insert of a
closed endpoint's name is a SIGSEGV inside libfabric, so names are inserted only while their
region exists in /dev/shm; (3) a first send to a peer
returns FI_EAGAIN until the *peer's* progress has accepted the mapping, as rxm's connection
handshake needs the target's progress: both ends must progress, as with Mercury; (4) a peer in
the same process is reached through its own region, which its close frees (the next send to it
was a SIGSEGV), so a closed endpoint's objects wait for the endpoints of this process that
inserted it (``_local``).

RMA: checked emulation on every provider, by measurement. ``put``/``get`` send a small request
that the target's progress loop checks against its own table (key, bounds, rights: never the
handle's claims) before the data moves as one tagged message between the two registered
buffers, zero-copy in libfabric (rxm's rendezvous; on shm one CMA copy, the same single copy
a native fi_read would make); a refusal is an AccessError naming the peer and the reason.
Native fi_read/fi_write (``rma="native"``, the provider's own keys) was run through the NA
suite's access-violation tests with libfabric 1.17 and fails them on both providers here:
  - shm: nothing is enforced. A put through a forged READ_WRITE claim on a READ_ONLY
    registration, a get from a WRITE_ONLY one, a get 4000+200 B into a 4096 B registration and
    a get with a forged key all *succeed* (shm's CMA fast path copies without looking the key
    up), and the target's read-only memory is overwritten.
  - tcp;ofi_rxm: rights are not reported: the put into READ_ONLY completes successfully at
    the initiator (the data is not written) and the next request to that peer then goes
    unanswered for seconds; the get from WRITE_ONLY succeeds. Out-of-bounds and forged-key
    accesses tear the connection down (FI_ECANCELED, then FI_ENOTCONN for everything with
    that peer) instead of failing one operation on a usable endpoint.
  - verbs;ofi_rxm: not measured (no RDMA device on the test host), so checked as well.
``rma="native"`` stays available for trusted deployments that want one-sided transfers and
accept those gaps; registrations then serialize the provider's key and base address.
A started transfer cannot be withdrawn from libfabric: canceling one completes it as Canceled
once the provider gives the buffer back (a checked get's data receive is fi_cancel'ed).

Progress. fi_cq_read in batches of 64. ``poll_fd()`` is an epoll set holding an eventfd
(completions made by another thread) and, where the CQ has a wait object (tcp, sockets, verbs:
fi_control(FI_GETWAIT)), its descriptor; blocking is guarded by fi_trywait(). shm has no wait
object (its peers write shared memory, nothing a descriptor can wait on), so there the set
holds a 1 ms periodic timerfd instead: an asyncio loop waiting on poll_fd() polls the CQ every
millisecond, and ``progress()`` spins ``spin_us`` and then sleeps in 1 ms slices. So that a
sleeping shm peer does not answer a millisecond late (999 round trips/s with spin_us=0, and a
16 MiB get at 0.68x process_vm_readv), each endpoint also has a doorbell in the set, an
abstract Unix datagram socket named after its region: every message petasus posts to a shm
peer rings the peer's (one sendto, whose failure only costs the tick). A post that
returns FI_EAGAIN is queued and retried from progress, in order per peer, never dropped; a
request's buffers and fi_context2 stay referenced until its completion has been read.

Peer failure. Error completions with a connection-level code fail every pending operation with
that peer, and later ones fail at once. An expected receive produces no completion at all if
its sender dies, so while operations with a peer are pending the plugin checks it every
``probe_interval`` seconds: on connection-based providers a small probe message (its error
completion reports the death; if rxm cannot even take it, answering FI_EAGAIN while it retries
a refused connection, a refused TCP connect to the peer's address confirms the death), and on
shm, whose sends to a dead process succeed silently, the process id in the address.
"""

from __future__ import annotations

import itertools
import os
import secrets
import select
import socket
from collections import deque
from typing import Any

from .. import _regs, auth, core
from .._polled import PolledPlugin
from ..types import Addr, MemHandle
from ._addressing import Addressing
from ._common import (
    PROBE_INTERVAL,
    PROVIDERS,
    RMA_CHUNK,
    SHM_RX_SIZE,
    _Req,
    log,
)
from ._handshake import TIMEOUT as HANDSHAKE_TIMEOUT
from ._lifecycle import Lifecycle
from ._messages import Messages
from ._peers import Peers
from ._progress import Progress
from ._rma import Rma

# shm sizes its receive-request pool from this parameter, read once when libfabric first
# initializes in the process (hints cannot raise it above 1024); see SHM_RX_SIZE for why the
# pool must be large. A value the user set is kept.
os.environ.setdefault("FI_SHM_RX_SIZE", str(SHM_RX_SIZE))


class OfiPlugin(Addressing, Messages, Peers, Rma, Progress, Lifecycle, PolledPlugin):
    """One endpoint, its CQ and AV, a posted receive pool, and Python-side matching."""

    def __init__(self, uri: str, listen: bool = False, *, max_msg_size: int = core.MAX_MSG_SIZE,
                 spin_us: int = core.SPIN_US, rma_chunk: int = RMA_CHUNK,
                 max_queued: int = core.MAX_QUEUED, rx_buffers: int | None = None,
                 probe_interval: float = PROBE_INTERVAL, rma: str = "checked",
                 auth_key: bytes | str | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
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
        self._auth_key = auth.check_key(auth_key)
        if handshake_timeout <= 0:
            raise ValueError(f"handshake_timeout must be positive, got {handshake_timeout}")
        self._open_core(max_msg_size, spin_us,
                        ("probes", "eagain", "unverified_dropped", "refused_names",
                         "handshake_failures", "auth_failures"),
                        log, max_queued, self._repost_held)
        self._probe_interval = probe_interval
        self._fids: list[Any] = []  # opened libfabric objects, closed in reverse order
        self._local = False  # an shm endpoint registered in ofi/_local.py
        self._tell = False  # ... whose close its same-process peers are still to hear of
        self._info: Any = None
        self._ep_fd: Any = None
        self._timer_fd = -1
        self._bell: socket.socket | None = None  # shm: see _doorbell
        self._bells: dict[Addr, bytes] = {}
        self._wait_fd = -1
        self._poll_set = select.epoll()
        self._poll_set.register(self._cq.wake_fd, select.EPOLLIN)
        self._reqs: dict[int, _Req] = {}
        self._backlog: deque[_Req] = deque()
        self._blocked: dict[Addr | None, int] = {}  # peers with requests in the backlog
        self._held_slots: list[int] = []
        self._peers: dict[str, Addr] = {}
        self._by_name: dict[bytes, Addr] = {}
        self._init_peers(handshake_timeout)
        self._probing: set[Addr] = set()
        self._gone: set[Addr] = set()  # same-process shm peers that closed (peer_closed)
        self._next_probe = 0.0
        self._regs: dict[int, MemHandle] = {}
        self._keys = _regs.Registrations()  # checked mode: our keys, checked per request
        self._rma_wait: dict[int, _Req] = {}  # RMA id -> the request its answer completes
        self._rma_ids = itertools.count(1)
        self._salt = secrets.randbits(16) << 44
        try:
            self._open(rest, listen, rx_buffers, rma_chunk)
        except BaseException:
            self._release()
            raise
        self._listening = listen

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._by_name)} peers"
        uri = self._self_addr.uri if hasattr(self, "_self_addr") else self.scheme
        return f"<OfiPlugin {uri} provider={getattr(self, 'provider', '?')} {state}>"

    def _statistics(self) -> dict[str, Any]:
        return {"provider": self.provider, "open_connections": len(self._by_name),
                "wait": "fd" if self._wait_fd >= 0 else "spin+timer", "mr_mode": self._mr_mode,
                "in_flight": len(self._reqs) - len(self._rx) // self._slot}
