"""The standalone scheme: every tier in this process, behind the one ``Store`` interface.

One lock guards the metadata (a dict in LRU order); bytes move outside it under a lease
(``readers``), so a large copy never stalls other keys, except copies of at most
``embedded_reads.INLINE_COPY`` bytes, cheaper to make under the lock than a second lock
round. Disk copies run on a few worker threads the store owns (``offload.Offloader``) and are
joined at close. Reads are ``embedded_reads.EmbeddedReads``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .api import Buffer, Store, readable, validate_key
from .config import Offload, Pin, StoreConfig
from .disk import DiskTier
from .dram import DramTier
from .embedded_reads import EmbeddedReads
from .errors import (
    AlreadyExists,
    NotFound,
    StoreClosed,
    StoreError,
    StoreFull,
    ValueTooLarge,
)
from .eviction import Action, ObjectRecord, plan_eviction
from .metrics import Histogram
from .offload import Offloader

log = logging.getLogger("petasus.store")



class EmbeddedStore(EmbeddedReads, Store):
    def __init__(self, path: str | os.PathLike[str] | None, config: StoreConfig) -> None:
        self.config = config
        self._temporary = path is None
        self.path = Path(tempfile.mkdtemp(prefix="petasus-store-") if path is None else path)
        self._lockfile = self._take_directory()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._objects: OrderedDict[str, ObjectRecord] = OrderedDict()
        self._closed = False
        self._gen = 0
        self.c = dict.fromkeys(
            ("put", "get", "remove", "promotions", "dram_hits", "dram_misses", "evictions",
             "dram_in", "dram_out", "disk_hits", "disk_misses", "disk_in", "disk_out",
             "deferred", "force_dropped", "dropped"), 0)
        self.phases = {p: Histogram() for p in ("allocate", "load", "write", "release")}
        try:
            self.dram = DramTier(config.dram_bytes, config.page_size)
            self.disk = DiskTier(self.path / "objects", config.disk_bytes, config.disk_fsync)
            for key, entry in self.disk.scan().items():
                self._objects[key] = ObjectRecord(key, entry.size, entry.gen, None, entry)
                self._gen = max(self._gen, entry.gen)
        except BaseException:
            self._release_directory()
            raise
        self.offloader = Offloader(self, config.offload_workers, config.offload_queue)

    # --- opening and closing --------------------------------------------------------------
    def _take_directory(self) -> Any:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lockfile = (self.path / "LOCK").open("a+")
        except OSError as exc:
            raise StoreError(f"cannot open store directory {self.path}: "
                             f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lockfile.close()
            raise StoreError(f"store directory {self.path} is in use by another process") from None
        return lockfile

    def _release_directory(self) -> None:
        self._lockfile.close()
        if self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued disk copies (up to ``timeout``), then release the tiers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
        self.offloader.stop(timeout)
        try:
            self.dram.close()
        except BufferError:  # a reader still copies out of the arena: it goes with its views
            log.warning("store %s closed while a read was in progress", self.path)
        self._release_directory()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._objects)} objects"
        return f"<EmbeddedStore {self.path} {state} offload={self.config.offload.value}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the store at {self.path} is closed")

    # --- puts -----------------------------------------------------------------------------
    def put(self, key: str, value: Buffer, *, overwrite: bool = False, pin: Pin = Pin.NONE,
            timeout: float | None = None) -> None:
        # put_many's path for one object, without its batch bookkeeping (~30% of a small put).
        src = readable(value, "put")
        validate_key(key, self.config.max_key_bytes)
        if len(src) > self.config.max_value_bytes:
            raise ValueTooLarge(f"value of {len(src)} bytes exceeds the cap of "
                                f"{self.config.max_value_bytes}", key=key, tier="dram")
        obj = ObjectRecord(key, len(src), 0, None, pin=Pin(pin))
        deadline = time.monotonic() + (self.config.put_timeout if timeout is None else timeout)
        self._reserve(obj, overwrite, deadline)
        try:
            if obj.alloc is not None:
                self.dram.write(obj.alloc, src)
        except BaseException:
            self._unreserve([obj])
            raise
        self._publish([obj], overwrite, True)

    def put_many(self, items: Iterable[tuple[str, Buffer]], *, overwrite: bool = False,
                 atomic: bool = False, timeout: float | None = None,
                 pin: Pin = Pin.NONE) -> list[StoreError | None]:
        staged: list[tuple[ObjectRecord, memoryview] | StoreError] = []
        seen: set[str] = set()
        for key, value in items:
            src = readable(value, "put")
            try:
                validate_key(key, self.config.max_key_bytes)
                if len(src) > self.config.max_value_bytes:
                    raise ValueTooLarge(f"value of {len(src)} bytes exceeds the cap of "
                                        f"{self.config.max_value_bytes}", key=key, tier="dram")
                if atomic and key in seen:
                    raise ValueError(f"put_many: key {key!r} appears twice in an atomic group")
            except StoreError as error:
                if atomic:
                    raise
                staged.append(error)
                continue
            seen.add(key)
            staged.append((ObjectRecord(key, len(src), 0, None, pin=Pin(pin)), src))
        deadline = time.monotonic() + (self.config.put_timeout if timeout is None else timeout)
        results: list[StoreError | None] = [
            item if isinstance(item, StoreError) else None for item in staged]
        # A group is reserved, written and published together. An atomic batch is one group
        # (it must fit in DRAM at once); any other batch is cut wherever the next object would
        # have to wait for room, so a batch larger than DRAM spills like single puts do.
        group: list[tuple[int, ObjectRecord, memoryview]] = []
        for i, item in enumerate(staged):
            if isinstance(item, StoreError):
                continue
            obj, src = item
            try:
                if not self._reserve(obj, overwrite, deadline, wait=atomic or not group):
                    self._commit(group, results, overwrite, atomic)
                    group = []
                    self._reserve(obj, overwrite, deadline, wait=True)
            except StoreError as exc:
                if atomic:
                    self._unreserve([o for _, o, _ in group])
                    raise
                results[i] = exc
                continue
            except BaseException:
                self._unreserve([o for _, o, _ in group])
                raise
            group.append((i, obj, src))
        self._commit(group, results, overwrite, atomic)
        return results

    def _commit(self, group: list[tuple[int, ObjectRecord, memoryview]],
                results: list[StoreError | None], overwrite: bool, atomic: bool) -> None:
        try:
            for _, obj, src in group:
                if obj.alloc is not None:
                    self.dram.write(obj.alloc, src)
        except BaseException:
            self._unreserve([o for _, o, _ in group])
            raise
        errors = self._publish([o for _, o, _ in group], overwrite, atomic)
        for (i, _, _), error in zip(group, errors):
            results[i] = error

    def _reserve(self, obj: ObjectRecord, overwrite: bool, deadline: float,
                 wait: bool = True) -> bool:
        """Take pages for an object that is not visible yet, evicting and (if ``wait``)
        waiting for room; False if there was no room and waiting was not allowed."""
        pages = self.dram.pages_for(obj.size)
        if pages > self.dram.pages.total:
            raise StoreFull(f"object of {obj.size} bytes is larger than DRAM "
                            f"({self.dram.capacity} bytes)", key=obj.key, tier="dram")
        started = time.perf_counter()
        with self._lock:
            self._check_open()
            if not overwrite and obj.key in self._objects:
                raise AlreadyExists("key is present (pass overwrite=True)", key=obj.key,
                                    tier="dram")
            while True:
                alloc = self.dram.pages.allocate(pages)
                if alloc is not None:
                    break
                self._evict(pages - self.dram.pages.free_pages)
                alloc = self.dram.pages.allocate(pages)
                if alloc is not None:
                    break
                if not wait:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreFull(
                        f"no room for {obj.size} bytes: {self.dram.pages.free_pages} of "
                        f"{self.dram.pages.total} pages free and nothing more evictable in "
                        "time", key=obj.key, tier="dram")
                self._room.wait(min(left, 0.5))
                self._check_open()
            self._gen += 1
            obj.gen = self._gen
            obj.alloc = alloc
        self.phases["allocate"].observe(time.perf_counter() - started)
        return True

    def _unreserve(self, objs: list[ObjectRecord]) -> None:
        with self._lock:
            for obj in objs:
                if obj.alloc is not None:
                    self.dram.pages.free(obj.alloc)
            self._room.notify_all()

    def _publish(self, objs: list[ObjectRecord], overwrite: bool,
                 atomic: bool) -> list[StoreError | None]:
        """Make written objects visible, all at once under one lock."""
        out: list[StoreError | None] = []
        with self._lock:
            if self._closed:
                for obj in objs:
                    self.dram.pages.free(obj.alloc)  # type: ignore[arg-type]
                raise StoreClosed(f"the store at {self.path} closed during the put")
            clash = [o for o in objs if not overwrite and o.key in self._objects]
            if atomic and clash:
                for obj in objs:
                    self.dram.pages.free(obj.alloc)  # type: ignore[arg-type]
                self._room.notify_all()
                raise AlreadyExists("key was put concurrently", key=clash[0].key, tier="dram")
            for obj in objs:
                if not overwrite and obj.key in self._objects:
                    self.dram.pages.free(obj.alloc)  # type: ignore[arg-type]
                    self._room.notify_all()
                    out.append(AlreadyExists("key was put concurrently", key=obj.key,
                                             tier="dram"))
                    continue
                old = self._objects.pop(obj.key, None)
                if old is not None:
                    self._retire(old)
                self._objects[obj.key] = obj
                self.c["put"] += 1
                self.c["dram_in"] += obj.size
                out.append(None)
                if self.config.offload is Offload.ON_PUT:
                    self.offloader.submit(obj)
            self._watermark(frozenset(objs))
        return out

    # --- eviction -------------------------------------------------------------------------
    def _watermark(self, spare: frozenset[ObjectRecord]) -> None:
        pages = self.dram.pages
        if pages.used_pages > self.config.high_watermark * pages.total:
            self._evict(pages.used_pages - int(self.config.low_watermark * pages.total), spare)

    def _evict(self, need_pages: int, spare: frozenset[ObjectRecord] = frozenset()) -> None:
        """One eviction cycle (under the lock)."""
        if need_pages <= 0:
            return
        plan = plan_eviction(self._objects.values(), need_pages, policy=self.config.offload,
                             force_evict=self.config.force_evict,
                             queue_room=self.offloader.room(),
                             disk_ok=self.offloader.disk_ok(), spare=spare)
        self.c["deferred"] += plan.deferred
        dropped = dropped_bytes = 0
        for obj, action in plan.actions:
            if action is Action.FREE:
                self._free_dram(obj)
            elif action is Action.DROP:
                del self._objects[obj.key]
                self._retire(obj)
                if self.config.offload is Offload.OFF:
                    self.c["dropped"] += 1
                else:
                    dropped += 1
                    dropped_bytes += obj.size
            else:
                obj.evict_after_offload = True
                if action is Action.OFFLOAD:
                    self.offloader.submit(obj)
        if dropped:
            self.c["force_dropped"] += dropped
            log.warning("store %s: force_evict dropped %d objects (%d bytes) without a disk "
                        "copy this cycle", self.path, dropped, dropped_bytes)

    def _free_dram(self, obj: ObjectRecord) -> None:
        if obj.alloc is not None and obj.readers == 0:
            started = time.perf_counter()
            self.dram.pages.free(obj.alloc)
            obj.alloc = None
            obj.evict_after_offload = False
            self.c["evictions"] += 1
            self.phases["release"].observe(time.perf_counter() - started)
            self._room.notify_all()

    def _retire(self, obj: ObjectRecord) -> None:
        """The object left the index: its disk copy goes now, its pages with the last lease."""
        obj.dead = True
        if obj.disk is not None:
            self.disk.delete(obj.disk)
            obj.disk = None
        if obj.readers == 0 and obj.alloc is not None:
            self.dram.pages.free(obj.alloc)
            obj.alloc = None
            self._room.notify_all()

    def _release_lease(self, obj: ObjectRecord) -> None:
        obj.readers -= 1
        if obj.readers:
            return
        if obj.dead and obj.alloc is not None:
            self.dram.pages.free(obj.alloc)
            obj.alloc = None
            self._room.notify_all()
        elif obj.evict_after_offload and obj.disk is not None:
            self._free_dram(obj)

    # Called by the offloader, under the lock, when a disk copy finished (entry) or failed.
    def offload_done(self, obj: ObjectRecord, entry: Any) -> None:
        if entry is not None:
            if obj.dead:
                self.disk.delete(entry)
            else:
                obj.disk = entry
                self.c["disk_in"] += obj.size
        else:
            obj.evict_after_offload = False
        self._release_lease(obj)
        self._room.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Give every DRAM-only object a disk copy and wait until all copies are complete."""
        if self.config.offload is Offload.OFF:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._check_open()
            pending = [o for o in self._objects.values() if o.disk is None and not o.offloading]
        for obj in pending:
            self.offloader.submit_blocking(obj, deadline)
        self.offloader.wait_idle(deadline)

    # --- reads ----------------------------------------------------------------------------
    def _lookup(self, key: str) -> ObjectRecord:
        obj = self._objects.get(key)
        if obj is None:
            self.c["dram_misses"] += 1
            self.c["disk_misses"] += 1
            raise NotFound("no such key", key=key, tier="dram")
        return obj

    def exists(self, key: str) -> bool:
        validate_key(key, self.config.max_key_bytes)
        with self._lock:
            self._check_open()
            return key in self._objects

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        for key in keys:
            validate_key(key, self.config.max_key_bytes)
        with self._lock:
            self._check_open()
            return [key in self._objects for key in keys]

    def size(self, key: str) -> int:
        validate_key(key, self.config.max_key_bytes)
        with self._lock:
            self._check_open()
            return self._lookup(key).size

    # --- the rest -------------------------------------------------------------------------
    def remove(self, key: str) -> None:
        validate_key(key, self.config.max_key_bytes)
        with self._lock:
            self._check_open()
            obj = self._lookup(key)
            del self._objects[key]
            self._retire(obj)
            self.c["remove"] += 1

    def pin(self, key: str, mode: Pin = Pin.SOFT) -> None:
        validate_key(key, self.config.max_key_bytes)
        with self._lock:
            self._check_open()
            self._lookup(key).pin = Pin(mode)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self.c
            pages = self.dram.pages
            in_dram = sum(1 for o in self._objects.values() if o.alloc is not None)
            on_disk = sum(1 for o in self._objects.values() if o.disk is not None)
            off = self.offloader
            return {
                "dram": {
                    "capacity": self.dram.capacity, "used": pages.used_pages * self.dram.page_size,
                    "objects": in_dram, "pages_total": pages.total,
                    "pages_used": pages.used_pages, "hits": c["dram_hits"],
                    "misses": c["dram_misses"], "evictions": c["evictions"],
                    "bytes_in": c["dram_in"], "bytes_out": c["dram_out"],
                },
                "disk": {
                    "capacity": self.disk.capacity, "used": self.disk.used, "objects": on_disk,
                    "hits": c["disk_hits"], "misses": c["disk_misses"],
                    "bytes_in": c["disk_in"], "bytes_out": c["disk_out"],
                    "errors": off.failed, "full": off.disk_full,
                    "last_error": off.last_error,
                },
                "offload": {
                    "policy": self.config.offload.value, "force_evict": self.config.force_evict,
                    "queued": off.queued, "in_flight": off.in_flight,
                    "completed": off.completed, "deferred": c["deferred"],
                    "force_dropped": c["force_dropped"], "failed": off.failed,
                    "dropped": c["dropped"],
                },
                "ops": {"put": c["put"], "get": c["get"], "remove": c["remove"],
                        "promotions": c["promotions"]},
                "phases": {name: h.snapshot() for name, h in self.phases.items()},
            }

