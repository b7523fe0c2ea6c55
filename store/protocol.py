"""The distributed store's RPCs, declared once and imported by master, nodes and clients.

Control goes through these RPCs (one per batch); data never does above the inline threshold:
clients read and write node segments one-sided through bulk handles the master hands out.
Errors travel as a status code and a message and are raised on the client as the same
``StoreError`` classes the embedded scheme raises.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from petasus import bulk, hg

from .errors import (
    AlreadyExists,
    InvalidKey,
    NeverFits,
    NotFound,
    ObjectLost,
    StoreError,
    StoreFull,
    ValueTooLarge,
)

OK = 0
FULL = 3  # no room now: the client retries until its put timeout
NEVER_FITS = 8  # no node could ever hold it: final
STALE = 9  # a node refused a cached location: the client asks the master


CODES: dict[int, type[StoreError]] = {
    1: NotFound, 2: AlreadyExists, FULL: StoreFull, 4: ObjectLost, 5: InvalidKey,
    6: ValueTooLarge, 7: StoreError, NEVER_FITS: NeverFits, STALE: StoreError,
}
CODE_OF = {cls: code for code, cls in CODES.items()}

MASTER_PROVIDER = 40
NODE_PROVIDER = 41


def code_of(exc: StoreError) -> int:
    return CODE_OF.get(type(exc), 7)


def raise_status(code: int, message: str, key: str | None, tier: str | None = None) -> None:
    if code != OK:
        raise CODES.get(code, StoreError)(message, key=key, tier=tier)


def error_of(code: int, message: str, key: str | None, tier: str | None = None) -> StoreError:
    return CODES.get(code, StoreError)(message, key=key, tier=tier)


@dataclasses.dataclass
class Status:
    code: int
    message: str


@dataclasses.dataclass
class Replica:
    """Where one copy lives: a node, its segment's serialized bulk handle, byte runs in it."""

    node_id: int
    uri: str
    segment: bytes
    runs: list[tuple[int, int]]  # (byte offset in the segment, length), in object order


@dataclasses.dataclass
class PutGrant:
    code: int
    message: str
    token: int
    replicas: list[Replica]


@dataclasses.dataclass
class Location:
    code: int
    message: str
    size: int
    gen: int
    lease_ms: int
    replicas: list[Replica]  # DRAM copies, preferred first
    disk_uris: list[str]  # the nodes holding disk copies, when no DRAM copy exists


@dataclasses.dataclass
class NodeHello:
    node_id: int
    heartbeat_s: float


@dataclasses.dataclass
class Staged:
    stage_id: int
    handle: bytes


# --- master ---------------------------------------------------------------------------------
@hg.declare
def register_node(uri: str, segment: bytes, capacity: hg.uint64, page_size: hg.uint32,
                  name: str) -> NodeHello: ...


@hg.declare
def heartbeat(node_id: hg.uint32, disk_used: hg.uint64) -> bool: ...


@hg.declare
def put_start(client: str, keys: list[str], sizes: list[int], replicas: hg.uint8,
              overwrite: bool, pin: str, preferred: str) -> list[PutGrant]: ...


@hg.declare
def put_end(tokens: list[int], atomic: bool) -> list[Status]: ...


@hg.declare
def put_abort(tokens: list[int]) -> None: ...


@hg.declare
def locate(keys: list[str], preferred: str) -> Any: ...  # pack_locations' form


# A batch's locations travel as one msgpack value: the nodes named once, each key a flat list
# (code, message, size, gen, lease_ms, [[node index, off, len, off, len, ...], ...], disk uris).
# The record-per-field procs cost ~30 us a key on each side (128 nested dataclasses each way
# per batch of 128 gets, with every replica's segment handle repeated); msgpack, in C, a
# fraction of that.
def pack_locations(nodes: list[tuple[int, str, bytes]], locs: list[list[Any]]) -> list[Any]:
    """The wire form of ``locate``'s answer (the master builds ``locs`` rows directly)."""
    return [[list(n) for n in nodes], locs]


def unpack_locations(wire: Any, count: int) -> list[Location]:
    """``locate``'s answer as Locations; a malformed one is a ``StoreError``, never a crash."""
    try:
        nodes_w, locs_w = wire
        nodes = []
        for nid, uri, seg in nodes_w:
            if type(nid) is not int or type(uri) is not str or type(seg) is not bytes:
                raise TypeError("a node is (int, str, bytes)")
            nodes.append((nid, uri, seg))
        out = []
        for code, message, size, gen, lease_ms, reps, disk in locs_w:
            replicas = []
            for rep in reps:
                if type(rep) is not list or not rep or type(rep[0]) is not int or \
                        not 0 <= rep[0] < len(nodes):
                    raise ValueError("a replica names no node of the answer")
                nid, uri, seg = nodes[rep[0]]
                flat = rep[1:]
                if len(flat) % 2 or any(type(x) is not int or x < 0 for x in flat):
                    raise ValueError("a replica's runs are not (offset, length) pairs")
                replicas.append(Replica(nid, uri, seg, list(zip(flat[::2], flat[1::2]))))
            if any(type(v) is not int for v in (code, size, gen, lease_ms)) or \
                    type(message) is not str or any(type(u) is not str for u in disk):
                raise TypeError("a location's fields have the wrong types")
            out.append(Location(code, message, size, gen, lease_ms, replicas, list(disk)))
    except (TypeError, ValueError, IndexError) as exc:
        raise StoreError(f"locate: malformed answer from the master: {exc}") from None
    if len(out) != count:
        raise StoreError(f"locate: the master answered {len(out)} locations for {count} keys")
    return out


@hg.declare
def remove(keys: list[str]) -> list[Status]: ...


@hg.declare
def exists(keys: list[str]) -> list[bool]: ...


@hg.declare
def pin(key: str, mode: str) -> Status: ...


@hg.declare
def flush(timeout: float) -> Status: ...


@hg.declare
def cluster_stats() -> Any: ...


@hg.declare
def watch(since: int, timeout: float) -> int: ...  # the master's state version, once moved


@hg.declare
def register_blocks(node: str, hashes: list[hg.uint64], tier: str) -> hg.uint32: ...


@hg.declare
def revoke_blocks(node: str, hashes: list[hg.uint64], tier: str) -> hg.uint32: ...


@hg.declare
def revoke_tier(node: str, tier: str) -> hg.uint32: ...


@hg.declare
def match_blocks(hashes: list[hg.uint64]) -> Any: ...


MASTER_RPCS = (register_node, heartbeat, put_start, put_end, put_abort, locate, remove, exists,
               pin, flush, cluster_stats, register_blocks, revoke_blocks, revoke_tier,
               match_blocks, watch)


# --- node -----------------------------------------------------------------------------------
@hg.declare
def offload(key: str, gen: int, runs: list[tuple[int, int]], size: int) -> Status: ...


# ``cached``: the client read this disk location from its cache, not from the master during
# this read: the node refuses (STALE, or a Staged of stage id 0) a generation the master
# retired, as ``read`` does.
@hg.declare
def disk_push(key: str, gen: int, cached: bool, dest: bulk.Bulk) -> Status: ...


@hg.declare
def disk_stage(key: str, gen: int, cached: bool) -> Staged: ...


@hg.declare
def disk_release(stage_id: int) -> None: ...


@hg.declare
def disk_delete(key: str, gen: int) -> None: ...


@hg.declare
def node_stats() -> Any: ...


# A read through the node: the node checks each object before it copies the bytes into the
# answer, so a client may read from a location it cached (``DistributedStore``'s location
# cache) instead of asking the master first. ``items`` is one msgpack list per object,
# ``[key, gen, off, len, off, len, ...]`` (the per-field procs cost ~30 us an object on each
# side, msgpack a fraction). The answer is one byte per object, 1 where the node read it and 0
# where it refused, then the bytes of the objects it read, in order (the client knows their
# sizes): one join on the node, where a msgpack list of the values cost 25 us per answer of
# 14 x 4 KiB (cProfile of a node serving get_many). The node refuses when ``node_id`` is not
# its current registration (it restarted, or the master
# dropped it and it joined again: its pages may hold anything), or, with ``cached``, the
# master retired that generation of the key (an overwrite or a remove while a lease was out,
# ``retire``). A location the master gave during this very read is not checked for that: the
# generation was current when the read began, and its lease keeps the pages from reuse.
@hg.declare
def read(node_id: hg.uint32, cached: bool, items: Any) -> bytes: ...


# The master tells a node, before it answers the overwrite or remove that retired them, that
# these generations must no longer be read through it (``read`` refuses them for ``ttl_ms``:
# longer than any lease, hence than any client's cached location, can outlive the retirement).
@hg.declare
def retire(keys: list[str], gens: list[int], ttl_ms: hg.uint32) -> None: ...


@hg.declare
def write_inline(runs: list[list[tuple[int, int]]], data: list[bytes]) -> None: ...


# The node's *epoch*: 16 bytes it registers read-only, [u64 registration id, u64 count of
# ``retire`` calls], little-endian, changed before each ``retire`` or re-registration is
# acknowledged. A client that read the epoch before a ``locate`` may later read the object
# one-sided from that location and then the epoch again: the same 16 bytes mean no retire and
# no new registration came in between, so the bytes it read were current (docs/store.md).
EPOCH = struct.Struct("<QQ")


@hg.declare
def epoch_region() -> bytes: ...  # the serialized bulk handle of the node's epoch


NODE_RPCS = (offload, disk_push, disk_stage, disk_release, disk_delete, node_stats, read,
             epoch_region,
             retire, write_inline)
