"""Who is on a connection of the socket plugins (tcp, sm): the HELLO, the optional shared-secret
handshake, and identities bound to connections.

A connection's first frame is the dialler's HELLO: the URI it claims and whether it listens.
A claim is only a name until something proves it, and a peer must never receive what is meant
for another by claiming its name first. So:

- an unproven claim gets an address of its own, bound to that one connection: replies to its
  requests go back where the requests came from, it is never entered in the table of peers we
  dial, and nothing is dialled because of it (a later ``addr_lookup`` of the same URI dials
  the URI itself, on a connection of our own);
- a proven claim joins the table of peers, so that a listener that called us is answered and
  called back over the connection it opened. Proof is the kernel's word where it has one
  (sm: ``SO_PEERCRED`` gives the pid of the process on a Unix socket, and an sm URI names its
  pid; a claim naming another process is refused) or the shared ``auth_key``.

With ``auth_key`` both ends prove they hold the key (``na/auth.py``: mutual HMAC over both nonces
and the claimed URI) before anything else is read or sent: the dialler holds its frames until
the listener's proof checks, and the listener reads only handshake frames until the dialler's
does. That costs one round trip per new connection; without a key the HELLO rides ahead of the
first message, as before. A refusal says why (no key, wrong key) in one frame, then closes.

Frames (``na/framing.py`` kinds): HELLO (flags: LISTENING, AUTH; payload: with AUTH the
dialler's nonce, then its URI), AUTH_CHALLENGE (listener to dialler: a status byte, then the
listener's nonce and proof), AUTH_PROOF (the dialler's proof).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Protocol

from . import auth
from . import framing as fr
from ._conn import Conn, Outbox, Routing
from ._transport import Transport, peer_pid
from .errors import ProtocolError
from .types import Addr

LISTENING = 1  # HELLO flag: the sender listens (its URI can be dialled)
AUTH = 2  # HELLO flag: the sender holds an auth_key; its nonce leads the payload
MAX_URI = 1024

# AUTH_CHALLENGE status: OK is followed by the listener's nonce and proof; the others end it.
OK, NEED_KEY, NO_KEY, BAD_PROOF = 0, 1, 2, 3
REFUSALS = {
    NEED_KEY: "the peer requires an auth_key and this instance has none",
    NO_KEY: "the peer has no auth_key (this instance requires one)",
    BAD_PROOF: "the peer refused our proof of the auth_key",
}
_CHALLENGE_SIZE = 1 + auth.NONCE_SIZE + auth.MAC_SIZE


class Peered(Protocol):
    """What the handshake uses of its plugin (``na._sockets.SocketPlugin``)."""

    stats: dict[str, int]
    log: logging.Logger
    scheme: str
    transport: Transport
    _outbox: Outbox
    _listening: bool
    _routing: Routing

    def addr_self(self) -> Addr: ...
    def _handshake_done(self, conn: Conn) -> None: ...


class Shake:
    """One connection's handshake in progress: the nonces, and on the listener's side the claim
    it will bind once the dialler's proof checks."""

    __slots__ = ("client_nonce", "flags", "server_nonce", "uri")

    def __init__(self, client_nonce: bytes, server_nonce: bytes = b"", uri: str = "",
                 flags: int = 0) -> None:
        self.client_nonce = client_nonce
        self.server_nonce = server_nonce
        self.uri = uri
        self.flags = flags


class Peering:
    """The peers of one socket plugin, by URI, and the handshake that names them. All calls
    run under the plugin's lock."""

    def __init__(self, plugin: Peered, key: bytes | None,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self.plugin = plugin
        self.key = key
        self.random = random
        # Listeners, by canonical URI: the ones we dial, and those whose claim was proven.
        self.peers: dict[str, Addr] = {}
        # Proven peers that do not listen, by the URI their HELLO gave: a lookup of that URI
        # (say, the owner of a bulk handle a third party forwards) reaches them over their
        # live connection.
        self.anon: dict[str, Addr] = {}
        # The nonces of our own keyed HELLOs still waiting for the listener's proof: one
        # coming back to us in a HELLO is a reflection (see ``_on_hello``).
        self.outstanding: dict[bytes, Conn] = {}
        plugin.stats.update(auth_failures=0, unproven_claims=0)

    # -- addresses -----------------------------------------------------------------------------
    def known(self, uri: str) -> Addr | None:
        """A proven peer that does not listen, by the URI it gave (it cannot be dialled)."""
        return self.anon.get(uri) if uri not in self.peers else None

    def lookup(self, canonical: str) -> Addr:
        """The address of the listener at ``canonical`` (``Transport.canonical``, which may
        resolve a host name: the caller runs it outside the plugin's lock)."""
        addr = self.peers.get(canonical)
        if addr is None:
            addr = self.peers[canonical] = Addr(canonical, True)
        return addr

    def closed(self, conn: Conn) -> None:
        """``conn`` is gone: its handshake, if any, with it."""
        shake = conn.shake
        if shake is not None and self.outstanding.get(shake.client_nonce) is conn:
            del self.outstanding[shake.client_nonce]

    def lost(self, addr: Addr) -> None:
        """``addr``'s connection is gone; a peer that does not listen is gone with it."""
        if not addr.listening and self.anon.get(addr.uri) is addr:
            del self.anon[addr.uri]

    # -- the dialler's side --------------------------------------------------------------------
    def dialled(self, conn: Conn) -> None:
        """Say HELLO on a connection we opened; with a key, hold every other frame until the
        listener has proven it holds the key too (``on_challenge``)."""
        me = self.plugin.addr_self().uri.encode()
        flags = LISTENING if self.plugin._listening else 0
        if self.key is None:
            self._send(conn, fr.HELLO, flags, me)
            return
        nonce = auth.new_nonce(self.random)
        self._send(conn, fr.HELLO, flags | AUTH, nonce + me)
        conn.shake = Shake(nonce)
        self.outstanding[nonce] = conn
        conn.held = []
        # Until the listener has proven itself, its challenge is all we read from it.
        conn.routes = {fr.AUTH_CHALLENGE: self.on_challenge}

    def on_challenge(self, conn: Conn, _tag: int, payload: memoryview | None) -> None:
        """The listener's answer to our keyed HELLO (or its refusal of our HELLO)."""
        shake = conn.shake
        body = bytes(payload or b"")
        if conn.accepted or not body:
            raise ProtocolError("handshake", conn.name, "unexpected authentication challenge")
        status = body[0]
        if status != OK:
            # Also on an unkeyed connection: the listener says why it closes.
            self._failed(conn, REFUSALS.get(status, f"the peer refused us (status {status})"))
        if shake is None:
            raise ProtocolError("handshake", conn.name, "unexpected authentication challenge")
        if len(body) != _CHALLENGE_SIZE:
            raise ProtocolError("handshake", conn.name,
                                f"a {len(body)} B authentication challenge")
        n = 1 + auth.NONCE_SIZE
        server_nonce, mac = body[1:n], body[n:]
        me = self.plugin.addr_self().uri.encode()
        if self.key is None or not auth.verify(self.key, auth.SERVER, shake.client_nonce,
                                               server_nonce, me, mac):
            self._refuse(conn, BAD_PROOF, "the peer could not prove it holds the auth_key")
        self.outstanding.pop(shake.client_nonce, None)
        held, conn.held, conn.shake = conn.held, None, None
        conn.routes = self.plugin._routing.table
        self._send(conn, fr.AUTH_PROOF, 0, auth.proof(
            self.key, auth.CLIENT, shake.client_nonce, server_nonce, me))
        outbox = self.plugin._outbox
        for bufs, op in held or ():
            outbox.enqueue(conn, bufs, op)
        self.plugin._handshake_done(conn)

    # -- the listener's side -------------------------------------------------------------------
    def on_frame(self, conn: Conn, kind: int, flags: int, payload: bytes) -> None:
        """A frame on an accepted connection whose peer is not known yet: its HELLO, then
        with a key its proof. Anything else is a protocol error (the connection closes)."""
        if kind == fr.HELLO and conn.shake is None:
            self._on_hello(conn, flags, payload)
        elif kind == fr.AUTH_PROOF and conn.shake is not None:
            self._on_proof(conn, payload)
        elif kind == fr.AUTH_CHALLENGE and conn.shake is not None and payload[:1] == \
                bytes((BAD_PROOF,)):
            self._failed(conn, REFUSALS[BAD_PROOF])  # the dialler found our proof wrong
        else:
            raise ProtocolError("handshake", conn.name,
                                f"frame kind {kind} before the handshake completed")

    def _on_hello(self, conn: Conn, flags: int, payload: bytes) -> None:
        nonce = b""
        if flags & AUTH:
            nonce, payload = payload[:auth.NONCE_SIZE], payload[auth.NONCE_SIZE:]
            if len(nonce) != auth.NONCE_SIZE:
                raise ProtocolError("handshake", conn.name, "a keyed HELLO without its nonce")
        uri = payload.decode("utf-8", "replace")
        scheme = self.plugin.scheme + "://"
        if not uri.startswith(scheme) or len(uri) > MAX_URI:
            raise ProtocolError("handshake", conn.name, f"bad peer URI {uri[:80]!r}")
        conn.name = conn.reader.peer = uri
        if self.key is None and not flags & AUTH:
            self._bind(conn, uri, flags, self._vouched(conn, uri))
        elif self.key is None:
            self._refuse(conn, NO_KEY, "the peer authenticates (auth_key) but this instance "
                         "has no auth_key")
        elif not flags & AUTH:
            self._refuse(conn, NEED_KEY, "the peer has no auth_key (this instance requires one)")
        else:
            # The kernel's word on an sm claim is checked before any proof is computed.
            self._vouched(conn, uri)
            own = self.outstanding.get(nonce)
            if own is not None and not _same_connection(own.sock, conn.sock):
                # Our own challenge, sent back on another connection: the proof we would
                # answer it with is the one our dialler waits for from its peer (the
                # proofs bind the nonces, the roles and the dialler's URI, all of which a
                # relay can copy). Only the other end of that very connection may use it.
                self._refuse(conn, BAD_PROOF, "the peer sent our own challenge back "
                             "(a reflection)")
            server_nonce = auth.new_nonce(self.random)
            conn.shake = Shake(nonce, server_nonce, uri, flags)
            self._send(conn, fr.AUTH_CHALLENGE, 0, bytes((OK,)) + server_nonce + auth.proof(
                self.key, auth.SERVER, nonce, server_nonce, uri.encode()))

    def _on_proof(self, conn: Conn, mac: bytes) -> None:
        shake = conn.shake
        if not auth.verify(self.key, auth.CLIENT, shake.client_nonce,  # type: ignore[arg-type]
                           shake.server_nonce, shake.uri.encode(), mac):
            self._refuse(conn, BAD_PROOF, "the peer could not prove it holds the auth_key")
        conn.shake = None
        self._bind(conn, shake.uri, shake.flags, True)

    def _vouched(self, conn: Conn, uri: str) -> bool:
        try:
            return self.plugin.transport.vouch(conn.sock, uri)
        except ValueError as exc:
            raise ProtocolError("handshake", conn.name, str(exc)) from None

    def _bind(self, conn: Conn, uri: str, flags: int, proven: bool) -> None:
        """Give the connection its peer's address (see the module docstring)."""
        if proven and flags & LISTENING:
            # A listener is one peer however many connections reach us from it.
            addr = self.peers.get(uri)
            if addr is None:
                addr = self.peers[uri] = Addr(uri, True)
            if addr.conn is None:
                addr.conn = conn
            addr.dead = None
        else:
            # Known by this connection only: a reconnect (or an impostor) never takes over
            # another connection's replies, and the claimed URI is never dialled for it.
            addr = Addr(uri, False)
            addr.conn = conn
            if proven:
                known = self.anon.get(uri)
                if known is None or known.conn is None:
                    self.anon[uri] = addr
            elif flags & LISTENING:
                self.plugin.stats["unproven_claims"] += 1
        conn.addr = addr
        self.plugin._handshake_done(conn)

    # -- plumbing ------------------------------------------------------------------------------
    def _send(self, conn: Conn, kind: int, flags: int, payload: bytes) -> None:
        self.plugin._outbox.enqueue(conn, [fr.encode_header(kind, len(payload), 0, flags),
                                           payload], None)

    def _refuse(self, conn: Conn, status: int, cause: str) -> None:
        """Tell the peer why (one frame, sent before the connection closes), and close. The
        frame goes straight to the socket's queue: a dialler's held frames stay held (they
        fail with the connection)."""
        conn.sendq.append([fr.encode_header(fr.AUTH_CHALLENGE, 1) + bytes((status,)), None])
        self.plugin._outbox.flush(conn)
        self._failed(conn, cause)

    def _failed(self, conn: Conn, cause: str) -> None:
        stats = self.plugin.stats
        stats["auth_failures"] += 1
        level = logging.WARNING if stats["auth_failures"] == 1 else logging.DEBUG
        self.plugin.log.log(level, "authentication with %s failed: %s", conn.name, cause)
        raise AuthFailed("handshake", conn.name, f"authentication failed: {cause}")


class AuthFailed(ProtocolError):
    """The handshake's key check failed: the connection closes, logged once, not as a bug."""


def _same_connection(dialled: socket.socket, accepted: socket.socket) -> bool:
    """Whether ``accepted`` is the far end of our own ``dialled`` (a plugin that sends to
    itself): the same address pair over IP, our own pid over a Unix socket."""
    try:
        if accepted.family == socket.AF_UNIX:
            return peer_pid(accepted) == os.getpid()
        return bool(dialled.getsockname() == accepted.getpeername())
    except OSError:
        return False
