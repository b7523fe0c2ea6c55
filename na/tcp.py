"""tcp plugin: messages over TCP (IPv4 and IPv6), RMA emulated by the target's progress loop.

URIs: ``tcp://127.0.0.1:7000``, ``tcp://[::1]:7000``; port 0 binds a free port, and
``addr_self()`` reports the bound one. A non-listening instance has an anonymous URI that peers
can answer over its own connection but cannot look up.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import secrets
import socket
from urllib.parse import urlsplit

from ._sockets import SocketPlugin


def parse_tcp_uri(uri: str, *, need_port: bool = True) -> tuple[str, int, int]:
    """(host, port, family) of a ``tcp://`` URI; raises ValueError naming the URI."""
    parts = urlsplit(uri)
    if parts.scheme != "tcp":
        raise ValueError(f"{uri!r} is not a tcp:// URI")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None
    if not host:
        raise ValueError(f"{uri!r} has no host (tcp://HOST:PORT)")
    if port is None:
        if need_port:
            raise ValueError(f"{uri!r} has no port (tcp://HOST:PORT)")
        port = 0
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"{uri!r}: cannot resolve {host!r}: {exc}") from None
        family, host = info[0][0], info[0][4][0]
    return host, port, family


def format_tcp_uri(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class TcpTransport:
    """Sockets over IP; a non-listening instance is anonymous (peers answer it over its own
    connection)."""

    scheme = "tcp"

    def __init__(self, uri: str) -> None:
        self.bind = uri if uri not in ("tcp://", "tcp") else "tcp://127.0.0.1:0"

    def open(self, listen: bool) -> tuple[str, socket.socket | None]:
        host, port, family = parse_tcp_uri(self.bind, need_port=False)
        if not listen:
            return f"tcp://anonymous-{secrets.token_hex(8)}", None
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno,
                          f"tcp: cannot listen on {self.bind}: {exc.strerror}") from None
        return format_tcp_uri(host, sock.getsockname()[1]), sock

    def canonical(self, uri: str) -> str:
        if uri.startswith("tcp://anonymous-"):
            raise ValueError(f"{uri!r} names a peer that does not listen: it can be reached "
                             "only over its own connection, while it is open")
        host, port, _family = parse_tcp_uri(uri)
        return format_tcp_uri(host, port)

    def connect(self, uri: str) -> tuple[socket.socket, bool]:
        host, port, family = parse_tcp_uri(uri)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err and err not in (errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            raise OSError(err, errno.errorcode.get(err, str(err)))
        return sock, bool(err)

    def tune(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def vouch(self, sock: socket.socket, uri: str) -> bool:
        # An address and port say nothing of who listens there: only an auth_key proves a
        # tcp claim.
        return False


class TcpPlugin(SocketPlugin):
    log = logging.getLogger("petasus.na.tcp")

    def __init__(self, uri: str = "tcp://127.0.0.1:0", listen: bool = False,
                 **options: int) -> None:
        super().__init__(TcpTransport(uri), listen, **options)
