"""store/pages.py's PageAllocator against a set of used pages (hypothesis).

The allocator is sans-I/O bookkeeping (the DRAM tier maps its runs onto the arena, part 2's
master runs it per node segment), so every property is checked exactly: no page handed out
twice, the free count, idempotent frees, runs that cover exactly the pages asked for, and
first fit (one contiguous run when one exists, else the first free runs in address order).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from petasus.store.pages import Allocation, PageAllocator


def free_runs(used: set[int], total: int) -> list[tuple[int, int]]:
    """(start, length) of each free run, in address order."""
    runs: list[tuple[int, int]] = []
    start = None
    for page in range(total + 1):
        free = page < total and page not in used
        if free and start is None:
            start = page
        elif not free and start is not None:
            runs.append((start, page - start))
            start = None
    return runs


def expected_runs(used: set[int], total: int, want: int) -> tuple[tuple[int, int], ...]:
    """First fit: the first free run that holds ``want`` pages, else the first free runs in
    address order until they add up (the last one cut to size)."""
    if want == 0:
        return ()
    runs = free_runs(used, total)
    for start, length in runs:
        if length >= want:
            return ((start, want),)
    out: list[tuple[int, int]] = []
    for start, length in runs:
        take = min(length, want)
        out.append((start, take))
        want -= take
        if not want:
            break
    return tuple(out)


class AllocatorMachine(RuleBasedStateMachine):
    allocations = Bundle("allocations")

    def __init__(self) -> None:
        super().__init__()
        self.used: set[int] = set()
        self.owned: dict[int, set[int]] = {}  # id(allocation) -> its pages
        self.freed: list[Allocation] = []

    @initialize(total=st.integers(1, 96))
    def start(self, total: int) -> None:
        self.total = total
        self.alloc = PageAllocator(total)

    @rule(target=allocations, want=st.integers(0, 40))
    def allocate(self, want: int) -> Allocation | None:
        free_before = self.alloc.free_pages
        expected = expected_runs(self.used, self.total, want)
        got = self.alloc.allocate(want)
        if want > free_before:
            assert got is None, f"{want} pages handed out with only {free_before} free"
            assert self.alloc.free_pages == free_before
            return None
        assert got is not None, f"{want} of {free_before} free pages refused"
        assert got.pages == want
        assert not got.freed
        assert all(count > 0 for _, count in got.runs)
        pages = [p for start, count in got.runs for p in range(start, start + count)]
        assert len(pages) == len(set(pages)) == want, f"runs overlap: {got.runs}"
        assert all(0 <= p < self.total for p in pages)
        assert not self.used & set(pages), f"pages handed out twice: {self.used & set(pages)}"
        assert got.runs == expected, f"not first fit: {got.runs}, expected {expected}"
        self.used |= set(pages)
        self.owned[id(got)] = set(pages)
        return got

    @rule(allocation=consumes(allocations))
    def free(self, allocation: Allocation | None) -> None:
        if allocation is None:
            return
        assert self.alloc.free(allocation) is True
        assert allocation.freed
        self.used -= self.owned.pop(id(allocation))
        self.freed.append(allocation)

    @rule(data=st.data())
    def free_again(self, data: st.DataObject) -> None:
        if not self.freed:
            return
        allocation = data.draw(st.sampled_from(self.freed))
        before = self.alloc.free_pages
        assert self.alloc.free(allocation) is False, "a second free was not a no-op"
        assert self.alloc.free_pages == before

    @invariant()
    def counts_are_exact(self) -> None:
        if not hasattr(self, "alloc"):
            return
        assert self.alloc.free_pages == self.total - len(self.used)
        assert self.alloc.used_pages == len(self.used)
        assert self.alloc.total == self.total
        assert self.alloc.runs_free() == len(free_runs(self.used, self.total))


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=50,
                                         deadline=None, derandomize=True, database=None)


@given(total=st.integers(1, 300), wants=st.lists(st.integers(1, 300), max_size=20))
@settings(deadline=None, derandomize=True, database=None)
def test_allocate_until_full_then_free_everything(total: int, wants: list[int]) -> None:
    alloc = PageAllocator(total)
    taken = [a for a in (alloc.allocate(w) for w in wants) if a is not None]
    assert alloc.used_pages == sum(a.pages for a in taken) <= total
    for a in taken:
        assert alloc.free(a)
    assert alloc.free_pages == total
    assert alloc.runs_free() == 1
    whole = alloc.allocate(total)
    assert whole is not None and whole.runs == ((0, total),)
    assert alloc.allocate(1) is None
    assert alloc.runs_free() == 0


def test_fragmented_allocation_takes_several_runs() -> None:
    alloc = PageAllocator(10)
    blocks = [alloc.allocate(2) for _ in range(5)]
    assert [b.runs for b in blocks if b] == [((0, 2),), ((2, 2),), ((4, 2),), ((6, 2),),
                                             ((8, 2),)]
    for i in (0, 2, 4):
        assert alloc.free(blocks[i])  # type: ignore[arg-type]
    assert alloc.runs_free() == 3
    got = alloc.allocate(5)
    assert got is not None and got.runs == ((0, 2), (4, 2), (8, 1))
    assert alloc.free_pages == 1


def test_zero_and_bad_sizes() -> None:
    alloc = PageAllocator(4)
    empty = alloc.allocate(0)
    assert empty is not None and empty.runs == () and empty.pages == 0
    assert alloc.free_pages == 4
    assert alloc.free(empty) and not alloc.free(empty)
    assert alloc.free_pages == 4
    with pytest.raises(ValueError, match="-1"):
        alloc.allocate(-1)
    assert alloc.allocate(5) is None and alloc.free_pages == 4
    for pages in (0, -3):
        with pytest.raises(ValueError):
            PageAllocator(pages)
