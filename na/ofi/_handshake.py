"""Who sent a message, and, with an ``auth_key``, proof: the ofi plugin's peer handshake.

Every message starts with the sender's name, but a peer can write any name there, and
libfabric 1.17's tcp;ofi_rxm and shm cannot report the source of a message from an address the
receiver has not inserted (FI_SOURCE_ERR is refused by both: fi_getinfo, FI_ENODATA). They do
report it, with FI_SOURCE, for an address that is in the address vector: fi_cq_readfrom gives
the fi_addr of the peer the message came from (rxm: the connection's; shm: the sending region's),
whatever the header says. So a message is attributed by the provider, never by its header, and
an unknown sender is verified by a challenge sent to the address it claims::

    initiator -> HELLO(flags, client_nonce)
    responder    checks the claimed name's form, that no known peer owns it, inserts it
    responder -> CHALLENGE(flags, client_nonce, server_nonce[, server_proof])   to that name
    initiator -> RESPONSE(server_nonce[, client_proof])   attributed to the claimed name by the
                                                          provider, since the name is inserted
    responder -> WELCOME(client_nonce)                    both ends deliver each other's messages
    either    -> REFUSE(nonce, reason)                    authentication failed

The CHALLENGE is the only message ever sent to an address a peer claimed before that address
answered from itself, and at most one is outstanding per name. Until a peer is established its
messages (other than these) are dropped and counted, and ours to it are held. With a key, the
proofs are ``na/auth.py``'s: mutual, over both nonces and the names both sides claimed.

This module decides; the plugin (``_messages.Messages``) does the I/O through the callables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .. import auth
from ..types import Addr

AUTH = 1  # HELLO/CHALLENGE flag: the sender holds an auth_key
MAX_PENDING = 64  # responder handshakes at once: bounds the verification dials unknown peers cause
TIMEOUT = 10.0  # seconds a peer has to complete the handshake
N = auth.NONCE_SIZE

INITIATOR, RESPONDER = "initiator", "responder"
AWAIT_CHALLENGE, AWAIT_WELCOME, AWAIT_RESPONSE = (
    "awaiting challenge", "awaiting welcome", "awaiting response")


class Shake:
    """One handshake in progress, in one role."""

    __slots__ = ("client_nonce", "deadline", "refusal", "server_nonce", "state", "transcript")

    def __init__(self, state: str, deadline: float, client_nonce: bytes, transcript: bytes) -> None:
        self.state = state
        self.deadline = deadline
        self.client_nonce = client_nonce
        self.server_nonce = b""
        self.transcript = transcript
        self.refusal = ""  # responder: why it will refuse whatever the initiator answers


def transcript(client_name: bytes, server_name: bytes) -> bytes:
    """What both proofs cover besides the nonces: the two names, length-prefixed."""
    return len(client_name).to_bytes(2, "big") + client_name + server_name


class Handshake:
    """Both roles for one endpoint. ``send(addr, kind, body)`` posts a handshake message,
    ``established(addr)`` opens the peer both ways, ``failed(addr, cause, role)`` ends it."""

    def __init__(self, key: bytes | None, self_name: bytes, kinds: dict[str, int],
                 send: Callable[[Addr, int, bytes], None],
                 established: Callable[[Addr], None],
                 failed: Callable[[Addr, str, str], None],
                 auth_failed: Callable[[Addr, str], None], *, timeout: float = TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        if timeout <= 0:
            raise ValueError(f"handshake_timeout must be positive, got {timeout}")
        self.key = key
        self.self_name = self_name
        self.k = kinds
        self.send = send
        self.established = established
        self.failed = failed
        self.auth_failed = auth_failed
        self.timeout = timeout
        self.clock = clock
        self.random = random
        self.initiating: dict[Addr, Shake] = {}
        self.responding: dict[Addr, Shake] = {}
        self._table = {kinds["CHALLENGE"]: self._on_challenge, kinds["RESPONSE"]: self._on_response,
                       kinds["WELCOME"]: self._on_welcome, kinds["REFUSE"]: self._on_refuse}

    def busy(self, addr: Addr) -> bool:
        return addr in self.initiating or addr in self.responding

    def start(self, addr: Addr, peer_name: bytes) -> None:
        """Say hello to a peer we are about to send to (its address was given to us)."""
        nonce = auth.new_nonce(self.random)
        self.initiating[addr] = Shake(AWAIT_CHALLENGE, self.clock() + self.timeout, nonce,
                                      transcript(self.self_name, peer_name))
        flags = AUTH if self.key is not None else 0
        self.send(addr, self.k["HELLO"], bytes((flags,)) + nonce)

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
        self.send(addr, self.k["CHALLENGE"], body)
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
            self.send(addr, self.k["REFUSE"], server_nonce + b"\1")
            self.auth_failed(addr, cause)
            self.failed(addr, f"authentication failed: {cause}", INITIATOR)
            return True
        shake.state = AWAIT_WELCOME
        shake.server_nonce = server_nonce
        if self.key is not None:
            server_nonce += auth.proof(self.key, auth.CLIENT, shake.client_nonce, server_nonce,
                                       shake.transcript)
        self.send(addr, self.k["RESPONSE"], server_nonce)
        return True

    def _on_welcome(self, addr: Addr, body: bytes) -> bool:
        shake = self.initiating.get(addr)
        if shake is None or shake.state != AWAIT_WELCOME or body != shake.client_nonce:
            return False
        del self.initiating[addr]
        self.established(addr)
        return True

    # -- the responder --------------------------------------------------------------------------
    def _on_response(self, addr: Addr, body: bytes) -> bool:
        shake = self.responding.get(addr)
        size = N + (auth.MAC_SIZE if self.key is not None else 0)
        if shake is None or len(body) != size or body[:N] != shake.server_nonce:
            return False
        del self.responding[addr]
        cause = shake.refusal
        if not cause and self.key is not None and not auth.verify(
                self.key, auth.CLIENT, shake.client_nonce, shake.server_nonce, shake.transcript,
                body[N:]):
            cause = "the peer could not prove it holds the auth_key"
            self.auth_failed(addr, cause)
        if cause:
            self.send(addr, self.k["REFUSE"], shake.client_nonce + b"\1")
            self.failed(addr, f"authentication failed: {cause}", RESPONDER)
            return True
        self.send(addr, self.k["WELCOME"], shake.client_nonce)
        self.established(addr)
        return True

    def _on_refuse(self, addr: Addr, body: bytes) -> bool:
        if len(body) != N + 1:
            return False
        shake = self.responding.get(addr)
        if shake is not None and body[:N] == shake.server_nonce:
            del self.responding[addr]
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

    def forget(self, addr: Addr) -> None:
        self.initiating.pop(addr, None)
        self.responding.pop(addr, None)
