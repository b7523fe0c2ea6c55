"""NA benchmark: message round trips and RMA bandwidth per plugin, beside the raw limits.

    python bench/na.py [--json] [--quick]

Every measurement is taken in each of ROUNDS interleaved rounds and reported as its median
(rounds=N in the row). Everything runs in one invocation so the ratios at the end compare
numbers taken on the same (shared, noisy) machine minutes apart, not days apart. Message round
trips run with the default placement and with both ends pinned to one CPU; "spin" is the
progress spin budget of both ends.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

import _common
from _common import child, emit, find, percentiles, ratio, summarize, timed, touched
from _raw import raw_memcpy, raw_pvm, raw_stream

from petasus import na

QUICK = "--quick" in sys.argv
MSGS = 2000 if QUICK else 10000
MSG = 64
SIZES = [4096, 64 << 10, 1 << 20, 16 << 20]
PLUGINS = {"tcp": "tcp://127.0.0.1:0", "sm": "sm://", "ofi-tcp": "ofi+tcp://127.0.0.1:0",
           "ofi-shm": "ofi+shm://"}
B = "na"


def pinned(flag: bool) -> int | None:
    if flag:
        os.sched_setaffinity(0, {0})
        return 0
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return None


# -- raw limits -------------------------------------------------------------------------------
def raw_pingpong(mode: str, placement: str) -> None:
    cpu = pinned(placement == "pinned")
    with child("_raw_peer.py", "pingpong", mode, cpu=cpu) as (_proc, port):
        sock = socket.create_connection(("127.0.0.1", int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload, buf = b"x" * MSG, bytearray(MSG)
        spin = mode == "spin"
        if spin:
            sock.setblocking(False)
        samples = []
        for i in range(MSGS + 200):
            t0 = time.perf_counter_ns()
            sock.send(payload)
            got = 0
            while got < MSG:
                try:
                    got += sock.recv_into(buf)
                except BlockingIOError:
                    os.sched_yield()
            if i >= 200:
                samples.append(time.perf_counter_ns() - t0)
        sock.close()
    report_latency("raw", f"pingpong-{mode}", samples, 1, placement=placement)


def report_latency(plugin: str, op: str, samples: list[int], conc: int, **extra: object) -> None:
    mean, p50, p99 = percentiles(samples)
    emit(B, plugin, op, MSG, conc, conc * 1e6 / mean, "ops/s", p50_us=round(p50, 2),
         p99_us=round(p99, 2), **extra)


# -- plugins ----------------------------------------------------------------------------------
def plugin_messages(name: str, uri: str, spin_us: int, placement: str) -> None:
    cpu = pinned(placement == "pinned")
    with child("_na_peer.py", uri, str(spin_us), cpu=cpu) as (_proc, line):
        peer_uri = line.split()[0]
        plugin = na.initialize(uri, spin_us=spin_us)
        addr = plugin.addr_lookup(peer_uri)
        payload = bytes(MSG)
        for conc in (1, 16):
            bufs = [bytearray(MSG) for _ in range(conc)]
            samples = []
            for i in range(MSGS // conc + 50):
                t0 = time.perf_counter_ns()
                ops = []
                for k in range(conc):
                    ops.append(plugin.msg_recv_expected(addr, bufs[k], k))
                    ops.append(plugin.msg_send_unexpected(addr, payload, k))
                for op in ops:
                    while not op.done:
                        plugin.progress(1.0)
                        plugin.trigger()
                    if op.error is not None:
                        raise op.error
                if i >= 50:
                    samples.append(time.perf_counter_ns() - t0)
            report_latency(name, "msg-roundtrip", samples, conc, spin_us=spin_us,
                           placement=placement)
        plugin.close()


def plugin_rma(name: str, uri: str) -> None:
    pinned(False)
    with child("_na_peer.py", uri, "200") as (_proc, line):
        peer_uri, handle_hex = line.split()
        plugin = na.initialize(uri)
        addr = plugin.addr_lookup(peer_uri)
        remote = plugin.mem_handle_deserialize(bytes.fromhex(handle_hex))
        local_buf = touched(64 << 20)
        local = plugin.mem_register(local_buf, na.Access.READ_WRITE)
        for op_name in ("get", "put"):
            call = getattr(plugin, op_name)
            for size in SIZES:
                for conc in (1, 4):
                    def run(size: int = size, conc: int = conc, call: Any = call) -> int:
                        rounds = max(1, (32 << 20) // (size * conc))
                        for _ in range(rounds):
                            ops = [call(local, (k * size) % (48 << 20), remote,
                                        (k * size) % (48 << 20), size, addr)
                                   for k in range(conc)]
                            for op in ops:
                                while not op.done:
                                    plugin.progress(1.0)
                                    plugin.trigger()
                                op.result()
                        return rounds * size * conc
                    emit(B, name, op_name, size, conc, timed(run, 0.3) / 1e9, "GB/s")
        plugin.close()


ROUNDS = 1 if QUICK else 3
KEYS = ("plugin", "op", "size", "concurrency", "spin_us", "placement")


def main() -> None:
    _common.QUIET = True
    for _round in range(ROUNDS):
        raw_memcpy(B)
        raw_pvm(B, SIZES[2:])
        raw_stream(B, SIZES[2:])
        for placement in ("default", "pinned"):
            raw_pingpong("block", placement)
            raw_pingpong("spin", placement)
            for name, uri in PLUGINS.items():
                for spin_us in (200, 0):
                    plugin_messages(name, uri, spin_us, placement)
        for name, uri in PLUGINS.items():
            plugin_rma(name, uri)
    pinned(False)
    summarize(B, KEYS)

    for name in PLUGINS:
        for placement in ("default", "pinned"):
            # Round-trip time ratio (target <= 3x) = raw rate / our rate.
            ratio(B, f"rtt-vs-raw-spin-pingpong[{placement}]",
                  find(bench=B, plugin="raw", op="pingpong-spin", placement=placement),
                  find(bench=B, plugin=name, op="msg-roundtrip", concurrency=1, spin_us=200,
                       placement=placement),
                  3.0, higher_is_better=False, plugin=name)
    # The same raw limits the bulk benchmark uses (bench/bulk.py): per plugin, its transport's.
    limits = {"tcp": "socket-stream", "ofi-tcp": "socket-stream",
              "sm": "process_vm_readv", "ofi-shm": "process_vm_readv"}
    for name, raw in limits.items():
        for size in SIZES[2:]:
            for conc in (1, 4):
                ratio(B, f"{name}-get-vs-{raw}",
                      find(bench=B, plugin=name, op="get", size=size, concurrency=conc),
                      find(bench=B, plugin="raw", op=raw, size=size), 0.8)


if __name__ == "__main__":
    main()
