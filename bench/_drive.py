"""How every RPC benchmark keeps calls in flight, and what it records about them.

Two patterns, the same for every system so that their rows compare:

- ``window``: ``conc`` calls in flight at all times; each time one returns a new one is sent
  (a sliding window, the way a pipelined client runs);
- ``burst``: ``conc`` calls sent together, all of them awaited, then the next burst (the
  slowest call of each burst holds up the next ones, so this is the lower of the two).

At one call in flight both are the same loop, measured once and recorded as ``window``.

Each measurement runs for a fixed wall time (not a fixed call count), so a slow system costs the
run no more time than a fast one, and records: calls per second, per-call latency (from the
call's send to its completion), and the CPU microseconds per call spent by all threads of the
client process and of the server process over the measured interval. The CPU time of both
processes comes from their process CPU clocks (every thread, those that exited included, in
nanoseconds); ``/proc/PID/stat``'s utime+stime (10 ms ticks) where that clock is not
available.

No third-party imports here: the drivers are tested without the benchmark peers installed.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
now_ns = time.perf_counter_ns
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) that process ``pid`` has used so far."""
    try:
        # Linux's CPU clock of another process: clock_getcpuclockid(pid), spelled out
        # (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)), as Python does not expose it.
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK


class Meter:
    """Wall time and the CPU time of this process and of ``server_pid`` over one interval."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.me = os.getpid()
        self.wall = self.cpu_client = self.cpu_server = 0.0
        self._marks = (0.0, 0.0, 0.0)

    def __enter__(self) -> Meter:
        self._marks = (time.perf_counter(), cpu_seconds(self.me), cpu_seconds(self.server_pid))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, client, server = self._marks
        self.wall = time.perf_counter() - wall
        self.cpu_client = cpu_seconds(self.me) - client
        self.cpu_server = cpu_seconds(self.server_pid) - server


class Sample:
    """One measurement's outcome, for ``record``."""

    __slots__ = ("calls", "cpu_client", "cpu_server", "latencies", "wall")

    def __init__(self, meter: Meter, latencies: list[int]) -> None:
        self.calls = len(latencies)
        self.latencies = latencies
        self.wall = meter.wall
        self.cpu_client = meter.cpu_client
        self.cpu_server = meter.cpu_server

    def fields(self) -> dict[str, Any]:
        """Rate, latency percentiles and CPU per call, as record fields."""
        ordered = sorted(self.latencies)
        n = len(ordered)
        return {"value": n / self.wall,
                "p50_us": round(ordered[n // 2] / 1e3, 2),
                "p99_us": round(ordered[min(n - 1, n * 99 // 100)] / 1e3, 2),
                "cpu_us_client": round(self.cpu_client / n * 1e6, 2),
                "cpu_us_server": round(self.cpu_server / n * 1e6, 2)}


def measure(server_pid: int, run: Callable[[], list[int]]) -> Sample:
    with Meter(server_pid) as meter:
        latencies = run()
    if not latencies:
        raise RuntimeError("a measurement completed no call")
    return Sample(meter, latencies)


async def ameasure(server_pid: int, run: Callable[[], Awaitable[list[int]]]) -> Sample:
    with Meter(server_pid) as meter:
        latencies = await run()
    if not latencies:
        raise RuntimeError("a measurement completed no call")
    return Sample(meter, latencies)


# -- blocking clients ------------------------------------------------------------------------
def serial(call: Callable[[int], None], seconds: float) -> list[int]:
    """One call at a time: ``call(i)`` sends call ``i``, waits for it and checks its answer."""
    latencies: list[int] = []
    end = now_ns() + int(seconds * 1e9)
    i = 0
    t = now_ns()
    while t < end:
        call(i)
        done = now_ns()
        latencies.append(done - t)
        t = done
        i += 1
    return latencies


def window(send: Callable[[int], T], wait: Callable[[T, int], None], conc: int,
           seconds: float) -> list[int]:
    """``conc`` calls in flight, answered in the order they were sent (one connection, one
    server thread, or handles waited on oldest first): ``send(i)`` returns a token that
    ``wait(token, i)`` completes and checks; a new call goes out as each one returns."""
    latencies: list[int] = []
    pending: deque[tuple[T, int, int]] = deque()
    end = now_ns() + int(seconds * 1e9)
    for i in range(conc):
        pending.append((send(i), i, now_ns()))
    n = conc
    while pending:
        token, i, t0 = pending.popleft()
        wait(token, i)
        t = now_ns()
        latencies.append(t - t0)
        if t < end:
            pending.append((send(n), n, t))
            n += 1
    return latencies


def burst(send: Callable[[int], T], wait: Callable[[T, int], None], conc: int,
          seconds: float) -> list[int]:
    """``conc`` calls sent together, then all awaited in order; a call's latency runs from
    the burst's start to its own completion."""
    latencies: list[int] = []
    end = now_ns() + int(seconds * 1e9)
    n = 0
    while now_ns() < end:
        t0 = now_ns()
        tokens = [send(n + k) for k in range(conc)]
        for k, token in enumerate(tokens):
            wait(token, n + k)
            latencies.append(now_ns() - t0)
        n += conc
    return latencies


def threads_window(make: Callable[[], Callable[[int], None]], conc: int,
                   seconds: float) -> list[int]:
    """``conc`` threads, each with a client of its own (``make()``, called in that thread
    before the clock starts), each calling in a loop: the window of a library whose client
    object serves one thread and one call at a time."""
    results: list[list[int]] = [[] for _ in range(conc)]
    errors: list[BaseException] = []
    start = threading.Barrier(conc + 1)

    def run(k: int) -> None:
        mine = results[k]
        try:
            call = make()
            start.wait()
            end = now_ns() + int(seconds * 1e9)
            i = k
            t = now_ns()
            while t < end:
                call(i)
                done = now_ns()
                mine.append(done - t)
                t = done
                i += conc
        except threading.BrokenBarrierError:
            pass  # another worker failed first
        except BaseException as exc:  # reported on the main thread
            errors.append(exc)
            start.abort()

    workers = [threading.Thread(target=run, args=(k,)) for k in range(conc)]
    for w in workers:
        w.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return [t for mine in results for t in mine]


def threads_burst(pool: ThreadPoolExecutor, call: Callable[[int], None], conc: int,
                  seconds: float) -> list[int]:
    """``conc`` calls submitted together to a pool of ``conc`` threads, all awaited."""
    latencies: list[int] = []
    end = now_ns() + int(seconds * 1e9)
    n = 0

    def timed(i: int, t0: int) -> int:
        call(i)
        return now_ns() - t0

    while now_ns() < end:
        t0 = now_ns()
        futures = [pool.submit(timed, n + k, t0) for k in range(conc)]
        latencies.extend(f.result() for f in futures)
        n += conc
    return latencies


# -- asyncio clients -------------------------------------------------------------------------
async def awindow(call: Callable[[int], Awaitable[None]], conc: int,
                  seconds: float) -> list[int]:
    """``conc`` tasks, each awaiting one call after another: the asyncio window."""
    results: list[list[int]] = [[] for _ in range(conc)]
    end = now_ns() + int(seconds * 1e9)

    async def worker(k: int) -> None:
        mine = results[k]
        i = k
        t = now_ns()
        while t < end:
            await call(i)
            done = now_ns()
            mine.append(done - t)
            t = done
            i += conc

    if conc == 1:
        await worker(0)  # no task of its own: the plain ``await`` loop a caller writes
    else:
        await asyncio.gather(*(worker(k) for k in range(conc)))
    return [t for mine in results for t in mine]


async def aburst(call: Callable[[int], Awaitable[None]], conc: int,
                 seconds: float) -> list[int]:
    """``conc`` calls gathered, then the next ``conc``."""
    latencies: list[int] = []
    end = now_ns() + int(seconds * 1e9)
    n = 0

    async def timed(i: int, t0: int) -> None:
        await call(i)
        latencies.append(now_ns() - t0)

    while now_ns() < end:
        t0 = now_ns()
        await asyncio.gather(*(timed(n + k, t0) for k in range(conc)))
        n += conc
    return latencies


def args(i: int) -> tuple[int, int]:
    """Arguments of call ``i``: distinct from their neighbours', and their sum fits int32."""
    return i % 1_000_000, i % 1000


def check(got: Any, i: int) -> None:
    x, y = args(i)
    if got != x + y:
        raise RuntimeError(f"sum({x}, {y}) returned {got!r}")
