"""Errors of the network abstraction.

Local misuse (a bad argument, a buffer too small) raises ``ValueError``/``TypeError`` at the call.
Everything below describes a failure that involves a peer, and names the operation, the peer and
the cause, so that a log line alone tells what went wrong where.
"""

from __future__ import annotations


class NAError(Exception):
    """Base of every failure that involves a peer or the transport."""

    def __init__(self, op: str, peer: str | None, cause: str) -> None:
        self.op = op
        self.peer = peer
        self.cause = cause
        where = f" with {peer}" if peer else ""
        super().__init__(f"{op}{where}: {cause}")


class PeerError(NAError, ConnectionError):
    """The peer could not be reached, or went away while the operation was pending."""


class ProtocolError(NAError):
    """The peer sent bytes that do not follow the wire format; its connection is closed."""


class AccessError(NAError, PermissionError):
    """A one-sided access was refused: unknown key, out of bounds, or not allowed by the rights."""


class Canceled(NAError):
    """The operation was canceled before it completed."""
