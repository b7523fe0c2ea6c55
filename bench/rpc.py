"""RPC benchmark: petasus sum(x, y) beside grpcio and pyzmq, in one run.

    python bench/rpc.py [--json] [--quick]

petasus runs over tcp and sm, 1 and 16 calls in flight, with the blocking and the asyncio API,
progress spin on (200 us) and off (0: always block). The peers: grpcio sync and asyncio
(generic bytes handler, no codegen) and pyzmq (DEALER/ROUTER with msgpack). Every configuration
is measured in each of ROUNDS interleaved rounds and reported as its median, so a burst of
noise on this shared 2-core VM cannot decide a ratio. The ratios against the targets come last.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import _common
import _rpc_baselines as peers
from _common import child, find, ratio, summarize
from _rpc_peer import sum as sum_rpc

from petasus import hg

QUICK = "--quick" in sys.argv
ROUNDS = 1 if QUICK else 5
CALLS = 2000 if QUICK else 6000
B = "rpc"


def pin(placement: str) -> int | None:
    if placement == "pinned":
        os.sched_setaffinity(0, {0})
        return 0
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return None


def bench_petasus(name: str, uri: str, spin_us: int, api: str, placement: str) -> None:
    cpu = pin(placement)
    with child("_rpc_peer.py", uri, str(spin_us), cpu=cpu) as (_proc, address), \
            hg.Engine(uri, spin_us=spin_us) as engine:
        engine.declare(sum_rpc)
        remote = engine.lookup(address)
        for conc in (1, 16):
            if api == "sync":
                if conc == 1:
                    def step(i: int) -> None:
                        peers.check(remote.sum(i % 1_000_000, 1), i % 1_000_000, 1)
                else:
                    def step(i: int) -> None:
                        handles = [remote.sum.future(i % 1_000_000, k) for k in range(16)]
                        for k, handle in enumerate(handles):
                            peers.check(engine.wait(handle), i % 1_000_000, k)
                samples, elapsed = peers.drive(step, conc, CALLS)
            else:
                samples, elapsed = asyncio.run(async_drive(remote, conc))
            peers.report(name, api, placement, conc, samples, elapsed)
            _common.RESULTS[-1]["spin_us"] = spin_us


async def async_drive(remote: Any, conc: int) -> tuple[list[int], float]:
    async def step(i: int) -> None:
        calls = [remote.sum.async_(i % 1_000_000, k) for k in range(conc)]
        for k, got in enumerate(await asyncio.gather(*calls)):
            peers.check(got, i % 1_000_000, k)
    return await peers.adrive(step, conc, CALLS)


CONFIGS: list[tuple[str, Any]] = []
for _placement in ("default", "pinned"):
    for _name, _uri in (("tcp", "tcp://127.0.0.1:0"), ("sm", "sm://")):
        for _spin in (200, 0):
            for _api in ("sync", "asyncio"):
                if _placement == "pinned" and (_api == "asyncio" or _name == "sm"):
                    continue
                CONFIGS.append((f"petasus {_name} {_api} spin={_spin} {_placement}",
                                lambda n=_name, u=_uri, s=_spin, a=_api, p=_placement:
                                bench_petasus(n, u, s, a, p)))
    CONFIGS.append((f"grpcio sync {_placement}",
                    lambda p=_placement: peers.bench_grpc_sync(CALLS // 4, p, pin(p))))
    CONFIGS.append((f"pyzmq {_placement}",
                    lambda p=_placement: peers.bench_zmq(CALLS, p, pin(p))))
for _name, _uri in (("ofi-tcp", "ofi+tcp://127.0.0.1:0"), ("ofi-shm", "ofi+shm://")):
    for _api in ("sync", "asyncio"):
        CONFIGS.append((f"petasus {_name} {_api} spin=200 default",
                        lambda n=_name, u=_uri, a=_api: bench_petasus(n, u, 200, a, "default")))
CONFIGS.append(("grpcio asyncio default",
                lambda: peers.bench_grpc_aio(CALLS // 4, "default", pin("default"))))

KEYS = ("plugin", "op", "size", "concurrency", "api", "placement", "spin_us")


def main() -> None:
    _common.QUIET = True
    for _round in range(ROUNDS):
        for _label, run in CONFIGS:
            run()
    pin("default")
    summarize(B, KEYS)
    for placement in ("default", "pinned"):
        for conc, vs_grpc, vs_zmq in ((1, 10.0, 4.0), (16, 10.0, 1.5)):
            mine = find(bench=B, plugin="tcp", api="sync", concurrency=conc, spin_us=200,
                        placement=placement)
            grpcs = [r for r in _common.RESULTS if r["plugin"] == "grpcio" and
                     r["concurrency"] == conc and r["placement"] == placement]
            best_grpc = max(grpcs, key=lambda r: r["value"]) if grpcs else None
            ratio(B, f"tcp-vs-best-grpcio[{placement}]", mine, best_grpc, vs_grpc)
            ratio(B, f"tcp-vs-pyzmq[{placement}]", mine,
                  find(bench=B, plugin="pyzmq", concurrency=conc, placement=placement), vs_zmq)
    for conc in (1, 16):
        # Issue 5: small-RPC rate over ofi+tcp at least the tcp plugin's.
        ratio(B, "ofi-tcp-vs-tcp", find(bench=B, plugin="ofi-tcp", api="sync", concurrency=conc,
                                       spin_us=200, placement="default"),
              find(bench=B, plugin="tcp", api="sync", concurrency=conc, spin_us=200,
                   placement="default"), 1.0)


if __name__ == "__main__":
    main()
