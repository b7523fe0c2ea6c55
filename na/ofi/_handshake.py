"""Who sent a message, and, with an ``auth_key``, proof: the ofi plugin's peer handshake.

A message used to start with its sender's name, which the receiver inserted into its address
vector and believed: any peer could make a server insert and dial an address it named, and
pass for another peer. The provider cannot say who sent a message either, as measured with
libfabric 1.17: FI_SOURCE_ERR (the source of an unknown sender) is refused by tcp;ofi_rxm and
shm (fi_getinfo: FI_ENODATA). FI_SOURCE is granted and fi_cq_readfrom reports an inserted
sender's fi_addr, but shm, when four processes connected at once, reported new senders'
messages under another peer's fi_addr, and rxm's source is the connection's IP address with
the port the connecting peer's own connection request states (read in rxm's source). So the
plugin verifies the claim itself, the same way on every provider::

    initiator -> HELLO(flags, client_nonce)              header: the initiator's name
    responder    checks the claimed name's length and form, inserts it (only now), and:
    responder -> CHALLENGE(flags, client_nonce, server_nonce[, server_proof])    to that name
    initiator -> RESPONSE(server_nonce, token_i[, client_proof])
    responder -> WELCOME(client_nonce, token_r)
    either    -> REFUSE(nonce, reason)                   authentication failed, or no hello

Only the owner of the claimed name receives the CHALLENGE, so only it can answer with the
server nonce; the CHALLENGE is the only message sent to a claimed address before that proof,
at most one is outstanding per name and ``MAX_PENDING`` in all. Each side then gives the other
a random session token, sent only to the verified address: every later message is headed by
the token its receiver gave, which is how the receiver knows whose it is (a dict lookup, as
the name lookup was) and where its replies go. A peer that is not established has its
messages dropped and counted; ours to it wait until it is. With a key, the proofs are
``na/auth.py``'s: mutual, over both nonces and the names both sides claimed, checked before
any token is given.

This module decides; the plugin (``_peers.Peers``) does the I/O through the callables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

from .. import auth
from ..types import Addr

AUTH = 1  # HELLO/CHALLENGE flag: the sender holds an auth_key
MAX_PENDING = 64  # responder handshakes at once: bounds the verification dials unknown peers cause
TIMEOUT = 10.0  # seconds a peer has to complete the handshake
TOKEN_SIZE = 16  # a session token: unguessable, as a nonce
REFUSED_AUTH, NO_HELLO = 1, 2  # REFUSE reasons
N = auth.NONCE_SIZE

INITIATOR, RESPONDER = "initiator", "responder"
AWAIT_CHALLENGE, AWAIT_WELCOME, AWAIT_RESPONSE = (
    "awaiting challenge", "awaiting welcome", "awaiting response")


class Shake:
    """One handshake in progress, in one role."""

    __slots__ = ("client_nonce", "deadline", "refusal", "server_nonce", "state", "token",
                 "transcript")

    def __init__(self, state: str, deadline: float, client_nonce: bytes, transcript: bytes) -> None:
        self.state = state
        self.deadline = deadline
        self.client_nonce = client_nonce
        self.server_nonce = b""
        self.transcript = transcript
        self.refusal = ""  # responder: why it will refuse whatever the initiator answers
        self.token = b""  # initiator: the token it gave the responder


def transcript(client_name: bytes, server_name: bytes) -> bytes:
    """What both proofs cover besides the nonces: the two names, length-prefixed."""
    return len(client_name).to_bytes(2, "big") + client_name + server_name


@dataclass(eq=False, repr=False)  # no repr: it would show the key
class Handshake:
    """Both roles for one endpoint. ``send(addr, kind, body)`` posts a handshake message,
    ``established(addr, ours, theirs)`` opens the peer both ways (``ours``: the token its
    messages to us carry; ``theirs``: the one ours to it carry), ``failed(addr, cause, role)``
    ends the handshake and ``auth_failed(addr, cause)`` counts a failed proof. ``kinds`` are
    the message kinds, by name; ``clock`` and ``random`` are injected for the tests."""

    key: bytes | None
    self_name: bytes
    kinds: dict[str, int]
    send: Callable[[Addr, int, bytes], None]
    established: Callable[[Addr, bytes, bytes], None]
    failed: Callable[[Addr, str, str], None]
    auth_failed: Callable[[Addr, str], None]
    _: KW_ONLY
    timeout: float = TIMEOUT
    clock: Callable[[], float] = time.monotonic
    random: Callable[[int], bytes] = os.urandom
    initiating: dict[Addr, Shake] = field(default_factory=dict, init=False)
    responding: dict[Addr, Shake] = field(default_factory=dict, init=False)
    _table: dict[int, Callable[[Addr, bytes], bool]] = field(init=False)

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"handshake_timeout must be positive, got {self.timeout}")
        k = self.kinds
        self._table = {k["CHALLENGE"]: self._on_challenge, k["RESPONSE"]: self._on_response,
                       k["WELCOME"]: self._on_welcome, k["REFUSE"]: self._on_refuse}

    def busy(self, addr: Addr) -> bool:
        return addr in self.initiating or addr in self.responding

    def start(self, addr: Addr, peer_name: bytes) -> None:
        """Say hello to a peer we are about to send to (its address was given to us)."""
        nonce = auth.new_nonce(self.random)
        self.initiating[addr] = Shake(AWAIT_CHALLENGE, self.clock() + self.timeout, nonce,
                                      transcript(self.self_name, peer_name))
        flags = AUTH if self.key is not None else 0
        self.send(addr, self.kinds["HELLO"], bytes((flags,)) + nonce)

    def hello(self, addr: Addr, claimed: bytes, body: bytes) -> bool:
        """A HELLO whose claimed name the plugin has checked and inserted as ``addr``; False
        when the body is malformed or too many verifications are under way."""
        if len(body) != 1 + N or (addr not in self.responding
                                  and len(self.responding) >= MAX_PENDING):
            return False
        flags, client_nonce = body[0], body[1:]
        shake = Shake(AWAIT_RESPONSE, self.clock() + self.timeout, client_nonce,
                      transcript(claimed, self.self_name))
        shake.server_nonce = auth.new_nonce(self.random)
        if self.key is not None and not flags & AUTH:
            shake.refusal = "the peer has no auth_key (this instance requires one)"
        elif self.key is None and flags & AUTH:
            shake.refusal = "the peer authenticates (auth_key) but this instance has no auth_key"
        if shake.refusal:
            self.auth_failed(addr, shake.refusal)
        self.responding[addr] = shake
        body = bytes((AUTH if self.key is not None else 0,)) + client_nonce + shake.server_nonce
        if self.key is not None:
            body += auth.proof(self.key, auth.SERVER, client_nonce, shake.server_nonce,
                               shake.transcript)
        self.send(addr, self.kinds["CHALLENGE"], body)
        return True

    def message(self, addr: Addr, kind: int, body: bytes) -> bool:
        """A handshake message the provider attributes to ``addr``; False if it matches no
        handshake of ours (stale, forged or malformed)."""
        step = self._table.get(kind)
        return step is not None and step(addr, body)

    # -- the initiator --------------------------------------------------------------------------
    def _on_challenge(self, addr: Addr, body: bytes) -> bool:
        shake = self.initiating.get(addr)
        size = 1 + 2 * N + (auth.MAC_SIZE if body[:1] == bytes((AUTH,)) else 0)
        if shake is None or shake.state != AWAIT_CHALLENGE or len(body) != size or \
                body[1:1 + N] != shake.client_nonce:
            return False
        flags, server_nonce, mac = body[0], body[1 + N:1 + 2 * N], body[1 + 2 * N:]
        cause = ""
        if self.key is None:
            if flags & AUTH:
                cause = "the peer requires an auth_key and this instance has none"
        elif not flags & AUTH:
            cause = "the peer has no auth_key (this instance requires one)"
        elif not auth.verify(self.key, auth.SERVER, shake.client_nonce, server_nonce,
                             shake.transcript, mac):
            cause = "the peer could not prove it holds the auth_key"
        if cause:
            del self.initiating[addr]
            self.send(addr, self.kinds["REFUSE"], server_nonce + bytes((REFUSED_AUTH,)))
            self.auth_failed(addr, cause)
            self.failed(addr, f"authentication failed: {cause}", INITIATOR)
            return True
        shake.state = AWAIT_WELCOME
        shake.server_nonce = server_nonce
        shake.token = self.random(TOKEN_SIZE)
        body = server_nonce + shake.token
        if self.key is not None:
            body += auth.proof(self.key, auth.CLIENT, shake.client_nonce, server_nonce,
                               shake.transcript)
        self.send(addr, self.kinds["RESPONSE"], body)
        return True

    def _on_welcome(self, addr: Addr, body: bytes) -> bool:
        shake = self.initiating.get(addr)
        if shake is None or shake.state != AWAIT_WELCOME or len(body) != N + TOKEN_SIZE or \
                body[:N] != shake.client_nonce:
            return False
        del self.initiating[addr]
        self.established(addr, shake.token, body[N:])
        return True

    # -- the responder --------------------------------------------------------------------------
    def _on_response(self, addr: Addr, body: bytes) -> bool:
        shake = self.responding.get(addr)
        size = N + TOKEN_SIZE + (auth.MAC_SIZE if self.key is not None else 0)
        if shake is None or len(body) != size or body[:N] != shake.server_nonce:
            return False
        del self.responding[addr]
        cause = shake.refusal
        if not cause and self.key is not None and not auth.verify(
                self.key, auth.CLIENT, shake.client_nonce, shake.server_nonce, shake.transcript,
                body[N + TOKEN_SIZE:]):
            cause = "the peer could not prove it holds the auth_key"
            self.auth_failed(addr, cause)
        if cause:
            self.send(addr, self.kinds["REFUSE"], shake.client_nonce + bytes((REFUSED_AUTH,)))
            self.failed(addr, f"authentication failed: {cause}", RESPONDER)
            return True
        token = self.random(TOKEN_SIZE)
        self.send(addr, self.kinds["WELCOME"], shake.client_nonce + token)
        self.established(addr, token, body[N:N + TOKEN_SIZE])
        return True

    def _on_refuse(self, addr: Addr, body: bytes) -> bool:
        if len(body) != N + 1:
            return False
        shake = self.responding.get(addr)
        if shake is not None and body[:N] == shake.server_nonce:
            del self.responding[addr]
            if body[N] == NO_HELLO:
                self.failed(addr, "the address claimed did not say hello", RESPONDER)
                return True
            if not shake.refusal:
                self.auth_failed(addr, "the peer refused our proof of the auth_key")
            self.failed(addr, "authentication failed: the peer refused our proof", RESPONDER)
            return True
        shake = self.initiating.get(addr)
        if shake is not None and body[:N] == shake.client_nonce:
            del self.initiating[addr]
            self.auth_failed(addr, "the peer refused our proof of the auth_key")
            self.failed(addr, "authentication failed: the peer refused our proof of the auth_key",
                        INITIATOR)
            return True
        return False

    # -- ending ---------------------------------------------------------------------------------
    def expire(self) -> list[tuple[Addr, str]]:
        """Drop the handshakes past their deadline; returns (addr, role) of each."""
        now = self.clock()
        out = []
        for role, table in ((INITIATOR, self.initiating), (RESPONDER, self.responding)):
            for addr in [a for a, s in table.items() if now >= s.deadline]:
                del table[addr]
                out.append((addr, role))
        return out

    def unsolicited(self, addr: Addr, body: bytes) -> None:
        """A CHALLENGE from a peer we said no hello to: someone claimed our name there."""
        if len(body) >= 1 + 2 * N and addr not in self.initiating:
            self.send(addr, self.kinds["REFUSE"], body[1 + N:1 + 2 * N] + bytes((NO_HELLO,)))

    def forget(self, addr: Addr) -> None:
        self.initiating.pop(addr, None)
        self.responding.pop(addr, None)
