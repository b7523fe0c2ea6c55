"""RPC baselines: ``sum(x, y)`` over plain gRPC (sync and asyncio) and over ZeroMQ, measured
the way petasus's own RPC benchmark is, so its rows have an off-the-shelf yardstick taken on the
same (shared, noisy) machine in the same run.

    python bench/_rpc_baselines.py [--json]

Each function starts its server with ``child("_rpc_peer_baselines.py", KIND, cpu=cpu)``; the
client itself is pinned (or not) by the caller, as na.py's ``pinned()`` does. Rows are
``bench="rpc" op="sum" size=8`` (the two int32 arguments) at concurrency 1 and 16.

Latencies: at concurrency 1 one sample is one call. At concurrency 16 one sample is one batch
(16 calls issued together, all awaited), not divided by 16: it is the time each call of the
batch spent in flight, which is what a caller with 16 outstanding calls sees per call.
ops/s is calls per second over the whole measured loop (16 * batches / elapsed at 16).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import msgpack
import zmq
from _common import child, emit, percentiles

REQ = struct.Struct("!ii")
RES = struct.Struct("!i")
PATH = "/bench.Sum/Sum"
WARMUP = 200  # calls before measuring
TIMEOUT = 5.0  # seconds any single wait may take before the run fails


def request(i: int, k: int) -> tuple[int, int]:
    """Arguments of call ``k`` of round ``i``: distinct, and their sum stays within int32."""
    return i % 1_000_000, k


def report(plugin: str, api: str, placement: str, conc: int, samples: list[int],
           elapsed: float) -> None:
    _mean, p50, p99 = percentiles(samples)
    emit(bench="rpc", plugin=plugin, op="sum", size=8, concurrency=conc,
         value=conc * len(samples) / elapsed, unit="ops/s", p50_us=round(p50, 2),
         p99_us=round(p99, 2), api=api, placement=placement)


def drive(step: Callable[[int], None], conc: int, rounds: int) -> tuple[list[int], float]:
    """Run ``step(i)`` (one call, or one batch of ``conc``) for ``rounds`` calls after warm-up;
    return per-step nanoseconds and the elapsed seconds of the measured loop."""
    for i in range(max(1, WARMUP // conc)):
        step(i)
    samples = []
    start = time.perf_counter()
    for i in range(max(1, rounds // conc)):
        t0 = time.perf_counter_ns()
        step(i)
        samples.append(time.perf_counter_ns() - t0)
    return samples, time.perf_counter() - start


async def adrive(step: Callable[[int], Awaitable[None]], conc: int,
                 rounds: int) -> tuple[list[int], float]:
    """``drive`` for coroutine steps."""
    for i in range(max(1, WARMUP // conc)):
        await step(i)
    samples = []
    start = time.perf_counter()
    for i in range(max(1, rounds // conc)):
        t0 = time.perf_counter_ns()
        await step(i)
        samples.append(time.perf_counter_ns() - t0)
    return samples, time.perf_counter() - start


def check(got: int, x: int, y: int) -> None:
    if got != x + y:
        raise RuntimeError(f"sum({x}, {y}) returned {got}")


def unpack_result(data: bytes) -> int:
    return RES.unpack(data)[0]


# -- gRPC -------------------------------------------------------------------------------------
def bench_grpc_sync(rounds: int, placement: str, cpu: int | None) -> None:
    with child("_rpc_peer_baselines.py", "grpc-sync", cpu=cpu) as (_proc, addr), \
            grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        # Requests go out as ready-made bytes (no request serializer).
        stub = channel.unary_unary(PATH, request_serializer=None,
                                   response_deserializer=unpack_result)

        def one(i: int) -> None:
            x, y = request(i, 0)
            check(stub(REQ.pack(x, y), timeout=TIMEOUT), x, y)

        def batch(i: int) -> None:
            args = [request(i, k) for k in range(16)]
            futures = [stub.future(REQ.pack(x, y), timeout=TIMEOUT) for x, y in args]
            for fut, (x, y) in zip(futures, args):
                check(fut.result(), x, y)  # the call's deadline bounds this wait

        for conc, step in ((1, one), (16, batch)):
            report("grpcio", "sync", placement, conc, *drive(step, conc, rounds))


def bench_grpc_aio(rounds: int, placement: str, cpu: int | None) -> None:
    async def run(addr: str) -> None:
        async with grpc.aio.insecure_channel(addr) as channel:
            await asyncio.wait_for(channel.channel_ready(), TIMEOUT)
            stub = channel.unary_unary(PATH, request_serializer=None,
                                       response_deserializer=unpack_result)

            async def call(x: int, y: int) -> None:
                check(await stub(REQ.pack(x, y), timeout=TIMEOUT), x, y)

            async def one(i: int) -> None:
                await call(*request(i, 0))

            async def batch(i: int) -> None:
                await asyncio.gather(*(call(*request(i, k)) for k in range(16)))

            for conc, step in ((1, one), (16, batch)):
                report("grpcio", "asyncio", placement, conc, *await adrive(step, conc, rounds))

    with child("_rpc_peer_baselines.py", "grpc-aio", cpu=cpu) as (_proc, addr):
        asyncio.run(run(addr))


# -- ZeroMQ -----------------------------------------------------------------------------------
def bench_zmq(rounds: int, placement: str, cpu: int | None) -> None:
    with child("_rpc_peer_baselines.py", "zmq", cpu=cpu) as (_proc, addr):
        ctx = zmq.Context()
        sock: Any = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))  # zmq.Again instead of a hang
        sock.setsockopt(zmq.SNDTIMEO, int(TIMEOUT * 1000))
        sock.connect(f"tcp://{addr}")
        try:
            def send(x: int, y: int) -> None:
                # Empty delimiter first, as REQ would: the ROUTER sees [identity, b"", payload].
                sock.send_multipart([b"", msgpack.packb([x, y])])

            def recv() -> int:
                return msgpack.unpackb(sock.recv_multipart()[-1])

            def one(i: int) -> None:
                x, y = request(i, 0)
                send(x, y)
                check(recv(), x, y)

            def batch(i: int) -> None:
                args = [request(i, k) for k in range(16)]
                for x, y in args:
                    send(x, y)
                # One connection to a single-threaded server: replies come back in order.
                for x, y in args:
                    check(recv(), x, y)

            for conc, step in ((1, one), (16, batch)):
                report("pyzmq", "sync", placement, conc, *drive(step, conc, rounds))
        finally:
            sock.close()
            ctx.term()


if __name__ == "__main__":
    for bench in (bench_grpc_sync, bench_grpc_aio, bench_zmq):
        bench(2000, "default", None)
