"""The distributed scheme's client: the ``Store`` interface over a master and storage nodes.

Control: one master RPC per batch (``put_start``/``put_end``, ``locate``, ...). Data: one-sided
bulk transfers straight between the caller's buffer and the node's segment, grouped per
node and all in flight at once; objects up to ``inline_bytes`` ride in a node RPC instead
(two-sided, copied through message buffers), which ``bench/store.py`` measures to be faster
below the crossover. Disk-only objects are pushed by their node into the caller's buffer in
one RPC (``disk_read="push"``), or staged, pulled and released (``"pull"``).

Locations of objects read inline or from disk are cached until their lease ends: a get of a
cached key goes to its node alone, which refuses a generation the master retired (an
overwrite or remove while the lease ran) or a location of another registration of its own;
the client then asks the master (docs/store.md, "Location cache").
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from petasus import bulk, hg

from . import protocol as p
from .api import Buffer, Store, readable, validate_key
from .config import Pin
from .errors import StoreClosed, StoreError, StoreFull, ValueTooLarge
from .metrics import merge_histograms
from .reads import READ_SLACK, Reads

# Objects up to this size are read and written through a node RPC rather than one-sided:
# below it the RPC's copy costs less than a bulk round trip. Per transport, from
# bench/store.py's crossover rows (a cached get_into, each mode from a client of its own): over
# tcp the RPC was faster up to 60 KiB (48 KiB: 86-90 us against 109-112 us one-sided), over sm
# up to 24 KiB (73-85 against 84-92 us; at 32 KiB one run each way: 75-95 against 82-86 us,
# then 120 against 89 us). Other transports, unmeasured:
# INLINE_DEFAULT. Every one stays under a message (``_read_batch``), past which a read
# answer would take the overflow path (64 KiB: 370 us).
INLINE_BYTES = {"tcp": 48 << 10, "sm": 24 << 10}
INLINE_DEFAULT = 16 << 10
RETRY_S = 0.005  # first back-off of a put that found no room; doubles up to 0.1 s


class DistributedStore(Reads, Store):
    def __init__(self, uri: str, *, timeout: float = 30.0, put_timeout: float = 10.0,
                 replicas: int = 1, disk_read: str = "push", inline_bytes: int | None = None,
                 preferred: str = "", max_key_bytes: int = 4096,
                 max_value_bytes: int = 1 << 30, cache_locations: bool = True,
                 **engine_options: Any) -> None:
        if disk_read not in ("push", "pull"):
            raise ValueError(f"disk_read must be 'push' or 'pull', not {disk_read!r}")
        self.uri = uri
        self.timeout, self.put_timeout = timeout, put_timeout
        self.replicas, self.disk_read = replicas, disk_read
        self.preferred = preferred
        self.max_key_bytes, self.max_value_bytes = max_key_bytes, max_value_bytes
        self.engine = hg.Engine(uri, timeout=timeout, **engine_options)
        self._read_batch = max(self.engine.na.msg_get_max_expected_size() - READ_SLACK, 1)
        if inline_bytes is None:
            inline_bytes = min(INLINE_BYTES.get(uri.split("://", 1)[0], INLINE_DEFAULT),
                               self._read_batch - 1)
        self.inline_bytes = inline_bytes
        self.engine.declare(p.MASTER_RPCS, p.NODE_RPCS)
        self.master = self.engine.lookup(uri, provider_id=p.MASTER_PROVIDER)
        self.client_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._nodes: dict[str, hg.Remote] = {}
        self._segments: dict[bytes, bulk.RemoteBulk] = {}
        self._closed = False
        self._closing = threading.Event()  # wakes a put that backs off waiting for room
        # key -> (lease end, size, gen, node id, node uri, ``read`` item [key, gen, off, len,
        # ...], or None for a disk copy) of objects read inline or from disk: a get of a
        # cached key is one RPC to its node, which refuses a retired generation or a location
        # of another registration; None disables the cache.
        self._cache: dict[str, tuple[float, int, int, int, str, list[int]]] | None = \
            {} if cache_locations else None
        # Single objects read one-sided: key -> (lease end, size, node uri, replica, the
        # node's epoch read before the locate that gave the replica). A get of such a key
        # reads the replica one-sided, then the epoch: unchanged, the bytes were current
        # (protocol.EPOCH). ``_far_seen``: key -> node uri of objects read one-sided once,
        # whose next read takes the epoch before it locates.
        self._far: dict[str, tuple[float, int, str, p.Replica, bytes]] = {}
        self._far_seen: dict[str, str] = {}
        self._epochs: dict[str, bulk.RemoteBulk] = {}
        self._epoch_lock = threading.Lock()
        self._epoch_local: tuple[bytearray, bulk.Bulk] | None = None
        self._staging: tuple[mmap.mmap, memoryview, bulk.Bulk] | None = None
        self._staging_lock = threading.Lock()  # one get at a time uses it; others allocate
        self.c = dict.fromkeys(("inline", "one_sided", "disk_push", "disk_pull", "retries",
                                "cache_hits", "cache_refused", "locates"), 0)

    def __repr__(self) -> str:
        return f"<DistributedStore {self.uri}{' closed' if self._closed else ''}>"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._closing.set()
            with self._staging_lock:
                self._drop_staging()
            with self._epoch_lock:
                if self._epoch_local is not None:
                    self._epoch_local[1].close()
                    self._epoch_local = None
            self.engine.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the store client of {self.uri} is closed")

    def _call(self, method: Any, *args: Any, timeout: float | None = None) -> Any:
        self._check_open()
        try:
            return method.call(*args, timeout=self.timeout if timeout is None else timeout)
        except (hg.RPCError, hg.PeerError, RuntimeError, ValueError) as exc:
            self._check_open()  # closed meanwhile, from another thread
            raise StoreError(f"store master {self.uri}: {exc}") from exc

    def _checked(self, keys: Sequence[str]) -> tuple[list[Any], list[int]]:
        """Per-key results pre-filled with each invalid key's error, and the valid indexes."""
        results: list[Any] = [None] * len(keys)
        valid = []
        cache = self._cache or {}
        for i, key in enumerate(keys):
            if type(key) is str and key in cache:  # checked when it was cached
                valid.append(i)
                continue
            try:
                validate_key(key, self.max_key_bytes)
                valid.append(i)
            except StoreError as exc:
                results[i] = exc
        return results, valid

    def _node(self, uri: str) -> hg.Remote:
        remote = self._nodes.get(uri)
        if remote is None:
            remote = self._nodes[uri] = self.engine.lookup(uri, provider_id=p.NODE_PROVIDER)
        return remote

    def _segment(self, wire: bytes) -> bulk.RemoteBulk:
        seg = self._segments.get(wire)
        if seg is None:
            seg = self._segments[wire] = bulk.RemoteBulk.from_bytes(wire)
        return seg

    # --- puts -----------------------------------------------------------------------------
    def put(self, key: str, value: Buffer, *, overwrite: bool = False, pin: Pin = Pin.NONE,
            timeout: float | None = None) -> None:
        self.put_many([(key, value)], overwrite=overwrite, atomic=True, timeout=timeout,
                      pin=pin)

    def put_many(self, items: Iterable[tuple[str, Buffer]], *, overwrite: bool = False,
                 atomic: bool = False, timeout: float | None = None, pin: Pin = Pin.NONE,
                 replicas: int | None = None) -> list[StoreError | None]:
        self._check_open()
        keys: list[str] = []
        views: list[memoryview] = []
        results: list[StoreError | None] = []
        seen: set[str] = set()
        for key, value in items:
            view = readable(value, "put")
            try:
                validate_key(key, self.max_key_bytes)
                if len(view) > self.max_value_bytes:
                    raise ValueTooLarge(f"value of {len(view)} bytes exceeds the cap of "
                                        f"{self.max_value_bytes}", key=key, tier="dram")
                if atomic and key in seen:
                    raise ValueError(f"put_many: key {key!r} appears twice in an atomic group")
                results.append(None)
            except StoreError as exc:
                if atomic:
                    raise
                results.append(exc)
            seen.add(key)
            keys.append(key)
            views.append(view)
        todo = [i for i, r in enumerate(results) if r is None]
        self._forget(keys)
        deadline = time.monotonic() + (self.put_timeout if timeout is None else timeout)
        backoff = RETRY_S
        while todo:
            grants = self._call(self.master.put_start, self.client_id, [keys[i] for i in todo],
                                [len(views[i]) for i in todo], replicas or self.replicas,
                                overwrite, Pin(pin).value, self.preferred)
            granted = [(i, g) for i, g in zip(todo, grants) if g.code == p.OK]
            full = [i for i, g in zip(todo, grants) if g.code == p.FULL]
            failed = [(i, g) for i, g in zip(todo, grants) if g.code not in (p.OK, p.FULL)]
            if atomic and (full or failed):
                self._abort([g.token for _, g in granted])
                if failed or time.monotonic() >= deadline:
                    i, g = (failed or [(full[0], grants[todo.index(full[0])])])[0]
                    raise p.error_of(g.code, g.message, keys[i], "dram")
                backoff = self._back_off(backoff, deadline)
                continue
            for i, g in failed:
                results[i] = p.error_of(g.code, g.message, keys[i], "dram")
            if granted:
                self._write_granted(granted, views, keys, atomic, results)
            if full and time.monotonic() >= deadline:
                for i in full:
                    results[i] = StoreFull("no room before the put's timeout", key=keys[i],
                                           tier="dram")
                full = []
            todo = full
            if todo:
                backoff = self._back_off(backoff, deadline)
        return results

    def _back_off(self, backoff: float, deadline: float) -> float:
        self.c["retries"] += 1
        if self._closing.wait(max(0.0, min(backoff, deadline - time.monotonic()))):
            self._check_open()
        return min(backoff * 2, 0.1)

    def _abort(self, tokens: list[int]) -> None:
        if tokens:
            try:
                self.master.put_abort.call(tokens, timeout=self.timeout)
            except (hg.RPCError, hg.PeerError):
                pass  # the master reclaims pending pages after their TTL anyway

    def _write_granted(self, granted: list[tuple[int, p.PutGrant]], views: list[memoryview],
                       keys: list[str], atomic: bool, results: list[StoreError | None]) -> None:
        inline: dict[str, tuple[list[list[tuple[int, int]]], list[bytes], list[int]]] = {}
        transfers: list[tuple[int, bulk.Transfer]] = []
        handles: list[bulk.Bulk] = []
        broken: dict[int, StoreError] = {}
        try:
            for i, g in granted:
                view = views[i]
                for rep in g.replicas:
                    if len(view) <= self.inline_bytes:
                        runs, data, idx = inline.setdefault(rep.uri, ([], [], []))
                        runs.append(rep.runs)
                        data.append(bytes(view))
                        idx.append(i)
                        continue
                    handles.append(self._one_sided(i, view, rep, bulk.READ_ONLY, transfers))
            futures = [(idx, self._node(uri).write_inline.future(runs, data,
                                                                 timeout=self.timeout))
                       for uri, (runs, data, idx) in inline.items()]
            for idx, fut in futures:
                try:
                    fut.result()
                    self.c["inline"] += len(idx)
                except (hg.RPCError, hg.PeerError) as exc:
                    for i in idx:
                        broken[i] = StoreError(f"writing to a node failed: {exc}", key=keys[i])
            for i, t in transfers:
                try:
                    t.wait(self.timeout)
                    self.c["one_sided"] += 1
                except (bulk.NAError, TimeoutError, ValueError) as exc:
                    broken[i] = StoreError(f"writing to a node failed: {exc}", key=keys[i])
        finally:
            for h in handles:
                h.close()
        tokens = [g.token for i, g in granted if i not in broken]
        if broken:
            self._abort([g.token for i, g in granted if i in broken])
            if atomic:
                self._abort(tokens)
                raise next(iter(broken.values()))
            for i, exc in broken.items():
                results[i] = exc
        statuses = self._call(self.master.put_end, tokens, atomic)
        ok_ids = [i for i, _ in granted if i not in broken]
        for i, st in zip(ok_ids, statuses):
            if st.code != p.OK:
                if atomic:
                    raise p.error_of(st.code, st.message, keys[i], "dram")
                results[i] = p.error_of(st.code, st.message, keys[i], "dram")

    def _one_sided(self, i: int, view: memoryview, rep: p.Replica, access: Any,
                   transfers: list[tuple[int, bulk.Transfer]]) -> bulk.Bulk:
        """Start the transfers between ``view`` and a copy's runs: pushes to write it
        (``access`` READ_ONLY), pulls to read it (WRITE_ONLY); the handle to close after."""
        handle = self.engine.bulk(view, access, eager=False)
        self._move(i, handle, 0, rep, access, transfers)
        return handle

    def _move(self, i: int, handle: bulk.Bulk, base: int, rep: p.Replica, access: Any,
              transfers: list[tuple[int, bulk.Transfer]]) -> None:
        seg = self._segment(rep.segment)
        move = handle.push_to if access == bulk.READ_ONLY else handle.pull_from
        pos = base
        for off, length in rep.runs:
            transfers.append((i, move(seg, length, offset=off, local_offset=pos)))
            pos += length

    # --- gets -----------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.exists_many([key])[0]

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        self._check_open()
        for key in keys:
            validate_key(key, self.max_key_bytes)
        return list(self._call(self.master.exists, list(keys)))

    def size(self, key: str) -> int:
        self._check_open()
        validate_key(key, self.max_key_bytes)
        loc = p.unpack_locations(self._call(self.master.locate, [key], self.preferred), 1)[0]
        p.raise_status(loc.code, loc.message, key, "dram")
        return int(loc.size)

    def remove(self, key: str) -> None:
        out = self.remove_many([key])[0]
        if out is not None:
            raise out

    def remove_many(self, keys: Sequence[str]) -> list[StoreError | None]:
        self._check_open()
        results, valid = self._checked(keys)
        self._forget(keys)
        statuses = self._call(self.master.remove, [keys[i] for i in valid])
        for i, st in zip(valid, statuses):
            if st.code != p.OK:
                results[i] = p.error_of(st.code, st.message, keys[i], "dram")
        return results

    def pin(self, key: str, mode: Pin = Pin.SOFT) -> None:
        self._check_open()
        validate_key(key, self.max_key_bytes)
        st = self._call(self.master.pin, key, Pin(mode).value)
        p.raise_status(st.code, st.message, key, "dram")

    def flush(self, timeout: float | None = None) -> None:
        self._check_open()
        limit = self.timeout if timeout is None else timeout
        st = self._call(self.master.flush, limit, timeout=limit + 5)
        p.raise_status(st.code, st.message, None, "disk")

    def cluster(self) -> dict[str, Any]:
        """The master's view: nodes, their segments and use, counters."""
        self._check_open()
        return dict(self._call(self.master.cluster_stats))

    def watch(self, since: int | None = None, timeout: float | None = None) -> int:
        """The version of the master's state (``cluster()["version"]``), which moves on
        every change: nodes joining or dropped, puts started, finished or expired, removes,
        pins, disk copies done, block index updates, a lapsed lease's pages freed (not reads,
        their leases and counters). Returns at once when it is not
        ``since`` (``None``: now), else when it moves or after ``timeout`` s (default: the
        store's timeout; the master parks a call for at most a minute). A long poll: wait
        for a condition on the cluster by reading the version, testing the condition, and
        watching from that version while it does not hold."""
        self._check_open()
        limit = self.timeout if timeout is None else max(0.0, timeout)
        version = int(self._call(self.master.watch, -1 if since is None else since, limit,
                                 timeout=limit + 5))
        if version < 0:
            raise StoreError(f"store master {self.uri}: watch: too many watches parked "
                             "already; try again later")
        return version

    def wait_until(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``condition()``, a fact about the cluster (what ``cluster()`` or a read
        shows), testing it again each time the master's state moves (``watch``), never on a
        timer; False if it still does not hold after ``timeout`` s. The version is read before
        each test, so a change during the test is not missed."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        version = self.watch()
        while not condition():
            left = end - time.monotonic()
            if left <= 0:
                return False
            version = self.watch(version, left)
        return True

    def stats(self) -> dict[str, Any]:
        s = self.cluster()
        nodes = s["nodes"]
        cap = sum(n["capacity"] for n in nodes)
        used = sum(n["used"] for n in nodes)
        phases = dict(s.get("phases", {}))
        for n in nodes:
            try:
                node = self._node(n["uri"]).node_stats.call(timeout=self.timeout)
            except (hg.RPCError, hg.PeerError):
                continue  # a node that is going away; the master drops it after its TTL
            for name, hist in node["phases"].items():
                phases[name] = merge_histograms(phases.get(name), hist)
        return {
            "dram": {"capacity": cap, "used": used, "objects": s["dram_objects"],
                     "pages_total": sum(n["capacity"] // n["page_size"] for n in nodes),
                     "pages_used": sum(n["used"] // n["page_size"] for n in nodes),
                     "hits": s["dram_hits"], "misses": s["dram_misses"],
                     "evictions": s["evictions"], "bytes_in": s["bytes_in"],
                     "bytes_out": s["bytes_out"]},
            "disk": {"capacity": None, "used": sum(n["disk_used"] for n in nodes),
                     "objects": s["disk_objects"], "hits": s["disk_hits"],
                     "misses": s["misses"], "bytes_in": s["disk_bytes_in"], "bytes_out": 0,
                     "errors": s["offload_failed"], "full": False, "last_error": None},
            "offload": {"policy": s["policy"], "force_evict": s["force_evict"],
                        "queued": 0, "in_flight": s["offloads_in_flight"],
                        "completed": s["offloads"], "deferred": s["deferred"],
                        "force_dropped": s["force_dropped"], "failed": s["offload_failed"],
                        "dropped": s["dropped"]},
            "ops": {"put": s["put"], "get": s["get"], "remove": s["remove"],
                    "promotions": 0},
            "phases": phases,
            "latency": s.get("latency", {}),
            "client": dict(self.c),
            "nodes": nodes,
        }

    # --- KV-block index -------------------------------------------------------------------
    def register_blocks(self, node: str, hashes: Sequence[int], tier: str) -> int:
        return int(self._call(self.master.register_blocks, node, list(hashes), tier))

    def revoke_blocks(self, node: str, hashes: Sequence[int], tier: str) -> int:
        return int(self._call(self.master.revoke_blocks, node, list(hashes), tier))

    def revoke_tier(self, node: str, tier: str) -> int:
        return int(self._call(self.master.revoke_tier, node, tier))

    def match_blocks(self, hashes: Sequence[int]) -> dict[str, Any]:
        return dict(self._call(self.master.match_blocks, list(hashes)))
