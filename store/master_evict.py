"""The master's eviction and offload (a part of ``master_state.MasterState``, in a module of
its own so that each part can be read in one sitting): which DRAM copies go when a node's
pages run short, which get a disk copy first, and what a finished disk copy frees. No I/O:
disk copies go out as actions the service carries out."""

from __future__ import annotations

import logging
from typing import Any

from .config import Offload, Pin, StoreConfig
from .master_records import READY, Copy, MObject, Node

log = logging.getLogger("petasus.store.master")


class Eviction:
    """Eviction and offload (a mixin of ``MasterState``, whose state it works on)."""

    config: StoreConfig
    nodes: dict[int, Node]
    objects: Any  # OrderedDict[str, MObject]
    held: list[tuple[float, Copy]]
    actions: list[tuple[Any, ...]]
    offloads_in_flight: int
    c: dict[str, int]

    def _retire(self, obj: MObject, now: float) -> None: ...

    def watermarks(self, now: float, spare: set[str] | frozenset[str] = frozenset()) -> None:
        high, low = self.config.high_watermark, self.config.low_watermark
        for node in self.nodes.values():
            pages = node.pages
            if pages.used_pages > high * pages.total:
                self._evict(node, pages.used_pages - int(low * pages.total), now, spare)

    def _evict(self, node: Node, need: int, now: float,
               spare: set[str] | frozenset[str] = frozenset()) -> None:
        # Pages of removed objects that a read lease still holds come back by themselves
        # when it lapses: evicting live objects for them would lose the wrong data.
        got = sum(c.alloc.pages for _, c in self.held if c.node is node)
        deferred = dropped = 0
        for soft_pass in (False, True):
            for obj in list(self.objects.values()):
                if got >= need:
                    break
                copy = next((c for c in obj.copies if c.node is node), None)
                if copy is None or obj.state != READY or obj.key in spare:
                    continue
                if obj.pin is Pin.HARD or (obj.pin is Pin.SOFT) != soft_pass:
                    continue
                if obj.lease_until > now:
                    continue
                pages = copy.alloc.pages
                others = len(obj.copies) > 1
                if copy in obj.offloading:
                    obj.evict_after = True  # freed when its disk copy completes
                    got += pages
                elif node in obj.disk or len(obj.disk) >= obj.replicas:
                    self._drop_copy(obj, copy)  # enough disk copies: this one may go
                    got += pages
                elif self.config.offload is Offload.OFF or (
                        self.config.force_evict and not self._offload(obj, copy)):
                    if others:
                        self._drop_copy(obj, copy)
                    else:
                        self._drop_object(obj, now)
                        if self.config.offload is Offload.OFF:
                            self.c["dropped"] += 1
                        else:
                            dropped += 1
                    got += pages
                elif self.config.force_evict or self._offload(obj, copy):
                    # Every replica gets its own disk copy on its own node, so replicas=N
                    # survives N-1 node losses in either tier; each DRAM copy goes as soon as
                    # its disk copy is complete.
                    obj.evict_after = True
                    got += pages
                else:
                    deferred += 1
            if got >= need:
                break
        self.c["deferred"] += deferred
        if dropped:
            self.c["force_dropped"] += dropped
            log.warning("force_evict dropped %d objects without a disk copy from node %s this "
                        "cycle", dropped, node.name)

    def _drop_copy(self, obj: MObject, copy: Copy) -> None:
        obj.copies.remove(copy)
        copy.node.pages.free(copy.alloc)
        self.c["evictions"] += 1

    def _drop_object(self, obj: MObject, now: float) -> None:
        del self.objects[obj.key]
        self._retire(obj, now)

    def _offload(self, obj: MObject, copy: Copy) -> bool:
        """Queue the disk copy of one replica on its own node (False: the queue is full)."""
        if copy in obj.offloading or copy.node in obj.disk:
            return True
        if self.offloads_in_flight >= self.config.offload_queue:
            return False
        obj.offloading.append(copy)
        self.offloads_in_flight += 1
        self.actions.append(("offload", copy.node, obj.key, obj.gen,
                             copy.node.runs(copy.alloc, obj.size), obj.size))
        return True

    def offload_done(self, key: str, gen: int, node: Node, ok: bool, now: float) -> None:
        self.offloads_in_flight -= 1
        obj = self.objects.get(key)
        if obj is None or obj.gen != gen or obj.state != READY:
            if ok:
                self.actions.append(("delete", node, key, gen))
            return
        copy = next((c for c in obj.offloading if c.node is node), None)
        if copy is not None:
            obj.offloading.remove(copy)
        if not ok:
            if not obj.offloading:
                obj.evict_after = False
            self.c["offload_failed"] += 1
            return
        self.c["offloads"] += 1
        self.c["disk_bytes_in"] += obj.size
        if node.node_id in self.nodes and node not in obj.disk:
            obj.disk.append(node)
        if (obj.evict_after and copy is not None and copy in obj.copies
                and obj.lease_until <= now):
            self._drop_copy(obj, copy)
        if not obj.offloading:
            obj.evict_after = False
