"""Which objects leave DRAM, and how: pure decisions over metadata records, no I/O.

The embedded store applies the plan to its own arena; the distributed master applies the
same plan to the segments of its nodes. Data-preserving by default (DESIGN.md, Store): an
object without a disk copy leaves DRAM only once a copy is complete, and a candidate whose
copy cannot be queued now is deferred, never dropped, unless ``force_evict`` says so.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any

from .config import Offload, Pin
from .pages import Allocation


@dataclasses.dataclass(eq=False)
class ObjectRecord:
    """One object's metadata. ``readers`` are leases on the DRAM pages (a copy in progress
    out of them, or into the disk tier); pages are freed only when no lease is held."""

    key: str
    size: int
    gen: int
    alloc: Allocation | None
    disk: Any = None  # the disk tier's entry once a copy is complete
    pin: Pin = Pin.NONE
    readers: int = 0
    offloading: bool = False
    evict_after_offload: bool = False
    dead: bool = False  # removed or overwritten: pages go when the last lease does


class Action(enum.Enum):
    FREE = "free"  # a disk copy exists: free the DRAM pages, keep the object
    DROP = "drop"  # no copy will be kept: the object is gone
    OFFLOAD = "offload"  # queue a disk copy; free the pages once it completes
    AWAIT = "await"  # a copy is already on its way; free the pages once it completes


@dataclasses.dataclass
class Plan:
    actions: list[tuple[ObjectRecord, Action]]
    deferred: int  # candidates skipped because their copy could not be queued
    pages: int  # pages freed now or once the queued copies complete


def plan_eviction(lru: Iterable[ObjectRecord], need_pages: int, *, policy: Offload,
                  force_evict: bool, queue_room: int, disk_ok: bool,
                  spare: frozenset[ObjectRecord] = frozenset()) -> Plan:
    """Walk candidates least recently used first until ``need_pages`` are accounted for;
    soft-pinned objects are considered only in a second pass, hard-pinned never, and those in
    ``spare`` (the objects the triggering put just made visible) not at all."""
    actions: list[tuple[ObjectRecord, Action]] = []
    deferred = 0
    got = 0
    order = list(lru)
    for soft_pass in (False, True):
        if got >= need_pages:
            break
        for obj in order:
            if got >= need_pages:
                break
            alloc = obj.alloc
            if alloc is None or alloc.pages == 0 or obj.dead or obj in spare:
                continue
            if obj.pin is Pin.HARD or (obj.pin is Pin.SOFT) != soft_pass:
                continue
            if obj.evict_after_offload:
                got += alloc.pages
                continue
            # Pages under a lease (a read, or the disk copy being written) cannot be freed
            # now, but a copy on its way frees them when it completes.
            if policy is Offload.OFF:
                action = Action.DROP
            elif obj.disk is not None:
                action = Action.FREE
            elif obj.offloading:
                action = Action.AWAIT
            elif disk_ok and queue_room > 0:
                action = Action.OFFLOAD
                queue_room -= 1
            elif force_evict:
                action = Action.DROP
            else:
                deferred += 1
                continue
            if obj.readers and action in (Action.FREE, Action.DROP):
                continue
            actions.append((obj, action))
            got += alloc.pages
    return Plan(actions, deferred, got)
