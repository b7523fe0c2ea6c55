"""Raw baselines' far end: a socket echo (blocking or busy-polled), a socket streamer, and a
process holding a buffer for process_vm_readv. First stdout line: where to reach it."""

from __future__ import annotations

import os
import socket
import struct
import sys

from _common import pin_from_env, touched


def pingpong(mode: str) -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], flush=True)
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(65536)
    if mode == "spin":
        conn.setblocking(False)
    while True:
        try:
            n = conn.recv_into(buf)
        except BlockingIOError:
            os.sched_yield()
            continue
        if n == 0:
            return
        conn.sendall(memoryview(buf)[:n])


def stream() -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], flush=True)
    conn, _ = lsock.accept()
    chunk = memoryview(touched(16 << 20))
    header = bytearray(16)
    while True:
        view = memoryview(header)
        while view:
            n = conn.recv_into(view)
            if n == 0:
                return
            view = view[n:]
        total, size = struct.unpack("<QQ", header)
        # Busy-polled like the plugins' progress loops: a blocking sender pays a wake-up each
        # time the socket buffer fills, which would flatter everything compared with it.
        conn.setblocking(False)
        while total > 0:
            view = chunk[: min(size, total)]
            while view:
                try:
                    n = conn.send(view)
                except BlockingIOError:
                    os.sched_yield()
                    continue
                view = view[n:]
                total -= n
        conn.setblocking(True)


def pvm(size: int) -> None:
    from petasus.na import _pvm

    buf = touched(size)
    print(os.getpid(), _pvm.buffer_address(memoryview(buf)), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    pin_from_env()
    {"pingpong": lambda: pingpong(sys.argv[2]), "stream": stream,
     "pvm": lambda: pvm(int(sys.argv[2]))}[sys.argv[1]]()
