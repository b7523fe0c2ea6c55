"""Faults and features of the distributed store, against a master and storage nodes in their
own processes (tests/store_cluster.py) over tcp and sm: a node killed with replicas=2 (nothing
lost) and replicas=1 (ObjectLost, never a hang or stale bytes), a writer killed in the middle
of a put (its pages reclaimed after the put TTL), a dead master (an error within the client's
timeout), forged segment keys (refused by the node's RMA checks), push and pull disk reads,
the KV-block index, ``petasus-store stat`` and the master's /metrics and /health.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from store_cluster import DEADLINE, TRANSPORTS, Cluster, KiB, MiB, wait_for
from store_kit import check_error, pattern

from petasus import bulk, hg
from petasus.store import NotFound, ObjectLost, StoreError, StoreFull
from petasus.store import protocol as p
from petasus.store.client import DistributedStore

HERE = Path(__file__).resolve().parent
FAST = ["tcp", "sm"]
# Short enough that the master drops a killed node (or a stalled put) within a test; long
# enough (4 heartbeats) that a loaded 2-core machine does not drop a live node.
NODE_TTL = 1.0
PUT_TTL = 1.0
# Sizes below and above the inline threshold (16 KiB: the bytes ride in the RPC) and runs of
# pages (4 KiB).
SIZES = [0, 100, 16 * KiB, 16 * KiB + 1, 300 * KiB + 7, 2 * MiB]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def locate(kv: DistributedStore, keys: list[str]) -> list[p.Location]:
    """The master's answer for ``keys``: their DRAM replicas and the disk copy's node."""
    return p.unpack_locations(kv.master.locate.call(keys, "", timeout=DEADLINE), len(keys))


def node_of(cluster: Cluster) -> dict[int, str]:
    return {n["id"]: n["name"] for n in cluster.info()["nodes"]}


def within(fn: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    """Run ``fn`` in a thread; its result or exception, or fail if it is still running at the
    deadline (a hang)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", fn()))
        except BaseException as exc:  # handed to the test below
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), f"{what} hangs (still running after {deadline} s)"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


@pytest.fixture(params=FAST)
def listen(request: pytest.FixtureRequest) -> str:
    return TRANSPORTS[request.param]


# -- one cluster per transport for the tests that do not kill anything -------------------------
@dataclasses.dataclass
class Shared:
    cluster: Cluster
    metrics_port: int
    kv: DistributedStore


@pytest.fixture(scope="module", params=FAST)
def shared(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """Two nodes of 512 KiB (objects spill to their disks), offload on eviction, metrics."""
    port = free_port()
    root = tmp_path_factory.mktemp(f"shared-{request.param}")
    with Cluster(TRANSPORTS[request.param], root, node_dram=512 * KiB,
                 master={"offload": "on_evict", "lease_ttl": 0.3,
                         "metrics_port": port}) as cluster:
        kv = cluster.client(timeout=10.0, put_timeout=5.0)
        try:
            yield Shared(cluster, port, kv)
        finally:
            kv.close()


def test_connect_gives_the_distributed_store(shared: Shared) -> None:
    assert isinstance(shared.kv, DistributedStore)
    assert shared.cluster.uri in repr(shared.kv)
    nodes = shared.kv.cluster()["nodes"]
    assert sorted(n["name"] for n in nodes) == ["node0", "node1"]
    assert all(n["capacity"] == 512 * KiB for n in nodes)


def test_stat_prints_the_nodes(shared: Shared) -> None:
    done = subprocess.run([sys.executable, "-m", "petasus.store.cli", "stat",
                           shared.cluster.uri, "--timeout", "10"], capture_output=True,
                          text=True, timeout=DEADLINE, check=False)
    assert done.returncode == 0, done.stderr
    for name in ("node0", "node1"):
        assert name in done.stdout
    assert "512.0 KiB" in done.stdout
    assert "objects" in done.stdout and "policy on_evict" in done.stdout


def test_metrics_and_health(shared: Shared) -> None:
    shared.kv.put("metrics/k", b"counted", overwrite=True)
    base = f"http://127.0.0.1:{shared.metrics_port}"
    with urllib.request.urlopen(f"{base}/health", timeout=DEADLINE) as reply:
        assert reply.status == 200
        assert reply.read() == b"ok\n"
    with urllib.request.urlopen(f"{base}/metrics", timeout=DEADLINE) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                   if line and not line.startswith("#"))
    assert float(samples["petasus_store_objects"]) >= 1
    assert float(samples["petasus_store_put"]) >= 1
    for name in ("evictions", "offloads", "lost", "pending", "nodes_dropped", "leases"):
        assert f"petasus_store_{name}" in samples, f"/metrics has no petasus_store_{name}"


def _health(port: int, wait: float = 0.0) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health?wait={wait}",
                                    timeout=DEADLINE + wait) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def test_master_metrics_have_rpc_latency_histograms(shared: Shared) -> None:
    shared.kv.put("metrics/latency", b"x", overwrite=True)
    shared.kv.get("metrics/latency")
    histograms = [line.split()[2] for line in _scrape(shared.metrics_port).splitlines()
                  if line.startswith("# TYPE") and line.endswith(" histogram")]
    for op in ("put_start", "put_end", "locate"):
        assert any(op in name for name in histograms), f"no latency histogram for {op}"


def test_node_metrics_and_health(tmp_path: Path) -> None:
    port = free_port()
    with Cluster(TRANSPORTS["tcp"], tmp_path, nodes=1, node_dram=1 * MiB,
                 node={"metrics_port": port}) as cluster:
        # Healthy once registered (the master lists it a moment before the node hears back).
        assert _health(port, wait=DEADLINE) == 200, "the node's /health"
        kv = cluster.client(timeout=10.0)
        try:
            kv.put("k", pattern("k", 64 * KiB))
            kv.flush(timeout=DEADLINE)
        finally:
            kv.close()
        text = _scrape(port)
        samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                       if line and not line.startswith("#"))
        assert float(samples["petasus_store_offloads"]) == 1
        histograms = [line.split()[2] for line in text.splitlines()
                      if line.startswith("# TYPE") and line.endswith(" histogram")]
        for phase in ("load", "push", "stage", "write"):
            assert any(phase in name for name in histograms), f"no histogram of {phase}"


def _forged(segment: bytes) -> bulk.RemoteBulk:
    """The node's segment handle with one byte of its memory key flipped (the key sits after
    the version and access bytes of the NA handle)."""
    wire = bulk.RemoteBulk.from_bytes(segment).wire
    key = bytearray(wire.handles[0])
    key[2] ^= 0x5A
    return bulk.RemoteBulk(dataclasses.replace(wire, handles=(bytes(key),)))


def test_a_forged_segment_key_is_refused_and_the_node_keeps_serving(shared: Shared) -> None:
    kv = shared.kv
    value = pattern("forge", 64 * KiB)
    kv.put("forge/k", value, overwrite=True)
    rep = locate(kv, ["forge/k"])[0].replicas[0]
    off, length = rep.runs[0]
    forged = _forged(rep.segment)
    out = bytearray(length)
    with kv.engine.bulk(out, bulk.WRITE_ONLY, eager=False) as local, \
            pytest.raises(bulk.AccessError):
        local.pull_from(forged, length, offset=off).wait(DEADLINE)
    assert out == bytes(length), "bytes arrived through a forged key"
    junk = bytes(b"\xff" * length)
    with kv.engine.bulk(junk, bulk.READ_ONLY, eager=False) as local, \
            pytest.raises(bulk.AccessError):
        local.push_to(forged, length, offset=off).wait(DEADLINE)
    # The genuine key still works, the object is intact, and the node serves other clients.
    assert kv.get("forge/k") == value
    other = shared.cluster.client(timeout=10.0)
    try:
        other.put("forge/other", pattern("forge/other", 40 * KiB), overwrite=True)
        assert other.get("forge/other") == pattern("forge/other", 40 * KiB)
    finally:
        other.close()


@pytest.mark.parametrize("scheme", FAST)
def test_a_cached_location_never_gives_an_overwritten_or_removed_value(scheme: str,
                                                                        tmp_path: Path) -> None:
    """A client reads a key it read before through its node alone (the location cached with
    its lease); an overwrite or a remove by another client is refused by the node from the
    moment it is answered, and the reader falls back to the master: never the old bytes."""
    with Cluster(TRANSPORTS[scheme], tmp_path, master={"lease_ttl": 30}) as cluster:
        writer = cluster.client(timeout=10.0)
        reader = cluster.client(timeout=10.0)
        try:
            values = [pattern(f"c/{i}", 100 + 997 * i) for i in range(8)]
            keys = [f"c/{i}" for i in range(8)]
            writer.put_many(list(zip(keys, values)))
            assert reader.get_many(keys) == values
            hits = reader.c["cache_hits"]
            assert reader.get_many(keys) == values
            assert reader.get(keys[0]) == values[0]
            assert reader.c["cache_hits"] == hits + 9, "a second read asked the master again"
            writer.put(keys[0], b"new bytes", overwrite=True)
            assert reader.get(keys[0]) == b"new bytes"
            writer.remove(keys[1])
            with pytest.raises(NotFound):
                reader.get(keys[1])
            out = bytearray(16 * KiB)
            writer.put(keys[2], b"newer", overwrite=True)
            assert reader.get_into(keys[2], out) == 5 and out[:5] == b"newer"
            assert reader.get_many(keys[3:]) == values[3:]
            # Objects read one-sided: cached from their second read (the node's epoch read
            # before it locates), then read one-sided and checked against the epoch.
            # (c/big lands in the bytes it returns; c/mid in the staging buffer, and a copy)
            big = pattern("c/big", 300 * KiB + 5)
            mid = pattern("c/mid", 128 * KiB + 3)
            writer.put_many([("c/big", big), ("c/mid", mid)])
            out = bytearray(400 * KiB)
            for _ in range(3):
                assert reader.get("c/big") == big
                assert reader.get_into("c/big", out) == len(big) and out[: len(big)] == big
                assert reader.get("c/mid") == mid
            assert "c/big" in reader._far and "c/mid" in reader._far
            hits = reader.c["cache_hits"]
            assert reader.get("c/big") == big
            assert reader.get("c/mid") == mid
            assert reader.c["cache_hits"] == hits + 2
            writer.put("c/mid", b"mid no more", overwrite=True)
            assert reader.get("c/mid") == b"mid no more"
            writer.put("c/big", b"small now", overwrite=True)
            assert reader.get("c/big") == b"small now"
            bigger = pattern("c/big2", 1 * MiB)
            writer.put("c/big", bigger, overwrite=True)
            assert reader.get("c/big") == bigger
            writer.remove("c/big")
            with pytest.raises(NotFound):
                reader.get_into("c/big", out)
        finally:
            writer.close()
            reader.close()


@pytest.mark.parametrize("scheme", FAST)
def test_the_node_refuses_a_retired_generation_or_another_registration(scheme: str,
                                                                        tmp_path: Path) -> None:
    with Cluster(TRANSPORTS[scheme], tmp_path, master={"lease_ttl": 30}) as cluster:
        kv = cluster.client(timeout=10.0)
        try:
            kv.put("r/k", b"first", overwrite=True)
            loc = locate(kv, ["r/k"])[0]
            rep = loc.replicas[0]
            item = ["r/k", loc.gen, *[x for run in rep.runs for x in run]]
            node = kv._node(rep.uri)
            assert node.read.call(rep.node_id, True, [item], timeout=DEADLINE) == b"\x01first"
            assert node.read.call(rep.node_id + 1, True, [item], timeout=DEADLINE) == b"\x00"
            kv.put("r/k", b"second", overwrite=True)
            assert node.read.call(rep.node_id, True, [item, item], timeout=DEADLINE) == b"\0\0"
            # Read under the lease the master gave for this read: the generation it named.
            assert node.read.call(rep.node_id, False, [item], timeout=DEADLINE) == b"\x01first"
            with pytest.raises(hg.RemoteError):
                node.read.call(rep.node_id, True, [["r/other", 1, -4096, 1]], timeout=DEADLINE)
            assert kv.get("r/k") == b"second"
        finally:
            kv.close()


def _disk_only(kv: DistributedStore, keys: list[str]) -> list[str]:
    return [k for k, loc in zip(keys, locate(kv, keys))
            if loc.code == p.OK and not loc.replicas and loc.disk_uris]


def test_push_and_pull_disk_reads_return_exact_bytes(shared: Shared) -> None:
    kv = shared.kv
    items = [(f"disk/{i}", pattern(f"disk/{i}", 48 * KiB + i * 1000)) for i in range(32)]
    assert kv.put_many(items, overwrite=True) == [None] * len(items)  # 1.8 MiB: 1 MiB of DRAM
    keys = [k for k, _ in items]
    values = dict(items)
    # A copy leaves DRAM once its disk copy is complete (off the put's path): wait for some.
    wait_for(kv, lambda: len(_disk_only(kv, keys)) >= 8, "objects evicted to disk")
    on_disk = _disk_only(kv, keys)
    for mode in ("push", "pull"):
        reader = shared.cluster.client(timeout=10.0, disk_read=mode)
        try:
            for key in on_disk:
                assert reader.get(key) == values[key], f"{mode} read of {key}"
                out = bytearray(b"\xa5" * (len(values[key]) + 10))
                assert reader.get_into(key, out) == len(values[key])
                assert out[: len(values[key])] == values[key]
                assert out[len(values[key]):] == b"\xa5" * 10, f"{mode} wrote past the object"
            assert reader.stats()["client"][f"disk_{mode}"] == 2 * len(on_disk)
            other = "pull" if mode == "push" else "push"
            assert reader.stats()["client"][f"disk_{other}"] == 0
        finally:
            reader.close()
    # Still disk-only (a disk hit is read from disk and left there), and nothing was lost.
    assert set(_disk_only(kv, keys)) >= set(on_disk)
    for key, value in items:
        assert kv.get(key) == value


def test_a_disk_read_into_a_too_small_buffer_is_an_error(shared: Shared) -> None:
    kv = shared.kv
    items = [(f"small/{i}", pattern(f"small/{i}", 64 * KiB)) for i in range(24)]
    kv.put_many(items, overwrite=True)
    keys = [k for k, _ in items]
    wait_for(kv, lambda: bool(_disk_only(kv, keys)), "an object evicted to disk")
    key = _disk_only(kv, keys)[0]
    for mode in ("push", "pull"):
        reader = shared.cluster.client(timeout=10.0, disk_read=mode)
        try:
            with pytest.raises(ValueError):
                reader.get_into(key, bytearray(64 * KiB - 1))
        finally:
            reader.close()


def test_flush_gives_every_object_a_disk_copy(shared: Shared) -> None:
    kv = shared.kv
    items = [(f"flush/{i}", pattern(f"flush/{i}", 20 * KiB + i)) for i in range(10)]
    assert kv.put_many(items, overwrite=True) == [None] * len(items)
    kv.flush(timeout=DEADLINE)
    info = kv.cluster()
    assert info["disk_objects"] == info["objects"], info
    for key, value in items:
        assert kv.get(key) == value


def test_an_object_larger_than_every_node_is_store_full_at_once(shared: Shared) -> None:
    """As the embedded store refuses an object larger than DRAM without waiting: no room can
    ever be made for it, so the put does not retry until its timeout."""
    kv = shared.cluster.client(timeout=10.0, put_timeout=3.0)
    try:
        with pytest.raises(StoreFull) as info:
            kv.put("huge", bytes(512 * KiB + 1))
        check_error(info.value, "huge")
        assert kv.stats()["client"]["retries"] == 0
        assert not kv.exists("huge")
    finally:
        kv.close()


def test_the_block_index(shared: Shared) -> None:
    kv = shared.kv
    big = 2**40 + 7
    assert kv.register_blocks("idx-a", [1, 2, 3], "dram") == 3
    assert kv.register_blocks("idx-a", [2, 3, 4, big], "disk") == 4  # additive across tiers
    assert kv.register_blocks("idx-a", [1, 2], "dram") == 0  # already there
    assert kv.register_blocks("idx-b", [3, 9], "dram") == 2

    def match(hashes: list[int]) -> tuple[dict[str, dict[str, list[int]]], int]:
        got = kv.match_blocks(hashes)
        nodes = {n: {t: sorted(hs) for t, hs in tiers.items()}
                 for n, tiers in got["nodes"].items()}
        return nodes, got["distinct"]

    assert match([1, 2, 3, 4, 5, big]) == (
        {"idx-a": {"dram": [1, 2, 3], "disk": [2, 3, 4, big]}, "idx-b": {"dram": [3]}}, 5)
    assert match([5, 6]) == ({}, 0)
    assert match([]) == ({}, 0)

    assert kv.revoke_blocks("idx-a", [2, 5], "dram") == 1  # 5 was never registered
    assert match([2]) == ({"idx-a": {"disk": [2]}}, 1)  # the disk tier still has it
    assert kv.revoke_tier("idx-a", "disk") == 4  # that tier only
    assert match([1, 2, 3, 4, big]) == ({"idx-a": {"dram": [1, 3]}, "idx-b": {"dram": [3]}}, 2)
    assert kv.revoke_tier("idx-a", "disk") == 0
    # Batched: one call of many hashes.
    many = list(range(10_000, 30_000))
    assert kv.register_blocks("idx-c", many, "dram") == len(many)
    assert match([*many, 1])[1] == len(many) + 1
    assert kv.revoke_tier("idx-c", "dram") == len(many)
    assert kv.revoke_tier("idx-a", "dram") == 2
    assert kv.revoke_tier("idx-b", "dram") == 2
    assert match([1, 3, 9, 10_000]) == ({}, 0)


def test_block_hashes_are_unsigned_64_bit(shared: Shared) -> None:
    """KV-block hashes are 64-bit digests (xxh64, the first 8 bytes of a sha256): every value
    of a uint64 is a hash, half of them above 2**63."""
    kv = shared.kv
    hashes = [0, 2**63 - 1, 2**63, 2**64 - 1]
    assert kv.register_blocks("idx-64", hashes, "dram") == 4
    got = kv.match_blocks(hashes)
    assert sorted(got["nodes"]["idx-64"]["dram"]) == hashes and got["distinct"] == 4
    assert kv.revoke_blocks("idx-64", [2**64 - 1], "dram") == 1
    assert kv.revoke_tier("idx-64", "dram") == 3


def test_stats_count_pages_of_the_nodes_page_size(tmp_path: Path) -> None:
    with Cluster(TRANSPORTS["tcp"], tmp_path, node_dram=1 * MiB,
                 node={"page_size": 16 * KiB}) as cluster:
        kv = cluster.client(timeout=10.0)
        try:
            kv.put("k", pattern("k", 10000))
            dram = kv.stats()["dram"]
            assert dram["capacity"] == 2 * MiB
            assert dram["pages_total"] == 2 * MiB // (16 * KiB)
            assert dram["pages_used"] == 1
        finally:
            kv.close()


def test_watch_answers_when_the_masters_state_moves_or_at_its_timeout(tmp_path: Path) -> None:
    with Cluster(TRANSPORTS["tcp"], tmp_path, nodes=1, node_dram=1 * MiB) as cluster:
        kv, other = cluster.client(timeout=10.0), cluster.client(timeout=10.0)
        try:
            version = kv.watch()
            assert kv.watch(version - 1, DEADLINE) == version  # moved already: at once
            # An idle cluster (no disk use to report, nothing pending): nothing moves, and the
            # call comes back at its timeout with the version it was given.
            assert kv.watch(version, 0) == version
            assert kv.watch(version, 0.2) == version
            seen: list[int] = []
            watcher = threading.Thread(target=lambda: seen.append(other.watch(version, DEADLINE)))
            watcher.start()
            kv.put("watched", b"x")
            watcher.join(DEADLINE + 10)
            assert seen and seen[0] > version, "the put did not answer the parked watch"
            info = cluster.info()
            assert info["version"] >= seen[0]
            kv.remove("watched")
            assert kv.watch(seen[0], DEADLINE) > seen[0], "a remove is a change"
            # A refusal is none: no watcher wakes for it.
            now = kv.watch()
            with pytest.raises(NotFound):
                kv.remove("watched")
            with pytest.raises(NotFound):
                kv.pin("watched")
            assert kv.watch(now, 0) == now
            # Nonsense timeouts are no wait, or the master's longest.
            now = kv.watch()
            assert kv.master.watch.call(now, float("nan"), timeout=DEADLINE) == now
            assert kv.master.watch.call(now, -5.0, timeout=DEADLINE) == now
        finally:
            kv.close()
            other.close()


def test_master_shutdown_answers_a_parked_watch(tmp_path: Path) -> None:
    with Cluster(TRANSPORTS["tcp"], tmp_path, nodes=1, node_dram=1 * MiB) as cluster:
        kv = cluster.client(timeout=10.0)
        try:
            version = kv.watch()
            seen: list[Any] = []

            def watch() -> None:
                try:
                    seen.append(kv.watch(version, DEADLINE))
                except StoreError as exc:
                    seen.append(exc)
            watcher = threading.Thread(target=watch)
            watcher.start()
            assert cluster.master is not None
            cluster.master.terminate()
            watcher.join(DEADLINE + 10)
            # Answered with the last version as the master went, or failed as the connection
            # closed; never left to its minute.
            assert seen and (seen[0] == version or isinstance(seen[0], StoreError)), seen
        finally:
            kv.close()


def test_node_health_waits_when_asked_and_refuses_a_bad_wait() -> None:
    from petasus.store.metrics import serve_http

    asked: list[float] = []
    ready = threading.Event()

    def healthy(wait: float) -> bool:
        asked.append(wait)
        return ready.wait(wait)
    server = serve_http(0, lambda: {"x": 1}, healthy)
    port = server.server_address[1]
    try:
        assert _health(port) == 503
        for bad in ("abc", "-1", "nan", "61"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health?wait={bad}",
                                       timeout=DEADLINE)
            assert err.value.code == 400
            assert b"wait must be" in err.value.read()
        threading.Timer(0.05, ready.set).start()
        assert _health(port, wait=DEADLINE) == 200
        assert asked == [0.0, DEADLINE]
    finally:
        server.shutdown()
        server.server_close()


# -- killed nodes ------------------------------------------------------------------------------
def test_replicas_2_lose_nothing_when_a_node_is_killed(listen: str, tmp_path: Path) -> None:
    with Cluster(listen, tmp_path, node_dram=8 * MiB, master={"node_ttl": NODE_TTL}) as cluster:
        kv = cluster.client(timeout=5.0, replicas=2)
        one = cluster.client(timeout=5.0)  # replicas=1 by default; put_many asks for 2
        try:
            values = {f"r2/{n}": pattern(f"r2/{n}", n) for n in SIZES}
            for key, value in list(values.items())[::2]:
                kv.put(key, value)
            assert one.put_many(list(values.items())[1::2], replicas=2) == [None] * 3
            keys = list(values)
            names = node_of(cluster)
            for key, loc in zip(keys, locate(kv, keys)):
                assert {names[r.node_id] for r in loc.replicas} == {"node0", "node1"}, key
            cluster.kill_node(0)
            # Before the master notices: a read that fails on the dead node tries the other.
            for reader in (kv, one):
                for key, value in values.items():
                    got = within(lambda r=reader, k=key: r.get(k), f"get {key}")
                    assert got == value, key
            cluster.wait_nodes(1)
            for key, loc in zip(keys, locate(kv, keys)):
                assert [names[r.node_id] for r in loc.replicas] == ["node1"], key
            for key, value in values.items():
                assert kv.get(key) == value
                out = bytearray(len(value))
                assert one.get_into(key, out) == len(value) and out == value
            assert cluster.info()["lost"] == 0
            # With one node left, two replicas cannot be placed; one can.
            with pytest.raises(StoreError):
                kv.put("r2/after", b"x", timeout=0.2)
            one.put("r2/after", b"x")
            assert kv.get("r2/after") == b"x"
        finally:
            kv.close()
            one.close()


def test_replicas_1_objects_on_a_killed_node_are_lost(listen: str, tmp_path: Path) -> None:
    with Cluster(listen, tmp_path, node_dram=8 * MiB, master={"node_ttl": NODE_TTL}) as cluster:
        kv = cluster.client(timeout=5.0)
        try:
            values = {f"r1/{i}/{n}": pattern(f"r1/{i}/{n}", n) for i in range(2) for n in SIZES}
            for key, value in values.items():
                kv.put(key, value)
            names = node_of(cluster)
            keys = list(values)
            where = {k: names[loc.replicas[0].node_id] for k, loc in zip(keys, locate(kv, keys))}
            lost = [k for k in keys if where[k] == "node0"]
            kept = [k for k in keys if where[k] == "node1"]
            assert lost and kept, where
            assert kv.register_blocks("node0", [11, 12], "dram") == 2
            assert kv.register_blocks("node1", [12], "dram") == 1
            cluster.kill_node(0)

            def check() -> None:
                for key in lost:
                    with pytest.raises(ObjectLost) as info:
                        within(lambda k=key: kv.get(k), f"get {key}")
                    check_error(info.value, key)
                    with pytest.raises(ObjectLost):
                        kv.get_into(key, bytearray(len(values[key])))
                for key in kept:
                    assert kv.get(key) == values[key]

            check()  # before the master drops the node: the reads fail on it
            cluster.wait_nodes(1)
            check()  # after: the master knows
            info = cluster.info()
            assert info["lost"] == len(lost)
            assert info["objects"] == len(kept)
            assert kv.exists_many(lost) == [False] * len(lost)
            # The dropped node's blocks left the index; the survivor's stay.
            assert kv.match_blocks([11, 12]) == {"nodes": {"node1": {"dram": [12]}},
                                                "distinct": 1}
            # A lost key can be written again, and then reads the new bytes.
            kv.put(lost[0], b"new bytes")
            assert kv.get(lost[0]) == b"new bytes"
            kv.remove(lost[1])
            with pytest.raises(NotFound):
                kv.get(lost[1])
        finally:
            kv.close()


def test_replicas_2_lose_nothing_when_a_node_is_killed_after_a_spill(listen: str,
                                                                      tmp_path: Path) -> None:
    """Objects put beyond DRAM with replicas=2: some now live on disk only, a disk copy per
    replica on each replica's node. Killing the node with most of them must lose nothing."""
    with Cluster(listen, tmp_path, node_dram=1 * MiB,
                 master={"node_ttl": NODE_TTL, "offload": "on_evict"}) as cluster:
        kv = cluster.client(timeout=5.0, replicas=2)
        try:
            values = {f"spill/{i}": pattern(f"spill/{i}", 100 * KiB + i) for i in range(30)}
            assert kv.put_many(list(values.items())) == [None] * len(values)
            keys = list(values)
            wait_for(kv, lambda: len(_disk_only(kv, keys)) >= 5, "objects evicted to disk")
            by_uri = {n["uri"]: n["name"] for n in cluster.info()["nodes"]}
            disk_locations = locate(kv, _disk_only(kv, keys))
            assert all(len(loc.disk_uris) == 2 for loc in disk_locations)
            disk_nodes = [by_uri[loc.disk_uris[0]] for loc in disk_locations]
            victim = max(sorted(set(disk_nodes)), key=disk_nodes.count)
            cluster.kill_node(int(victim.removeprefix("node")))
            cluster.wait_nodes(1)
            lost = [k for k in keys if isinstance(kv.get_many([k])[0], ObjectLost)]
            assert lost == [], f"{len(lost)} objects put with replicas=2 lost with {victim}"
            for key, value in values.items():
                assert kv.get(key) == value
        finally:
            kv.close()


# -- a writer killed in the middle of a put ----------------------------------------------------
def _used(cluster: Cluster) -> int:
    return sum(n["used"] for n in cluster.info()["nodes"])


def test_a_writer_killed_mid_put_has_its_pages_reclaimed(listen: str, tmp_path: Path) -> None:
    with Cluster(listen, tmp_path, node_dram=8 * MiB, master={"put_ttl": PUT_TTL}) as cluster:
        kv = cluster.client(timeout=5.0)
        try:
            kv.put("before", pattern("before", 100 * KiB))
            baseline = _used(cluster)
            assert cluster.info()["pending"] == 0
            writer = subprocess.Popen(
                [sys.executable, str(HERE / "store_stalled_writer.py"), cluster.uri, "stalled",
                 str(1 * MiB)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                line = writer.stdout.readline()  # type: ignore[union-attr]
                assert line.startswith("granted "), line
                info = cluster.info()
                assert info["pending"] == 1
                assert _used(cluster) == baseline + 1 * MiB
                assert not kv.exists("stalled")
                writer.send_signal(signal.SIGKILL)
                assert writer.wait(DEADLINE) == -signal.SIGKILL
            finally:
                if writer.poll() is None:
                    writer.kill()
                    writer.wait(DEADLINE)
                writer.stdout.close()  # type: ignore[union-attr]
                writer.stdin.close()  # type: ignore[union-attr]
            wait_for(kv, lambda: cluster.info()["pending"] == 0 and _used(cluster) == baseline,
                     "the master to reclaim the stalled put's pages")
            assert cluster.info()["expired_puts"] == 1
            assert not kv.exists("stalled")
            with pytest.raises(NotFound):
                kv.get("stalled")
            # The key and the pages are free again: a new put of it reads back whole.
            kv.put("stalled", pattern("stalled", 1 * MiB))
            assert kv.get("stalled") == pattern("stalled", 1 * MiB)
            assert kv.get("before") == pattern("before", 100 * KiB)
        finally:
            kv.close()


# Puts 8 MiB objects one after the other, saying so before each: killed in the middle of one.
BIG_WRITER = """
import sys
from petasus import store
kv = store.connect(sys.argv[1], timeout=10.0)
value = bytes(range(256)) * (8 << 12)
for i in range(1000):
    print(f"putting {i}", flush=True)
    kv.put(f"big/{i}", value)
"""


def test_a_client_killed_during_large_puts_leaks_no_pages(listen: str, tmp_path: Path) -> None:
    with Cluster(listen, tmp_path, node_dram=48 * MiB, master={"put_ttl": PUT_TTL}) as cluster:
        kv = cluster.client(timeout=5.0)
        try:
            writer = subprocess.Popen([sys.executable, "-c", BIG_WRITER, cluster.uri],
                                      stdout=subprocess.PIPE, text=True)
            try:
                for line in writer.stdout:  # type: ignore[union-attr]
                    if line.strip() == "putting 2":
                        break
                writer.send_signal(signal.SIGKILL)
                assert writer.wait(DEADLINE) == -signal.SIGKILL
            finally:
                if writer.poll() is None:
                    writer.kill()
                    writer.wait(DEADLINE)
                writer.stdout.close()  # type: ignore[union-attr]
            keys = [f"big/{i}" for i in range(4)]
            value = bytes(range(256)) * (8 << 12)
            # Whatever the writer finished is whole; whatever it did not leaves no pages.
            wait_for(kv, lambda: cluster.info()["pending"] == 0, "the killed put to expire")
            present = [k for k, there in zip(keys, kv.exists_many(keys)) if there]
            assert present[:2] == ["big/0", "big/1"]
            assert _used(cluster) == len(present) * len(value)
            for key in present:
                assert kv.get(key) == value
        finally:
            kv.close()


def test_put_end_of_an_expired_put_is_an_error(listen: str, tmp_path: Path) -> None:
    """A writer that finishes after its TTL is told so, and its object never appears."""
    with Cluster(listen, tmp_path, node_dram=4 * MiB, master={"put_ttl": PUT_TTL}) as cluster:
        kv = cluster.client(timeout=5.0)
        try:
            grant = kv.master.put_start.call("late", ["late"], [5000], 1, False, "none", "",
                                             timeout=DEADLINE)[0]
            assert grant.code == p.OK
            wait_for(kv, lambda: cluster.info()["pending"] == 0, "the put to expire")
            status = kv.master.put_end.call([grant.token], False, timeout=DEADLINE)[0]
            assert status.code != p.OK
            assert not kv.exists("late")
            assert _used(cluster) == 0
        finally:
            kv.close()


# -- a dead master -----------------------------------------------------------------------------
def test_a_dead_master_is_an_error_within_the_timeout(listen: str, tmp_path: Path) -> None:
    with Cluster(listen, tmp_path, node_dram=4 * MiB) as cluster:
        kv = cluster.client(timeout=2.0)
        try:
            kv.put("k", pattern("k", 100 * KiB))
            assert kv.get("k") == pattern("k", 100 * KiB)
            uri = cluster.uri
            cluster.kill_master()
            calls: list[tuple[str, Callable[[], Any]]] = [
                ("get", lambda: kv.get("k")), ("put", lambda: kv.put("k2", b"v")),
                ("exists", lambda: kv.exists("k")), ("remove", lambda: kv.remove("k")),
                ("get_into", lambda: kv.get_into("k", bytearray(100 * KiB))),
                ("stats", kv.stats), ("pin", lambda: kv.pin("k")),
                ("match_blocks", lambda: kv.match_blocks([1])),
                ("flush", lambda: kv.flush(timeout=1.0))]
            for name, call in calls:
                with pytest.raises(StoreError) as info:
                    within(call, f"{name} with the master dead", deadline=20.0)
                assert not isinstance(info.value, (NotFound, ObjectLost)), info.value
                assert uri in str(info.value), f"{name}: {info.value} does not name the master"
        finally:
            kv.close()


# -- the harness -------------------------------------------------------------------------------
def test_a_cluster_stops_everything_it_started_even_when_a_test_fails(tmp_path: Path) -> None:
    cluster = Cluster(TRANSPORTS["tcp"], tmp_path, node_dram=1 * MiB)
    with pytest.raises(RuntimeError, match="a failing test"), cluster:
        procs = [cluster.master, *cluster.nodes]
        assert all(proc is not None and proc.alive for proc in procs)
        raise RuntimeError("a failing test")
    assert all(proc is not None and not proc.alive for proc in procs)
    # A node killed before stop() is reaped without complaint.
    with Cluster(TRANSPORTS["tcp"], tmp_path / "again", node_dram=1 * MiB) as again:
        again.kill_node(1)
    assert not any(proc.alive for proc in [again.master, *again.nodes] if proc is not None)
