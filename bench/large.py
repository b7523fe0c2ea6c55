"""Large ``bytes`` values beside bulk handles: an RPC whose ``bytes`` argument or result
overflows the message, against the same bytes moved as a handle (issue 13, item 5).

    python bench/large.py [--json] [--quick] [--rounds N] [--no-copy]

Per plugin (tcp, sm) and size (16 and 64 MiB), one call at a time:

- ``bytes-arg``: ``consume(data: bytes)``; the server pulls the input and the handler gets a
  ``bytes`` object;
- ``handle-arg``: ``take(handle)`` with a read-only handle made per call, pulled by the server
  into memory it already owns (what an application would do instead of a ``bytes`` argument);
- ``bytes-result``: ``produce(size) -> bytes``; the client pulls the result and gets ``bytes``;
- ``handle-result``: ``expose()`` answers with a handle, which the client pulls into memory it
  already owns.

The ``bytes-*-copy`` rows run the same calls with ``PETASUS_ADOPT=0`` on both sides (the
server started with it, the client's ``hg.adopt`` switched off around them): values copied out
of the landing into fresh objects, as before ``hg/adopt.py`` (old-vs-new in one run).

The data on either side is faulted in once, before timing, as an application's would be: what
is measured is what the RPC path costs per call, fresh allocations included. Each figure is the
median of ROUNDS interleaved rounds (every other round backwards), and the ratios come last:
``bytes-*`` against ``handle-*`` (target 0.8), and against ``bytes-*-copy``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator

import _common
from _bulk_peer import consume, expose, produce, take
from _common import child, find, ratio, summarize, timed, touched

from petasus import bulk, hg
from petasus.hg import adopt

B = "large"
MiB = 1 << 20
SIZES = [16 * MiB, 64 * MiB]
PLUGINS = {"tcp": "tcp://127.0.0.1:0", "sm": "sm://"}
OPS = ("bytes-arg", "handle-arg", "bytes-result", "handle-result")
KEYS = ("plugin", "op", "size", "concurrency")


@contextlib.contextmanager
def copying() -> Iterator[None]:
    """Values copied out of the landing, as before ``hg.adopt``: this process's pool lends
    nothing, and the server is started with ``PETASUS_ADOPT=0``."""
    api, adopt._API = adopt._API, None
    os.environ["PETASUS_ADOPT"] = "0"
    try:
        yield
    finally:
        adopt._API = api
        del os.environ["PETASUS_ADOPT"]


def bench_plugin(name: str, uri: str, seconds: float, copy: bool) -> None:
    ops = [f"{op}-copy" for op in OPS if op.startswith("bytes")] if copy else OPS
    with child("_bulk_peer.py", uri) as (_proc, address), hg.Engine(uri, timeout=60) as engine:
        engine.declare(expose, take, consume, produce)
        remote = engine.lookup(address)
        with engine.bulk(touched(64 * MiB), bulk.READ_WRITE) as local:
            for size in SIZES:
                data = bytes(touched(size))
                calls = max(1, (128 * MiB) // size)

                def bytes_arg(data: bytes = data) -> None:
                    remote.consume(data)

                def handle_arg(data: bytes = data) -> None:
                    with engine.bulk(data, bulk.READ_ONLY, eager=False) as handle:
                        remote.take(handle)

                def bytes_result(size: int = size) -> None:
                    if len(remote.produce(size)) != size:
                        raise RuntimeError("produce returned the wrong size")

                def handle_result(size: int = size) -> None:
                    local.pull_from(remote.expose(), size).wait()

                fns: dict[str, Callable[[], None]] = {
                    "bytes-arg": bytes_arg, "handle-arg": handle_arg,
                    "bytes-result": bytes_result, "handle-result": handle_result}
                for op in ops:
                    fn = fns[op.removesuffix("-copy")]

                    def run(fn: Callable[[], None] = fn, size: int = size,
                            calls: int = calls) -> int:
                        for _ in range(calls):
                            fn()
                        return calls * size
                    _common.emit(B, name, op, size, 1, timed(run, seconds) / 1e9, "GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON record per line")
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--sizes", type=lambda v: tuple(int(x) * MiB for x in v.split(",")),
                        default=None, help="sizes in MiB, comma-separated (default 16,64)")
    parser.add_argument("--no-copy", dest="copy", action="store_false",
                        help="skip the PETASUS_ADOPT=0 rows (half the time)")
    opts = parser.parse_args()
    if opts.sizes:
        SIZES[:] = opts.sizes
    _common.JSON = opts.json
    rounds, seconds = (1, 0.3) if opts.quick else (opts.rounds, 0.6)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    plan = [(name, uri, copy) for name, uri in PLUGINS.items()
            for copy in ((False, True) if opts.copy else (False,))]
    _common.QUIET = True
    for n in range(rounds):
        for name, uri, copy in plan if n % 2 == 0 else reversed(plan):
            with copying() if copy else contextlib.nullcontext():
                bench_plugin(name, uri, seconds, copy)
    summarize(B, KEYS)
    for name in PLUGINS:
        for size in SIZES:
            for kind in ("arg", "result"):
                mine = find(bench=B, plugin=name, op=f"bytes-{kind}", size=size)
                ratio(B, f"bytes-{kind}-vs-handle-{kind}", mine,
                      find(bench=B, plugin=name, op=f"handle-{kind}", size=size), 0.8)
                ratio(B, f"bytes-{kind}-vs-copy", mine,
                      find(bench=B, plugin=name, op=f"bytes-{kind}-copy", size=size), 1.0)


if __name__ == "__main__":
    main()
