"""The bulk benchmarks' far end: a petasus engine that exposes a 64 MiB region, pulls the
handles it is sent, swallows large arguments and returns large results. Serves until stdin
closes; first stdout line: the URI."""

from __future__ import annotations

import sys
import threading

from _common import pin_from_env, touched

from petasus import bulk, hg

SIZE = 64 << 20


@hg.declare
def expose() -> bulk.Bulk:
    """The 64 MiB region, READ_WRITE, for the client to pull from and push into."""


@hg.declare
def take(data: bulk.Bulk) -> hg.uint64:
    """Pull ``data`` into memory this side already owns (eager handles: a local copy)."""


@hg.declare
def consume(data: bytes) -> hg.uint64:
    """An RPC with one large argument: the overflow path carries it."""


@hg.declare
def produce(size: hg.uint64) -> bytes:
    """An RPC with one large result (``size`` bytes): the overflow path carries it back."""


def main() -> None:
    pin_from_env()
    engine = hg.Engine(sys.argv[1], listen=True)
    region = engine.bulk(touched(SIZE), bulk.READ_WRITE)
    landing = engine.bulk(touched(SIZE), bulk.WRITE_ONLY)

    def take_(data: bulk.RemoteBulk) -> int:
        landing.pull_from(data).wait()
        return data.size

    engine.register(expose, lambda: region)
    engine.register(take, take_)
    engine.register(consume, len)
    results: dict[int, bytes] = {}  # made (and faulted in) once per size, as an app's data is
    engine.register(produce, lambda size: results.get(size) or
                    results.setdefault(size, bytes(touched(size))))
    print(engine.uri, flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), engine.shutdown()), daemon=True).start()
    engine.serve(handle_signals=False)
    region.close()
    landing.close()
    engine.close()


if __name__ == "__main__":
    main()
