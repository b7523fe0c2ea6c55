"""Pipelined pulls: several chunk transfers in flight while the caller works on finished ones.

This is the Mercury paper's pipelined write: instead of pulling a large region and then
processing it, the target pulls it in chunks into a small ring of buffers and processes each
chunk while the next ones move. Memory stays at ``(depth + 1) * chunk_size`` however large the
region is.

``chunks()`` hands the chunks to the calling thread, in order. ``pipeline()`` gives them to a
``consume`` function on a worker thread while the calling thread keeps the transfers moving;
that is what overlaps the two when consuming releases the GIL (file writes, hashing, numpy).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .handle import WRITE_ONLY, Bulk, Region, RemoteBulk
from .transfer import Driver, Transfer, driver_for

log = logging.getLogger("petasus.bulk")

CHUNK_SIZE = 1 << 20  # large enough that a chunk costs far more than its request (~30 us)
DEPTH = 4


class _Ring:
    """A ring of registered chunk buffers and the pulls that fill them, oldest first."""

    def __init__(self, owner: Any, source: RemoteBulk | Region, chunk_size: int, depth: int,
                 offset: int, size: int | None) -> None:
        if chunk_size < 1 or depth < 1:
            raise ValueError("pipeline: chunk_size and depth must be positive")
        if isinstance(source, Region):
            base, start, avail = source.bulk, source.offset, source.size
        else:
            base, start, avail = source, 0, source.size
        if not 0 <= offset <= avail:
            raise ValueError(f"pipeline: offset {offset} is outside the {avail} B source")
        if size is None:
            size = avail - offset
        if size < 0 or offset + size > avail:
            raise ValueError(f"pipeline: {size} B at offset {offset} exceeds the {avail} B source")
        self.source = base
        self.next = start + offset
        self.end = start + offset + size
        self.base = start
        self.chunk = chunk_size
        self.inflight: deque[tuple[Bulk, int, int, Transfer]] = deque()
        self.depth = depth
        self.free: deque[Bulk] = deque()
        try:
            for _ in range(min(depth + 1, -(-size // chunk_size))):
                self.free.append(Bulk(owner, bytearray(min(chunk_size, size)), WRITE_ONLY,
                                      eager=False))
        except BaseException:
            self.close()
            raise
        self.driver: Driver = self.free[0]._driver if self.free else driver_for(owner)

    def launch(self) -> None:
        while self.free and self.next < self.end and len(self.inflight) < self.depth:
            slot = self.free.popleft()
            n = min(self.chunk, self.end - self.next)
            t = slot.pull_from(self.source, n, offset=self.next)
            self.inflight.append((slot, self.next - self.base, n, t))
            self.next += n

    @property
    def finished(self) -> bool:
        return self.next >= self.end and not self.inflight

    def head(self, timeout: float | None) -> tuple[Bulk, int, int]:
        slot, offset, n, t = self.inflight[0]
        t.wait(timeout)  # raises with the slot still in flight, where close() finds it
        self.inflight.popleft()
        return slot, offset, n

    def close(self) -> None:
        for _slot, _off, _n, t in self.inflight:
            t.cancel()
        for _slot, _off, _n, t in self.inflight:
            if not t.done:
                self.driver.wait_until(lambda t=t: t.done, 5.0)
        for slot, *_rest in self.inflight:
            slot.close()
        for slot in self.free:
            slot.close()
        self.inflight.clear()
        self.free.clear()


def chunks(owner: Any, source: RemoteBulk | Region, *, chunk_size: int = CHUNK_SIZE,
           depth: int = DEPTH, offset: int = 0, size: int | None = None,
           timeout: float | None = None) -> Iterator[tuple[int, memoryview]]:
    """Pull ``source`` in chunks; yield ``(offset, view)`` in order, ``depth`` pulls in flight.

    A view is valid until the next iteration (its buffer is then refilled). ``offset`` in the
    result is relative to the start of ``source``; ``timeout`` bounds the wait for each chunk.
    """
    ring = _Ring(owner, source, chunk_size, depth, offset, size)
    try:
        while not ring.finished:
            ring.launch()
            slot, off, n = ring.head(timeout)
            yield off, slot.views[0][:n]
            ring.free.append(slot)
    finally:
        ring.close()


def pipeline(owner: Any, source: RemoteBulk | Region,
             consume: Callable[[int, memoryview], Any], *, chunk_size: int = CHUNK_SIZE,
             depth: int = DEPTH, offset: int = 0, size: int | None = None,
             timeout: float | None = None) -> int:
    """Pull ``source`` in chunks and call ``consume(offset, view)`` for each, in order, on a
    worker thread while the next chunks move. Returns the number of bytes consumed; the first
    failure (a transfer's or ``consume``'s) cancels the rest and is raised."""
    ring = _Ring(owner, source, chunk_size, depth, offset, size)
    consuming: deque[tuple[Bulk, int, Future[Any]]] = deque()
    total = 0
    worker = ThreadPoolExecutor(1, thread_name_prefix="petasus-pipeline")
    wait_until = ring.driver.wait_until
    try:
        while not ring.finished or consuming:
            while consuming and consuming[0][2].done():
                slot, n, fut = consuming.popleft()
                ring.free.append(slot)
                fut.result()
                total += n
            ring.launch()
            if ring.inflight:
                head = ring.inflight[0][3]
                if not head.done:
                    if not wait_until(lambda h=head: h.done or bool(  # type: ignore[misc]
                            consuming and consuming[0][2].done()), timeout):
                        limit = ring.driver.timeout if timeout is None else timeout
                        raise TimeoutError(f"pipeline: chunk at offset {ring.inflight[0][1]} "
                                           f"not transferred within {limit:g} s")
                    continue
                slot, off, n = ring.head(timeout)
                consuming.append((slot, n, worker.submit(consume, off, slot.views[0][:n])))
            elif consuming:
                slot, n, fut = consuming[0]
                fut.result(timeout)
                consuming.popleft()
                ring.free.append(slot)
                total += n
        return total
    finally:
        for _slot, _n, fut in consuming:
            fut.cancel()
        worker.shutdown(wait=True)
        for slot, _n, _fut in consuming:
            slot.close()
        ring.close()
