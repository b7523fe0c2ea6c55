"""A good client's small-RPC latency while another peer declares a 1 GiB overflow input.

    python bench/overflow_stall.py [URI] [--runs N]        URI: tcp://127.0.0.1:0 (default), sm://

The server, the good client and the hostile peer each run in their own process. The good
client calls ``add(1, 2)`` back to back for 2.5 s; meanwhile the hostile peer sends one
request (~100 B) whose input, it says, is a 1 GiB bulk handle, then never serves the pull
(over sm with process_vm the server reads it anyway, in 4 MiB chunks). Printed: the good
client's median and worst latency, and the worst of the calls in flight at the declaration or
begun in the 1 s after it (the hostile process says when it sent it). Where
the engine has ``max_overflow_per_peer``, the server gives one peer the whole 1 GiB, so that
the landing buffer is allocated on both codes (with the default share, a quarter, the request
is refused at once). Issue 11: the old landing was ``bytearray(size)``, which zero-fills
1 GiB on the progress thread before it serves anyone.
"""

from __future__ import annotations

import argparse
import inspect
import mmap
import statistics
import subprocess
import sys
import time

from petasus import hg, na
from petasus.bulk import layout
from petasus.hg import header as hd


@hg.declare
def add(x: hg.int32, y: hg.int32) -> hg.int32: ...


@hg.declare
def take(data: bytes) -> hg.uint64: ...


GiB = 1 << 30


def serve(uri: str) -> None:
    options = {"max_overflow": GiB}
    if "max_overflow_per_peer" in inspect.signature(hg.Engine.__init__).parameters:
        options["max_overflow_per_peer"] = GiB
    with hg.Engine(uri, listen=True, allow_remote_shutdown=True, **options) as engine:
        engine.register(add, lambda x, y: x + y)
        engine.register(take, len)
        print(f"listening on {engine.uri}", flush=True)
        engine.serve()


def declare_huge(uri: str, server: str) -> tuple[na.Plugin, mmap.mmap]:
    """Connect, then send one request declaring a 1 GiB input; never progress again."""
    plugin = na.initialize(uri)
    addr = plugin.addr_lookup(server)
    hello = plugin.msg_recv_expected(addr, bytearray(4096), 1)
    plugin.msg_send_unexpected(addr, hd.encode_request(hd.rpc_id("nothing")), 1)
    na.wait(plugin, hello, timeout=10)
    memory = mmap.mmap(-1, GiB)  # untouched: declaring it costs the hostile nothing
    key = plugin.mem_register(memory, na.Access.READ_ONLY)
    wire = layout.encode(layout.Wire(int(na.Access.READ_ONLY),
                                     plugin.addr_serialize(plugin.addr_self()), (GiB,),
                                     (plugin.mem_handle_serialize(key),)))
    request = hd.REQUEST.pack(hd.IDENTIFIER, hd.PROTOCOL, hd.rpc_id(take.name),
                              hd.MORE_DATA, 0) + wire
    plugin.msg_recv_expected(addr, bytearray(4096), 2)
    plugin.msg_send_unexpected(addr, request, 2)
    return plugin, memory


def run(uri: str) -> tuple[float, float, float, int]:
    server = subprocess.Popen([sys.executable, __file__, "--serve", uri],
                              stdout=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().split()[-1]  # type: ignore[union-attr]
        with hg.Engine(uri, timeout=30) as good:
            good.declare(add)
            remote = good.lookup(address)
            for _ in range(500):
                remote.add(1, 2)
            samples: list[tuple[float, float]] = []
            start = time.perf_counter()
            hostile = subprocess.Popen([sys.executable, __file__, "--hostile", uri, address],
                                       stdout=subprocess.PIPE, text=True)
            samples: list[tuple[float, float]] = []
            start = time.time()  # wall clock: the hostile process says when it declared
            while time.time() < start + 2.5:
                t = time.perf_counter()
                remote.add(1, 2)
                samples.append((time.time(), time.perf_counter() - t))
            sent = hostile.stdout.readline()  # type: ignore[union-attr]
            hostile.kill()
            hostile.wait(10)
            good.lookup(address).shutdown()
        if not sent.startswith("declared "):
            raise RuntimeError(f"the hostile peer did not declare its input: {sent!r}")
        at = float(sent.split()[1])
        lat = [d for _t, d in samples]
        after = [d for t, d in samples if t + d >= at and t < at + 1.0] or [0.0]
        return statistics.median(lat), max(lat), max(after), len(samples)
    finally:
        server.wait(10)
        if server.poll() is None:
            server.kill()


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
        return
    if sys.argv[1:2] == ["--hostile"]:
        # Its own process: on sm the server reads the hostile's pages with process_vm_readv,
        # which takes the hostile process's memory lock; that must not stall the good client.
        declare_huge(sys.argv[2], sys.argv[3])
        print(f"declared {time.time()}", flush=True)
        time.sleep(60)  # never progresses: it is killed when the measurement ends
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri", nargs="?", default="tcp://127.0.0.1:0")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    uri = args.uri
    for _ in range(args.runs):
        median, worst, worst_after, n = run(uri)
        print(f"{uri}: {n} calls, median {median * 1e6:.0f} us, worst {worst * 1e3:.1f} ms, "
              f"worst in the 1 s after the 1 GiB declaration {worst_after * 1e3:.1f} ms",
              flush=True)


if __name__ == "__main__":
    main()
