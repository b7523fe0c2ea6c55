"""Which peers may talk to us: messages from unverified senders, the handshake's I/O, and the
operations held for a peer until its handshake completes (the protocol is ``_handshake``)."""

from __future__ import annotations

import os
import re
import socket

from ..errors import PeerError
from ..types import Addr, OpState
from ._common import (
    _HELLO,
    _REFUSE,
    _SHAKE,
    _Req,
    log,
)
from ._fabric import lib
from ._handshake import INITIATOR, MAX_PENDING

# Names inserted for peers that claimed them and have not been verified yet, over the life of
# the endpoint. libfabric 1.17 cannot forget an address safely (after fi_av_remove, rxm still
# reports the removed peer's messages under its old fi_addr, and shm reports a re-inserted
# one as fi_addr 0), so the address vector only grows; this bounds what unknown peers make it
# hold (each entry is a few hundred bytes in libfabric).
MAX_CLAIMED = 65536
# An ofi+shm name: fi_shm://PID_NAME:0:N (shm appends the endpoint count; see _shm_name).
_SHM_NAME = re.compile(rb"fi_shm://[0-9]{1,10}_[A-Za-z0-9._-]{1,64}(:[0-9]{1,5}:[0-9]{1,5})?")
_LOGGED_MAX = 1024  # distinct peers whose first refusal is logged: no log flood by many names


class Peers:
    """Mixin of ``OfiPlugin`` (state is created in ``OfiPlugin.__init__``)."""

    # -- what arrives from outside the established peers ----------------------------------------
    def _vet(self, src: int, addr: Addr | None, kind: int, hdr: memoryview,
             body: memoryview) -> Addr | None:
        """A message off the per-message path: from a sender that is not an established peer,
        or one of the handshake's. Returns None: it is consumed or dropped here."""
        claimed = bytes(hdr[1:])
        if addr is None:
            # A sender we inserted but have not established: by the provider's word, or on
            # shm by the name it claims.
            addr = self._inserted.get(src) if self._by_src else self._by_name.get(claimed)
        if kind == _HELLO:
            self._on_hello(addr, claimed, bytes(body))
        elif kind > _REFUSE:
            self.stats["protocol_errors"] += 1
            self._log_once(addr or claimed, f"dropped a message of unknown kind {kind >> 32:#x}")
        elif addr is None or kind < _HELLO or not self._shake.message(addr, kind, bytes(body)):
            self.stats["unverified_dropped"] += 1
            self._log_once(addr or claimed, "dropped a message from a sender that is not an "
                           "established peer")
        return None

    def _on_hello(self, addr: Addr | None, claimed: bytes, body: bytes) -> None:
        if addr is not None and self._by_src:
            # The provider attributes it: the claim must be the sender's own name.
            if self._names.get(addr) != claimed:
                self._refuse_name(claimed, f"it came from {addr.uri}")
                return
            # A restarted peer at the same address, or a second hello: prove it again.
            self._unready(addr)
        elif addr is not None:
            # shm: a known name. Its owner may say hello while we say hello to it; but an
            # established peer's name never returns (a name holds its pid and a random part).
            if addr in self._ready or addr in self._shake.responding:
                self._refuse_name(claimed, "it names an established peer, or one in its "
                                  "handshake")
                return
        else:
            why = self._check_name(claimed)
            if why is None and claimed in self._by_name:
                # Once a name is inserted the provider attributes its owner's messages to it:
                # an unattributed claim of it comes from someone else.
                why = "it names a known peer, and the message did not come from that peer"
            if why is None and (self._claimed >= MAX_CLAIMED
                                or len(self._shake.responding) >= MAX_PENDING):
                why = "too many unverified peers"
            if why is not None:
                self._refuse_name(claimed, why)
                return
            self._claimed += 1
            addr = self._addr_for(claimed)  # fi_av_insert, only now
            if addr.fabric_addr is None:
                self._refuse_name(claimed, "the provider cannot resolve it")
                return
        if not self._shake.hello(addr, claimed, body):
            self.stats["unverified_dropped"] += 1
            self._log_once(addr, "dropped a malformed or untimely handshake")

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

    def _established(self, addr: Addr) -> None:
        addr.dead = None  # it answered from its address (a restarted peer comes back)
        self._ready.add(addr)
        self._by_fi[addr.fabric_addr] = addr  # type: ignore[index]
        self._ready_names[self._names[addr]] = addr
        held = self._held.pop(addr, ())
        for req in held:
            if req.owner is None or req.owner.state != OpState.FINISHED:
                self._start(req)

    def _unready(self, addr: Addr) -> None:
        self._ready.discard(addr)
        self._by_fi.pop(addr.fabric_addr, None)  # type: ignore[arg-type]
        self._ready_names.pop(self._names.get(addr, b""), None)

    def _shake_failed(self, addr: Addr, cause: str, role: str) -> None:
        self.stats["handshake_failures"] += 1
        if role == INITIATOR or addr not in self._ready:
            # Held operations fail; a challenge still queued for it is dropped (backlog).
            self._peer_failed(addr, cause)
        self._log_once(addr, f"handshake as {role} failed: {cause}")

    def _auth_failed(self, addr: Addr, cause: str) -> None:
        self.stats["auth_failures"] += 1
        self._log_once(("auth", addr), f"authentication of {addr.uri} failed: {cause}")

    def _expire_shakes(self) -> None:
        for addr, role in self._shake.expire():
            if addr not in self._ready:
                self._shake_failed(addr, f"could not connect: no handshake within "
                                   f"{self._shake.timeout} s", role)

    # -- holding our operations until the peer is established ----------------------------------
    def _hold(self, req: _Req) -> None:
        addr: Addr = req.addr  # type: ignore[assignment]
        if addr.dead:
            if req.owner is not None and req.owner.state != OpState.FINISHED:
                self._cq.fail(req.owner, PeerError(req.owner.kind.name.lower(), addr.uri,
                                                   addr.dead))
            return
        self._held.setdefault(addr, []).append(req)
        if addr not in self._shake.initiating:
            self._shake.start(addr, self._names[addr])

    def _fail_held(self, addr: Addr, cause: str) -> None:
        for req in self._held.pop(addr, ()):
            op = req.owner
            if op is not None and op.state != OpState.FINISHED:
                self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, cause))
