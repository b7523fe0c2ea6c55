"""Figures of the connection limits (issue 11): memory per idle connection, time to close a
stalled handshake, and the good client's worst latency under each attack of
tests/test_conn_limits.py, against tests/limits_peer.py in another process.

    .venv/bin/python bench/conn_limits.py [tcp|sm ...] [--old]

``--old`` passes no limit options, so the same script measures a checkout without them
(run it with that checkout's interpreter). Nothing here is asserted: it prints.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import conn_attacks as ca

OLD = "--old" in sys.argv
URIS = {"tcp": "tcp://127.0.0.1:0", "sm": "sm://"}


def limits(**options: Any) -> dict[str, Any]:
    return {} if OLD else options


def worst(good: ca.GoodClient, calls: int = 50) -> float:
    return max(good.call() for _ in range(calls)) * 1e3


def settle(good: ca.GoodClient, count: int) -> None:
    """Wait (by calling the server) until it has accepted ``count`` more connections than
    the good client's."""
    for _ in range(1000):
        if good.stats()["open_connections"] >= 1 + count:
            return


def half_headers(uri: str, count: int = 1000) -> None:
    with ca.Server(uri) as server, ca.GoodClient(server.uri) as good:
        good.call()
        before = server.rss_kib()
        socks = ca.open_many(server.uri, count)
        try:
            settle(good, count)
            lat = worst(good)
            grew = server.rss_kib() - before
            print(f"{uri:18} {count} half-header connections: RSS +{grew / 1024:.1f} MiB, "
                  f"{grew / count:.1f} KiB per connection; good client worst {lat:.2f} ms")
        finally:
            ca.close_all(socks)


def stalled_handshake(uri: str) -> None:
    if OLD:
        print(f"{uri:18} stalled handshake: no deadline (never closed)")
        return
    with ca.Server(uri, handshake_timeout=2.0) as server, ca.GoodClient(server.uri) as good:
        one = ca.raw_connect(server.uri)
        one_took = ca.wait_closed(one)
        one.close()
        socks = ca.open_many(server.uri, 1000)
        opened = time.monotonic()
        try:
            lat = worst(good)
            for sock in socks:
                ca.wait_closed(sock)
            took = time.monotonic() - opened
            print(f"{uri:18} stalled handshake, handshake_timeout=2.0: closed after "
                  f"{one_took:.3f} s; 1,000 of them: the last closed {took:.2f} s after the "
                  f"last opened; good client worst {lat:.2f} ms while they were open")
        finally:
            ca.close_all(socks)


def idle(uri: str) -> None:
    if OLD:
        print(f"{uri:18} idle connection: no idle timeout (never closed)")
        return
    with ca.Server(uri, idle_timeout=2.0) as server, ca.GoodClient(server.uri) as good:
        sock = ca.raw_connect(server.uri)
        ca.hello(sock, uri[:uri.index(":")])
        start = time.monotonic()
        lat = ca.serve_until_closed(good, sock) * 1e3
        print(f"{uri:18} idle connection, idle_timeout=2.0: closed after "
              f"{time.monotonic() - start:.2f} s; good client worst {lat:.2f} ms")
        sock.close()


def descriptors(uri: str, cause: str) -> None:
    options: dict[str, Any] = {"nofile": 1024}
    if cause == "emfile" and not OLD:
        options["max_connections"] = 100_000
    with ca.Server(uri, **options) as server:
        before = server.rss_kib()
        socks = ca.open_many(server.uri, 1100)
        try:
            start = time.perf_counter()
            try:
                with ca.GoodClient(server.uri) as good:
                    good.call()
                    first = (time.perf_counter() - start) * 1e3
                    lat = worst(good)
                    stats = good.stats()
                    print(f"{uri:18} 1,100 stalled connections at RLIMIT_NOFILE=1024 ({cause}): "
                          f"first call {first:.1f} ms, then worst {lat:.2f} ms; closed_cap "
                          f"{stats.get('closed_cap')}, closed_emfile {stats.get('closed_emfile')}"
                          f"; RSS +{(server.rss_kib() - before) / 1024:.1f} MiB")
            except Exception as exc:  # the old code's answer is this failure
                print(f"{uri:18} 1,100 stalled connections at RLIMIT_NOFILE=1024 ({cause}): "
                      f"good client failed after {time.perf_counter() - start:.1f} s: {exc}")
        finally:
            ca.close_all(socks)


def flood(uri: str, count: int = 300_000) -> None:
    opts = limits(max_queued_bytes=64 << 20)
    with ca.Server(uri, **opts) as server, ca.GoodClient(server.uri) as good:
        good.call()
        before = server.rss_kib()
        hostile = ca.raw_connect(server.uri)
        ca.hello(hostile, uri[:uri.index(":")])
        hostile.settimeout(5.0)
        batch = b"".join(ca.request(tag) for tag in range(1000))
        lat = [0.0]
        stop = threading.Event()

        def measure() -> None:
            while not stop.is_set():
                lat[0] = max(lat[0], good.call())

        thread = threading.Thread(target=measure, daemon=True)
        thread.start()
        sent = 0
        try:
            for _ in range(count // 1000):
                hostile.sendall(batch)
                sent += 1000
        except (TimeoutError, OSError):
            pass
        stop.set()
        thread.join(ca.TIMEOUT)
        stats = good.stats()
        print(f"{uri:18} flood of {sent} blob(1 KiB) requests never read: server RSS "
              f"+{(server.rss_kib() - before) / 1024:.1f} MiB, requests read "
              f"{stats['msgs_received']}, reads_paused {stats.get('reads_paused')}; good "
              f"client worst {lat[0] * 1e3:.2f} ms")
        hostile.close()


def main() -> None:
    ca.raise_nofile(4096)
    chosen = [a for a in sys.argv[1:] if a in URIS] or list(URIS)
    for name in chosen:
        uri = URIS[name]
        half_headers(uri)
        stalled_handshake(uri)
        idle(uri)
        descriptors(uri, "cap")
        descriptors(uri, "emfile")
        flood(uri)
    socket.setdefaulttimeout(None)


if __name__ == "__main__":
    main()
