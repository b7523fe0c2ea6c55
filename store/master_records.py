"""The records of the master's metadata (store/master_state.py): nodes, objects, their DRAM
copies, and the grant a put starts with. Data only."""

from __future__ import annotations

import dataclasses

from .config import Pin
from .pages import Allocation, PageAllocator

PENDING, READY, LOST = "pending", "ready", "lost"


@dataclasses.dataclass(eq=False)
class Node:
    node_id: int
    name: str
    uri: str
    segment: bytes
    page_size: int
    pages: PageAllocator
    last_seen: float
    disk_used: int = 0

    def runs(self, alloc: Allocation, size: int) -> list[tuple[int, int]]:
        out, left = [], size
        for start, count in alloc.runs:
            take = min(count * self.page_size, left)
            out.append((start * self.page_size, take))
            left -= take
        return out


@dataclasses.dataclass(eq=False)
class Copy:
    node: Node
    alloc: Allocation


@dataclasses.dataclass(eq=False)
class MObject:
    key: str
    size: int
    gen: int
    state: str
    copies: list[Copy]
    overwrite: bool = False
    pin: Pin = Pin.NONE
    disk: list[Node] = dataclasses.field(default_factory=list)  # complete disk copies
    lease_until: float = 0.0
    token: int = 0
    deadline: float = 0.0
    offloading: list[Copy] = dataclasses.field(default_factory=list)  # copies being written
    evict_after: bool = False
    replicas: int = 1


@dataclasses.dataclass
class Grant:
    token: int
    replicas: list[tuple[Node, list[tuple[int, int]]]]
