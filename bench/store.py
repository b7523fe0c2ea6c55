"""Store benchmark: the embedded scheme's puts, gets, batches and disk offload, beside memcpy
and raw os.pwrite / os.pread of the same sizes, in one run.

    python bench/store.py [--json] [--quick] [--embedded | --distributed]

Single objects at 4 KiB, 64 KiB, 1 MiB and 16 MiB: put (a copy of bytes), put_from (a numpy
array read in place), get (a new bytes object), get_into (into a buffer already touched), and
get_into of a disk-only object (a store reopened over objects written by an earlier one).
Batches of 128 x 4 KiB: put_many, get_many, get_into_many. Offload: bytes per second from
the first put of 64 MiB of objects (offload="on_put", a store warmed up beforehand) until
flush() returns, every copy complete; raw pwrite writes the same bytes into a new file.
Every figure is the median of ROUNDS interleaved rounds (rounds=N in the row); the ratios
against the targets of issue 9 come last.

The distributed scheme (a master and a node in processes, the client here) over tcp and sm:
the same single-object and batch rows, gets through the node RPC against one-sided per size
(the inline crossover), and push against pull reads of disk-only objects; Redis (Debian's
redis-server, persistence off, redis-py with hiredis) GET/SET and MGET/MSET beside them; and
the raw loopback socket stream. ``--embedded`` leaves the distributed rows out, ``--distributed``
the embedded ones.

Records: {"bench": "store", "scheme": "embedded" | "tcp" | "sm" | "redis" | "raw", "op",
"size" (bytes per object),
"batch" (objects per call), "value", "unit", ...}; --json prints only these.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import touched

from petasus import store

QUICK = "--quick" in sys.argv
JSON = "--json" in sys.argv
ROUNDS = 1 if QUICK else 3
MIN_SECONDS = 0.1 if QUICK else 0.3
KiB, MiB = 1 << 10, 1 << 20
SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB]
BATCH = 128
SMALL = 4 * KiB
OFFLOAD_TOTAL = (32 if QUICK else 64) * MiB
OFFLOAD_SIZES = [1 * MiB, 16 * MiB]
B = "store"
KEYS = ("scheme", "op", "size", "batch")

RESULTS: list[dict[str, Any]] = []
QUIET = False


def emit(scheme: str, op: str, size: int, batch: int, value: float, unit: str,
         **extra: Any) -> dict[str, Any]:
    row = {"bench": B, "scheme": scheme, "op": op, "size": size, "batch": batch,
           "value": round(value, 3), "unit": unit, **extra}
    RESULTS.append(row)
    if QUIET:
        return row
    if JSON:
        print(json.dumps(row), flush=True)
    else:
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"{B:5} {scheme:9} {op:26} {size:>9} x{batch:<4} {value:>14.3f} {unit:6} {tail}",
              flush=True)
    return row


def summarize() -> None:
    """One median row per configuration, over the interleaved rounds."""
    global QUIET
    rows, RESULTS[:] = list(RESULTS), []
    QUIET = False
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in KEYS), []).append(row)
    for group in groups.values():
        first = group[0]
        extra = {k: v for k, v in first.items() if k not in (*KEYS, "bench", "value", "unit")}
        emit(first["scheme"], first["op"], first["size"], first["batch"],
             statistics.median(r["value"] for r in group), first["unit"], rounds=len(group),
             **extra)


def find(**match: Any) -> dict[str, Any] | None:
    return next((r for r in RESULTS if all(r.get(k) == v for k, v in match.items())), None)


def ratio(name: str, num: dict[str, Any] | None, den: dict[str, Any] | None,
          target: float) -> None:
    if num is None or den is None or not den["value"]:
        return
    value = num["value"] / den["value"]
    emit(num["scheme"], f"ratio:{name}", num["size"], num["batch"], value, "x",
         target=f">={target}", ok=value >= target)


def rate(fn: Callable[[], int]) -> float:
    """Units (bytes or objects, whatever ``fn`` returns) per second, after one warm-up."""
    fn()
    moved, calls = 0, 0
    start = time.perf_counter()
    while True:
        moved += fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_SECONDS and calls >= 3:
            return moved / elapsed


def bandwidth(scheme: str, op: str, size: int, fn: Callable[[], int]) -> None:
    """A single-object figure in GB/s, with its rate in objects per second."""
    bps = rate(fn)
    emit(scheme, op, size, 1, bps / 1e9, "GB/s", ops_s=round(bps / size))


# -- the raw limits ---------------------------------------------------------------------------
def raw(scratch: Path, src: memoryview, dst: memoryview) -> None:
    # From 4 sources in turn into one destination: the working set of the store's rows,
    # which rotate over 4 objects. One source, copied again and again, stays in the CPU's
    # caches and measures them (22 GB/s at 1 MiB on this VM, where get_into over 4 objects
    # made 10 GB/s).
    for size in SIZES:
        turn = [0]

        def copy(size: int = size, turn: list[int] = turn) -> int:
            turn[0] += 1
            at = (turn[0] % 4) * size
            dst[:size] = src[at:at + size]
            return size
        bandwidth("raw", "memcpy", size, copy)

    # pwrite into a new file, OFFLOAD_TOTAL bytes in objects of `size`, then pread them back:
    # what a disk tier's copies cost at the least (a store also opens, checksums and renames
    # a file per object). A new file each time, as offloads write new files: rewriting pages
    # already in the page cache would be a memcpy, not a write.
    for size in SIZES:
        count = max(1, OFFLOAD_TOTAL // size)
        path = scratch / "raw"
        start = time.perf_counter()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        for i in range(count):
            os.pwrite(fd, src[:size], i * size)
        elapsed = time.perf_counter() - start
        emit("raw", "pwrite", size, 1, count * size / elapsed / 1e9, "GB/s",
             ops_s=round(count / elapsed))
        start = time.perf_counter()
        got = sum(os.preadv(fd, [dst[:size]], i * size) for i in range(count))
        elapsed = time.perf_counter() - start
        os.close(fd)
        os.unlink(path)
        if got != count * size:
            raise RuntimeError(f"raw pread: {got} of {count * size} bytes")
        emit("raw", "pread", size, 1, got / elapsed / 1e9, "GB/s", ops_s=round(count / elapsed))


# -- the embedded scheme ----------------------------------------------------------------------
def singles(kv: store.Store, disk_kv: store.Store | None, src: np.ndarray, dst: memoryview,
            label: str = "embedded") -> None:
    for size in SIZES:
        value = src[:size].tobytes()
        array = src[:size]
        keys = [f"s/{size}/{i}" for i in range(4)]
        for key in keys:
            kv.put(key, value, overwrite=True)
        turn = [0]

        def put(value: bytes = value, keys: list[str] = keys, turn: list[int] = turn) -> int:
            turn[0] += 1
            kv.put(keys[turn[0] % 4], value, overwrite=True)
            return len(value)

        def put_from(array: np.ndarray = array, keys: list[str] = keys,
                     turn: list[int] = turn) -> int:
            turn[0] += 1
            kv.put_from(keys[turn[0] % 4], array, overwrite=True)
            return array.nbytes

        def get(keys: list[str] = keys, turn: list[int] = turn) -> int:
            turn[0] += 1
            return len(kv.get(keys[turn[0] % 4]))

        def get_into(keys: list[str] = keys, turn: list[int] = turn) -> int:
            turn[0] += 1
            return kv.get_into(keys[turn[0] % 4], dst)

        bandwidth(label, "put", size, put)
        bandwidth(label, "put_from", size, put_from)
        bandwidth(label, "get", size, get)
        bandwidth(label, "get_into", size, get_into)
        if size >= 64 * KiB and disk_kv is not None:
            disk_keys = [f"d/{size}/{i}" for i in range(4)]

            def disk_get_into(keys: list[str] = disk_keys, turn: list[int] = turn) -> int:
                turn[0] += 1
                return disk_kv.get_into(keys[turn[0] % 4], dst)
            bandwidth("embedded", "get_into_disk", size, disk_get_into)
        kv.remove_many(keys)


def batches(kv: store.Store, src: np.ndarray, label: str = "embedded") -> None:
    items = [(f"b/{i}", src[i * SMALL:(i + 1) * SMALL].tobytes()) for i in range(BATCH)]
    keys = [k for k, _ in items]
    buffers = [touched(SMALL) for _ in range(BATCH)]
    kv.put_many(items, overwrite=True)

    def put_many() -> int:
        kv.put_many(items, overwrite=True)
        return BATCH

    def get_many() -> int:
        return len(kv.get_many(keys))

    def get_into_many() -> int:
        return len(kv.get_into_many(keys, buffers))

    for op, fn in (("put_many", put_many), ("get_many", get_many),
                   ("get_into_many", get_into_many)):
        ops = rate(fn)
        emit(label, op, SMALL, BATCH, ops, "ops/s", gb_s=round(ops * SMALL / 1e9, 3))
    kv.remove_many(keys)


def offload_stores(scratch: Path, src: np.ndarray) -> dict[int, store.Store]:
    """A store per object size (offload="on_put"), warmed up: its arena touched once and
    its disk tier's directories made, so that a round measures the disk copies alone."""
    stores = {}
    for size in OFFLOAD_SIZES:
        kv = store.connect(f"embedded://{scratch / f'offload-{size}'}", offload="on_put",
                           dram_bytes=OFFLOAD_TOTAL + 16 * MiB)
        run_offload(kv, size, src, "warm")
        stores[size] = kv
    return stores


def run_offload(kv: store.Store, size: int, src: np.ndarray, tag: str) -> float:
    """Seconds from the first put of OFFLOAD_TOTAL bytes until flush() returns (every copy
    complete); the objects are removed afterwards, their files with them."""
    count = OFFLOAD_TOTAL // size
    keys = [f"o/{tag}/{i}" for i in range(count)]
    done = kv.stats()["offload"]["completed"]
    array = src[:size]
    start = time.perf_counter()
    for key in keys:
        kv.put_from(key, array)
    kv.flush()  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    completed = kv.stats()["offload"]["completed"] - done
    if completed != count:
        raise RuntimeError(f"offload: {completed} of {count} copies completed")
    kv.remove_many(keys)
    return elapsed


def offload(stores: dict[int, store.Store], src: np.ndarray, round_: int) -> None:
    for size, kv in stores.items():
        count = OFFLOAD_TOTAL // size
        elapsed = run_offload(kv, size, src, str(round_))
        emit("embedded", "offload", size, 1, count * size / elapsed / 1e9, "GB/s",
             policy="on_put", objects=count)


def disk_store(scratch: Path, src: np.ndarray) -> store.Store:
    """A store whose objects are all on disk only: written by one store, reopened by another."""
    path = scratch / "disk"
    with store.connect(f"embedded://{path}", offload="on_put", dram_bytes=128 * MiB) as kv:
        for size in SIZES[1:]:
            for i in range(4):
                kv.put_from(f"d/{size}/{i}", src[:size])
        kv.flush()  # type: ignore[attr-defined]
    return store.connect(f"embedded://{path}", dram_bytes=16 * MiB)


# -- the distributed scheme, Redis, and the raw socket stream ------------------------------------
NET = {"tcp": "tcp://127.0.0.1:0", "sm": "sm://"}
EMBEDDED_ONLY = "--embedded" in sys.argv
DISTRIBUTED_ONLY = "--distributed" in sys.argv
CROSSOVER = [1 * KiB, 4 * KiB, 16 * KiB, 32 * KiB, 48 * KiB, 64 * KiB, 256 * KiB]


def distributed(src: np.ndarray, dst: memoryview) -> None:
    import _common
    from _raw import raw_stream
    from _store_net import cluster, crossover, disk_reads, redis_rows, redis_server

    _common.QUIET = True
    for round_ in range(ROUNDS):
        raw_stream("store", [16 * MiB])
        row = _common.RESULTS[-1]
        emit("raw", "socket-stream", row["size"], 1, row["value"], "GB/s", round=round_)
        with redis_server() as client:
            if client is not None:
                redis_rows(client, SIZES, src, BATCH, SMALL, bandwidth, emit, rate)
        for label, scheme in NET.items():
            with cluster(scheme, dram=256 * MiB) as uri, store.connect(uri) as kv:
                singles(kv, None, src, dst, label)
                batches(kv, src, label)
                crossover(uri, label, src, dst, CROSSOVER, emit, rate)
            disk_reads(scheme, label, src, dst, 64 * KiB, emit, rate)


def embedded(scratch: Path, src: np.ndarray, src_view: memoryview, dst: memoryview) -> None:
    disk_kv = disk_store(scratch, src)
    stores = offload_stores(scratch, src)
    with store.connect(f"embedded://{scratch / 'dram'}", dram_bytes=256 * MiB) as kv:
        for round_ in range(ROUNDS):
            raw(scratch, src_view, dst)
            singles(kv, disk_kv, src, dst)
            batches(kv, src)
            offload(stores, src, round_)
    disk_kv.close()
    for kv in stores.values():
        kv.close()


def main() -> None:
    global QUIET
    logging.disable(logging.WARNING)
    QUIET = True
    scratch = Path(tempfile.mkdtemp(prefix="petasus-bench-store-", dir=os.environ.get("TMPDIR")))
    src = np.frombuffer(np.random.default_rng(0).bytes(64 * MiB), dtype=np.uint8)
    src_view, dst = memoryview(touched(64 * MiB)), memoryview(touched(64 * MiB))
    src_view[:] = src.data
    try:
        if not DISTRIBUTED_ONLY:
            embedded(scratch, src, src_view, dst)
        if not EMBEDDED_ONLY:
            distributed(src, dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summarize()

    mib = 1 * MiB
    ratio("get_into-vs-memcpy", find(scheme="embedded", op="get_into", size=mib),
          find(scheme="raw", op="memcpy", size=mib), 0.8)
    ratio("put_from-vs-memcpy", find(scheme="embedded", op="put_from", size=mib),
          find(scheme="raw", op="memcpy", size=mib), 0.5)
    for size in OFFLOAD_SIZES:
        ratio("offload-vs-pwrite", find(scheme="embedded", op="offload", size=size),
              find(scheme="raw", op="pwrite", size=size), 0.7)
    stream = find(scheme="raw", op="socket-stream", size=16 * MiB)
    for label in NET:
        ratio("get-vs-redis", find(scheme=label, op="get", size=mib),
              find(scheme="redis", op="get", size=mib), 1.5)
        ratio("get_into-vs-socket-stream", find(scheme=label, op="get_into", size=16 * MiB),
              stream, 0.7)
        ratio("get_many-vs-redis-mget", find(scheme=label, op="get_many", size=SMALL,
                                             batch=BATCH),
              find(scheme="redis", op="get_many", size=SMALL, batch=BATCH), 0.5)
        ratio("disk-push-vs-pull", find(scheme=label, op="get_disk_push", size=64 * KiB),
              find(scheme=label, op="get_disk_pull", size=64 * KiB), 1.3)
    many = find(scheme="embedded", op="get_many", size=SMALL, batch=BATCH)
    if many is not None:
        value = many["value"] / 200_000
        emit("embedded", "ratio:get_many-vs-200k-ops", SMALL, BATCH, value, "x",
             target=">=1.0", ok=value >= 1.0, ops_s=many["value"])


if __name__ == "__main__":
    main()
