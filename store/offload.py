"""Disk copies in the background: a bounded queue and a few worker threads the store owns.

The queue's cap is what makes eviction data-preserving without stalling puts: a candidate
whose copy cannot be queued is deferred (or force-dropped), never waited for under the lock.
Workers share the store's lock through a condition, take a lease on the object's pages while
they write them, and hand the result back to the store (``offload_done``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from .disk import DiskFull
from .errors import StoreError, StoreFull
from .eviction import ObjectRecord

log = logging.getLogger("petasus.store.offload")

# After a failed copy (disk full, I/O error) no new copy is queued for this long, so a full
# disk costs one failure per second, not one per eviction cycle.
RETRY_AFTER_S = 1.0
LOG_EVERY_S = 10.0


class Offloader:
    def __init__(self, store: Any, workers: int, cap: int) -> None:
        self.store = store
        self.cap = cap
        self._cond = threading.Condition(store._lock)
        self._queue: collections.deque[ObjectRecord] = collections.deque()
        self._stopping = False
        self.in_flight = 0
        self.completed = 0
        self.failed = 0
        self.disk_full = False
        self.last_error: str | None = None
        self._error_at = -RETRY_AFTER_S
        self._epoch = 0  # failures so far: a copy started before the last one proves nothing
        self._logged_at = -LOG_EVERY_S
        self._threads = [threading.Thread(target=self._run, name=f"petasus-store-offload-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # The methods below run under the store's lock.
    def room(self) -> int:
        return self.cap - len(self._queue) - self.in_flight

    def disk_ok(self) -> bool:
        return time.monotonic() - self._error_at >= RETRY_AFTER_S

    def submit(self, obj: ObjectRecord) -> bool:
        if obj.offloading or obj.disk is not None or obj.dead or obj.alloc is None:
            return obj.offloading
        if self.room() <= 0 or self._stopping:
            return False
        obj.offloading = True
        self._queue.append(obj)
        self._cond.notify()
        return True

    # The methods below take the lock themselves.
    def submit_blocking(self, obj: ObjectRecord, deadline: float | None) -> None:
        with self._cond:
            while self.room() <= 0 and not self._stopping:
                self._wait(deadline, "queueing disk copies")
            self.submit(obj)

    def wait_idle(self, deadline: float | None) -> None:
        with self._cond:
            failed = self.failed
            while self._queue or self.in_flight:
                self._wait(deadline, "waiting for disk copies")
            if self.failed != failed:
                kind = StoreFull if self.disk_full else StoreError
                raise kind(f"{self.failed - failed} disk copies failed: {self.last_error}",
                           tier="disk")

    def _wait(self, deadline: float | None, what: str) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"store {self.store.path}: timed out {what}")
        self._cond.wait(left)

    def stop(self, timeout: float) -> None:
        """Let the workers finish the queue for up to ``timeout``, then abandon the rest."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            if self._queue:
                log.warning("store %s closed with %d disk copies not made", self.store.path,
                            len(self._queue))
            for obj in self._queue:
                obj.offloading = False
            self._queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _run(self) -> None:
        store = self.store
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                obj = self._queue.popleft()
                if obj.dead or obj.alloc is None or obj.disk is not None:
                    obj.offloading = False
                    self._cond.notify_all()
                    continue
                obj.readers += 1
                self.in_flight += 1
                segments = store.dram.segments(obj.alloc, obj.size)
                epoch = self._epoch
            started = time.perf_counter()
            entry, error = None, None
            try:
                entry = store.disk.write(obj.key, obj.gen, segments, obj.size)
            except OSError as exc:
                error = exc
            except Exception as exc:  # a bug must not kill the worker and wedge every put
                log.exception("store %s: disk copy of %r failed", store.path, obj.key)
                error = exc
            finally:
                for seg in segments:
                    seg.release()
            elapsed = time.perf_counter() - started
            with self._cond:
                self.in_flight -= 1
                obj.offloading = False
                store.phases["write"].observe(elapsed)
                if entry is not None:
                    self.completed += 1
                    if epoch == self._epoch:
                        self.disk_full = False
                else:
                    self._failed(obj, error)
                store.offload_done(obj, entry)
                self._cond.notify_all()

    def _failed(self, obj: ObjectRecord, error: BaseException | None) -> None:
        now = time.monotonic()
        self.failed += 1
        self._epoch += 1
        self._error_at = now
        self.disk_full = isinstance(error, DiskFull)
        self.last_error = f"{obj.key!r}: {error}"
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("store %s: disk copy failed, objects stay in DRAM (%d failures so "
                        "far): %s", self.store.path, self.failed, self.last_error)
