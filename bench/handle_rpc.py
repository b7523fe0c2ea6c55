"""One small RPC carrying a bulk handle that the server pulls (``take(handle)``): the call
rate at 4 KiB, 64 KiB and 1 MiB, over tcp and sm, one call at a time.

    python bench/handle_rpc.py [--json] [--seconds S]

The server runs in a child process (``--serve URI``) with a handler that pulls the handle into
memory it already owns. This is the path of bulk.py's "rma-take" rows without the rest of
that benchmark, small enough to run against an old checkout's interpreter for an old-vs-new
comparison (issue 10). Nothing is asserted: it prints.
"""

from __future__ import annotations

import argparse
import json
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


def measure(name: str, seconds: float) -> dict[int, float]:
    uri = URIS[name]
    server = subprocess.Popen([sys.executable, __file__, "--serve", uri],
                              stdout=subprocess.PIPE, text=True)
    try:
        target = server.stdout.readline().strip()  # type: ignore[union-attr]
        rates = {}
        with hg.Engine(uri) as client:
            client.declare(take)
            remote = client.lookup(target)
            for size in SIZES:
                with client.bulk(bytearray(size), bulk.READ_ONLY, eager=False) as handle:
                    for _ in range(200):
                        remote.take(handle)
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < seconds:
                        remote.take(handle)
                        n += 1
                    rates[size] = n / (time.perf_counter() - t0)
        return rates
    finally:
        server.kill()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON record per line")
    parser.add_argument("--seconds", type=float, default=1.0, help="per size (default 1)")
    parser.add_argument("--serve", metavar="URI", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve:
        serve(opts.serve)
        return
    for name in URIS:
        for size, rate in measure(name, opts.seconds).items():
            row = {"bench": "handle_rpc", "plugin": name, "op": "take", "size": size,
                   "value": round(rate, 1), "unit": "ops/s"}
            print(json.dumps(row) if opts.json else
                  f"handle_rpc {name:4} take {size:>8} B  {rate:10.1f} ops/s", flush=True)


if __name__ == "__main__":
    main()
