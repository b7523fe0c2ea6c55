"""The raw limits every bandwidth benchmark is set against, measured in the same run: a
busy-polled loopback socket stream, process_vm_readv, and memcpy."""

from __future__ import annotations

import os
import socket
import struct

from _common import child, emit, timed, touched

from petasus.na import _pvm


def raw_stream(bench: str, sizes: list[int]) -> None:
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # unpinned: default placement
    with child("_raw_peer.py", "stream") as (_proc, port):
        sock = socket.create_connection(("127.0.0.1", int(port)))
        dest = memoryview(touched(64 << 20))
        for size in sizes:
            def run(size: int = size) -> int:
                total = max(size, 256 << 20)
                sock.sendall(struct.pack("<QQ", total, size))
                # Land every message in the same `size` bytes, as a get of `size` does.
                region = dest[:size]
                left = total
                sock.setblocking(False)
                while left:
                    pos = (total - left) % size
                    try:
                        left -= sock.recv_into(region[pos: pos + min(left, size - pos)])
                    except BlockingIOError:
                        os.sched_yield()
                sock.setblocking(True)
                return total
            emit(bench, "raw", "socket-stream", size, 1, timed(run) / 1e9, "GB/s")
        sock.close()


def raw_pvm(bench: str, sizes: list[int]) -> None:
    with child("_raw_peer.py", "pvm", str(64 << 20)) as (_proc, line):
        pid, addr = map(int, line.split())
        dest = memoryview(touched(64 << 20))
        for size in (*sizes, 64 << 20):
            def run(size: int = size) -> int:
                _pvm.transfer(False, pid, dest[:size], addr)
                return size
            emit(bench, "raw", "process_vm_readv", size, 1, timed(run, 0.3) / 1e9, "GB/s")


def raw_memcpy(bench: str) -> None:
    size = 64 << 20
    src, dst = memoryview(touched(size)), memoryview(touched(size))

    def run() -> int:
        dst[:] = src
        return size
    emit(bench, "raw", "memcpy", size, 1, timed(run) / 1e9, "GB/s")
