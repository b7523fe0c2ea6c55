"""Counters and phase histograms, and their Prometheus exposition.

Histograms are fixed log-spaced buckets (10 us .. 10 s), cheap enough to record on every disk
phase; ``collector(store)`` turns any store's ``stats()`` into Prometheus metrics at scrape
time, so the hot path never touches prometheus_client.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

BOUNDS = tuple(10.0 ** (e / 2) for e in range(-10, 3))  # 10 us .. 10 s, two per decade


class Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def snapshot(self) -> dict[str, Any]:
        cumulative, buckets = 0, []
        for bound, n in zip((*BOUNDS, float("inf")), self.counts):
            cumulative += n
            buckets.append((bound, cumulative))
        return {"count": self.count, "sum_s": self.sum, "buckets": buckets}


def merge_histograms(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The sum of two ``Histogram.snapshot()`` records (same bounds)."""
    if a is None:
        return {"count": b["count"], "sum_s": b["sum_s"], "buckets": [tuple(x) for x in
                                                                      b["buckets"]]}
    return {"count": a["count"] + b["count"], "sum_s": a["sum_s"] + b["sum_s"],
            "buckets": [(x[0], x[1] + y[1]) for x, y in zip(a["buckets"], b["buckets"])]}


def histogram_family(name: str, doc: str, snapshot: dict[str, Any]) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    buckets = [(str(float(bound)), count) for bound, count in snapshot["buckets"]]
    buckets[-1] = ("+Inf", snapshot["count"])
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=snapshot["sum_s"])


def collector(store: Any, prefix: str = "petasus_store") -> Any:
    """A prometheus_client collector over ``store.stats()``; register it in a registry."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    gauges = {"capacity", "used", "objects", "pages_total", "pages_used", "queued",
              "in_flight", "full"}

    class StoreCollector:
        def collect(self) -> Iterator[Any]:
            stats = store.stats()
            for group in ("dram", "disk", "offload", "ops"):
                for name, raw in stats.get(group, {}).items():
                    value = int(raw) if isinstance(raw, bool) else raw
                    if not isinstance(value, (int, float)):
                        continue
                    metric = f"{prefix}_{group}_{name}"
                    if name in gauges:
                        yield GaugeMetricFamily(metric, f"{group} {name}", value=value)
                    else:
                        yield CounterMetricFamily(metric, f"{group} {name}", value=value)
            for phase, hist in stats.get("phases", {}).items():
                yield histogram_family(f"{prefix}_phase_{phase}_seconds",
                                       f"time spent in the {phase} phase", hist)

    return StoreCollector()


def serve_metrics(store: Any, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` for one store on ``addr:port``; returns (server, thread)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(collector(store))
    return start_http_server(port, addr=addr, registry=registry)


MAX_HEALTH_WAIT_S = 60.0


def serve_http(port: int, stats: Any, healthy: Any, addr: str = "127.0.0.1") -> Any:
    """``/metrics`` (Prometheus text, from ``stats()``'s numbers) and ``/health`` (200 once
    ``healthy(wait)``, else 503) on a daemon thread; returns the server. ``healthy`` may
    wait up to ``wait`` s for it, which ``/health?wait=S`` asks for (at most a minute): a
    script that starts a node waits on that instead of polling."""
    import http.server
    import threading
    import urllib.parse

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    class Flat:
        def collect(self) -> Iterator[Any]:
            for name, value in stats().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    yield GaugeMetricFamily(f"petasus_store_{name}", name, value=value)
                elif name in ("phases", "latency") and isinstance(value, dict):
                    for op, hist in value.items():
                        what = "RPC latency of" if name == "latency" else "time spent in"
                        yield histogram_family(f"petasus_store_{name}_{op}_seconds",
                                               f"{what} {op}", hist)

    registry = CollectorRegistry()
    registry.register(Flat())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/metrics":
                body, code = generate_latest(registry), 200
            elif url.path == "/health":
                try:
                    wait = float(urllib.parse.parse_qs(url.query).get("wait", ["0"])[-1])
                except ValueError:
                    wait = -1.0
                if not 0 <= wait <= MAX_HEALTH_WAIT_S:  # also NaN
                    body = f"wait must be 0-{MAX_HEALTH_WAIT_S:g} seconds\n".encode()
                    self._send(400, body)
                    return
                ok = healthy(wait)
                body, code = (b"ok\n" if ok else b"starting\n"), (200 if ok else 503)
            else:
                body, code = b"not found\n", 404
            self._send(code, body)

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((addr, port), Handler)
    threading.Thread(target=server.serve_forever, name="petasus-store-metrics",
                     daemon=True).start()
    return server
