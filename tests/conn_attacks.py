"""Peers that hold a server's resources, for tests/test_conn_limits.py and bench/conn_limits.py:
raw sockets speaking petasus' frames (or half of one), the server process they attack
(tests/limits_peer.py) and the good client that must still be served.

Nothing here waits without a timeout: every socket has one, and every loop a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from limits_peer import add, blob, na_stats

from petasus import hg
from petasus.hg import header as hd
from petasus.na import framing as fr

HERE = Path(__file__).parent
TIMEOUT = 20.0


class Server:
    """tests/limits_peer.py in its own process: the server under attack."""

    def __init__(self, uri: str, **options: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "limits_peer.py"), uri, json.dumps(options)],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("listening on "):
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            raise RuntimeError(f"limits_peer.py did not start: {line!r}")
        self.uri = line.split()[-1]
        self.pid = self.proc.pid

    def rss_kib(self) -> int:
        """The server's resident memory (VmRSS), from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                with GoodClient(self.uri) as client:
                    client.remote.shutdown()
                self.proc.wait(TIMEOUT)
            except (hg.RPCError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        self.proc.stdout.close()  # type: ignore[union-attr]

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GoodClient:
    """A well-behaved client; ``call()`` returns how long one RPC took."""

    def __init__(self, uri: str) -> None:
        self.engine = hg.Engine("sm://" if uri.startswith("sm") else "tcp://127.0.0.1:0",
                                timeout=TIMEOUT)
        self.engine.declare(add, na_stats)
        self.remote = self.engine.lookup(uri)

    def call(self) -> float:
        start = time.perf_counter()
        if self.remote.add.call(40, 2, timeout=TIMEOUT) != 42:
            raise AssertionError("the server answered add(40, 2) wrongly")
        return time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        return json.loads(self.remote.na_stats.call(timeout=TIMEOUT))  # type: ignore[no-any-return]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> GoodClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_connect(uri: str) -> socket.socket:
    """A plain socket to a tcp:// or sm:// listener, speaking nothing yet."""
    if uri.startswith("sm://"):
        from petasus.na.sm import runtime_dir

        pid, inst = uri.removeprefix("sm://").split("/")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(str(runtime_dir() / f"{pid}-{inst}.sock"))
        return sock
    host, port = uri.removeprefix("tcp://").rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT)


def hello(sock: socket.socket, scheme: str) -> None:
    """The handshake of a peer that does not listen."""
    me = (b"tcp://anonymous-%016x" % os.getpid()) if scheme == "tcp" else \
        f"sm://{os.getpid()}/9999".encode()
    sock.sendall(fr.encode_header(fr.HELLO, len(me)) + me)


HALF_HEADER = fr.encode_header(fr.HELLO, 40)[: fr.HEADER_SIZE // 2]


def request(tag: int, size: int = 1024) -> bytes:
    """One blob(size) request frame (36 B asking for a ``size`` B reply), answered on
    ``tag``."""
    body = hd.REQUEST.pack(hd.IDENTIFIER, hd.PROTOCOL, hd.rpc_id(blob.name), 0, 0) + \
        struct.pack("!I", size)
    return fr.encode_header(fr.UNEXPECTED, len(body), tag=tag) + body


def wait_closed(sock: socket.socket, timeout: float = TIMEOUT) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping whatever it sends);
    TimeoutError if it is still open after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the server kept the connection open for {timeout} s")
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            continue


def serve_until_closed(good: GoodClient, sock: socket.socket,
                       timeout: float = TIMEOUT) -> float:
    """Call the server with ``good`` until it closes ``sock``; the worst call's latency.
    A good client that keeps calling is never the one closed as idle."""
    deadline = time.monotonic() + timeout
    worst = 0.0
    sock.setblocking(False)
    while time.monotonic() < deadline:
        worst = max(worst, good.call())
        try:
            if not sock.recv(65536):
                return worst
        except BlockingIOError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return worst
    raise TimeoutError(f"the server kept the connection open for {timeout} s")


def open_many(uri: str, count: int, first: bytes = HALF_HEADER) -> list[socket.socket]:
    """``count`` connections that each sent ``first`` and then nothing."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = raw_connect(uri)
            socks.append(sock)
            if first:
                sock.sendall(first)
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def raise_nofile(need: int) -> None:
    """Let this process hold ``need`` descriptors (up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
