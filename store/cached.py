"""Reads through a location the client cached, without asking the master: several keys per
node RPC (the node refuses a retired generation), a disk copy by push or pull, or one object
one-sided from the node's segment, checked against the node's published epoch.

``CachedReads`` is a part of ``client.DistributedStore`` (through ``reads.Reads``), in a module
of its own so that each part can be read in one sitting; it uses the store's engine, nodes,
location caches and staging buffer, and ``Reads``' node and disk reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from petasus import bulk, hg

from . import protocol as p

# From this size a one-sided get lands in the bytes object it returns (``hg.fresh_bytes``)
# rather than in the staging buffer and a copy of it: a registration per get against a
# copy of the object (memcpy here: ~8-15 GB/s, so ~100 us per MiB).
FRESH_MIN = 256 << 10


class CachedReads:
    """Reads through cached locations (a mixin of ``Reads``)."""

    def _forget(self, keys: Iterable[str]) -> None:
        cache, far = self._cache, self._far
        if cache or far:
            for key in keys:
                cache.pop(key, None)  # type: ignore[union-attr]
                far.pop(key, None)

    def _epoch_of(self, uri: str, behind: Sequence[bulk.Transfer] = ()) -> bytes | None:
        """The node's epoch (protocol.EPOCH), read one-sided once the reads ``behind`` have
        read the node's memory; None if it cannot be read. Where transfers reach a peer in
        order (``Engine.rma_ordered``) the epoch read starts at once behind them, and its
        answer follows theirs instead of costing a round trip of its own."""
        try:
            region = self._epochs.get(uri)
            if region is None:
                wire = self._node(uri).epoch_region.call(timeout=self.timeout)
                region = self._epochs[uri] = bulk.RemoteBulk.from_bytes(wire)
            with self._epoch_lock:
                if self._epoch_local is None:
                    buf = bytearray(p.EPOCH.size)
                    self._epoch_local = (buf, self.engine.bulk(buf, bulk.WRITE_ONLY,
                                                               eager=False))
                buf, handle = self._epoch_local
                if not self.engine.rma_ordered:
                    for t in behind:
                        t.wait(self.timeout)
                    behind = ()
                epoch = handle.pull_from(region, p.EPOCH.size)
                try:
                    for t in behind:
                        t.wait(self.timeout)
                finally:
                    epoch.wait(self.timeout)  # the buffer is free again before anyone reuses it
                return bytes(buf)
        except (hg.RPCError, hg.PeerError, bulk.NAError, TimeoutError, ValueError, TypeError):
            self._epochs.pop(uri, None)  # a node that restarted has a new region
            return None

    def _read_far(self, key: str, dst: memoryview | None) -> bytes | int | None:
        """A single object read one-sided through its cached replica, then checked against
        the node's epoch: the bytes (a get) or the size (a get_into), or None to locate."""
        entry = self._far.get(key)
        if entry is None:
            return None
        until, size, uri, rep, before = entry
        if until <= time.monotonic() or (dst is not None and len(dst) < size):
            self._far.pop(key, None)
            return None
        value: bytes | int | None = None
        transfers: list[tuple[int, bulk.Transfer]] = []
        fresh = hg.fresh_bytes(size) if dst is None and size >= FRESH_MIN else None
        try:
            if dst is None and fresh is None:
                if not self._staging_lock.acquire(blocking=False):
                    return None
                try:
                    view, handle = self._staging_for(size)
                    self._move(0, handle, 0, rep, bulk.WRITE_ONLY, transfers)
                    if self._epoch_of(uri, [t for _, t in transfers]) == before and \
                            time.monotonic() < until:
                        value = bytes(view[:size])
                finally:
                    self._staging_lock.release()
            else:
                # A get of a large object lands in the bytes it returns (no copy out of the
                # staging buffer); the view is never released by hand: a transfer that is
                # still in flight after an error keeps the memory it writes alive.
                land = dst[:size] if fresh is None else fresh[1]  # type: ignore[index]
                with self.engine.bulk(land, bulk.WRITE_ONLY, eager=False) as handle:
                    self._move(0, handle, 0, rep, bulk.WRITE_ONLY, transfers)
                    current = self._epoch_of(uri, [t for _, t in transfers])
                if current == before and time.monotonic() < until:
                    value = size if fresh is None else fresh[0]
        except (bulk.NAError, TimeoutError, ValueError):
            value = None
        if value is None:
            self._far.pop(key, None)
            self.c["cache_refused"] += 1
        else:
            self.c["cache_hits"] += 1
            self.c["one_sided"] += 1
        return value

    def _read_cached(self, keys: Sequence[str], valid: list[int],
                     dsts: list[memoryview] | None, results: list[Any]) -> list[int]:
        """Read the keys whose location is cached from their nodes; the indexes left to
        locate (not cached, refused by the node, or read too late for the lease)."""
        cache = self._cache
        if cache is None:
            return valid
        now = time.monotonic()
        wanted = []
        disk: list[tuple[int, str, tuple[Any, ...]]] = []
        miss = []
        for i in valid:
            entry = cache.get(keys[i])
            if entry is None or entry[0] <= now or (dsts is not None and
                                                    len(dsts[i]) < entry[1]):
                miss.append(i)
                continue
            if entry[5] is None:
                disk.append((i, keys[i], entry))
            else:
                wanted.append((i, keys[i], entry))
        if not wanted and not disk:
            return valid
        got = self._node_reads([(i, e[5], e[3], e[4], e[1]) for i, _key, e in wanted],
                               True) if wanted else {}
        for i, key, entry in disk:
            got[i] = self._disk_cached(key, entry, None if dsts is None else dsts[i])
            wanted.append((i, key, entry))
        done = time.monotonic()
        hits = 0
        for i, key, entry in wanted:
            value = got.get(i)
            if value is None or done >= entry[0]:
                cache.pop(key, None)
                miss.append(i)
                continue
            hits += 1
            if dsts is None or type(value) is int:
                results[i] = value
            else:
                dsts[i][: len(value)] = value
                results[i] = len(value)
        self.c["cache_hits"] += hits
        self.c["cache_refused"] += len(wanted) - hits
        if len(miss) > 1:
            miss.sort()
        return miss

    def _disk_cached(self, key: str, entry: tuple[Any, ...],
                     dst: memoryview | None) -> bytearray | int | None:
        """A disk read through a cached location: the bytes (a get), the size (a get_into),
        or None where the node refused it or failed."""
        size = entry[1]
        buf = bytearray(size) if dst is None else None
        view = memoryview(buf) if buf is not None else dst[:size]  # type: ignore[index]
        try:
            status = self._disk_read(entry[4], key, entry[2], view, True)
        except (hg.RPCError, hg.PeerError, bulk.NAError, TimeoutError):
            return None
        if status.code != p.OK:
            return None
        return size if buf is None else buf
