"""Page allocator over one arena: a byte per page, first fit, several runs per object.

Sans-I/O bookkeeping (no memory is touched here): the DRAM tier maps the runs onto its arena,
and part 2's master runs the same allocator per node segment (UMBP's page bitmap). A bytearray
of 0/1 bytes makes "find n free pages" one ``bytearray.find`` in C, which keeps a 1 GiB arena
of 4 KiB pages (262,144 entries) well under a microsecond per page scanned.
"""

from __future__ import annotations

import dataclasses

FREE = 0
USED = 1


@dataclasses.dataclass(eq=False)
class Allocation:
    """The runs (first page, page count) one object holds; freed at most once."""

    runs: tuple[tuple[int, int], ...]
    pages: int
    freed: bool = False


class PageAllocator:
    def __init__(self, pages: int) -> None:
        if pages <= 0:
            raise ValueError(f"a page allocator needs at least one page, not {pages}")
        self._map = bytearray(pages)
        self._zeros = bytes(pages)
        self._ones = b"\x01" * pages
        self.total = pages
        self.free_pages = pages

    @property
    def used_pages(self) -> int:
        return self.total - self.free_pages

    def allocate(self, pages: int) -> Allocation | None:
        """One contiguous run if there is one, else the first free runs that add up; None if
        fewer than ``pages`` are free (nothing is taken then)."""
        if pages < 0:
            raise ValueError(f"cannot allocate {pages} pages")
        if pages > self.free_pages:
            return None
        if pages == 0:
            return Allocation((), 0)
        start = self._map.find(self._zeros[:pages])
        if start >= 0:
            runs: list[tuple[int, int]] = [(start, pages)]
        else:
            runs = []
            need, pos = pages, 0
            while need:
                start = self._map.find(FREE, pos)
                end = self._map.find(USED, start)
                if end < 0:
                    end = self.total
                take = min(end - start, need)
                runs.append((start, take))
                need -= take
                pos = end
        for start, count in runs:
            self._map[start : start + count] = self._ones[:count]
        self.free_pages -= pages
        return Allocation(tuple(runs), pages)

    def free(self, allocation: Allocation) -> bool:
        """Idempotent: a second free of the same allocation is a no-op (returns False)."""
        if allocation.freed:
            return False
        for start, count in allocation.runs:
            self._map[start : start + count] = self._zeros[:count]
        self.free_pages += allocation.pages
        allocation.freed = True
        return True

    def runs_free(self) -> int:
        """How many free runs the map has (fragmentation, for stats)."""
        count, pos = 0, 0
        while True:
            start = self._map.find(FREE, pos)
            if start < 0:
                return count
            count += 1
            end = self._map.find(USED, start)
            if end < 0:
                return count
            pos = end
