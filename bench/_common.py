"""Shared helpers of the benchmarks: JSON result lines, latency statistics, child processes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS: list[dict[str, Any]] = []
JSON = "--json" in sys.argv
QUIET = False  # collect without printing (rounds that are summarized later)


def emit(bench: str, plugin: str, op: str, size: int, concurrency: int, value: float,
         unit: str, **extra: Any) -> dict[str, Any]:
    """One result: a JSON line with --json, a readable line otherwise; kept for the ratios."""
    row = {"bench": bench, "plugin": plugin, "op": op, "size": size,
           "concurrency": concurrency, "value": round(value, 3), "unit": unit, **extra}
    RESULTS.append(row)
    if QUIET:
        return row
    if JSON:
        print(json.dumps(row), flush=True)
    else:
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"{bench:5} {plugin:15} {op:38} {size:>9} x{concurrency:<3} "
              f"{value:>12.3f} {unit:8} {tail}", flush=True)
    return row


def summarize(bench: str, keys: tuple[str, ...], medians: tuple[str, ...] = ()) -> None:
    """Replace the collected rows by one median row per configuration (``keys`` say which
    fields make a configuration) and print those: rounds interleaved in time, so a burst of
    noise on a shared machine moves one sample of each, not a whole result. The fields named
    in ``medians`` (CPU per call) take their own median; the others come from the row of
    median value."""
    global QUIET
    rows, RESULTS[:] = list(RESULTS), []
    QUIET = False
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    for group in groups.values():
        middle = sorted(group, key=lambda r: r["value"])[len(group) // 2]
        extra = {k: middle[k] for k in middle if k not in
                 ("bench", "plugin", "op", "size", "concurrency", "value", "unit")}
        for k in medians:
            if k in extra:
                extra[k] = round(statistics.median(r[k] for r in group), 2)
        emit(bench, middle["plugin"], middle["op"], middle["size"], middle["concurrency"],
             statistics.median(r["value"] for r in group), middle["unit"], rounds=len(group),
             **extra)


def find(**match: Any) -> dict[str, Any] | None:
    for row in RESULTS:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def ratio(bench: str, name: str, num: dict[str, Any] | None, den: dict[str, Any] | None,
          target: float, higher_is_better: bool = True, plugin: str | None = None,
          **extra: Any) -> None:
    """Emit num/den against a target; ``plugin`` names the row (default: num's plugin);
    ``extra`` fields (which rows were set against each other) are added to it."""
    if num is None or den is None or not den["value"]:
        return
    value = num["value"] / den["value"]
    ok = value >= target if higher_is_better else value <= target
    emit(bench, plugin or num["plugin"], f"ratio:{name}", num["size"], num["concurrency"],
         value, "x", target=(">=" if higher_is_better else "<=") + str(target), ok=ok, **extra)


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    """(mean, p50, p99) in microseconds."""
    ordered = sorted(samples_ns)
    n = len(ordered)
    return (sum(ordered) / n / 1e3, ordered[n // 2] / 1e3, ordered[min(n - 1, n * 99 // 100)] / 1e3)


def timed(fn: Callable[[], int], min_seconds: float = 0.5, min_rounds: int = 3) -> float:
    """Bytes per second of ``fn`` (which returns the bytes it moved), after one warm-up call."""
    fn()
    moved, rounds = 0, 0
    start = time.perf_counter()
    while True:
        moved += fn()
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and rounds >= min_rounds:
            return moved / elapsed


@contextmanager
def child(*args: str, cpu: int | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``python bench/<args>``; yield it and its first stdout line (its address)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu is not None:
        env["BENCH_CPU"] = str(cpu)
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, env=env, cwd=HERE)
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"benchmark peer {args} exited without an address")
        yield proc, line
    finally:
        if proc.poll() is None:
            proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def pin_from_env() -> None:
    cpu = os.environ.get("BENCH_CPU")
    if cpu is not None:
        pin_process({int(cpu)})


def pin_process(cpus: set[int] | None) -> None:
    """Pin every thread of this process to ``cpus`` (None: all of them). Every thread, not
    only the caller: a library's threads started in an earlier measurement (grpcio's) keep
    the affinity they were born with."""
    target = cpus if cpus is not None else set(range(os.cpu_count() or 1))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), target)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that exited meanwhile


def touched(size: int) -> bytearray:
    """A buffer whose pages are already faulted in: a fresh one costs more than the copy."""
    buf = bytearray(size)
    view = memoryview(buf)
    for off in range(0, size, 4096):
        view[off] = 1
    return buf
