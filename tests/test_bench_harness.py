"""The benchmark harness's drivers keep the number of calls in flight they claim to, account
CPU time per process, and petasus's callback clients complete and check every call. No timing
is asserted: these tests run on a shared machine, and speed is the benchmarks' business."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _drive  # noqa: E402


class FakeServer:
    """Answers in send order; counts the calls in flight."""

    def __init__(self) -> None:
        self.inflight = 0
        self.most = 0
        self.sent: list[int] = []
        self.waited: list[int] = []

    def send(self, i: int) -> int:
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        self.sent.append(i)
        return i * 10

    def wait(self, token: int, i: int) -> None:
        assert token == i * 10
        self.inflight -= 1
        self.waited.append(i)


@pytest.mark.parametrize("conc", [1, 4, 16])
def test_window_keeps_conc_in_flight_and_answers_in_order(conc: int) -> None:
    server = FakeServer()
    latencies = _drive.window(server.send, server.wait, conc, 0.02)
    assert server.most == conc
    assert server.inflight == 0
    assert server.waited == server.sent == list(range(len(latencies)))
    assert len(latencies) >= conc


def test_burst_sends_whole_bursts() -> None:
    server = FakeServer()
    latencies = _drive.burst(server.send, server.wait, 8, 0.02)
    assert server.most == 8
    assert len(latencies) % 8 == 0 and latencies
    assert server.waited == list(range(len(latencies)))


def test_serial_numbers_its_calls() -> None:
    seen: list[int] = []
    latencies = _drive.serial(seen.append, 0.01)
    assert seen == list(range(len(latencies)))


@pytest.mark.parametrize("pattern", ["window", "burst"])
def test_async_patterns_keep_conc_in_flight(pattern: str) -> None:
    state = {"now": 0, "most": 0}
    seen: list[int] = []

    async def call(i: int) -> None:
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0)
        seen.append(i)
        state["now"] -= 1

    drive = _drive.awindow if pattern == "window" else _drive.aburst
    latencies = asyncio.run(drive(call, 6, 0.02))
    assert state["most"] == 6
    assert len(latencies) == len(seen)
    assert len(set(seen)) == len(seen)  # every call number once


def test_threads_window_makes_each_client_in_its_own_thread() -> None:
    owners: list[int] = []
    lock = threading.Lock()

    def make() -> Callable[[int], None]:
        me = threading.get_ident()
        with lock:
            owners.append(me)

        def call(_i: int) -> None:
            assert threading.get_ident() == me
        return call

    latencies = _drive.threads_window(make, 3, 0.02)
    assert len(set(owners)) == 3
    assert threading.get_ident() not in owners
    assert latencies


def test_threads_window_reports_a_failed_call() -> None:
    def make() -> Callable[[int], None]:
        def call(i: int) -> None:
            _drive.check(-1, i)
        return call

    with pytest.raises(RuntimeError, match="returned -1"):
        _drive.threads_window(make, 2, 0.02)


def test_cpu_seconds_follows_the_process_clock_and_proc_stat() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sum(range(3_000_000)); "
                              "print('done', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "done\n"  # type: ignore[union-attr]
        clock = _drive.cpu_seconds(child.pid)
        with open(f"/proc/{child.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        assert clock > 0
        assert clock == pytest.approx(ticks, abs=0.05)  # the same accounting, 10 ms ticks
        assert _drive.cpu_seconds(os.getpid()) == pytest.approx(
            time.process_time(), abs=0.05)
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]


def test_measure_refuses_an_empty_run() -> None:
    with pytest.raises(RuntimeError, match="no call"):
        _drive.measure(os.getpid(), list)


def test_sample_fields_per_call() -> None:
    with _drive.Meter(os.getpid()) as meter:
        pass
    meter.wall, meter.cpu_client, meter.cpu_server = 2.0, 0.004, 0.002
    fields = _drive.Sample(meter, [1000, 3000, 2000, 4000]).fields()
    assert fields["value"] == 2.0
    assert fields["p50_us"] == 3.0
    assert fields["cpu_us_client"] == 1000.0
    assert fields["cpu_us_server"] == 500.0


@pytest.mark.parametrize("driver", ["callback_window", "callback_burst"])
def test_petasus_callback_clients_complete_and_check_every_call(driver: str) -> None:
    import _common
    import _rpc_petasus
    from _rpc_peer import sum as sum_rpc

    from petasus import hg

    with _common.child("_rpc_peer.py", "tcp://127.0.0.1:0", "0") as (_proc, address), \
            hg.Engine("tcp://127.0.0.1:0", spin_us=0) as engine:
        engine.declare(sum_rpc)
        method = engine.lookup(address).sum
        latencies = getattr(_rpc_petasus, driver)(engine, method, 4, 0.05)
        assert latencies
        assert engine.statistics()["sent"] == len(latencies)
        assert method(2, 3) == 5  # nothing left in flight or broken


def test_plots_draw_from_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import _plot

    rows = []
    for plugin, api in (("tcp", "blocking"), ("pyzmq", "blocking")):
        for conc in (1, 4):
            for pattern in ("window", "burst"):
                rows.append({"bench": "rpc", "plugin": plugin, "op": "sum", "size": 8,
                             "concurrency": conc, "value": 1000.0 * conc, "unit": "ops/s",
                             "api": api, "pattern": pattern, "placement": "default",
                             "spin_us": 200, "cpu_us_client": 10.0, "cpu_us_server": 5.0})
    bulk = [{"bench": "bulk", "plugin": "tcp", "op": "pull", "size": 1 << s, "concurrency": 1,
             "value": 1.0, "unit": "GB/s"} for s in (12, 16, 20)]
    bulk.append({"bench": "bulk", "plugin": "raw", "op": "memcpy", "size": 1 << 26,
                 "concurrency": 1, "value": 5.0, "unit": "GB/s"})
    paths = _plot.rpc(rows, tmp_path, "test") + _plot.bulk(bulk, tmp_path, "test")
    for path in paths:
        assert path.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "rpc.jsonl").read_text().count("\n") == len(rows)
