"""RPC benchmark: petasus sum(x, y) beside pyzmq, grpcio, Pyro5 and aio-msgpack-rpc, in one run.

    python bench/rpc.py [--json] [--quick] [--pin same|split] [--plot DIR]
                        [--only REGEX] [--conc 1,16] [--rounds N] [--seconds S] [--hog 0,1]

Every system is measured with the same drivers (``_drive``) at 1 to 32 calls in flight, both
as a sliding window (a new call sent as each returns) and as bursts (N sent, N awaited), each
driven the fastest way its API offers (``_rpc_baselines`` says how for the peers). petasus runs
over tcp and sm with the blocking API (``remote.sum()`` at one in flight; beyond that both
``forward`` with a completion callback that sends the next call, and handles from
``remote.sum.future()`` waited on oldest first) and with the asyncio API (N tasks awaiting
``remote.sum.async_()``, or N of them gathered), and that asyncio API again on uvloop's loop
(``api="asyncio-uvloop"``, tcp at 1 and 16, when uvloop is installed); spin 200 us, and spin 0
(always block) at 1 and 16 in flight; ofi+tcp and ofi+shm at 1 and 16. Records carry ``api``,
``client``, ``pattern``, ``placement`` and the CPU microseconds per call of the client and of
the server process (all threads).

Placement: by default every configuration runs unpinned, and petasus tcp and pyzmq at one in
flight run again with both ends pinned to one CPU (``placement="same"``); ``--pin same`` (or
``split``: client on CPU 0, server on CPU 1) runs every configuration that way instead.

Each configuration is measured in each of ROUNDS interleaved rounds and reported as its
median, so a burst of noise on this shared 2-core VM cannot decide a ratio. The ratios come
last: per in-flight count, petasus tcp's best row against the best row of the best peer.
``--plot DIR`` writes the rate and CPU pictures (``rpc-rate.png``, ``rpc-cpu.png``) and the
rows they were drawn from (``rpc.jsonl``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common
from _common import child, pin_process, ratio, summarize
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
    window,
)
from _rpc_baselines import WARMUP, Point, baselines, report
from _rpc_peer import sum as sum_rpc
from _rpc_petasus import callback_burst, callback_window

from petasus import hg

B = "rpc"
SWEEP = (1, 2, 4, 8, 16, 32)
PEERS = ("pyzmq", "grpcio", "Pyro5", "aio-msgpack-rpc")
# Where each end runs: (client CPUs, server CPU); None is wherever the kernel puts it.
PLACEMENTS: dict[str, tuple[set[int] | None, int | None]] = {
    "default": (None, None), "same": ({0}, 0), "split": ({0}, 1)}
KEYS = ("plugin", "op", "size", "concurrency", "api", "client", "pattern", "placement",
        "spin_us", "server")


def points(concs: tuple[int, ...]) -> list[Point]:
    """Window at every count, burst above one (at one in flight they are the same loop)."""
    return [("window", c) for c in concs] + [("burst", c) for c in concs if c > 1]


# -- petasus ---------------------------------------------------------------------------------
def bench_petasus(name: str, uri: str, spin_us: int, api: str, plan: list[Point],
                  seconds: float, placement: str, cpu: int | None) -> None:
    extra = {"spin_us": spin_us}
    with child("_rpc_peer.py", uri, str(spin_us), cpu=cpu) as (proc, address), \
            hg.Engine(uri, spin_us=spin_us) as engine:
        engine.declare(sum_rpc)
        method = engine.lookup(address).sum
        pid = proc.pid
        if api == "asyncio":
            asyncio.run(petasus_async(name, method, plan, seconds, placement, pid, extra))
            return
        if api == "asyncio-uvloop":
            import uvloop

            uvloop.run(petasus_async(name, method, plan, seconds, placement, pid, extra,
                                     api))
            return

        def one(i: int) -> None:
            check(method(*args(i)), i)

        def wait(handle: hg.Handle, i: int) -> None:
            check(engine.wait(handle), i)

        def send(i: int) -> hg.Handle:
            return method.future(*args(i))

        serial(one, WARMUP)
        for pattern, conc in plan:
            if conc == 1:
                sample = measure(pid, lambda: serial(one, seconds))
                report(name, "blocking", "remote.sum()", pattern, 1, placement, sample, **extra)
                continue
            drive: Callable[..., list[int]] = callback_window if pattern == "window" else \
                callback_burst
            sample = measure(pid, lambda d=drive, c=conc: d(engine, method, c, seconds))
            report(name, "blocking", "forward + callback", pattern, conc, placement, sample,
                   **extra)
            ordered = window if pattern == "window" else burst
            sample = measure(pid, lambda d=ordered, c=conc: d(send, wait, c, seconds))
            report(name, "blocking", "future(), oldest first", pattern, conc, placement,
                   sample, **extra)


async def petasus_async(name: str, method: hg.RemoteMethod, plan: list[Point], seconds: float,
                        placement: str, pid: int, extra: dict[str, Any],
                        api: str = "asyncio") -> None:
    async def call(i: int) -> None:
        check(await method.async_(*args(i)), i)

    await awindow(call, 1, WARMUP)
    for pattern, conc in plan:
        if pattern == "window" or conc == 1:
            sample: Sample = await ameasure(pid, lambda c=conc: awindow(call, c, seconds))
            client = "await async_()" if conc == 1 else "N tasks awaiting async_()"
        else:
            sample = await ameasure(pid, lambda c=conc: aburst(call, c, seconds))
            client = "gather(N async_())"
        report(name, api, client, pattern, conc, placement, sample, **extra)


# -- the plan ---------------------------------------------------------------------------------
def configs(quick: bool, pin: str | None, concs: tuple[int, ...] | None = None
            ) -> list[tuple[str, Callable[[float], None]]]:
    """(label, run(seconds)) for one round, placements applied by ``run`` itself; ``concs``
    limits the in-flight counts."""
    sweep = SWEEP if concs is None else tuple(c for c in SWEEP if c in concs)
    short = tuple(c for c in (1, 16) if concs is None or c in concs)
    out: list[tuple[str, Callable[[float], None]]] = []

    def placed(placement: str, fn: Callable[[float, str, int | None], None]
               ) -> Callable[[float], None]:
        client_cpus, server_cpu = PLACEMENTS[placement]

        def run(seconds: float) -> None:
            pin_process(client_cpus)
            try:
                fn(seconds, placement, server_cpu)
            finally:
                pin_process(None)
        return run

    def petasus(name: str, uri: str, spin: int, api: str, plan: list[Point],
                placement: str) -> None:
        out.append((f"petasus {name} {api} spin={spin} {placement}", placed(
            placement, lambda s, p, c: bench_petasus(name, uri, spin, api, plan, s, p, c))))

    main = pin or "default"
    for api in ("blocking", "asyncio"):
        petasus("tcp", "tcp://127.0.0.1:0", 200, api, points(sweep), main)
        petasus("sm", "sm://", 200, api, points(short if quick else sweep), main)
        if not quick:
            petasus("tcp", "tcp://127.0.0.1:0", 0, api, points(short), main)
        for name, uri in (("ofi-tcp", "ofi+tcp://127.0.0.1:0"), ("ofi-shm", "ofi+shm://")):
            petasus(name, uri, 200, api, [("window", 1), ("window", 16)] if quick else
                    points(short), main)
    if _have("uvloop"):
        # The same asyncio API on uvloop's loop (which hides its ready queue, so calls there
        # always wait through a future: AsyncioDriver.inline never runs).
        petasus("tcp", "tcp://127.0.0.1:0", 200, "asyncio-uvloop", points(short), main)
    theirs = [(f"{peer} {main}", placed(main, lambda s, p, c, b=bench: b(points(sweep), s, p, c)))
              for peer, bench in baselines(every_server=not quick).items()]
    if pin is None:
        # Both ends on one CPU: a spinning client must not starve its co-located server.
        for api in ("blocking", "asyncio"):
            petasus("tcp", "tcp://127.0.0.1:0", 200, api, [("window", 1)], "same")
        theirs.append(("pyzmq same", placed(
            "same", lambda s, p, c: baselines(False)["pyzmq"]([("window", 1)], s, p, c))))
    # Ours and theirs alternate, so that a slow stretch of the shared machine falls on both.
    mixed = []
    for k in range(max(len(out), len(theirs))):
        mixed.extend(out[k:k + 1] + theirs[k:k + 1])
    return mixed


@contextlib.contextmanager
def hogs(cpus: list[int]) -> Iterator[None]:
    """A process spinning in pure Python on each of ``cpus`` until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in cpus]
    try:
        for proc, cpu in zip(procs, cpus, strict=True):
            os.sched_setaffinity(proc.pid, {cpu})
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- the verdict ------------------------------------------------------------------------------
def best(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The fastest row that matches (any api, client and pattern unless ``match`` says)."""
    hits = [r for r in rows if not r["op"].startswith("ratio") and
            all(r.get(k) == v for k, v in match.items())]
    return max(hits, key=lambda r: r["value"]) if hits else None


def describe(row: dict[str, Any]) -> str:
    return f"{row['plugin']} {row['api']} {row['pattern']} ({row['client']})"


def verdict(placements: list[str]) -> None:
    rows = list(_common.RESULTS)
    for placement in placements:
        for conc in SWEEP:
            mine = best(rows, plugin="tcp", concurrency=conc, placement=placement)
            if mine is None:
                continue
            peers = [p for p in (best(rows, plugin=name, concurrency=conc, placement=placement)
                                 for name in PEERS) if p is not None]
            top = max(peers, key=lambda r: r["value"]) if peers else None
            if top is not None:
                ratio(B, f"tcp-best-vs-best-peer[{placement}]", mine, top, 1.0,
                      mine=describe(mine), peer=describe(top))
            # The targets of the issues: 10x grpcio, 4x pyzmq at one call in flight, 1.5x at 16.
            grpc_best = best(rows, plugin="grpcio", concurrency=conc, placement=placement)
            zmq_best = best(rows, plugin="pyzmq", concurrency=conc, placement=placement)
            if conc in (1, 16):
                ratio(B, f"tcp-vs-best-grpcio[{placement}]", mine, grpc_best, 10.0,
                      mine=describe(mine), peer=describe(grpc_best) if grpc_best else None)
                ratio(B, f"tcp-vs-pyzmq[{placement}]", mine, zmq_best, 4.0 if conc == 1 else 1.5,
                      mine=describe(mine), peer=describe(zmq_best) if zmq_best else None)
            # Issue 13: the asyncio API at the blocking API's speed.
            aio = best(rows, plugin="tcp", api="asyncio", concurrency=conc, placement=placement,
                       spin_us=200)
            blk = best(rows, plugin="tcp", api="blocking", concurrency=conc,
                       placement=placement, spin_us=200)
            ratio(B, f"tcp-asyncio-vs-blocking[{placement}]", aio, blk, 1.0,
                  mine=describe(aio) if aio else None, peer=describe(blk) if blk else None)
            uv = best(rows, plugin="tcp", api="asyncio-uvloop", concurrency=conc,
                      placement=placement, spin_us=200)
            ratio(B, f"tcp-uvloop-vs-blocking[{placement}]", uv, blk, 1.0,
                  mine=describe(uv) if uv else None, peer=describe(blk) if blk else None)
        for conc in SWEEP:
            # Same host: sm against every peer, pyzmq over a Unix socket included (issue 13:
            # 1.5x the best at 16 in flight).
            mine = best(rows, plugin="sm", concurrency=conc, placement=placement)
            peers = [p for p in (best(rows, plugin=name, concurrency=conc, placement=placement)
                                 for name in (*PEERS, "pyzmq-ipc")) if p is not None]
            if mine is not None and peers:
                top = max(peers, key=lambda r: r["value"])
                ratio(B, f"sm-best-vs-best-peer[{placement}]", mine, top,
                      1.5 if conc == 16 else 1.0, mine=describe(mine), peer=describe(top))
    for conc in (1, 16):
        # Issue 5: small-RPC rate over ofi+tcp at least the tcp plugin's.
        ofi = best(rows, plugin="ofi-tcp", api="blocking", concurrency=conc,
                   placement="default")
        tcp = best(rows, plugin="tcp", api="blocking", concurrency=conc, spin_us=200,
                   placement="default")
        if ofi is not None and tcp is not None:
            ratio(B, "ofi-tcp-vs-tcp", ofi, tcp, 1.0, mine=describe(ofi), peer=describe(tcp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON record per line")
    parser.add_argument("--quick", action="store_true", help="one short round (~40 s)")
    parser.add_argument("--pin", choices=("same", "split"),
                        help="run every configuration with this placement")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots there")
    parser.add_argument("--only", metavar="REGEX",
                        help="run only the configurations whose label matches (e.g. "
                        "'tcp (blocking|asyncio) spin=200|pyzmq'); --list shows the labels")
    parser.add_argument("--list", action="store_true", help="print the labels and exit")
    parser.add_argument("--conc", metavar="N,N", help="only these calls-in-flight counts")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="seconds per point")
    parser.add_argument("--hog", metavar="CPU,CPU",
                        help="keep a busy process on each of these CPUs during the run (a "
                        "shared machine: what spinning costs when a yield hands the CPU away)")
    opts = parser.parse_args()
    _common.JSON = opts.json
    rounds, seconds = (1, 0.15) if opts.quick else (3, 0.3)
    rounds = opts.rounds or rounds
    seconds = opts.seconds or seconds
    concs = tuple(int(c) for c in opts.conc.split(",")) if opts.conc else None
    plan = configs(opts.quick, opts.pin, concs)
    if opts.only:
        plan = [(label, run) for label, run in plan if re.search(opts.only, label)]
    if opts.list:
        print("\n".join(label for label, _run in plan))
        return
    _common.QUIET = True
    with hogs([int(c) for c in opts.hog.split(",")] if opts.hog else []):
        for n in range(rounds):
            # Every other round backwards: what drifts over a round does not favour one end.
            for _label, run in plan if n % 2 == 0 else reversed(plan):
                run(seconds)
    if opts.hog:
        print(f"(busy processes on CPU {opts.hog} throughout)", file=sys.stderr)
    summarize(B, KEYS, medians=("cpu_us_client", "cpu_us_server", "p50_us", "p99_us"))
    verdict([opts.pin] if opts.pin else ["default", "same"])
    if opts.plot:
        import _plot

        note = f"{rounds} round(s), {seconds:g} s per point, median"
        for path in _plot.rpc(_common.RESULTS, opts.plot, note):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
