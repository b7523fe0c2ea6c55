"""The distributed client's reads: locations from the master, cached until their lease
ends; objects read through their node (inline, several keys per RPC), one-sided from its
segment (checked against the node's published epoch), or from its disk by push or pull.

``Reads`` is a part of ``client.DistributedStore`` kept in a module of its own so that either
can be read in one sitting; it uses the store's engine, master, nodes and caches. Reads
through a location the client cached are ``cached.CachedReads``.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Sequence
from typing import Any

from petasus import bulk, hg

from . import protocol as p
from .api import Buffer, writable
from .cached import CachedReads
from .errors import ObjectLost, StoreError

# A node ``read`` answers at most the transport's message less this: one message rather than
# an exposed overflow the client pulls and acknowledges (two more round trips: 35.8K against
# 24.5K keys/s for 128 x 4 KiB over tcp); a batch is several reads in flight at once. The
# headers of an answer (hg's and the bytes' length) take 16 bytes.
READ_SLACK = 1 << 10
CACHE_KEYS = 1 << 16  # locations a client keeps (cleared when full)
LEASE_MARGIN_S = 0.05  # a cached location is used until this long before its lease ends
# A get's one-sided reads land in one buffer of the client, registered once and touched when
# made, up to this size; ``bytes`` are copied out of it. A fresh buffer per get cost more than
# the copy: a 1 MiB bytearray 30-135 us (zeroed, faulted in by the read), its registration
# 24-44 us; 16 MiB 3 ms (measured on this 2-core VM, tcp and sm).
STAGING_MAX = 64 << 20


class Reads(CachedReads):
    """The read half of ``DistributedStore`` (a mixin: the attributes it uses are made in
    ``DistributedStore.__init__``)."""

    _read_batch: int

    def get(self, key: str) -> bytes:
        out = self.get_many([key])[0]
        if isinstance(out, StoreError):
            raise out
        return out

    def get_into(self, key: str, buffer: Buffer) -> int:
        out = self.get_into_many([key], [buffer])[0]
        if isinstance(out, StoreError):
            raise out
        return out

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        got = self._read_many(keys, None)
        return [bytes(r) if isinstance(r, bytearray) else r for r in got]  # type: ignore[misc]

    def get_into_many(self, keys: Sequence[str],
                      buffers: Sequence[Buffer]) -> list[int | StoreError]:
        if len(keys) != len(buffers):
            raise ValueError(f"get_into_many: {len(keys)} keys but {len(buffers)} buffers")
        views = [writable(b, "get_into") for b in buffers]
        return self._read_many(keys, views)  # type: ignore[return-value]

    def _drop_staging(self) -> None:
        if self._staging is not None:
            buf, view, handle = self._staging
            self._staging = None
            handle.close()
            view.release()
            buf.close()

    def _staging_for(self, size: int) -> tuple[memoryview, bulk.Bulk]:
        """The staging buffer, grown to hold ``size`` bytes (the caller holds its lock)."""
        if self._staging is None or len(self._staging[0]) < size:
            self._drop_staging()
            cap = max(size, 1 << 20)
            buf = mmap.mmap(-1, cap)
            view = memoryview(buf)
            zero = bytes(1 << 20)
            for off in range(0, cap, len(zero)):  # touched now, not by the first reads
                n = min(len(zero), cap - off)
                view[off : off + n] = zero[:n]
            self._staging = (buf, view, self.engine.bulk(buf, bulk.WRITE_ONLY, eager=False))
        return self._staging[1], self._staging[2]

    def _read_many(self, keys: Sequence[str],
                   dsts: list[memoryview] | None) -> list[Any]:
        self._check_open()
        results, valid = self._checked(keys)
        cache = self._cache
        if cache and valid:
            valid = self._read_cached(keys, valid, dsts, results)
        before: tuple[str, bytes] | None = None  # (node uri, its epoch) before the locate
        if cache is not None and len(valid) == 1:
            i = valid[0]
            got = self._read_far(keys[i], None if dsts is None else dsts[i])
            if got is not None:
                results[i] = got
                valid = []
            elif keys[i] in self._far_seen:
                uri = self._far_seen[keys[i]]
                epoch = self._epoch_of(uri)
                before = None if epoch is None else (uri, epoch)
        for _attempt in range(3):
            if not valid:
                break
            started = time.monotonic()
            self.c["locates"] += 1
            locs = p.unpack_locations(self._call(self.master.locate, [keys[i] for i in valid],
                                                 self.preferred), len(valid))
            again = []
            pending: list[tuple[int, p.Location, memoryview, Any]] = []
            staged: list[tuple[int, int, int]] = []  # (index, offset in staging, size)
            big = 0 if dsts is not None else sum(
                loc.size for loc in locs
                if loc.code == p.OK and loc.replicas and loc.size > self.inline_bytes)
            staging = None
            if 0 < big <= STAGING_MAX and self._staging_lock.acquire(blocking=False):
                try:
                    staging = self._staging_for(big)
                except BaseException:
                    self._staging_lock.release()
                    raise
            pos = 0
            for i, loc in zip(valid, locs):
                if loc.code != p.OK:
                    results[i] = p.error_of(loc.code, loc.message, keys[i], "dram")
                    continue
                if staging is not None and loc.replicas and loc.size > self.inline_bytes:
                    staged.append((i, pos, loc.size))
                    pending.append((i, loc, staging[0][pos : pos + loc.size],
                                    (staging[1], pos)))
                    results[i] = None
                    pos += loc.size
                    continue
                if dsts is None:
                    buf = bytearray(loc.size)
                    dst = memoryview(buf)
                    results[i] = buf
                else:
                    dst = dsts[i]
                    if len(dst) < loc.size:
                        raise ValueError(f"get_into {keys[i]!r}: the buffer holds {len(dst)} "
                                         f"bytes, the object {loc.size}")
                    results[i] = loc.size
                pending.append((i, loc, dst, None))
            try:
                self._fetch(pending, keys, results, _attempt)
                lease = min((loc.lease_ms for _, loc, _, _ in pending), default=0) / 1000
                for i, _loc, _dst, _ in pending:
                    if isinstance(results[i], _Retry) or time.monotonic() - started > lease:
                        again.append(i)  # the lease lapsed mid-read: the bytes may be stale
                if staging is not None:
                    for i, at, size in staged:
                        if results[i] is None:
                            results[i] = bytes(staging[0][at : at + size])
            finally:
                if staging is not None:
                    self._staging_lock.release()
            if cache is not None:
                if len(cache) >= CACHE_KEYS:
                    cache.clear()
                for i, loc, _dst, _ in pending:
                    if i in again or isinstance(results[i], StoreError):
                        continue
                    until = started + loc.lease_ms / 1000 - LEASE_MARGIN_S
                    if loc.replicas and loc.size <= self.inline_bytes:
                        rep = loc.replicas[0]
                        cache[keys[i]] = (until, loc.size, loc.gen, rep.node_id, rep.uri,
                                          [keys[i], loc.gen,
                                           *[x for run in rep.runs for x in run]])
                    elif not loc.replicas and loc.disk_uris and loc.size:
                        # (an empty object is never sent for, so its node could not refuse it)
                        cache[keys[i]] = (until, loc.size, loc.gen, 0, loc.disk_uris[0], None)
                    elif loc.replicas and len(pending) == 1:
                        rep = loc.replicas[_attempt % len(loc.replicas)]  # the one read
                        if len(self._far_seen) >= CACHE_KEYS:
                            self._far_seen.clear()
                            self._far.clear()
                        self._far_seen[keys[i]] = rep.uri
                        if before is not None and before[0] == rep.uri:
                            self._far[keys[i]] = (until, loc.size, rep.uri, rep, before[1])
            valid = again
            if again:
                self.c["retries"] += 1
        for i in valid:
            results[i] = ObjectLost("could not read a stable copy in three attempts",
                                    key=keys[i], tier="dram")
        return results

    def _node_reads(self, wanted: list[tuple[int, list[Any], int, str, int]],
                    cached: bool) -> dict[int, bytes | None]:
        """``read`` RPCs for (index, item, node id, node uri, size), grouped per node in
        answers of one message at most, all in flight at once: each index's bytes, or
        None where the node refused or failed."""
        groups: dict[tuple[str, int], list[tuple[int, list[Any], int, str, int]]] = {}
        for w in wanted:
            group = groups.get((w[3], w[2]))
            if group is None:
                groups[(w[3], w[2])] = [w]
            else:
                group.append(w)
        limit, timeout = self._read_batch, self.timeout
        calls = []
        for (uri, nid), group in groups.items():
            read = self._node(uri).read
            start = total = 0
            for k, w in enumerate(group):
                size = w[4] + 1  # its flag byte
                if total and total + size > limit:
                    part = group[start:k]
                    calls.append((part, read.future(nid, cached, [x[1] for x in part],
                                                    timeout=timeout)))
                    start, total = k, 0
                total += size
            part = group[start:]
            calls.append((part, read.future(nid, cached, [x[1] for x in part],
                                            timeout=timeout)))
        out: dict[int, bytes | None] = {}
        for part, fut in calls:
            try:
                answer = fut.result()
            except (hg.RPCError, hg.PeerError):
                answer = b""
            count = len(part)
            flags = answer[:count]
            if len(flags) == count and flags.count(1) == count:  # every item read: the rule
                pos = count
                for w in part:
                    end = pos + w[4]
                    out[w[0]] = answer[pos:end]
                    pos = end
                if pos == len(answer):
                    continue
            elif len(flags) == count and flags.count(0) + flags.count(1) == count and \
                    len(answer) == count + sum(w[4] for w, flag in zip(part, flags) if flag):
                pos = count
                for w, flag in zip(part, flags):
                    if flag:
                        end = pos + w[4]
                        out[w[0]] = answer[pos:end]
                        pos = end
                    else:
                        out[w[0]] = None
                continue
            for w in part:  # failed, or an answer that does not add up
                out[w[0]] = None
        return out

    def _fetch(self, pending: list[tuple[int, p.Location, memoryview, Any]],
               keys: Sequence[str], results: list[Any], attempt: int) -> None:
        inline: list[tuple[int, list[Any], int, str, int]] = []
        transfers: list[tuple[int, bulk.Transfer]] = []
        handles: list[bulk.Bulk] = []
        disk: list[tuple[int, p.Location, memoryview]] = []
        dsts = {i: dst for i, _, dst, _ in pending}
        try:
            for i, loc, dst, extra in pending:
                if not loc.replicas:
                    if loc.disk_uris:
                        disk.append((i, loc, dst))
                    else:
                        results[i] = ObjectLost("no copy is reachable", key=keys[i])
                    continue
                rep = loc.replicas[attempt % len(loc.replicas)]  # a retry tries the next
                if loc.size <= self.inline_bytes:
                    inline.append((i, [keys[i], loc.gen, *[x for run in rep.runs for x in run]],
                                   rep.node_id, rep.uri, loc.size))
                    continue
                if extra is not None:  # a slice of the registered staging buffer
                    self._move(i, extra[0], extra[1], rep, bulk.WRITE_ONLY, transfers)
                    continue
                handles.append(self._one_sided(i, dst[: loc.size], rep, bulk.WRITE_ONLY,
                                               transfers))
            for i, loc, dst in disk:
                self._read_disk(i, loc, dst, keys, results, attempt)
            if inline:
                for i, value in self._node_reads(inline, False).items():
                    if value is None:
                        results[i] = _Retry()
                    elif isinstance(results[i], bytearray):
                        results[i] = value  # a get: the answer's bytes are the value, no copy
                    else:
                        dsts[i][: len(value)] = value
                self.c["inline"] += len(inline)
            for i, t in transfers:
                try:
                    t.wait(self.timeout)
                    self.c["one_sided"] += 1
                except (bulk.NAError, TimeoutError, ValueError):
                    results[i] = _Retry()
        finally:
            for h in handles:
                h.close()

    def _read_disk(self, i: int, loc: p.Location, dst: memoryview, keys: Sequence[str],
                   results: list[Any], attempt: int) -> None:
        try:
            status = self._disk_read(loc.disk_uris[attempt % len(loc.disk_uris)], keys[i],
                                     loc.gen, dst[: loc.size], False)
            if status.code != p.OK:
                results[i] = p.error_of(status.code, status.message, keys[i], "disk")
        except hg.RemoteError as exc:
            results[i] = ObjectLost(f"disk read failed: {exc}", key=keys[i], tier="disk")
        except (hg.RPCError, hg.PeerError, bulk.NAError, TimeoutError):
            results[i] = _Retry()

    def _disk_read(self, uri: str, key: str, gen: int, view: memoryview,
                   cached: bool) -> p.Status:
        """Read a disk copy into ``view``: pushed by its node, or staged, pulled, released."""
        if not len(view):
            return p.Status(p.OK, "")
        node = self._node(uri)
        if self.disk_read == "push":
            with self.engine.bulk(view, bulk.WRITE_ONLY, eager=False) as handle:
                status = node.disk_push.call(key, gen, cached, handle, timeout=self.timeout)
            self.c["disk_push"] += 1
            return status  # type: ignore[no-any-return]
        staged = node.disk_stage.call(key, gen, cached, timeout=self.timeout)
        if not staged.stage_id:
            return p.Status(p.STALE, f"node {uri} refused a cached location")
        try:
            with self.engine.bulk(view, bulk.WRITE_ONLY, eager=False) as handle:
                handle.pull_from(bulk.RemoteBulk.from_bytes(staged.handle),
                                 len(view)).wait(self.timeout)
        finally:
            node.disk_release.call(staged.stage_id, timeout=self.timeout)
        self.c["disk_pull"] += 1
        return p.Status(p.OK, "")

    # --- the rest -------------------------------------------------------------------------


class _Retry:
    """A read that failed on its replica (node gone, lease lapsed): locate and try again."""
