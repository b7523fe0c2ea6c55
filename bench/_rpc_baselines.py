"""RPC baselines: ``sum(x, y)`` over gRPC (blocking stub and grpc.aio), ZeroMQ, Pyro5 and
aio-msgpack-rpc, measured by the same drivers (``_drive``) as petasus's own rows, so that they
are an off-the-shelf yardstick taken on the same (shared, noisy) machine in the same run.

    python bench/_rpc_baselines.py [--json]

Every peer is driven the fastest way its documentation allows a normal call to be made, for
each pattern (a baseline that flatters us would be a defect):

- pyzmq: one DEALER socket against a ROUTER, msgpack payloads; the window keeps N requests
  queued on the socket and sends one as each reply is read (replies come back in order). One
  frame per message (the REQ-style empty delimiter frame halved its rate at 16 in flight),
  copying receives on the server (zero-copy frames pay off above ~10 KB only);
  pyzmq-ipc is the same over a Unix socket (``ipc://``), ZeroMQ's fastest transport between
  processes of one host: the peer of the sm plugin;
- grpcio blocking: one channel, a generic bytes method (no protobuf codegen), ``stub(...)`` at
  one in flight and ``stub.future(...)`` beyond, waited on oldest first; grpc.aio: N tasks
  awaiting calls on one channel (window) or N calls gathered (burst). Both clients run against
  the thread-pool server and the grpc.aio server (records say which: ``server``); the summary
  takes the fastest pair;
- Pyro5: marshal serializer and TCP_NODELAY (its fast settings); a proxy serves one thread, so
  N calls in flight are N threads with a proxy each (window) or a pool of N such threads
  (burst). Batch proxies and one-way calls are left out: they are not a normal call (a batch
  is one request carrying many calls, a one-way call has no answer);
- aio-msgpack-rpc: one connection, N tasks awaiting ``client.call`` (window) or N calls
  gathered (burst), no per-call timeout (its ``wait_for`` timer would be a cost of ours).

Rows are ``bench="rpc" op="sum" size=8`` with ``api``, ``client`` (the pattern's code, in
words), ``pattern``, ``placement`` and the CPU microseconds per call of each side.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import msgpack
import zmq
from _common import child, emit
from _drive import (
    Sample,
    aburst,
    ameasure,
    args,
    awindow,
    burst,
    check,
    measure,
    serial,
    threads_burst,
    threads_window,
    window,
)

REQ = struct.Struct("!ii")
RES = struct.Struct("!i")
PATH = "/bench.Sum/Sum"
GRPC_SERVERS = {"grpc-sync": "grpc.server (thread pool)", "grpc-aio": "grpc.aio.server"}
WARMUP = 0.05  # seconds of calls before each client's first measurement
TIMEOUT = 5.0  # seconds any single wait may take before the run fails
Point = tuple[str, int]  # (pattern, calls in flight)


def report(plugin: str, api: str, client: str, pattern: str, conc: int, placement: str,
           sample: Sample, **extra: Any) -> None:
    fields = sample.fields()
    emit(bench="rpc", plugin=plugin, op="sum", size=8, concurrency=conc,
         value=fields.pop("value"), unit="ops/s", **fields, api=api, client=client,
         pattern=pattern, placement=placement, **extra)


def run_blocking(pid: int, points: list[Point], seconds: float,
                 one: Callable[[int], None], send: Callable[[int], Any],
                 wait: Callable[[Any, int], None],
                 emit_point: Callable[[str, int, Sample], None]) -> None:
    """Measure a blocking client at each point: ``one(i)`` at one in flight, ``send``/``wait``
    (answers in send order) beyond."""
    serial(one, WARMUP)
    for pattern, conc in points:
        if conc == 1:
            sample = measure(pid, lambda: serial(one, seconds))
        else:
            drive = window if pattern == "window" else burst
            sample = measure(pid, lambda d=drive, c=conc: d(send, wait, c, seconds))
        emit_point(pattern, conc, sample)


async def run_async(pid: int, points: list[Point], seconds: float,
                    call: Callable[[int], Any],
                    emit_point: Callable[[str, int, Sample], None]) -> None:
    """Measure an asyncio client at each point: tasks awaiting ``call(i)``."""
    await awindow(call, 1, WARMUP)
    for pattern, conc in points:
        drive = awindow if pattern == "window" or conc == 1 else aburst
        sample = await ameasure(pid, lambda d=drive, c=conc: d(call, c, seconds))
        emit_point(pattern, conc, sample)


def unpack_result(data: bytes) -> int:
    return RES.unpack(data)[0]


# -- gRPC -------------------------------------------------------------------------------------
def bench_grpc_sync(points: list[Point], seconds: float, placement: str,
                    cpu: int | None, server: str = "grpc-sync") -> None:
    with child("_rpc_peer_baselines.py", server, cpu=cpu) as (proc, addr), \
            grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        # Requests go out as ready-made bytes (no request serializer).
        stub = channel.unary_unary(PATH, request_serializer=None,
                                   response_deserializer=unpack_result)

        def one(i: int) -> None:
            check(stub(REQ.pack(*args(i)), timeout=TIMEOUT), i)

        def send(i: int) -> Any:
            return stub.future(REQ.pack(*args(i)), timeout=TIMEOUT)

        def wait(future: Any, i: int) -> None:
            check(future.result(), i)  # the call's deadline bounds this wait

        def emit_point(pattern: str, conc: int, sample: Sample) -> None:
            client = "stub()" if conc == 1 else "stub.future(), oldest first"
            report("grpcio", "blocking", client, pattern, conc, placement, sample,
                   server=GRPC_SERVERS[server])

        run_blocking(proc.pid, points, seconds, one, send, wait, emit_point)


def bench_grpc_aio(points: list[Point], seconds: float, placement: str,
                   cpu: int | None, server: str = "grpc-aio") -> None:
    async def run(pid: int, addr: str) -> None:
        async with grpc.aio.insecure_channel(addr) as channel:
            await asyncio.wait_for(channel.channel_ready(), TIMEOUT)
            stub = channel.unary_unary(PATH, request_serializer=None,
                                       response_deserializer=unpack_result)

            async def call(i: int) -> None:
                check(await stub(REQ.pack(*args(i)), timeout=TIMEOUT), i)

            def emit_point(pattern: str, conc: int, sample: Sample) -> None:
                client = "N tasks awaiting stub()" if pattern == "window" else "gather(N stub())"
                report("grpcio", "asyncio", client, pattern, conc, placement, sample,
                       server=GRPC_SERVERS[server])

            await run_async(pid, points, seconds, call, emit_point)

    with child("_rpc_peer_baselines.py", server, cpu=cpu) as (proc, addr):
        asyncio.run(run(proc.pid, addr))


# -- ZeroMQ -----------------------------------------------------------------------------------
def bench_zmq(points: list[Point], seconds: float, placement: str, cpu: int | None,
              transport: str = "tcp") -> None:
    """``transport="ipc"``: over a Unix socket, reported as ``pyzmq-ipc``."""
    kind, name = ("zmq-ipc", "pyzmq-ipc") if transport == "ipc" else ("zmq", "pyzmq")
    with child("_rpc_peer_baselines.py", kind, cpu=cpu) as (proc, endpoint):
        ctx = zmq.Context()
        sock: Any = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))  # zmq.Again instead of a hang
        sock.setsockopt(zmq.SNDTIMEO, int(TIMEOUT * 1000))
        sock.connect(endpoint)
        pack, unpack = msgpack.packb, msgpack.unpackb
        try:
            # One frame per message, no REQ-style empty delimiter: a DEALER needs none, and
            # the two-frame form measured at half the rate at 16 in flight on this VM.
            def send(i: int) -> None:
                sock.send(pack(args(i)))

            def wait(_token: None, i: int) -> None:
                # One connection to a single-threaded server: replies come back in order.
                check(unpack(sock.recv()), i)

            def one(i: int) -> None:
                send(i)
                wait(None, i)

            def emit_point(pattern: str, conc: int, sample: Sample) -> None:
                report(name, "blocking", "DEALER send/recv", pattern, conc, placement, sample)

            run_blocking(proc.pid, points, seconds, one, send, wait, emit_point)
        finally:
            sock.close()
            ctx.term()


# -- Pyro5 ------------------------------------------------------------------------------------
def bench_pyro5(points: list[Point], seconds: float, placement: str, cpu: int | None) -> None:
    import Pyro5.api
    from _rpc_peer_baselines import PYRO_OBJECT, pyro_configure

    pyro_configure()
    with child("_rpc_peer_baselines.py", "pyro5", cpu=cpu) as (proc, addr):
        uri = f"PYRO:{PYRO_OBJECT}@{addr}"
        proxies: list[Any] = []

        def make() -> Callable[[int], None]:
            proxy = Pyro5.api.Proxy(uri)
            proxy._pyroTimeout = TIMEOUT
            proxy._pyroBind()
            proxies.append(proxy)

            def call(i: int) -> None:
                check(proxy.sum(*args(i)), i)
            return call

        try:
            main = make()
            serial(main, WARMUP)
            local = threading.local()

            def pooled(i: int) -> None:
                call = getattr(local, "call", None)
                if call is None:
                    call = local.call = make()
                call(i)

            for pattern, conc in points:
                if conc == 1:
                    sample = measure(proc.pid, lambda: serial(main, seconds))
                    client = "proxy.sum()"
                elif pattern == "window":
                    sample = measure(proc.pid, lambda c=conc: threads_window(make, c, seconds))
                    client = "N threads, a proxy each"
                else:
                    with ThreadPoolExecutor(conc) as pool:
                        list(pool.map(pooled, range(conc * 4)))  # every thread has its proxy
                        sample = measure(proc.pid, lambda p=pool, c=conc:
                                         threads_burst(p, pooled, c, seconds))
                    client = "pool of N threads, a proxy each"
                report("Pyro5", "blocking", client, pattern, conc, placement, sample)
                for proxy in proxies[1:]:
                    proxy._pyroClaimOwnership()
                    proxy._pyroRelease()
                del proxies[1:]
        finally:
            for proxy in proxies:
                proxy._pyroClaimOwnership()
                proxy._pyroRelease()


# -- aio-msgpack-rpc --------------------------------------------------------------------------
def bench_aio_msgpack_rpc(points: list[Point], seconds: float, placement: str,
                          cpu: int | None) -> None:
    import aio_msgpack_rpc as amr

    async def run(pid: int, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        client = amr.Client(*await asyncio.open_connection(host, int(port)))
        try:
            async def call(i: int) -> None:
                check(await client.call("sum", *args(i)), i)

            def emit_point(pattern: str, conc: int, sample: Sample) -> None:
                how = "N tasks awaiting call()" if pattern == "window" else "gather(N call())"
                report("aio-msgpack-rpc", "asyncio", how, pattern, conc, placement, sample)

            await run_async(pid, points, seconds, call, emit_point)
        finally:
            client.close()

    with child("_rpc_peer_baselines.py", "aio-msgpack-rpc", cpu=cpu) as (proc, addr):
        asyncio.run(run(proc.pid, addr))


def baselines(every_server: bool) -> dict[str, Callable[..., None]]:
    """Each peer's runner; grpcio's two clients against its own kind of server, and with
    ``every_server`` against the other kind too (which pair is faster varies on this VM)."""
    out: dict[str, Callable[..., None]] = {
        "pyzmq": bench_zmq, "pyzmq-ipc": functools.partial(bench_zmq, transport="ipc"),
        "grpcio-blocking": bench_grpc_sync,
        "grpcio-asyncio": bench_grpc_aio, "Pyro5": bench_pyro5,
        "aio-msgpack-rpc": bench_aio_msgpack_rpc}
    if every_server:
        out["grpcio-blocking/aio-server"] = functools.partial(bench_grpc_sync,
                                                              server="grpc-aio")
        out["grpcio-asyncio/sync-server"] = functools.partial(bench_grpc_aio,
                                                              server="grpc-sync")
    return out


if __name__ == "__main__":
    for bench in baselines(True).values():
        bench([("window", 1), ("window", 16), ("burst", 16)], 0.3, "default", None)
