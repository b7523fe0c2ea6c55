"""The master's metadata and decisions, without I/O: time comes in as ``now``, and what must
happen on nodes (a disk copy, a delete) goes out as actions the service carries out.

Objects: key -> size, generation, state, DRAM copies (node, page runs), the node holding the
disk copy, pin, read lease. Pages: one ``PageAllocator`` per node segment. Puts are two-phase
(pending until ``put_end``; a writer that never finishes is reclaimed after ``put_ttl``);
reads take a lease during which the copy's pages are neither freed nor reused.

The records are in ``master_records.py``; eviction and offload, a part of ``MasterState``, in
``master_evict.py``.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import OrderedDict
from typing import Any

from .blocks import BlockIndex
from .config import Offload, Pin, StoreConfig
from .errors import AlreadyExists, NeverFits, NotFound, ObjectLost, StoreError, StoreFull
from .master_evict import Eviction
from .master_records import LOST, PENDING, READY, Copy, Grant, MObject, Node
from .pages import PageAllocator

log = logging.getLogger("petasus.store.master")

STRATEGIES = ("most_free", "random")


class MasterState(Eviction):
    def __init__(self, config: StoreConfig, *, lease_ttl: float = 5.0, node_ttl: float = 10.0,
                 put_ttl: float = 30.0, strategy: str = "most_free",
                 rng: random.Random | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"placement strategy must be one of {STRATEGIES}, not {strategy!r}")
        self.config = config
        self.lease_ttl, self.node_ttl, self.put_ttl = lease_ttl, node_ttl, put_ttl
        self.strategy = strategy
        self.rng = rng or random.Random()
        self.nodes: dict[int, Node] = {}
        self.objects: OrderedDict[str, MObject] = OrderedDict()
        self.pending: dict[int, MObject] = {}
        self.finished: OrderedDict[int, None] = OrderedDict()  # recent tokens: idempotent end
        self.held: list[tuple[float, Copy]] = []  # freed copies whose pages a lease still holds
        self.actions: list[tuple[Any, ...]] = []
        # (node, key, gen) of leased copies retired by an overwrite or a remove: the service
        # tells their nodes (``retire``) before it answers (``take_retired``).
        self.retired: list[tuple[Node, str, int]] = []
        self.offloads_in_flight = 0
        self._ids = itertools.count(1)
        self._gens = itertools.count(1)
        self.blocks = BlockIndex()
        self.c = dict.fromkeys(("put", "get", "remove", "evictions", "offloads", "offload_failed",
                                "deferred", "force_dropped", "dropped", "lost", "expired_puts",
                                "nodes_dropped", "leases", "dram_hits", "dram_misses",
                                "disk_hits", "misses", "bytes_in", "bytes_out",
                                "disk_bytes_in"), 0)

    # --- nodes ----------------------------------------------------------------------------
    def register_node(self, name: str, uri: str, segment: bytes, capacity: int, page_size: int,
                      now: float) -> Node:
        if page_size <= 0 or page_size & (page_size - 1) or capacity < page_size:
            raise StoreError(f"node {name!r} offers a bad segment: {capacity} bytes of "
                             f"{page_size}-byte pages")
        for old in [n for n in self.nodes.values() if n.name == name]:
            self.drop_node(old, "it registered again")
        node = Node(next(self._ids), name, uri, segment, page_size,
                    PageAllocator(capacity // page_size), now)
        self.nodes[node.node_id] = node
        log.info("node %s (%s) joined: %d pages of %d bytes", name, uri, node.pages.total,
                 page_size)
        return node

    def heartbeat(self, node_id: int, disk_used: int, now: float) -> bool:
        node = self.nodes.get(node_id)
        if node is None:
            return False
        node.last_seen = now
        node.disk_used = disk_used
        return True

    def drop_node(self, node: Node, why: str) -> None:
        """Forget a node: its copies leave the metadata; objects left without any copy are
        lost (a tombstone, so reads raise ObjectLost rather than NotFound)."""
        self.nodes.pop(node.node_id, None)
        self.c["nodes_dropped"] += 1
        lost = 0
        for token, obj in list(self.pending.items()):
            if any(c.node is node for c in obj.copies):
                self._free_copies(obj, 0.0)
                del self.pending[token]
        for obj in self.objects.values():
            if obj.state != READY:
                continue
            obj.copies = [c for c in obj.copies if c.node is not node]
            obj.offloading = [c for c in obj.offloading if c.node is not node]
            obj.disk = [n for n in obj.disk if n is not node]
            if not obj.copies and not obj.disk:
                obj.state = LOST
                lost += 1
        self.held = [(t, c) for t, c in self.held if c.node is not node]
        self.blocks.revoke_node(node.name)
        self.c["lost"] += lost
        log.warning("node %s (%s) dropped (%s): %d objects lost", node.name, node.uri, why, lost)

    # --- puts -----------------------------------------------------------------------------
    def put_start(self, keys: list[str], sizes: list[int], replicas: int, overwrite: bool,
                  pin: Pin, preferred: str, now: float) -> list[Grant | StoreError]:
        out: list[Grant | StoreError] = []
        for key, size in zip(keys, sizes):
            try:
                out.append(self._grant(key, size, replicas, overwrite, pin, preferred, now))
            except StoreError as exc:
                out.append(exc)
        return out

    def _grant(self, key: str, size: int, replicas: int, overwrite: bool, pin: Pin,
               preferred: str, now: float) -> Grant:
        if size > self.config.max_value_bytes:
            from .errors import ValueTooLarge

            raise ValueTooLarge(f"value of {size} bytes exceeds the cap of "
                                f"{self.config.max_value_bytes}", key=key, tier="dram")
        old = self.objects.get(key)
        if old is not None and old.state == READY and not overwrite:
            raise AlreadyExists("key is present (pass overwrite=True)", key=key, tier="dram")
        if replicas < 1:
            raise StoreError(f"replicas must be at least 1, not {replicas}", key=key)
        nodes = self._placement(preferred)
        if len(nodes) < replicas:
            raise StoreFull(f"{replicas} replicas asked, {len(nodes)} nodes alive", key=key,
                            tier="dram")
        if all(-(-size // n.page_size) > n.pages.total for n in nodes):
            raise NeverFits(f"object of {size} bytes is larger than every node's segment",
                            key=key, tier="dram")
        copies: list[Copy] = []
        for node in nodes:
            if len(copies) == replicas:
                break
            pages = -(-size // node.page_size)
            if pages > node.pages.total:
                continue
            alloc = node.pages.allocate(pages)
            if alloc is None:
                self._evict(node, pages - node.pages.free_pages, now)
                alloc = node.pages.allocate(pages)
            if alloc is not None:
                copies.append(Copy(node, alloc))
        if len(copies) < replicas:
            for c in copies:
                c.node.pages.free(c.alloc)
            raise StoreFull(f"no room for {size} bytes on {replicas} nodes now", key=key,
                            tier="dram")
        token = next(self._ids)
        obj = MObject(key, size, next(self._gens), PENDING, copies, overwrite, pin, token=token,
                      deadline=now + self.put_ttl, replicas=replicas)
        self.pending[token] = obj
        return Grant(token, [(c.node, c.node.runs(c.alloc, size)) for c in copies])

    def _placement(self, preferred: str) -> list[Node]:
        nodes = list(self.nodes.values())
        if self.strategy == "random":
            self.rng.shuffle(nodes)
        else:
            nodes.sort(key=lambda n: -n.pages.free_pages)
        nodes.sort(key=lambda n: preferred not in (n.name, n.uri))
        return nodes

    def put_end(self, tokens: list[int], atomic: bool, now: float) -> list[StoreError | None]:
        objs: list[MObject | StoreError | None] = []
        for token in tokens:
            obj = self.pending.get(token)
            if obj is None:
                objs.append(None if token in self.finished else StoreError(
                    f"put {token} is unknown or expired (writers have {self.put_ttl} s)"))
                continue
            old = self.objects.get(obj.key)
            if old is not None and old.state == READY and not obj.overwrite:
                objs.append(AlreadyExists("key was put concurrently", key=obj.key, tier="dram"))
                continue
            objs.append(obj)
        if atomic and any(isinstance(o, StoreError) for o in objs):
            first = next(o for o in objs if isinstance(o, StoreError))
            self.put_abort(tokens)
            return [o if isinstance(o, StoreError) else StoreError(
                f"not made visible: the atomic group failed ({first})",
                key=o.key if isinstance(o, MObject) else None) for o in objs]
        out: list[StoreError | None] = []
        for token, obj in zip(tokens, objs):
            if not isinstance(obj, MObject):
                if isinstance(obj, StoreError):
                    self.put_abort([token])
                out.append(obj)
                continue
            del self.pending[token]
            self._finish(token)
            old = self.objects.pop(obj.key, None)
            if old is not None:
                self._retire(old, now)
            obj.state = READY
            self.objects[obj.key] = obj
            self.c["put"] += 1
            self.c["bytes_in"] += obj.size
            if self.config.offload is Offload.ON_PUT:
                for copy in obj.copies:
                    self._offload(obj, copy)
            out.append(None)
        self.watermarks(now, spare={o.key for o in objs if isinstance(o, MObject)})
        return out

    def _finish(self, token: int) -> None:
        self.finished[token] = None
        while len(self.finished) > 65536:
            self.finished.popitem(last=False)

    def put_abort(self, tokens: list[int]) -> None:
        for token in tokens:
            obj = self.pending.pop(token, None)
            if obj is not None:
                self._free_copies(obj, 0.0)

    # --- reads and the rest ---------------------------------------------------------------
    def locate(self, key: str, preferred: str, now: float) -> MObject:
        obj = self.objects.get(key)
        if obj is None:
            self.c["misses"] += 1
            self.c["dram_misses"] += 1
            raise NotFound("no such key", key=key, tier="dram")
        if obj.state == LOST:
            raise ObjectLost("every copy was on nodes that are gone", key=key, tier="dram")
        self.c["get"] += 1
        self.c["leases"] += 1
        self.c["bytes_out"] += obj.size
        if obj.copies:
            self.c["dram_hits"] += 1
        else:
            self.c["dram_misses"] += 1
            self.c["disk_hits"] += 1
        obj.lease_until = now + self.lease_ttl
        self.objects.move_to_end(key)
        obj.copies.sort(key=lambda c: preferred not in (c.node.name, c.node.uri))
        return obj

    def exists(self, key: str) -> bool:
        obj = self.objects.get(key)
        return obj is not None and obj.state == READY

    def remove(self, key: str, now: float) -> None:
        obj = self.objects.pop(key, None)
        if obj is None:
            raise NotFound("no such key", key=key, tier="dram")
        self._retire(obj, now)
        self.c["remove"] += 1

    def pin(self, key: str, mode: Pin) -> None:
        obj = self.objects.get(key)
        if obj is None or obj.state != READY:
            raise NotFound("no such key", key=key, tier="dram")
        obj.pin = mode

    def _retire(self, obj: MObject, now: float) -> None:
        if obj.lease_until > now and obj.state == READY:
            # A client may hold this location in its cache until the lease ends: its nodes
            # must refuse this generation before the overwrite or remove is answered.
            for node in [c.node for c in obj.copies] + obj.disk:
                self.retired.append((node, obj.key, obj.gen))
        obj.state = LOST if obj.state == LOST else "retired"
        self._free_copies(obj, obj.lease_until if obj.lease_until > now else 0.0)
        for node in obj.disk:
            self.actions.append(("delete", node, obj.key, obj.gen))
        obj.disk = []

    def _free_copies(self, obj: MObject, until: float) -> None:
        for c in obj.copies:
            if until:
                self.held.append((until, c))
            elif c.node.node_id in self.nodes:
                c.node.pages.free(c.alloc)
        obj.copies = []

    # --- time -----------------------------------------------------------------------------
    def tick(self, now: float) -> bool:
        """Expire what time has run out for; True if that changed anything."""
        changed = False
        for token, obj in list(self.pending.items()):
            if obj.deadline <= now:
                changed = True
                del self.pending[token]
                self._free_copies(obj, 0.0)
                self.c["expired_puts"] += 1
                log.warning("put of %r expired: its writer did not finish in %s s", obj.key,
                            self.put_ttl)
        for node in list(self.nodes.values()):
            if node.last_seen + self.node_ttl <= now:
                changed = True
                self.drop_node(node, f"no heartbeat for {self.node_ttl} s")
        if self.held:
            keep = []
            for until, c in self.held:
                if until > now:
                    keep.append((until, c))
                elif c.node.node_id in self.nodes:
                    c.node.pages.free(c.alloc)
            changed = changed or len(keep) < len(self.held)
            self.held = keep
        # Eviction is driven by puts (put_start when pages run out, put_end past the high
        # watermark), as in the embedded scheme: a timer-driven cycle would race a reader
        # right after its put and drop what it just wrote under offload="off".
        return changed

    def take_retired(self) -> dict[Node, tuple[list[str], list[int]]]:
        """The retired leased copies since the last call, per live node."""
        out: dict[Node, tuple[list[str], list[int]]] = {}
        for node, key, gen in self.retired:
            if node.node_id in self.nodes:
                keys, gens = out.setdefault(node, ([], []))
                keys.append(key)
                gens.append(gen)
        self.retired = []
        return out

    def take_actions(self) -> list[tuple[Any, ...]]:
        out, self.actions = self.actions, []
        return out

    def stats(self) -> dict[str, Any]:
        dram_objects = sum(1 for o in self.objects.values() if o.copies)
        disk_objects = sum(1 for o in self.objects.values() if o.disk)
        return {
            "nodes": [{"id": n.node_id, "name": n.name, "uri": n.uri,
                       "capacity": n.pages.total * n.page_size,
                       "used": n.pages.used_pages * n.page_size, "disk_used": n.disk_used,
                       "page_size": n.page_size}
                      for n in self.nodes.values()],
            "objects": sum(1 for o in self.objects.values() if o.state == READY),
            "dram_objects": dram_objects, "disk_objects": disk_objects,
            "pending": len(self.pending), "offloads_in_flight": self.offloads_in_flight,
            "policy": self.config.offload.value, "force_evict": self.config.force_evict,
            **self.c,
        }

