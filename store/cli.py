"""``petasus-store``: the store's command line.

``petasus-store demo [PATH]`` opens an embedded store whose DRAM tier is smaller than what it
writes, so objects spill to disk while it runs; it reads every object back, verifies it, and
shows where the bytes are. Part 2 adds ``master`` and ``node``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence

import xxhash
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import StoreError, connect
from .config import Offload

MiB = 1 << 20


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def demo(args: argparse.Namespace) -> int:
    console = Console()
    uri = f"embedded://{os.path.abspath(args.path)}" if args.path else "embedded://"
    count = max(1, args.total * MiB // (args.object_kib * 1024))
    size = args.object_kib * 1024
    console.print(f"[bold]petasus store demo[/]: {uri}  DRAM {args.dram} MiB, writing "
                  f"{count} objects of {args.object_kib} KiB ({_size(count * size)}), "
                  f"offload={args.offload}")
    digests: dict[str, int] = {}
    bad = 0
    with connect(uri, dram_bytes=args.dram * MiB, offload=args.offload) as kv, Progress(
        TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/"
        "{task.total}"), TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task("put", total=count)
        # Deterministic contents, so a second run over the same PATH can verify what the
        # first one left on disk.
        base = random.Random(size).randbytes(size)
        keys = [f"demo/{size}/{i:06d}" for i in range(count)]
        found = [key for key, present in zip(keys, kv.exists_many(keys)) if present]
        if found:
            buffer = bytearray(size)
            damaged = 0
            for key in found:
                i = int(key.rsplit("/", 1)[1])
                n = kv.get_into(key, buffer)
                damaged += n != size or buffer != i.to_bytes(8, "little") + base[8:]
            progress.console.print(f"reopened: {len(found)} objects from an earlier run, "
                                   f"{len(found) - damaged} intact")
            bad += damaged
        started = time.perf_counter()
        for i, key in enumerate(keys):
            value = i.to_bytes(8, "little") + base[8:]
            digests[key] = xxhash.xxh3_64_intdigest(value)
            kv.put(key, value, overwrite=True)
            progress.advance(task)
        put_s = time.perf_counter() - started
        task = progress.add_task("get", total=count)
        buffer = bytearray(size)
        started = time.perf_counter()
        for key, digest in digests.items():
            n = kv.get_into(key, buffer)
            if n != size or xxhash.xxh3_64_intdigest(buffer) != digest:
                bad += 1
            progress.advance(task)
        get_s = time.perf_counter() - started
        prefix = kv.exists_prefix([*keys[:8], "demo/missing", *keys[8:10]])
        stats = kv.stats()
    table = Table(title="tiers")
    for col in ("tier", "capacity", "used", "objects", "hits", "bytes in", "bytes out"):
        table.add_column(col, justify="right")
    for tier in ("dram", "disk"):
        s = stats[tier]
        cap = "unbounded" if s["capacity"] is None else _size(s["capacity"])
        table.add_row(tier, cap, _size(s["used"]), str(s["objects"]), str(s["hits"]),
                      _size(s["bytes_in"]), _size(s["bytes_out"]))
    console.print(table)
    off = stats["offload"]
    table = Table(title="offload")
    for col in ("policy", "completed", "deferred", "force dropped", "failed", "evictions"):
        table.add_column(col, justify="right")
    table.add_row(off["policy"], str(off["completed"]), str(off["deferred"]),
                  str(off["force_dropped"]), str(off["failed"]),
                  str(stats["dram"]["evictions"]))
    console.print(table)
    total = count * size
    console.print(f"put {_size(total / put_s)}/s, get_into {_size(total / get_s)}/s; "
                  f"exists_prefix of 8 present + 1 missing = {prefix}")
    if bad:
        console.print(f"[red]FAIL[/]: {bad} of {count} objects read back wrong")
        return 1
    spilled = stats["disk"]["objects"]
    console.print(f"verified {count} objects ({_size(total)}), {spilled} with a disk copy: ok")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="petasus-store", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write more than DRAM holds, read it all back verified")
    d.add_argument("path", nargs="?", help="store directory (default: a temporary one)")
    d.add_argument("--dram", type=int, default=16, help="DRAM tier in MiB (default 16)")
    d.add_argument("--total", type=int, default=64, help="MiB to write (default 64)")
    d.add_argument("--object-kib", type=int, default=256, help="object size in KiB")
    d.add_argument("--offload", default=Offload.ON_EVICT.value,
                   choices=[o.value for o in Offload])
    args = parser.parse_args(argv)
    try:
        return demo(args)
    except StoreError as exc:
        print(f"petasus-store: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
