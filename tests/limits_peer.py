"""An RPC server for the connection-limit attacks (tests/test_conn_limits.py and
bench/conn_limits.py): ``python tests/limits_peer.py URI [json-options]``; its first line is
``listening on <uri>``. The option ``nofile`` lowers RLIMIT_NOFILE first (the descriptor
attack); the others go to the engine and its plugin."""

from __future__ import annotations

import json
import resource
import sys

from petasus import hg


@hg.declare
def add(x: hg.int32, y: hg.int32) -> hg.int32: ...


@hg.declare
def blob(size: hg.uint32) -> bytes: ...


@hg.declare
def na_stats() -> str: ...


def main() -> None:
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    nofile = options.pop("nofile", None)
    if nofile is not None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    engine = hg.Engine(sys.argv[1], listen=True, allow_remote_shutdown=True, **options)
    engine.register(add, lambda x, y: x + y)
    engine.register(blob, lambda size: bytes(min(size, 4096)))  # the replies a flood asks for
    engine.register(na_stats, lambda: json.dumps(engine.na.statistics()))
    print(f"listening on {engine.uri}", flush=True)
    engine.serve()
    engine.close()


if __name__ == "__main__":
    main()
