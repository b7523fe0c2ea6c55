"""One small RPC carrying a bulk handle that the server pulls (``take(handle)``): the call
rate at 4 KiB, 64 KiB and 1 MiB, over tcp and sm, one call at a time.

    python bench/handle_rpc.py [--json] [--seconds S] [--sizes N,N] [tcp] [sm]

The server runs in a child process (``--serve URI``) with a handler that pulls the handle into
memory it already owns. This is the path of bulk.py's "rma-take" rows without the rest of
that benchmark, with the CPU each side spends per call (all threads, from /proc), small enough
to run against an old checkout's interpreter for an old-vs-new comparison (issue 10).
Nothing is asserted: it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from petasus import bulk, hg

SIZES = (4 << 10, 64 << 10, 1 << 20)
URIS = {"tcp": "tcp://127.0.0.1:0", "sm": "sm://"}


@hg.declare
def take(data: bulk.Bulk) -> hg.uint64: ...


def serve(uri: str) -> None:
    engine = hg.Engine(uri, listen=True)
    memory = bytearray(max(SIZES))

    def impl(data: bulk.RemoteBulk) -> int:
        with engine.bulk(memoryview(memory)[:data.size], bulk.WRITE_ONLY) as local:
            local.pull_from(data).wait(10)
        return data.size

    engine.register(take, impl)
    print(engine.uri, flush=True)
    engine.serve()


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU of every thread of ``pid`` (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, seconds: float,
            sizes: tuple[int, ...] = SIZES) -> dict[int, tuple[float, float, float]]:
    uri = URIS[name]
    server = subprocess.Popen([sys.executable, __file__, "--serve", uri],
                              stdout=subprocess.PIPE, text=True)
    try:
        target = server.stdout.readline().strip()  # type: ignore[union-attr]
        rates = {}
        with hg.Engine(uri) as client:
            client.declare(take)
            remote = client.lookup(target)
            for size in sizes:
                with client.bulk(bytearray(size), bulk.READ_ONLY, eager=False) as handle:
                    for _ in range(200):
                        remote.take(handle)
                    n, t0 = 0, time.perf_counter()
                    c0, s0 = time.process_time(), _cpu_seconds(server.pid)
                    while time.perf_counter() - t0 < seconds:
                        remote.take(handle)
                        n += 1
                    rates[size] = (n / (time.perf_counter() - t0),
                                   (time.process_time() - c0) / n * 1e6,
                                   (_cpu_seconds(server.pid) - s0) / n * 1e6)
        return rates
    finally:
        server.kill()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON record per line")
    parser.add_argument("--seconds", type=float, default=1.0, help="per size (default 1)")
    parser.add_argument("plugins", nargs="*", metavar="PLUGIN",
                        help=f"plugins to measure, of {', '.join(URIS)} (default: all)")
    parser.add_argument("--sizes", type=lambda v: tuple(int(x) for x in v.split(",")),
                        default=SIZES, help="comma-separated sizes in bytes (default: "
                        f"{','.join(map(str, SIZES))})")
    parser.add_argument("--serve", metavar="URI", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve:
        serve(opts.serve)
        return
    unknown = set(opts.plugins) - set(URIS)
    if unknown:
        parser.error(f"unknown plugins: {', '.join(sorted(unknown))}")
    for name in opts.plugins or URIS:
        for size, (rate, client_us, server_us) in measure(name, opts.seconds, opts.sizes).items():
            row = {"bench": "handle_rpc", "plugin": name, "op": "take", "size": size,
                   "value": round(rate, 1), "unit": "ops/s",
                   "client_cpu_us": round(client_us, 1), "server_cpu_us": round(server_us, 1)}
            print(json.dumps(row) if opts.json else
                  f"handle_rpc {name:4} take {size:>8} B  {rate:10.1f} ops/s  CPU per call: "
                  f"client {client_us:6.1f} us, server {server_us:6.1f} us", flush=True)


if __name__ == "__main__":
    main()
