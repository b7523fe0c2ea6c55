"""Which peers may talk to us: messages from unverified senders, the handshake's I/O, and the
operations held for a peer until its handshake completes (the protocol is ``_handshake``)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable

from ..errors import PeerError
from ..types import Addr, Op, OpState
from ._common import (
    _CHALLENGE,
    _HELLO,
    _KIND_MASK,
    _REFUSE,
    _SHAKE,
    _Req,
    _tcp_refused,
    log,
)
from ._fabric import lib
from ._handshake import INITIATOR, MAX_PENDING, RESPONDER

# Names inserted because a peer claimed them, over the life of the endpoint. The address vector
# only grows (libfabric 1.17 does not forget an address cleanly: after fi_av_remove, rxm still
# reports the removed peer's messages under the old fi_addr, and shm no longer reports a
# re-inserted one), so this bounds what unknown peers can make it hold.
MAX_CLAIMED = 65536
# An ofi+shm name: fi_shm://PID_NAME:0:N (shm appends the endpoint count; see _shm_name).
_SHM_NAME = re.compile(rb"fi_shm://[0-9]{1,10}_[A-Za-z0-9._-]{1,64}(:[0-9]{1,5}:[0-9]{1,5})?")
_LOGGED_MAX = 1024  # distinct peers whose first refusal is logged: no log flood by many names


class Peers:
    """Mixin of ``OfiPlugin``; ``_init_peers`` creates its state."""

    def _init_peers(self, timeout: float) -> None:
        self._names: dict[Addr, bytes] = {}
        # Established peers: who a message is from is the session token in its header, and
        # our messages to a peer carry the one it gave us.
        self._by_token: dict[bytes, Addr] = {}
        self._tokens: dict[Addr, list[bytes]] = {}
        self._out: dict[Addr, bytes] = {}
        self._ready: set[Addr] = set()
        self._held: dict[Addr, list[tuple[Op, Callable[[], None]]]] = {}  # until established
        self._logged: set[object] = set()
        self._claimed = 0
        self._shake_timeout = timeout

    # -- what arrives from outside the established peers ----------------------------------------
    def _vet(self, kind: int, claimed: bytes, body: bytes) -> None:
        """A message without an established peer's token, or one of the handshake's: its
        header is a claimed name, and nothing of it reaches the matcher."""
        if kind == _HELLO:
            self._on_hello(claimed, body)
            return
        if kind > _REFUSE:
            self.stats["protocol_errors"] += 1
            self._log_once(claimed, f"dropped a message of unknown kind {kind >> 32:#x}")
            return
        # A handshake message claims a name we know; its nonce shows whether it is that
        # peer's answer to us (only the owner of the name received what it echoes).
        addr = self._by_name.get(claimed) if kind > _HELLO else None
        if addr is not None and self._shake.message(addr, kind, body):
            return
        if addr is not None and kind == _CHALLENGE and addr in self._ready:
            self._shake.unsolicited(addr, body)  # someone said hello in our name
        self.stats["unverified_dropped"] += 1
        self._log_once(claimed, "dropped a message from a sender that is not an established "
                       "peer")

    def _on_hello(self, claimed: bytes, body: bytes) -> None:
        addr = self._by_name.get(claimed)
        why = None
        if addr is None:
            why = self._check_name(claimed)
            if why is None and (self._claimed >= MAX_CLAIMED
                                or len(self._shake.responding) >= MAX_PENDING):
                why = "too many unverified peers"
        elif addr is self._self_addr:
            why = "it is our own name"
        elif addr in self._shake.responding:
            why = "that name's verification is already under way"
        if why is not None:
            self._refuse_name(claimed, why)
            return
        if addr is None:
            self._claimed += 1
            addr = self._addr_for(claimed)  # fi_av_insert: only a checked name, only now
            if addr.fabric_addr is None:
                self._refuse_name(claimed, "the provider cannot resolve it")
                return
        # An established peer stays established (its token) unless this one proves the name.
        if not self._shake.hello(addr, claimed, body):
            self.stats["unverified_dropped"] += 1
            self._log_once(claimed, "dropped a malformed handshake, or one too many at once")

    def _check_name(self, name: bytes) -> str | None:
        """Why a claimed name is refused before it is inserted, or None: its length and form."""
        fmt = self.addr_format
        if fmt == lib.FI_SOCKADDR_IN:
            if len(name) != 16 or name[:2] != socket.AF_INET.to_bytes(2, "little") or \
                    name[8:] != bytes(8):
                return f"not a {len(self._name)} B IPv4 socket address"
            if name[2:4] == b"\0\0" or name[4] in (0, 255) or 224 <= name[4] < 240:
                return "no port, or not a unicast address"
            return None
        if fmt == lib.FI_SOCKADDR_IN6:
            if len(name) != 28 or name[:2] != socket.AF_INET6.to_bytes(2, "little") or \
                    name[4:8] != bytes(4) or name[2:4] == b"\0\0" or name[8] == 0xFF:
                return "not an IPv6 unicast socket address with a port"
            return None
        if fmt == lib.FI_ADDR_STR:
            if len(name) > 128:
                return "longer than 128 B"
            if self.transport == "shm":
                if _SHM_NAME.fullmatch(name) is None:
                    return "not an ofi+shm name (fi_shm://PID_NAME:0:N)"
                try:
                    owner = os.stat(b"/dev/shm/" + name.partition(b"://")[2]).st_uid
                except OSError:
                    return "no such shared-memory region"
                if owner != os.geteuid():
                    # Only our own user's processes can use our region: shm creates it 0600.
                    return "its shared-memory region belongs to another user"
            return None
        return None if len(name) == len(self._name) else f"not {len(self._name)} B long"

    def _refuse_name(self, claimed: bytes, why: str) -> None:
        self.stats["refused_names"] += 1
        self._log_once(claimed, f"refused a claimed sender name: {why}")

    def _log_once(self, who: object, what: str) -> None:
        if who in self._logged or len(self._logged) > _LOGGED_MAX:
            return
        self._logged.add(who)
        if len(self._logged) > _LOGGED_MAX:
            what = f"{what} (further refusals are counted, not logged)"
        if isinstance(who, tuple):
            who = who[1]
        name = who.uri if isinstance(who, Addr) else f"a sender claiming {bytes(who)[:64]!r}"
        log.warning("%s: %s (%s)", self.scheme, what, name)

    # -- the handshake's callbacks --------------------------------------------------------------
    def _shake_send(self, addr: Addr, kind: int, body: bytes) -> None:
        self._start(self._send_req(_SHAKE, None, addr, body, kind))

    def _established(self, addr: Addr, ours: bytes, theirs: bytes) -> None:
        addr.dead = None  # it answered at its address (a restarted peer comes back)
        # Both handshakes of a simultaneous hello establish: the last two tokens stay valid.
        tokens = self._tokens.setdefault(addr, [])
        tokens.append(ours)
        if len(tokens) > 2:
            self._by_token.pop(tokens.pop(0), None)
        self._by_token[ours] = addr
        self._out[addr] = bytes((len(theirs),)) + theirs
        self._ready.add(addr)
        for op, start in self._held.pop(addr, ()):
            if op.state != OpState.FINISHED:
                start()

    def _shake_failed(self, addr: Addr, cause: str, role: str) -> None:
        self.stats["handshake_failures"] += 1
        if role == INITIATOR:
            self._peer_failed(addr, cause)  # what we held for it fails with the cause
        # A failed verification leaves the name usable: a claim by someone else must not
        # make the real owner's own hello fail (its queued challenge is dropped: backlog).
        self._log_once(addr, f"handshake as {role} failed: {cause}")

    def _auth_failed(self, addr: Addr, cause: str) -> None:
        self.stats["auth_failures"] += 1
        self._log_once(("auth", addr), f"authentication of {addr.uri} failed: {cause}")

    def _expire_shakes(self) -> None:
        for addr, role in self._shake.expire():
            if addr not in self._ready:
                self._shake_failed(addr, f"could not connect: no handshake within "
                                   f"{self._shake.timeout} s", role)
        if self.transport != "tcp":
            return
        for role, table in ((INITIATOR, self._shake.initiating),
                            (RESPONDER, self._shake.responding)):
            for addr in [a for a in table if a in self._blocked]:
                # rxm answers FI_EAGAIN for as long as the kernel refuses its connection to
                # the address; a refused connect there is the same answer, sooner.
                cause = _tcp_refused(addr.uri)
                if cause:
                    table.pop(addr, None)
                    self._shake_failed(addr, cause, role)

    def _stale_shake(self, req: _Req) -> bool:
        """Whether ``req`` is a hello or challenge (still queued) of a handshake given up."""
        return req.kind == _SHAKE and req.args[-1] & _KIND_MASK in (_HELLO, _CHALLENGE) and \
            not self._shake.busy(req.addr)  # type: ignore[arg-type]

    # -- holding our operations until the peer is established ----------------------------------
    def _hold(self, op: Op, start: Callable[[], None]) -> None:
        """Run ``start`` once ``op``'s peer is established; say hello if nobody has."""
        addr: Addr = op.addr  # type: ignore[assignment]
        self._held.setdefault(addr, []).append((op, start))
        if addr not in self._shake.initiating:
            self._shake.start(addr, self._names[addr])

    def _fail_held(self, addr: Addr, cause: str) -> None:
        for op, _start in self._held.pop(addr, ()):
            if op.state != OpState.FINISHED:
                self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, cause))
