"""The transport interface of the socket plugins: what differs between tcp and Unix sockets.

``na/tcp.py`` (``TcpTransport``) and ``na/sm.py`` (``UnixTransport``) implement it; the
socket plugin (``na/_sockets.py``) does everything else the same way over either.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process on the other end of a Unix socket, as the kernel says."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[0]


class Transport(Protocol):
    """What differs between tcp and Unix sockets: naming, listening, connecting."""

    scheme: str

    def open(self, listen: bool) -> tuple[str, socket.socket | None]:
        """This instance's URI, and when listening its bound (not yet listening) socket."""
        ...

    def canonical(self, uri: str) -> str:
        """A peer URI's canonical spelling; ValueError if malformed."""
        ...

    def connect(self, uri: str) -> tuple[socket.socket, bool]:
        """A non-blocking socket to ``uri`` and whether it is still connecting."""
        ...

    def tune(self, sock: socket.socket) -> None:
        """Per-socket options (TCP_NODELAY and the like)."""
        ...

    def vouch(self, sock: socket.socket, uri: str) -> bool:
        """Whether the kernel proves that the peer on ``sock`` owns ``uri``: False where it
        cannot tell; ValueError naming both where it says the claim is false."""
        ...
