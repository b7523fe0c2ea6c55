"""What ``auth_key`` costs: the first call on a new connection (connect, handshake, call) and
calls on a connection already proven, with and without the key, over tcp and sm, one run.

    python bench/auth.py [--json] [--rounds N]

The keyed handshake adds one round trip before the first message (the dialler holds its
frames until the listener has proven the key); after that a keyed connection is the same
connection, so its call rate should match. Each figure is the median of ROUNDS interleaved
rounds; the ratios (keyed / unkeyed) come last. Nothing is asserted: it prints.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import _common
from _common import find, ratio, summarize
from _rpc_peer import sum as sum_rpc

from petasus import hg

B = "auth"
KEY = b"bench-secret-0123456789abcdef"
URIS = {"tcp": ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"), "sm": ("sm://", "sm://")}
FIRST_CALLS = 200
STEADY_CALLS = 5000


def measure(name: str, key: bytes | None) -> None:
    listen, client_uri = URIS[name]
    server = hg.Engine(listen, listen=True, auth_key=key)
    server.register(sum_rpc, lambda x, y: x + y)
    thread = threading.Thread(target=server.serve, kwargs={"handle_signals": False},
                              daemon=True)
    thread.start()
    label = "keyed" if key else "unkeyed"
    try:
        firsts = []
        for _ in range(FIRST_CALLS):  # a new client engine each time: a new connection
            with hg.Engine(client_uri, auth_key=key) as client:
                client.declare(sum_rpc)
                t0 = time.perf_counter_ns()
                client.lookup(server.uri).sum(1, 2)
                firsts.append(time.perf_counter_ns() - t0)
        _common.emit(B, name, f"first-call-{label}", 8, 1, statistics.median(firsts) / 1e3,
                     "us")
        with hg.Engine(client_uri, auth_key=key) as client:
            client.declare(sum_rpc)
            remote = client.lookup(server.uri)
            remote.sum(1, 2)
            t0 = time.perf_counter()
            for i in range(STEADY_CALLS):
                remote.sum(i, 1)
            rate = STEADY_CALLS / (time.perf_counter() - t0)
        _common.emit(B, name, f"call-{label}", 8, 1, rate, "ops/s")
    finally:
        server.shutdown()
        thread.join(10)
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON record per line")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    opts = parser.parse_args()
    _common.JSON = opts.json
    _common.QUIET = True
    plan = [(name, key) for name in URIS for key in (None, KEY)]
    for n in range(opts.rounds):
        for name, key in plan if n % 2 == 0 else reversed(plan):
            measure(name, key)
    summarize(B, ("plugin", "op"))
    for name in URIS:
        ratio(B, "first-call-keyed-vs-unkeyed", find(bench=B, plugin=name, op="first-call-keyed"),
              find(bench=B, plugin=name, op="first-call-unkeyed"), 2.0, higher_is_better=False)
        ratio(B, "call-keyed-vs-unkeyed", find(bench=B, plugin=name, op="call-keyed"),
              find(bench=B, plugin=name, op="call-unkeyed"), 0.95)


if __name__ == "__main__":
    main()
