"""Bulk benchmark: pull and push bandwidth per plugin beside the raw limits and grpcio, the
eager/RMA crossover, and an RPC whose argument overflows into bulk.

    python bench/bulk.py [--json] [--quick] [--plot DIR]

"pull" copies from the peer's registered region into ours, "push" the other way; 1 and 16
transfers in flight. The raw limits (busy-polled socket stream, process_vm_readv, memcpy) and
grpcio moving the same bytes as one unary response are measured in the same run. The eager rows
time one RPC that carries a handle to S bytes, which the server pulls into memory it already
owns: "eager" carries the bytes inside the handle, "rma" sends the keys and the server pulls.
Every figure is the median of ROUNDS interleaved rounds; the ratios against the targets and the
crossover come last. ``--plot DIR`` draws bandwidth against size (``bulk-bandwidth.png``, petasus
beside the raw limits and grpcio) and keeps the rows it was drawn from (``bulk.jsonl``).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import _common
import grpc
from _bulk_peer import SIZE, consume, expose, take
from _common import child, emit, find, percentiles, ratio, summarize, timed, touched
from _raw import raw_memcpy, raw_pvm, raw_stream
from _rpc_peer_baselines import GRPC_LARGE

from petasus import bulk, hg

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
EAGER_SIZES = [1 << 10, 2 << 10, 4 << 10, 8 << 10, 16 << 10, 32 << 10, 48 << 10, 60 << 10,
               128 << 10, 256 << 10, 1 << 20]
PLUGINS = {"tcp": "tcp://127.0.0.1:0", "sm": "sm://", "ofi-tcp": "ofi+tcp://127.0.0.1:0",
           "ofi-shm": "ofi+shm://"}
B = "bulk"
MiB = 1 << 20


def unpinned() -> None:
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def bench_transfers(name: str, uri: str) -> None:
    with child("_bulk_peer.py", uri) as (_proc, address), hg.Engine(uri, timeout=60) as engine:
        engine.declare(expose, take, consume)
        region = engine.lookup(address).expose()
        with engine.bulk(touched(SIZE), bulk.READ_WRITE) as local:
            for direction in ("pull", "push"):
                move = local.pull_from if direction == "pull" else local.push_to
                for size in SIZES:
                    for conc in (1, 16):
                        def run(size: int = size, conc: int = conc, move: Any = move) -> int:
                            rounds = max(1, (32 * MiB) // (size * conc))
                            span = SIZE - size + 1
                            for _ in range(rounds):
                                transfers = [move(region, size, offset=(k * size) % span,
                                                  local_offset=(k * size) % span)
                                             for k in range(conc)]
                                for t in transfers:
                                    t.wait()
                            return rounds * size * conc
                        emit(B, name, direction, size, conc, timed(run, 0.3) / 1e9, "GB/s")


def bench_eager(name: str, uri: str) -> None:
    """One RPC carrying a handle the server pulls, per size, eager and not (handle made per
    call, as an application would)."""
    with child("_bulk_peer.py", uri) as (_proc, address), hg.Engine(uri, timeout=60) as engine:
        engine.declare(expose, take, consume)
        remote = engine.lookup(address)
        for size in EAGER_SIZES:
            data = bytes(touched(size))
            for mode in ("eager", "rma"):
                calls = 300 if size <= 64 << 10 else 100
                samples = []
                for i in range(calls + 30):
                    t0 = time.perf_counter_ns()
                    with engine.bulk(data, bulk.READ_ONLY, eager=mode == "eager") as handle:
                        remote.take(handle)
                    if i >= 30:
                        samples.append(time.perf_counter_ns() - t0)
                mean, p50, _p99 = percentiles(samples)
                emit(B, name, f"{mode}-take", size, 1, 1e6 / mean, "ops/s", p50_us=round(p50, 1))


def bench_overflow(name: str, uri: str) -> None:
    """An RPC with a 1 MiB bytes argument: it overflows the message and travels by bulk."""
    with child("_bulk_peer.py", uri) as (_proc, address), hg.Engine(uri, timeout=60) as engine:
        engine.declare(expose, take, consume)
        remote = engine.lookup(address)
        data = bytes(touched(MiB))

        def run() -> int:
            for _ in range(16):
                remote.consume(data)
            return 16 * MiB
        emit(B, name, "rpc-1MiB-arg", MiB, 1, timed(run, 0.3) / 1e9, "GB/s")


def bench_grpc() -> None:
    with child("_rpc_peer_baselines.py", "grpc-bytes") as (_proc, addr), \
            grpc.insecure_channel(addr, options=GRPC_LARGE) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        get = channel.unary_unary("/bench.Bytes/Get")
        put = channel.unary_unary("/bench.Bytes/Put")
        for size in SIZES[2:]:
            def run(size: int = size) -> int:
                rounds = max(1, (32 * MiB) // size)
                for _ in range(rounds):
                    if len(get(struct.pack("!Q", size), timeout=30)) != size:
                        raise RuntimeError("grpc Get returned the wrong size")
                return rounds * size
            emit(B, "grpcio", "get", size, 1, timed(run, 0.3) / 1e9, "GB/s")
        data = bytes(MiB)

        def put_run() -> int:
            for _ in range(16):
                put(data, timeout=30)
            return 16 * MiB
        emit(B, "grpcio", "rpc-1MiB-arg", MiB, 1, timed(put_run, 0.3) / 1e9, "GB/s")


KEYS = ("plugin", "op", "size", "concurrency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON record per line")
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write a PNG plot there")
    opts = parser.parse_args()
    _common.JSON = opts.json
    rounds = 1 if opts.quick else 3
    _common.QUIET = True
    unpinned()
    for _round in range(rounds):
        raw_memcpy(B)
        # From 64 KiB up, so that the picture has a limit beside each of petasus's points
        # but the smallest (the ratios use 1 and 16 MiB).
        raw_pvm(B, SIZES[1:4])
        raw_stream(B, SIZES[1:])
        bench_grpc()
        for name, uri in PLUGINS.items():
            bench_transfers(name, uri)
            bench_eager(name, uri)
            bench_overflow(name, uri)
    summarize(B, KEYS)

    for size in SIZES[2:4]:
        for conc in (1, 16):
            pulls = {n: find(bench=B, plugin=n, op="pull", size=size, concurrency=conc)
                     for n in PLUGINS}
            for n, raw in (("tcp", "socket-stream"), ("ofi-tcp", "socket-stream"),
                           ("sm", "process_vm_readv"), ("ofi-shm", "process_vm_readv")):
                ratio(B, f"{n}-pull-vs-{raw}", pulls[n],
                      find(bench=B, plugin="raw", op=raw, size=size), 0.8)
            for n in PLUGINS:
                ratio(B, f"{n}-pull-vs-grpcio", pulls[n],
                      find(bench=B, plugin="grpcio", op="get", size=size), 2.5)
    for n, uri in PLUGINS.items():
        ratio(B, f"{n}-rpc-1MiB-arg-vs-grpcio", find(bench=B, plugin=n, op="rpc-1MiB-arg"),
              find(bench=B, plugin="grpcio", op="rpc-1MiB-arg"), 1.0)
        # The crossover: the largest size up to which carrying the bytes is still faster.
        faster = [s for s in EAGER_SIZES
                  if (e := find(bench=B, plugin=n, op="eager-take", size=s)) and
                  (r := find(bench=B, plugin=n, op="rma-take", size=s)) and
                  e["value"] >= r["value"]]
        below = [s for s in faster if all(s2 in faster for s2 in EAGER_SIZES if s2 <= s)]
        with hg.Engine(uri) as engine:
            limit = bulk.eager_limit(engine.na)
        emit(B, n, "eager-crossover", max(below, default=0), 1, max(below, default=0), "bytes",
             default_limit=limit)
    if opts.plot:
        import _plot

        for path in _plot.bulk(_common.RESULTS, opts.plot, f"{rounds} round(s), median"):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
