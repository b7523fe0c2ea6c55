"""Shared-secret authentication of connections: the crypto every plugin's handshake uses.

Mutual HMAC challenge-response (DESIGN.md's security model): each side sends a fresh nonce, and
each proves it holds the key by a MAC over both nonces, the role it speaks as and the transcript
both sides saw (the URIs claimed). The role label keeps a proof from being reflected back at its
sender; the fresh nonces keep a recorded proof from being replayed on another connection. No
plugin allocates for, or dispatches, anything an unproven peer sends: the handshake frames are
the only ones it reads before the proof checks.

This module does no I/O: plugins carry the nonces and proofs in their own handshake frames.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

NONCE_SIZE = 16  # 128 bits: a nonce never repeats across the connections of a key's lifetime
MAC_SIZE = 32  # HMAC-SHA256
MIN_KEY_SIZE = 16  # a shorter shared secret is guessable offline from one recorded handshake

# The roles a proof is bound to.
CLIENT = b"petasus-auth client"
SERVER = b"petasus-auth server"


def check_key(key: bytes | bytearray | memoryview | str | None) -> bytes | None:
    """The key as bytes (a str is taken as UTF-8), or None when authentication is off.

    Raises ``ValueError`` for a key too short to resist offline guessing, ``TypeError`` for
    anything that is not bytes-like or a str."""
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"auth_key must be bytes or str, not {type(key).__name__}")
    key = bytes(key)
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"auth_key must be at least {MIN_KEY_SIZE} bytes, got {len(key)}")
    return key


def new_nonce(random: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh challenge nonce (``random`` is injected so tests can fix it)."""
    return random(NONCE_SIZE)


def proof(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes,
          transcript: bytes = b"") -> bytes:
    """The MAC that ``role`` sends to show it holds ``key`` on this connection."""
    mac = hmac.new(key, role, hashlib.sha256)
    for part in (client_nonce, server_nonce, transcript):
        # Length-prefixed, so that moving bytes between parts changes the MAC.
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.digest()


def verify(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes,
           transcript: bytes, mac: bytes | memoryview) -> bool:
    """Whether ``mac`` is ``role``'s proof for these nonces, compared in constant time."""
    if len(mac) != MAC_SIZE or len(client_nonce) != NONCE_SIZE or \
            len(server_nonce) != NONCE_SIZE:
        return False
    return hmac.compare_digest(proof(key, role, client_nonce, server_nonce, transcript),
                               bytes(mac))
