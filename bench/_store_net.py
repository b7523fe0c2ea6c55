"""The distributed rows of bench/store.py: a master and a node in processes, the client here;
Redis beside it, started from Debian's redis-server on a loopback port, persistence off."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from petasus import store

KiB, MiB = 1 << 10, 1 << 20


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "petasus.store.cli", *args],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    found = re.match(r"listening on (\S+)", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"petasus-store {args[0]} did not start: {line!r}")
    return proc, found.group(1)


@contextlib.contextmanager
def cluster(scheme: str, *, dram: int, nodes: int = 1, **flags: Any) -> Iterator[str]:
    """A master and ``nodes`` storage nodes; yields the master's URI once all joined."""
    procs = []
    try:
        args = ["master", "--listen", scheme]
        for name, value in flags.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        master, uri = _start(args)
        procs.append(master)
        for _ in range(nodes):
            procs.append(_start(["node", "--master", uri, "--listen", scheme,
                                 "--dram-bytes", str(dram)])[0])
        with store.connect(uri, timeout=10) as probe:
            deadline = time.monotonic() + 30
            while len(probe.cluster()["nodes"]) < nodes:  # type: ignore[attr-defined]
                if time.monotonic() > deadline:
                    raise RuntimeError("storage nodes did not join the master")
                time.sleep(0.01)
        yield uri
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[Any]:
    """A private redis-server (no persistence) and a redis-py client with hiredis; None when
    either is missing (the rows are then left out, and said so)."""
    exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        redis = None  # type: ignore[assignment]
    if exe is None or redis is None:
        print("store bench: redis rows skipped (needs Debian's redis-server and redis-py: "
              "EXTRAS=test,bench bash scripts/setup.sh)", file=sys.stderr)
        yield None
        return
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="petasus-bench-redis-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir, "--protected-mode", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        yield client
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def redis_rows(client: Any, sizes: list[int], src: Any, batch: int, small: int,
               bandwidth: Callable[..., None], emit: Callable[..., Any],
               rate: Callable[[Callable[[], int]], float]) -> None:
    for size in sizes:
        value = src[:size].tobytes()
        keys = [f"s/{size}/{i}" for i in range(4)]
        for key in keys:
            client.set(key, value)
        turn = [0]

        def put(value: bytes = value, keys: list[str] = keys, turn: list[int] = turn) -> int:
            turn[0] += 1
            client.set(keys[turn[0] % 4], value)
            return len(value)

        def get(keys: list[str] = keys, turn: list[int] = turn) -> int:
            turn[0] += 1
            return len(client.get(keys[turn[0] % 4]))

        bandwidth("redis", "put", size, put)
        bandwidth("redis", "get", size, get)
        client.delete(*keys)
    items = {f"b/{i}": src[i * small:(i + 1) * small].tobytes() for i in range(batch)}
    keys = list(items)
    client.mset(items)

    def mset() -> int:
        client.mset(items)
        return batch

    def mget() -> int:
        return len(client.mget(keys))

    for op, fn in (("put_many", mset), ("get_many", mget)):
        ops = rate(fn)
        emit("redis", op, small, batch, ops, "ops/s", gb_s=round(ops * small / 1e9, 3))
    client.delete(*keys)


def crossover(uri: str, label: str, src: Any, dst: memoryview, sizes: list[int],
              emit: Callable[..., Any], rate: Callable[[Callable[[], int]], float]) -> None:
    """Gets of each size through the node RPC (inline) and one-sided, same objects; each mode
    from a client of its own, whose location cache holds only that mode's reads."""
    with store.connect(uri) as writer:
        for size in sizes:
            for i in range(4):
                writer.put(f"x/{size}/{i}", src[:size].tobytes(), overwrite=True)
    for mode, limit in (("inline", 1 << 62), ("one_sided", -1)):
        with store.connect(uri, inline_bytes=limit) as kv:
            for size in sizes:
                keys = [f"x/{size}/{i}" for i in range(4)]
                turn = [0]

                def get(keys: list[str] = keys, turn: list[int] = turn) -> int:
                    turn[0] += 1
                    kv.get_into(keys[turn[0] % 4], dst)
                    return 1

                ops = rate(get)
                emit(label, f"get_into_{mode}", size, 1, ops, "ops/s",
                     us=round(1e6 / ops, 1), gb_s=round(ops * size / 1e9, 3))


def disk_reads(scheme: str, label: str, src: Any, dst: memoryview, size: int,
               emit: Callable[..., Any], rate: Callable[[Callable[[], int]], float]) -> None:
    """Reads of disk-only objects: push (one RPC to the owner) against pull (stage, read,
    release). DRAM is filled past its watermark so the first objects are evicted to disk.
    ``round_trips`` per read are counted: the master's locates (none once the client cached
    the location) plus one per push, three per pull (stage, the one-sided read, release)."""
    dram = 8 * MiB
    with cluster(scheme, dram=dram, offload="on_evict") as uri, store.connect(uri) as kv:
        keys = [f"disk/{i}" for i in range(16)]
        for key in keys:
            kv.put(key, src[:size].tobytes())
        filler = 64 * KiB
        for i in range(2 * dram // filler):
            kv.put(f"fill/{i}", src[:filler].tobytes())
        kv.flush(30)  # type: ignore[attr-defined]
        # push, pull, pull, push: whatever the cluster still settles after the fill (evictions,
        # the page cache) weighs on both modes alike; the median takes all four rows.
        for mode in ("push", "pull", "pull", "push"):
            kv.disk_read = mode  # type: ignore[attr-defined]
            before = dict(kv.c)  # type: ignore[attr-defined]
            turn = [0]

            def get(turn: list[int] = turn) -> int:
                turn[0] += 1
                kv.get_into(keys[turn[0] % len(keys)], dst)
                return 1
            ops = rate(get)
            after = kv.c  # type: ignore[attr-defined]
            moved = after[f"disk_{mode}"] - before[f"disk_{mode}"]
            trips = after["locates"] - before["locates"] + moved * (1 if mode == "push" else 3)
            emit(label, f"get_disk_{mode}", size, 1, ops, "ops/s", us=round(1e6 / ops, 1),
                 disk_reads=moved, round_trips=round(trips / max(moved, 1), 2))
