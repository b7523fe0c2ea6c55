"""The DRAM tier: one arena mapped once, carved into pages by ``PageAllocator``.

The arena is an anonymous shared mapping (a buffer-protocol object), so the distributed
scheme can register it once with the network layer and peers read and write objects in
place; nothing here copies more than once.
"""

from __future__ import annotations

import mmap

from .pages import Allocation, PageAllocator


class DramTier:
    def __init__(self, capacity: int, page_size: int) -> None:
        self.page_size = page_size
        self.pages = PageAllocator(capacity // page_size)
        self.capacity = self.pages.total * page_size
        self._arena = mmap.mmap(-1, self.capacity)
        self.view = memoryview(self._arena)

    def pages_for(self, size: int) -> int:
        return -(-size // self.page_size)

    def segments(self, allocation: Allocation, size: int) -> list[memoryview]:
        """The object's bytes as views over the arena, in order (the tail page is partial)."""
        out = []
        page = self.page_size
        left = size
        for start, count in allocation.runs:
            take = min(count * page, left)
            out.append(self.view[start * page : start * page + take])
            left -= take
        return out

    def write(self, allocation: Allocation, src: memoryview) -> None:
        pos = 0
        for seg in self.segments(allocation, len(src)):
            seg[:] = src[pos : pos + len(seg)]
            pos += len(seg)

    def read_into(self, allocation: Allocation, size: int, dst: memoryview) -> None:
        pos = 0
        for seg in self.segments(allocation, size):
            dst[pos : pos + len(seg)] = seg
            pos += len(seg)

    def read(self, allocation: Allocation, size: int) -> bytes:
        segs = self.segments(allocation, size)
        if len(segs) == 1:
            return segs[0].tobytes()
        return b"".join(segs)

    def close(self) -> None:
        self.view.release()
        self._arena.close()
