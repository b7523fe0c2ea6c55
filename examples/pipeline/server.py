"""Consumes large writes as they arrive (the Mercury paper's pipelined write).

    python examples/pipeline/server.py [URI]      default tcp://127.0.0.1:0

The server pulls the client's buffer in chunks into a small ring of registered buffers and
hashes each chunk on a worker thread while the next chunks move; memory stays at a few chunks
however large the write is.
"""

import hashlib
import sys
import time

import api

from petasus import bulk, hg


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:0"
    with hg.Engine(uri, listen=True, allow_remote_shutdown=True, timeout=300) as engine:

        def write(data: bulk.RemoteBulk, chunk_size: int, depth: int) -> tuple[str, float]:
            digest = hashlib.sha256()
            start = time.perf_counter()
            if depth:
                bulk.pipeline(engine, data, lambda _offset, view: digest.update(view),
                              chunk_size=chunk_size, depth=depth)
            else:
                buffer = bytearray(data.size)
                with engine.bulk(buffer, bulk.WRITE_ONLY) as local:
                    local.pull_from(data).wait()
                digest.update(buffer)
            return digest.hexdigest(), time.perf_counter() - start

        engine.register(api.write, write)
        print(f"listening on {engine.uri}", flush=True)
        engine.serve()


if __name__ == "__main__":
    main()
