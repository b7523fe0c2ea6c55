"""The main job's demos: an embedded store that spills to disk, and a cluster of a master and
two storage nodes that spills, replicates and loses a node without losing an object."""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import xxhash
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import connect

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




@contextmanager
def local_cluster(scheme: str, *, nodes: int, dram: int, node_ttl: float,
                  console: Console) -> Iterator[tuple[str, list[subprocess.Popen[str]]]]:
    """A master and ``nodes`` storage nodes as processes of this machine; all stopped after."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "petasus.store.cli", *args],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        found = re.match(r"listening on (\S+)", line)
        if not found:
            raise RuntimeError(f"petasus-store {args[0]} did not start")
        return found.group(1)

    try:
        uri = start("master", "--listen", scheme, "--node-ttl", str(node_ttl))
        node_procs = []
        for i in range(nodes):
            start("node", "--master", uri, "--listen", scheme, "--dram-bytes", str(dram),
                  "--name", f"node{i}")
            node_procs.append(procs[-1])
        with connect(uri, timeout=10) as probe:
            if not probe.wait_until(  # type: ignore[attr-defined]
                    lambda: len(probe.cluster()["nodes"]) >= nodes, 30):  # type: ignore[attr-defined]
                raise RuntimeError("the storage nodes did not join the master")
        console.print(f"master {uri}, {nodes} nodes of {_size(dram)} DRAM each (processes "
                      f"{', '.join(str(p.pid) for p in procs)})")
        yield uri, node_procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cluster_demo(args: argparse.Namespace) -> int:
    console = Console()
    dram = args.dram * MiB // 2
    size = args.object_kib * 1024
    count = max(1, args.total * MiB // size)
    base = random.Random(size).randbytes(size)

    def value(i: int) -> bytes:
        return i.to_bytes(8, "little") + base[8:]

    bad = 0
    with local_cluster(args.cluster, nodes=2, dram=dram, node_ttl=1.5,
                       console=console) as (uri, nodes), connect(uri) as kv:
        # 1. More than the cluster's DRAM holds: objects spill to the nodes' disks.
        keys = [f"spill/{i:06d}" for i in range(count)]
        with Progress(TextColumn("{task.description:<12}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("put", total=count)
            started = time.perf_counter()
            for i, key in enumerate(keys):
                kv.put(key, value(i), overwrite=True)
                progress.advance(task)
            put_s = time.perf_counter() - started
            task = progress.add_task("get", total=count)
            buffer = bytearray(size)
            started = time.perf_counter()
            for i, key in enumerate(keys):
                n = kv.get_into(key, buffer)
                bad += n != size or buffer != value(i)
                progress.advance(task)
            get_s = time.perf_counter() - started
        spilled = kv.stats()
        console.print(f"spill: {count} objects ({_size(count * size)}) through "
                      f"{_size(2 * dram)} of DRAM: put {_size(count * size / put_s)}/s, get "
                      f"{_size(count * size / get_s)}/s, {spilled['disk']['objects']} read "
                      f"back from disk, {bad} wrong")
        kv.remove_many(keys)
        # 2. Two replicas each, then one node is killed: nothing is lost.
        replicated = [f"replicated/{i:04d}" for i in range(max(1, dram // 4 // size))]
        kv.put_many([(k, value(i)) for i, k in enumerate(replicated)], replicas=2)
        victim = nodes[1]
        victim.kill()
        victim.wait()
        lost = sum(kv.get(k) != value(i) for i, k in enumerate(replicated))
        if not kv.wait_until(  # type: ignore[attr-defined]
                lambda: len(kv.cluster()["nodes"]) <= 1, 30):  # type: ignore[attr-defined]
            raise RuntimeError("the master did not notice the killed node")
        lost += sum(kv.get(k) != value(i) for i, k in enumerate(replicated))
        console.print(f"replicas=2: {len(replicated)} objects, node1 killed (kill -9), the "
                      f"master dropped it; {lost} lost or wrong, read twice (before and after "
                      "the drop)")
        bad += lost
        stats = kv.stats()
    table = Table(title="cluster")
    for col in ("objects", "DRAM copies", "disk copies", "evictions", "offloads", "lost"):
        table.add_column(col, justify="right")
    table.add_row(str(stats["ops"]["put"]), str(stats["dram"]["objects"]),
                  str(stats["disk"]["objects"]), str(stats["dram"]["evictions"]),
                  str(stats["offload"]["completed"]), "0" if not bad else str(bad))
    console.print(table)
    if bad:
        console.print(f"[red]FAIL[/]: {bad} objects read back wrong or lost")
        return 1
    console.print("cluster demo: every object verified; master and nodes stopped: ok")
    return 0
