"""Writes a large buffer to the pipeline server, pipelined and not, and prints the bandwidth.

    python examples/pipeline/client.py URI [MiB]     default 256 MiB
"""

import hashlib
import os
import sys

import api

from petasus import bulk, hg

MiB = 1 << 20


def main() -> None:
    uri = sys.argv[1]
    size = int(sys.argv[2]) * MiB if len(sys.argv) > 2 else 256 * MiB
    data = bytearray(os.urandom(MiB)) * (size // MiB)
    want = hashlib.sha256(data).hexdigest()
    with hg.Engine(uri, timeout=300) as engine:
        engine.declare(api)
        server = engine.lookup(uri)
        with engine.bulk(data, bulk.READ_ONLY) as handle:
            for label, chunk, depth in (("whole pull, then hash", size, 0),
                                        ("pipelined, 4 x 4 MiB chunks in flight", 4 * MiB, 4)):
                digest, seconds = server.write(handle, chunk, depth)
                status = "ok" if digest == want else "MISMATCH"
                print(f"{label}: {size // MiB} MiB in {seconds * 1e3:.0f} ms = "
                      f"{size / seconds / 1e9:.2f} GB/s (digest {status})")


if __name__ == "__main__":
    main()
