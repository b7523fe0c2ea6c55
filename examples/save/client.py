"""Sends a file to the save server, which pulls its bytes (no copy on this side: the bulk
handle exposes the file's mapping itself).

    python examples/save/client.py URI PATH
"""

import mmap
import sys
import time
from pathlib import Path

import api

from petasus import bulk, hg


def main() -> None:
    uri, path = sys.argv[1], Path(sys.argv[2])
    with hg.Engine(uri, timeout=300) as engine, path.open("rb") as f:
        engine.declare(api)
        server = engine.lookup(uri)
        size = path.stat().st_size
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        start = time.perf_counter()
        with engine.bulk(data, bulk.READ_ONLY) as handle:
            try:
                written = server.save(path.name, handle)
            except hg.RemoteError as exc:  # refused (too large, a bad name): the server says why
                sys.exit(f"not saved: {exc}")
        elapsed = time.perf_counter() - start
        if size:
            data.close()  # type: ignore[union-attr]
        print(f"saved {path.name}: {written} bytes in {elapsed * 1e3:.1f} ms "
              f"({written / elapsed / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
