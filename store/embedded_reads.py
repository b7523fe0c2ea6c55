"""The embedded scheme's reads: from DRAM (copied under the metadata lock up to
``INLINE_COPY``, under a lease beyond), or from the disk tier (promoted back to DRAM on a
hit when ``promote_on_hit``), singly or in batches.

``EmbeddedReads`` is a part of ``embedded.EmbeddedStore`` in a module of its own, so that each
part can be read in one sitting; it uses the store's lock, object table, tiers and counters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from .api import Buffer, validate_key, writable
from .errors import ObjectLost, StoreError
from .eviction import ObjectRecord

# DRAM copies up to 4 MiB happen under the metadata lock, without a lease: CPython holds the
# GIL through a memoryview copy anyway, so releasing our lock would let no other thread run,
# and a second lock round costs more than it saves. Larger copies take a lease so that a
# close or an eviction cycle is not held up for milliseconds.
INLINE_COPY = 4 << 20


class EmbeddedReads:
    """The read half of ``EmbeddedStore`` (a mixin: the attributes it uses are made in
    ``EmbeddedStore.__init__``)."""

    def get(self, key: str) -> bytes:
        return self._read(key, None)  # type: ignore[return-value]

    def get_into(self, key: str, buffer: Buffer) -> int:
        return self._read(key, writable(buffer, "get_into"))  # type: ignore[return-value]

    def _read(self, key: str, dst: memoryview | None) -> bytes | int:
        validate_key(key, self.config.max_key_bytes)
        with self._lock:
            self._check_open()
            self.c["get"] += 1
            obj = self._lookup(key)
            size = obj.size
            if dst is not None and len(dst) < size:
                raise ValueError(f"get_into {key!r}: the buffer holds {len(dst)} bytes, the "
                                 f"object {size}")
            if obj.alloc is not None:
                self.c["dram_hits"] += 1
                self.c["dram_out"] += size
                self._objects.move_to_end(key)
                if size <= INLINE_COPY:
                    if dst is None:
                        return self.dram.read(obj.alloc, size)
                    self.dram.read_into(obj.alloc, size, dst)
                    return size
                obj.readers += 1
                alloc = obj.alloc
                fd = -1
            else:
                self.c["dram_misses"] += 1
                if obj.disk is None:
                    raise ObjectLost("object has neither a DRAM nor a disk copy", key=key,
                                     tier="disk")
                entry = obj.disk
                fd = self.disk.open(entry)
        if fd < 0:
            try:
                if dst is None:
                    return self.dram.read(alloc, size)
                self.dram.read_into(alloc, size, dst)
                return size
            finally:
                with self._lock:
                    self._release_lease(obj)
        started = time.perf_counter()
        try:
            if dst is None:
                data: bytes | None = self.disk.read(fd, entry)
            else:
                self.disk.read_into(fd, entry, dst)
                data = None
        finally:
            os.close(fd)
        self.phases["load"].observe(time.perf_counter() - started)
        with self._lock:
            self.c["disk_hits"] += 1
            self.c["disk_out"] += size
            if self.config.promote_on_hit:
                self._promote(obj, data if data is not None else dst[:size])
        return data if data is not None else size

    def _promote(self, obj: ObjectRecord, data: bytes | memoryview) -> None:
        """Copy a disk-only object back into DRAM if there is room now (under the lock)."""
        if obj.dead or obj.alloc is not None:
            return
        alloc = self.dram.pages.allocate(self.dram.pages_for(obj.size))
        if alloc is None:
            return
        self.dram.write(alloc, memoryview(data))
        obj.alloc = alloc
        self._objects.move_to_end(obj.key)
        self.c["promotions"] += 1

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        out: list[bytes | StoreError] = []
        large: list[int] = []
        with self._lock:
            self._check_open()
            for key in keys:
                if not isinstance(key, str):
                    validate_key(key, self.config.max_key_bytes)  # raises TypeError
                obj = self._objects.get(key)
                if obj is not None and obj.alloc is not None and obj.size <= INLINE_COPY:
                    self.c["get"] += 1
                    self.c["dram_hits"] += 1
                    self.c["dram_out"] += obj.size
                    self._objects.move_to_end(key)
                    out.append(self.dram.read(obj.alloc, obj.size))
                else:
                    large.append(len(out))
                    out.append(b"")
        for i in large:
            try:
                out[i] = self.get(keys[i])
            except StoreError as exc:
                out[i] = exc
        return out

    def get_into_many(self, keys: Sequence[str],
                      buffers: Sequence[Buffer]) -> list[int | StoreError]:
        if len(keys) != len(buffers):
            raise ValueError(f"get_into_many: {len(keys)} keys but {len(buffers)} buffers")
        views = [writable(b, "get_into_many") for b in buffers]
        out: list[int | StoreError] = []
        rest: list[int] = []
        with self._lock:
            self._check_open()
            for key, dst in zip(keys, views):
                obj = self._objects.get(key) if isinstance(key, str) else None
                if (obj is not None and obj.alloc is not None and obj.size <= INLINE_COPY
                        and len(dst) >= obj.size):
                    self.c["get"] += 1
                    self.c["dram_hits"] += 1
                    self.c["dram_out"] += obj.size
                    self._objects.move_to_end(key)
                    self.dram.read_into(obj.alloc, obj.size, dst)
                    out.append(obj.size)
                else:
                    rest.append(len(out))
                    out.append(0)
        for i in rest:
            try:
                out[i] = self._read(keys[i], views[i])  # type: ignore[assignment]
            except StoreError as exc:
                out[i] = exc
        return out
