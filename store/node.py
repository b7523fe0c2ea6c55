"""A storage node: a registered DRAM segment clients read and write one-sided, a disk tier,
and the disk-side RPCs (offload, push and pull reads, delete), announced to the master.

The node never decides anything: the master allocates pages in its segment and tells it
what to copy to disk. A push read is one RPC: the node reads the object from disk into
memory it registers for the occasion and writes it one-sided into the caller's buffer.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from petasus import bulk, hg

from . import protocol as p
from .disk import DiskEntry, DiskTier
from .errors import ObjectLost, StoreError
from .metrics import Histogram

log = logging.getLogger("petasus.store.node")

# Disk reads of objects up to this size run on the progress thread (a pread that the page
# cache usually serves in tens of microseconds); larger ones in the node's pool. A 64 KiB push
# through the pool took ~4 ms on a loaded 2-core VM: the handoff to the pool thread, its wait
# for the progress thread to see the put acknowledged, and its answer handed back.
LOAD_INLINE_BYTES = 1 << 20
PUSH_BUFFERS = 4  # registered LOAD_INLINE_BYTES buffers kept for pushes (mmap + register each
# time cost more than the 64 KiB read itself)


class NodeService:
    def __init__(self, master_uri: str, listen: str, *, dram_bytes: int, page_size: int = 4096,
                 disk_dir: str | os.PathLike[str] | None = None, disk_bytes: int | None = None,
                 disk_fsync: bool = False, name: str | None = None,
                 rpc_timeout: float = 30.0, auth_key: bytes | str | None = None) -> None:
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._temporary = disk_dir is None
        root = Path(tempfile.mkdtemp(prefix="petasus-node-") if disk_dir is None else disk_dir)
        # The master forgets a node's objects when the node goes: start from an empty tier.
        shutil.rmtree(root / "objects", ignore_errors=True)
        self.root = root
        self.disk = DiskTier(root / "objects", disk_bytes, disk_fsync)
        self.entries: dict[tuple[str, int], DiskEntry] = {}
        self.capacity = dram_bytes // page_size * page_size
        self.page_size = page_size
        self.arena = mmap.mmap(-1, self.capacity)
        self.view = memoryview(self.arena)
        self.engine = hg.Engine(listen, listen=True, timeout=rpc_timeout,
                                allow_remote_shutdown=True, auth_key=auth_key)
        self.segment = self.engine.bulk(self.arena, bulk.READ_WRITE, eager=False)
        self._epoch = bytearray(p.EPOCH.size)  # p.EPOCH: (registration id, retires)
        self._retires = 0
        self._epoch_bulk = self.engine.bulk(self._epoch, bulk.READ_ONLY, eager=False)
        self.engine.declare(p.MASTER_RPCS)
        self._lock = threading.Lock()
        self._staged: dict[int, tuple[bulk.Bulk, mmap.mmap]] = {}
        self._stage_ids = itertools.count(1)
        self.phases = {k: Histogram() for k in ("write", "load", "push", "stage")}
        self.c = dict.fromkeys(("offloads", "pushes", "stages", "inline_reads",
                                "inline_writes", "failed", "reads_refused", "retired"), 0)
        # key -> (the newest generation the master retired, until when to refuse it); read on
        # the progress thread by ``read``, written there by ``retire``: no lock.
        self._retired: dict[str, tuple[int, float]] = {}
        self._sweep_at = 0.0
        for decl, impl, blocking in (
            (p.offload, self._offload, True),
            (p.disk_release, self._disk_release, False),
            (p.disk_delete, self._disk_delete, True), (p.node_stats, self.stats, False),
            (p.read, self._read, False), (p.retire, self._retire, False),
            (p.epoch_region, self._epoch_bulk.to_bytes, False),
            (p.write_inline, self._write_inline, False),
        ):
            self.engine.register(decl, impl, provider_id=p.NODE_PROVIDER, blocking=blocking)
        self._timeout = rpc_timeout
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="petasus-store-node")
        self._pushing: dict[int, tuple[float, bulk.Transfer]] = {}
        self._push_bufs: list[tuple[mmap.mmap, bulk.Bulk]] = []  # free ones, progress thread
        self._push_ids = itertools.count(1)
        for decl, handler in ((p.disk_push, self._disk_push), (p.disk_stage, self._disk_stage)):
            rpc = hg.RPC(decl.name, decl.in_proc, decl.out_proc, provider_id=p.NODE_PROVIDER)
            rpc.handler = handler
            self.engine.hg.register(rpc)
        self.master = self.engine.lookup(master_uri, provider_id=p.MASTER_PROVIDER)
        self._stop = threading.Event()
        self.node_id, self.heartbeat_s = 0, 1.0
        self._registered = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.engine.uri

    def start(self) -> None:
        """Join the master (from a thread other than the one that will serve)."""
        hello = self.master.register_node(self.uri, self.segment.to_bytes(), self.capacity,
                                          self.page_size, self.name)
        self._set_node_id(hello.node_id)
        self.heartbeat_s = hello.heartbeat_s
        self._thread = threading.Thread(target=self._beat, name="petasus-store-heartbeat",
                                        daemon=True)
        self._thread.start()

    def serve(self, handle_signals: bool = True) -> None:
        threading.Thread(target=self.start, daemon=True).start()
        try:
            self.engine.serve(handle_signals=handle_signals)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for buf, handle in self._push_bufs:
            handle.close()
            buf.close()
        self._push_bufs.clear()
        for handle, buf in self._staged.values():
            handle.close()
            buf.close()
        self._staged.clear()
        self._epoch_bulk.close()
        self.segment.close()
        self.engine.close()
        self.view.release()
        self.arena.close()
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def _set_node_id(self, node_id: int) -> None:
        with self._registered:
            self.node_id = node_id
            p.EPOCH.pack_into(self._epoch, 0, node_id, self._retires)
            self._registered.notify_all()

    def wait_registered(self, timeout: float = 0.0) -> bool:
        """Whether the master has this node on its list, waiting up to ``timeout`` s for it
        (``/health``)."""
        with self._registered:
            return self._registered.wait_for(lambda: self.node_id > 0, timeout)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            late = time.monotonic() - self._timeout
            for started, transfer in list(self._pushing.values()):
                if started < late:
                    transfer.cancel()  # a client that never acknowledges: answer it failed
            try:
                if not self.master.heartbeat(self.node_id, self.disk.used):
                    # The master dropped us and may hand our pages to new objects as soon as
                    # we join again: refuse every read through a location of the old
                    # registration before that.
                    self._set_node_id(0)
                    hello = self.master.register_node(self.uri, self.segment.to_bytes(),
                                                      self.capacity, self.page_size, self.name)
                    self._set_node_id(hello.node_id)
                    log.warning("node %s re-registered with the master as %d", self.name,
                                self.node_id)
            except (hg.RPCError, hg.PeerError) as exc:
                log.warning("node %s: heartbeat to the master failed: %s", self.name, exc)

    # --- handlers -------------------------------------------------------------------------
    def _segments(self, runs: list[tuple[int, int]]) -> list[memoryview]:
        out = []
        for off, length in runs:
            if off < 0 or length < 0 or off + length > self.capacity:
                raise ValueError(f"run ({off}, {length}) is outside the {self.capacity}-byte "
                                 "segment")
            out.append(self.view[off : off + length])
        return out

    def _offload(self, key: str, gen: int, runs: list[tuple[int, int]], size: int) -> p.Status:
        started = time.perf_counter()
        try:
            segments = self._segments(runs)
            if sum(len(s) for s in segments) != size:
                raise ValueError(f"runs hold {sum(len(s) for s in segments)} bytes, not {size}")
            entry = self.disk.write(key, gen, segments, size)
        except (OSError, ValueError) as exc:
            self.c["failed"] += 1
            return p.Status(3 if isinstance(exc, OSError) else 7, f"node {self.name}: {exc}")
        with self._lock:
            old = [k for k in self.entries if k[0] == key and k[1] < gen]
            for k in old:
                self.disk.delete(self.entries.pop(k))
            self.entries[(key, gen)] = entry
        self.c["offloads"] += 1
        self.phases["write"].observe(time.perf_counter() - started)
        return p.Status(p.OK, "")

    def _entry(self, key: str, gen: int) -> DiskEntry:
        with self._lock:
            entry = self.entries.get((key, gen))
        if entry is None:
            raise ObjectLost(f"node {self.name} has no disk copy of generation {gen}", key=key,
                             tier="disk")
        return entry

    def _load(self, key: str, gen: int) -> tuple[DiskEntry, mmap.mmap]:
        """Read a disk copy into fresh anonymous memory (untouched until the read fills it)."""
        entry = self._entry(key, gen)
        buf = mmap.mmap(-1, max(entry.size, 1))
        try:
            self._read_copy(entry, memoryview(buf))
        except BaseException:
            buf.close()
            raise
        return entry, buf

    def _read_copy(self, entry: DiskEntry, view: memoryview) -> None:
        started = time.perf_counter()
        fd = self.disk.open(entry)
        try:
            self.disk.read_into(fd, entry, view)
        finally:
            os.close(fd)
        self.phases["load"].observe(time.perf_counter() - started)

    def _is_retired(self, key: str, gen: int) -> bool:
        old = self._retired.get(key)
        return old is not None and gen <= old[0] and time.monotonic() < old[1]

    def _sized(self, handle: hg.TargetHandle, key: str, gen: int, work: Any) -> None:
        """Run ``work(handle)`` here for a small disk copy, in the pool for a large one."""
        try:
            size = self._entry(key, gen).size
        except StoreError:
            size = 0  # ``work`` answers the error
        if size <= LOAD_INLINE_BYTES:
            work(handle)
        else:
            self._pool.submit(self._guarded, handle, work)

    @staticmethod
    def _guarded(handle: hg.TargetHandle, work: Any) -> None:
        try:
            work(handle)
        except Exception as exc:
            handle.fail(exc)

    def _disk_push(self, handle: hg.TargetHandle) -> None:
        """Read a disk copy and push it into the caller's buffer; answer once it landed."""
        key, gen, cached, dest = handle.args
        if cached and self._is_retired(key, gen):
            self.c["reads_refused"] += 1
            handle.respond(p.Status(p.STALE, f"node {self.name}: generation {gen} was retired"))
            return
        self._sized(handle, key, gen, lambda h: self._push(h, key, gen, dest))

    def _push(self, handle: hg.TargetHandle, key: str, gen: int, dest: bulk.RemoteBulk) -> None:
        try:
            entry = self._entry(key, gen)
            if dest.size < entry.size:
                raise StoreError(f"the destination holds {dest.size} bytes, the object "
                                 f"{entry.size}", key=key, tier="disk")
        except StoreError as exc:
            handle.respond(p.Status(p.code_of(exc), str(exc)))
            return
        if not entry.size:
            self.c["pushes"] += 1
            handle.respond(p.Status(p.OK, ""))
            return
        # A small copy (read here, on the progress thread: ``_sized``) goes through a kept,
        # registered buffer; a large one (read in the pool) through memory of its own.
        kept = entry.size <= LOAD_INLINE_BYTES
        if kept:
            buf, local = self._push_bufs.pop() if self._push_bufs else self._push_buffer()
        else:
            buf = mmap.mmap(-1, entry.size)
            local = None
        try:
            self._read_copy(entry, memoryview(buf)[: entry.size])
            if local is None:
                local = self.engine.bulk(buf, bulk.READ_ONLY, eager=False)
            started = time.perf_counter()
            transfer = local.push_to(dest, entry.size)
        except StoreError as exc:
            self._done_with(kept, buf, local)
            handle.respond(p.Status(p.code_of(exc), str(exc)))
            return
        except BaseException:
            self._done_with(kept, buf, local)
            raise
        push_id = next(self._push_ids)
        self._pushing[push_id] = (time.monotonic(), transfer)

        def landed(t: bulk.Transfer) -> None:
            self._pushing.pop(push_id, None)
            self._done_with(kept, buf, local)
            if t.error is not None:
                handle.fail(t.error)
                return
            self.c["pushes"] += 1
            self.phases["push"].observe(time.perf_counter() - started)
            handle.respond(p.Status(p.OK, ""))
        transfer.add_done_callback(landed)

    def _push_buffer(self) -> tuple[mmap.mmap, bulk.Bulk]:
        buf = mmap.mmap(-1, LOAD_INLINE_BYTES)
        return buf, self.engine.bulk(buf, bulk.READ_ONLY, eager=False)

    def _done_with(self, kept: bool, buf: mmap.mmap, local: bulk.Bulk | None) -> None:
        """Give a push's buffer back (kept) or let it go. Its memory is unmapped when the
        last view goes (the NA operations that just completed still hold theirs: closing it
        here would raise BufferError)."""
        if kept and local is not None and len(self._push_bufs) < PUSH_BUFFERS:
            self._push_bufs.append((buf, local))
        elif local is not None:
            local.close()

    def _disk_stage(self, handle: hg.TargetHandle) -> None:
        key, gen, cached = handle.args
        if cached and self._is_retired(key, gen):
            self.c["reads_refused"] += 1
            handle.respond(p.Staged(0, b""))
            return
        self._sized(handle, key, gen, lambda h: h.respond(self._stage(key, gen)))

    def _stage(self, key: str, gen: int) -> p.Staged:
        started = time.perf_counter()
        _, buf = self._load(key, gen)
        handle = self.engine.bulk(buf, bulk.READ_ONLY, eager=False)
        stage_id = next(self._stage_ids)
        with self._lock:
            self._staged[stage_id] = (handle, buf)
        self.c["stages"] += 1
        self.phases["stage"].observe(time.perf_counter() - started)
        return p.Staged(stage_id, handle.to_bytes())

    def _disk_release(self, stage_id: int) -> None:
        with self._lock:
            staged = self._staged.pop(stage_id, None)
        if staged is not None:
            staged[0].close()
            staged[1].close()

    def stats(self) -> dict[str, Any]:
        return {**self.c, "disk_used": self.disk.used, "disk_objects": len(self.entries),
                "phases": {k: h.snapshot() for k, h in self.phases.items()}}

    def _disk_delete(self, key: str, gen: int) -> None:
        with self._lock:
            entry = self.entries.pop((key, gen), None)
        if entry is not None:
            self.disk.delete(entry)

    def _read(self, node_id: int, cached: bool, items: Any) -> bytes:
        """A byte per item (1: read, 0: refused), then the bytes of the items read, in order
        (``protocol.read``). Refused: another registration of ours, or (``cached``) a
        generation the master retired (``retire``). One pass per item, its checks folded in:
        a batch of 128 is this node's hot path."""
        if type(items) is not list:
            raise ValueError("read: items is not a list")
        count = len(items)
        if node_id != self.node_id or not node_id:
            self.c["reads_refused"] += count
            return bytes(count)
        retired = self._retired if cached else None
        now = time.monotonic() if retired else 0.0
        view, cap = self.view, self.capacity
        flags = bytearray(count)
        parts: list[Any] = [flags]
        refused = 0
        try:
            for k, item in enumerate(items):
                if type(item) is not list:
                    raise TypeError("an item is not a list")
                if retired:
                    old = retired.get(item[0])
                    if old is not None and now < old[1] and item[1] <= old[0]:
                        refused += 1
                        continue
                n = len(item)
                if n < 2 or n % 2:
                    raise ValueError("an item is not [key, gen, off, len, ...]")
                for j in range(2, n, 2):
                    off, length = item[j], item[j + 1]
                    if off < 0 or length < 0 or off + length > cap:
                        raise ValueError(f"run ({off}, {length}) is outside the {cap}-byte "
                                         "segment")
                    parts.append(view[off : off + length])
                flags[k] = 1
        except (TypeError, IndexError, KeyError) as exc:
            raise ValueError(f"read: a malformed item: {exc}") from None
        self.c["reads_refused"] += refused
        self.c["inline_reads"] += count - refused
        return b"".join(parts)

    def _retire(self, keys: list[str], gens: list[int], ttl_ms: int) -> None:
        if len(keys) != len(gens):
            raise ValueError(f"{len(keys)} keys for {len(gens)} generations")
        now = time.monotonic()
        retired = self._retired
        if len(retired) > 4096 and now >= self._sweep_at:
            # A new dict, swapped in whole: disk reads check it from the handler pool.
            self._retired = retired = {k: v for k, v in retired.items() if v[1] > now}
            self._sweep_at = now + 1.0
        until = now + ttl_ms / 1000
        self._retires += 1
        p.EPOCH.pack_into(self._epoch, 0, self.node_id, self._retires)
        for key, gen in zip(keys, gens):
            old = retired.get(key)
            retired[key] = (max(gen, old[0]) if old is not None and old[1] > now else gen, until)
        self.c["retired"] += len(keys)

    def _write_inline(self, runs: list[list[tuple[int, int]]], data: list[bytes]) -> None:
        if len(runs) != len(data):
            raise ValueError(f"{len(runs)} run lists for {len(data)} values")
        for r, value in zip(runs, data):
            segments = self._segments(r)
            if sum(len(s) for s in segments) != len(value):
                raise ValueError(f"runs hold {sum(len(s) for s in segments)} bytes, the value "
                                 f"{len(value)}")
            pos = 0
            for seg in segments:
                seg[:] = value[pos : pos + len(seg)]
                pos += len(seg)
        self.c["inline_writes"] += len(runs)
