"""The writer test_store_faults kills: puts objects into ``embedded://DIR`` (offload=on_put)
forever and says on stdout which are acknowledged and which are durable.

    python tests/store_crash_writer.py DIR

Each round puts ROUND objects ("acked KEY SIZE" after each put returns), then ``flush()``es and
prints "durable KEY SIZE" for each: after a flush every object put before it has a complete
disk copy. The bytes derive from the key (store_kit.pattern), so the test can tell an intact
object from a torn one without being told what was written.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_kit import KiB, MiB, pattern

from petasus import store

ROUND = 6


def size_of(i: int) -> int:
    """1 KiB to ~3 MiB: large enough that a kill usually lands inside a disk copy."""
    return (i * 997 * KiB) % (3 * MiB) + KiB + i


def main() -> None:
    # fsync makes each disk copy last milliseconds, so that the kill usually lands inside one
    # (measured: a half-written temporary file in 4 kills of 5, against 1 in 5 without).
    kv = store.connect(f"embedded://{sys.argv[1]}", offload="on_put", dram_bytes=48 * MiB,
                       offload_workers=2, disk_fsync=True)
    i = 0
    while True:
        written = []
        for _ in range(ROUND):
            key, size = f"obj/{i}", size_of(i)
            kv.put(key, pattern(key, size))
            print(f"acked {key} {size}", flush=True)
            written.append((key, size))
            i += 1
        kv.flush()  # type: ignore[attr-defined]
        for key, size in written:
            print(f"durable {key} {size}", flush=True)


if __name__ == "__main__":
    main()
