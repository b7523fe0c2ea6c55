"""The master's metadata and decisions (store/master_state.py) without sockets or clocks: time
is passed in as ``now``, and what must happen on nodes comes out as actions.

Two-phase puts (pending until put_end, idempotent put_end, expiry after put_ttl), read leases
(pages neither freed nor reused until they lapse), node drops (lost objects), replicas on
distinct nodes, eviction with replicas (one copy kept for the disk copy, the others freed at
once), the offload queue's cap (deferral, or drops under force_evict), the block index.
"""

from __future__ import annotations

from typing import Any

import pytest

from petasus.store import AlreadyExists, NotFound, ObjectLost, Pin, StoreError, StoreFull
from petasus.store.config import StoreConfig
from petasus.store.master_state import READY, BlockIndex, Grant, MasterState, Node

PAGE = 4096


def master(nodes: int = 2, pages: int = 10, **config: Any) -> tuple[MasterState, list[Node]]:
    options = {"lease_ttl": config.pop("lease_ttl", 5.0),
               "node_ttl": config.pop("node_ttl", 1e9), "put_ttl": config.pop("put_ttl", 30.0)}
    state = MasterState(StoreConfig(**config), **options)
    joined = [state.register_node(f"n{i}", f"tcp://127.0.0.1:{7100 + i}",
                                  f"segment-{i}".encode(), pages * PAGE, PAGE, 0.0)
              for i in range(nodes)]
    return state, joined


def grant(state: MasterState, key: str, size: int, now: float = 0.0, *, replicas: int = 1,
          overwrite: bool = False, pin: Pin = Pin.NONE, preferred: str = "") -> Grant:
    out = state.put_start([key], [size], replicas, overwrite, pin, preferred, now)[0]
    if isinstance(out, StoreError):
        raise out
    return out


def put(state: MasterState, key: str, size: int, now: float = 0.0, **options: Any) -> Grant:
    g = grant(state, key, size, now, **options)
    assert state.put_end([g.token], False, now) == [None]
    return g


def used(state: MasterState) -> int:
    return sum(n.pages.used_pages for n in state.nodes.values())


def nodes_of(state: MasterState, key: str) -> list[str]:
    return sorted(c.node.name for c in state.objects[key].copies)


# -- two-phase puts ----------------------------------------------------------------------------
def test_a_put_is_invisible_until_put_end() -> None:
    state, (n0, _) = master()
    g = grant(state, "k", 3 * PAGE - 5, preferred="n0")
    assert [node.name for node, _ in g.replicas] == ["n0"]
    _, runs = g.replicas[0]
    assert runs == [(0, 3 * PAGE - 5)]  # byte runs: the tail page is partial
    assert state.stats()["pending"] == 1 and n0.pages.used_pages == 3
    assert not state.exists("k")
    with pytest.raises(NotFound):
        state.locate("k", "", 0.0)
    assert state.put_end([g.token], False, 1.0) == [None]
    assert state.exists("k")
    obj = state.locate("k", "", 1.0)
    assert (obj.size, obj.state) == (3 * PAGE - 5, READY)
    assert state.stats()["pending"] == 0 and state.stats()["objects"] == 1


def test_put_end_is_idempotent() -> None:
    state, _ = master()
    g = grant(state, "k", 5000)
    assert state.put_end([g.token], False, 0.0) == [None]
    assert state.put_end([g.token], False, 0.0) == [None]  # a retried finalize
    assert state.put_end([g.token], True, 0.0) == [None]
    assert state.stats()["put"] == 1 and used(state) == 2


def test_put_end_of_an_unknown_token_is_an_error() -> None:
    state, _ = master()
    [error] = state.put_end([12345], False, 0.0)
    assert isinstance(error, StoreError)


def test_put_abort_frees_the_pages_and_is_idempotent() -> None:
    state, _ = master()
    g = grant(state, "k", 4 * PAGE)
    assert used(state) == 4
    state.put_abort([g.token])
    state.put_abort([g.token])
    assert used(state) == 0 and state.stats()["pending"] == 0
    assert isinstance(state.put_end([g.token], False, 0.0)[0], StoreError)
    assert not state.exists("k")


def test_a_pending_put_expires_after_put_ttl() -> None:
    state, _ = master(put_ttl=30.0)
    g = grant(state, "k", 2 * PAGE, now=100.0)
    assert not state.tick(129.9)  # nothing expired: no change for ``watch`` to report
    assert state.stats()["pending"] == 1 and used(state) == 2
    assert state.tick(130.0)
    assert state.stats()["pending"] == 0 and used(state) == 0
    assert state.stats()["expired_puts"] == 1
    assert isinstance(state.put_end([g.token], False, 130.1)[0], StoreError)
    assert not state.exists("k")
    put(state, "k", 2 * PAGE, 131.0)  # the key and the pages are free again
    assert state.exists("k")


def test_existing_keys_and_overwrite() -> None:
    state, _ = master()
    put(state, "k", 100)
    with pytest.raises(AlreadyExists):
        grant(state, "k", 100)
    g = grant(state, "k", 3 * PAGE, overwrite=True)
    assert state.locate("k", "", 0.0).size == 100  # the old object until put_end
    assert state.put_end([g.token], False, 0.0) == [None]
    assert state.locate("k", "", 0.0).size == 3 * PAGE


def test_two_writers_of_one_key_without_overwrite() -> None:
    state, _ = master()
    first, second = grant(state, "k", 100), grant(state, "k", 200)
    assert state.put_end([second.token], False, 0.0) == [None]
    [error] = state.put_end([first.token], False, 0.0)
    assert isinstance(error, AlreadyExists)
    assert state.locate("k", "", 0.0).size == 200
    assert used(state) == 1  # the loser's pages are freed


def test_an_atomic_put_end_is_all_or_nothing() -> None:
    state, _ = master()
    group = [grant(state, f"g{i}", 5000) for i in range(3)]
    clash = grant(state, "race", 10)
    put(state, "race", 20)  # another writer's "race" is there when the group ends
    results = state.put_end([g.token for g in [*group, clash]], True, 0.0)
    assert isinstance(results[3], AlreadyExists)
    assert not any(state.exists(f"g{i}") for i in range(3))
    assert state.stats()["pending"] == 0
    assert used(state) == 1  # only the other writer's "race"
    # None of the group finished: no token may be reported as a finished put (a retried
    # put_end of those tokens says they are unknown).
    assert all(isinstance(r, StoreError) for r in results), results
    assert all(isinstance(r, StoreError)
               for r in state.put_end([g.token for g in group], True, 0.0))


def test_values_over_the_cap_and_bad_replica_counts() -> None:
    state, _ = master(max_value_bytes=8 * PAGE)
    with pytest.raises(StoreError, match="exceeds"):
        grant(state, "big", 8 * PAGE + 1)
    with pytest.raises(StoreError):
        grant(state, "k", 10, replicas=0)
    with pytest.raises(StoreFull):
        grant(state, "k", 10, replicas=3)  # two nodes
    assert used(state) == 0 and state.stats()["pending"] == 0


def test_an_object_larger_than_every_segment_is_store_full() -> None:
    state, _ = master(pages=4)
    with pytest.raises(StoreFull):
        grant(state, "huge", 5 * PAGE)
    assert used(state) == 0


def test_zero_byte_objects() -> None:
    state, _ = master()
    put(state, "empty", 0, replicas=2)
    obj = state.locate("empty", "", 0.0)
    assert obj.size == 0 and len(obj.copies) == 2 and used(state) == 0


# -- placement ---------------------------------------------------------------------------------
def test_replicas_are_on_distinct_nodes() -> None:
    state, _ = master(nodes=3, pages=100)
    for i in range(20):
        g = grant(state, f"k{i}", (i + 1) * 1000, replicas=2)
        assert len({node.node_id for node, _ in g.replicas}) == 2
        state.put_end([g.token], False, 0.0)
    g = grant(state, "three", 100, replicas=3)
    assert sorted(node.name for node, _ in g.replicas) == ["n0", "n1", "n2"]


def test_most_free_placement_and_the_preferred_node() -> None:
    state, _ = master(nodes=2, pages=100)
    put(state, "a", 10 * PAGE, preferred="n0")
    assert nodes_of(state, "a") == ["n0"]
    put(state, "b", PAGE)  # no preference: the node with more free pages
    assert nodes_of(state, "b") == ["n1"]
    put(state, "c", PAGE, preferred="tcp://127.0.0.1:7100")  # by URI too
    assert nodes_of(state, "c") == ["n0"]


def test_a_full_node_is_skipped_for_another() -> None:
    state, _ = master(nodes=2, pages=10, offload="off")
    put(state, "a", 9 * PAGE, preferred="n0", pin=Pin.HARD)
    put(state, "b", 4 * PAGE, preferred="n0")  # no room on n0: placed on n1
    assert nodes_of(state, "b") == ["n1"]


# -- leases ------------------------------------------------------------------------------------
def test_a_lease_keeps_removed_pages_until_it_lapses() -> None:
    state, (n0,) = master(nodes=1, pages=4, lease_ttl=5.0, offload="off")
    put(state, "k", 4 * PAGE)
    state.locate("k", "", 10.0)  # a reader holds a lease until 15
    state.remove("k", 11.0)
    assert not state.exists("k")
    assert n0.pages.used_pages == 4  # the reader may still be copying those pages
    with pytest.raises(StoreFull):
        grant(state, "next", PAGE, 12.0)
    assert not state.tick(14.9)
    assert n0.pages.used_pages == 4
    assert state.tick(15.0)  # pages freed: a change
    assert n0.pages.used_pages == 0
    put(state, "next", 4 * PAGE, 15.1)


def test_a_lease_keeps_overwritten_pages_until_it_lapses() -> None:
    state, (n0,) = master(nodes=1, pages=8, lease_ttl=5.0)
    first = put(state, "k", 4 * PAGE)
    state.locate("k", "", 0.0)
    put(state, "k", 4 * PAGE, 1.0, overwrite=True)
    assert n0.pages.used_pages == 8
    # The new copy is elsewhere in the segment: not in the pages the reader is copying.
    [(_, old_runs)] = first.replicas
    new_runs = state.nodes[n0.node_id].runs(state.objects["k"].copies[0].alloc, 4 * PAGE)
    assert set(old_runs).isdisjoint(new_runs)
    state.tick(5.0)
    assert n0.pages.used_pages == 4


def test_eviction_skips_objects_under_a_lease() -> None:
    state, (n0,) = master(nodes=1, pages=10, lease_ttl=5.0, offload="off")
    put(state, "read", 6 * PAGE)
    state.locate("read", "", 0.0)
    with pytest.raises(StoreFull):
        grant(state, "new", 6 * PAGE, 1.0)  # "read" is leased: not a candidate
    assert state.exists("read")
    put(state, "new", 6 * PAGE, 5.0)  # lapsed: "read" is dropped (offload="off")
    assert not state.exists("read")
    assert n0.pages.used_pages == 6


# -- nodes -------------------------------------------------------------------------------------
def test_a_silent_node_is_dropped_and_its_only_copies_are_lost() -> None:
    state, (n0, n1) = master(node_ttl=10.0)
    put(state, "only-n0", 100, preferred="n0")
    put(state, "only-n1", 100, preferred="n1")
    put(state, "both", 100, replicas=2)
    state.heartbeat(n1.node_id, 0, 8.0)
    assert not state.tick(9.9)
    assert len(state.nodes) == 2
    assert state.tick(10.0)  # n0's last heartbeat was its registration at 0
    assert [n.name for n in state.nodes.values()] == ["n1"]
    with pytest.raises(ObjectLost):
        state.locate("only-n0", "", 10.0)
    assert not state.exists("only-n0")
    assert nodes_of(state, "both") == ["n1"]
    assert nodes_of(state, "only-n1") == ["n1"]
    stats = state.stats()
    assert stats["lost"] == 1 and stats["nodes_dropped"] == 1 and stats["objects"] == 2
    assert not state.heartbeat(n0.node_id, 0, 11.0)  # told to register again


def test_a_dropped_nodes_pending_puts_are_abandoned() -> None:
    state, (_, n1) = master(node_ttl=10.0)
    g = grant(state, "k", 3 * PAGE, replicas=2)
    state.heartbeat(n1.node_id, 0, 8.0)
    state.tick(10.0)
    assert state.stats()["pending"] == 0
    assert n1.pages.used_pages == 0
    assert isinstance(state.put_end([g.token], False, 10.0)[0], StoreError)


def test_a_lost_key_can_be_put_again() -> None:
    state, (_, n1) = master(node_ttl=10.0)
    put(state, "k", 100, preferred="n0")
    state.heartbeat(n1.node_id, 0, 9.0)
    state.tick(10.0)
    put(state, "k", 200, 10.0)
    assert state.locate("k", "", 10.0).size == 200


def test_a_node_that_registers_again_replaces_its_old_self() -> None:
    state, (n0, _) = master()
    put(state, "k", 100, preferred="n0")
    again = state.register_node("n0", "tcp://127.0.0.1:7200", b"segment-new", 10 * PAGE, PAGE,
                                1.0)
    assert n0.node_id not in state.nodes and again.node_id in state.nodes
    with pytest.raises(ObjectLost):
        state.locate("k", "", 1.0)


def test_a_bad_segment_is_refused() -> None:
    state, _ = master(nodes=0)
    with pytest.raises(StoreError):
        state.register_node("x", "tcp://h:1", b"s", 10 * PAGE, 3000, 0.0)
    with pytest.raises(StoreError):
        state.register_node("x", "tcp://h:1", b"s", 100, PAGE, 0.0)


# -- eviction and offload ----------------------------------------------------------------------
def offloads(state: MasterState) -> list[tuple[Any, ...]]:
    return [a for a in state.take_actions() if a[0] == "offload"]


def test_eviction_with_replicas_writes_a_disk_copy_per_replica() -> None:
    """replicas=2 survives a node loss in either tier: each replica gets its own disk copy
    on its own node, and each DRAM copy goes as soon as its own disk copy is complete."""
    state, (n0, n1) = master(nodes=2, pages=10, offload="on_evict")
    put(state, "x", 4 * PAGE, replicas=2)
    put(state, "y", 6 * PAGE, replicas=2)  # 10 of 10 pages on each node: over 0.9
    actions = offloads(state)
    assert sorted((a[1].name, a[2], a[5]) for a in actions) == [
        ("n0", "x", 4 * PAGE), ("n1", "x", 4 * PAGE)]
    assert all(a[3] == state.objects["x"].gen for a in actions)
    assert sorted(nodes_of(state, "x")) == ["n0", "n1"]  # nothing freed before its copy
    assert state.stats()["offloads_in_flight"] == 2
    first, second = actions
    state.offload_done("x", first[3], first[1], True, 1.0)
    assert nodes_of(state, "x") == [second[1].name] and state.objects["x"].disk == [first[1]]
    assert first[1].pages.used_pages == 6 and second[1].pages.used_pages == 10
    state.offload_done("x", second[3], second[1], True, 1.0)
    obj = state.locate("x", "", 2.0)
    assert obj.copies == [] and sorted(n.name for n in obj.disk) == ["n0", "n1"]
    assert n0.pages.used_pages == 6 and n1.pages.used_pages == 6
    assert state.stats()["offloads_in_flight"] == 0
    # One node gone: the other's disk copy still serves the object.
    state.drop_node(n0, "test")
    assert [n.name for n in state.locate("x", "", 3.0).disk] == ["n1"]


def test_a_failed_disk_copy_leaves_the_object_in_dram() -> None:
    state, _ = master(nodes=1, pages=10, offload="on_evict")
    put(state, "x", 5 * PAGE)
    put(state, "y", 5 * PAGE)
    [(_, node, key, gen, _, _)] = offloads(state)
    state.offload_done(key, gen, node, False, 1.0)
    assert nodes_of(state, key) == ["n0"] and state.objects[key].disk == []
    assert state.stats()["offload_failed"] == 1
    state.locate(key, "", 2.0)


def test_on_put_queues_a_copy_for_every_put() -> None:
    state, _ = master(nodes=1, pages=10, offload="on_put")
    put(state, "a", PAGE)
    put(state, "b", PAGE)
    assert [a[2] for a in offloads(state)] == ["a", "b"]


def test_a_full_offload_queue_defers_candidates() -> None:
    state, _ = master(nodes=1, pages=10, offload="on_evict", offload_queue=1,
                          low_watermark=0.3)
    for key in ("a", "b", "c"):
        put(state, key, 3 * PAGE)
    put(state, "d", PAGE)  # 10 of 10: evict down to 3 pages
    assert [a[2] for a in offloads(state)] == ["a"]  # the queue holds one copy
    stats = state.stats()
    assert stats["deferred"] == 2 and stats["force_dropped"] == 0
    assert all(state.exists(k) for k in "abcd")
    assert nodes_of(state, "b") == ["n0"] and nodes_of(state, "c") == ["n0"]


def test_force_evict_drops_what_cannot_be_queued() -> None:
    state, _ = master(nodes=1, pages=10, offload="on_evict", offload_queue=1,
                          low_watermark=0.3, force_evict=True)
    for key in ("a", "b", "c"):
        put(state, key, 3 * PAGE)
    put(state, "d", PAGE)
    assert [a[2] for a in offloads(state)] == ["a"]
    stats = state.stats()
    assert stats["force_dropped"] == 2 and stats["deferred"] == 0
    assert state.exists("a") and state.exists("d")
    for key in ("b", "c"):
        assert not state.exists(key)
        with pytest.raises(NotFound):
            state.locate(key, "", 1.0)


def test_offload_off_drops_and_hard_pins_stay() -> None:
    state, _ = master(nodes=1, pages=10, offload="off")
    put(state, "hard", 3 * PAGE, pin=Pin.HARD)
    put(state, "soft", 3 * PAGE, pin=Pin.SOFT)
    put(state, "plain", 3 * PAGE)
    put(state, "new", PAGE)  # 10 of 10: down to 7
    assert state.exists("hard") and state.exists("soft") and state.exists("new")
    assert not state.exists("plain")  # the unpinned one goes first
    assert state.stats()["dropped"] == 1


def test_an_offload_of_a_removed_object_deletes_its_disk_copy() -> None:
    state, _ = master(nodes=1, pages=10, offload="on_put")
    put(state, "k", PAGE)
    [(_, node, key, gen, _, _)] = offloads(state)
    state.remove("k", 0.5)
    state.offload_done(key, gen, node, True, 1.0)
    assert ("delete", node, "k", gen) in state.take_actions()
    assert not state.exists("k")


def test_a_removed_object_with_a_disk_copy_deletes_it() -> None:
    state, _ = master(nodes=1, pages=10, offload="on_put")
    put(state, "k", PAGE)
    [(_, node, key, gen, _, _)] = offloads(state)
    state.offload_done(key, gen, node, True, 1.0)
    state.remove("k", 2.0)
    assert state.take_actions() == [("delete", node, "k", gen)]


# -- the KV-block index ------------------------------------------------------------------------
def test_the_block_index() -> None:
    index = BlockIndex()
    assert index.register("a", [1, 2, 3], "dram") == 3
    assert index.register("a", [3, 4], "disk") == 2
    assert index.register("a", [3], "dram") == 0
    assert index.register("b", [1], "dram") == 1
    assert index.match([1, 3, 4, 7]) == {
        "nodes": {"a": {"dram": [1, 3], "disk": [3, 4]}, "b": {"dram": [1]}}, "distinct": 3}
    assert index.revoke("a", [3, 7], "dram") == 1
    assert index.match([3]) == {"nodes": {"a": {"disk": [3]}}, "distinct": 1}
    assert index.revoke_tier("a", "disk") == 2
    assert index.match([1, 2, 3, 4]) == {"nodes": {"a": {"dram": [1, 2]}, "b": {"dram": [1]}},
                                         "distinct": 2}
    index.revoke_node("a")
    assert index.match([1, 2]) == {"nodes": {"b": {"dram": [1]}}, "distinct": 1}
    assert index.revoke_tier("a", "dram") == 0
    assert index.match([]) == {"nodes": {}, "distinct": 0}


def test_a_dropped_node_leaves_the_block_index() -> None:
    state, (_, n1) = master(node_ttl=10.0)
    state.blocks.register("n0", [1, 2], "dram")
    state.blocks.register("n1", [2], "disk")
    state.heartbeat(n1.node_id, 0, 9.0)
    state.tick(10.0)
    assert state.blocks.match([1, 2]) == {"nodes": {"n1": {"disk": [2]}}, "distinct": 1}


# -- retires: what cached locations must be refused -----------------------------------------------
def test_an_overwrite_or_remove_under_a_lease_retires_every_copy() -> None:
    state, (n0, n1) = master(lease_ttl=5.0)
    put(state, "k", 100, 0.0, replicas=2)
    gen = state.objects["k"].gen
    assert state.take_retired() == {}
    state.locate("k", "", 1.0)  # a lease until 6.0: a client may cache the location
    put(state, "k", 200, 2.0, overwrite=True, replicas=2)
    assert state.take_retired() == {n0: (["k"], [gen]), n1: (["k"], [gen])}
    assert state.take_retired() == {}
    gen2 = state.objects["k"].gen
    state.locate("k", "", 3.0)
    state.remove("k", 4.0)
    assert state.take_retired() == {n0: (["k"], [gen2]),
                                    n1: (["k"], [gen2])}


def test_no_retire_once_the_lease_ended_or_for_a_dropped_node() -> None:
    state, (_n0, n1) = master(lease_ttl=5.0)
    put(state, "a", 100, 0.0, preferred="n0")
    put(state, "b", 100, 0.0, preferred="n1")
    state.locate("a", "", 1.0)
    state.locate("b", "", 1.0)
    put(state, "a", 100, 7.0, overwrite=True)  # the lease ended at 6.0: no client caches it
    assert state.take_retired() == {}
    gen_b = state.objects["b"].gen
    state.locate("b", "", 8.0)
    state.drop_node(n1, "test")  # b's only copy was there: lost, and its node is gone
    put(state, "b", 100, 9.0, overwrite=True)
    assert state.take_retired() == {}, f"a retire for a dropped node (gen {gen_b})"


# -- the version that watch() long-polls ----------------------------------------------------
class Answered:
    """Stands for a parked call's TargetHandle: what it was answered with."""

    source = "test"

    def __init__(self) -> None:
        self.values: list[int] = []

    def respond(self, value: int) -> None:
        self.values.append(value)


def test_changes_park_until_the_version_moves_or_the_deadline() -> None:
    import threading

    from petasus.store.master_changes import MAX_PARKED, Changes

    changes = Changes(threading.Lock())
    start = changes.version  # from the clock: a restarted master's are all newer
    early, late, stale = Answered(), Answered(), Answered()
    with changes.lock:
        assert not changes.park(stale, start - 1, 10.0)  # moved already: answer now
        assert changes.park(early, start, 1.0)
        assert changes.park(late, start, 2.0)
        due = changes.expire(1.0)
    changes.answer(due)
    assert early.values == [start] and late.values == [] and stale.values == []
    with changes:  # a handler that changed nothing after all: no version, no answer
        changes.unchanged()
    assert late.values == [] and changes.version == start
    with changes:  # a change: every parked call hears the new version, after the lock
        assert not late.values
    assert late.values == [start + 1] and changes.version == start + 1
    with changes.lock:
        crowd = [Answered() for _ in range(MAX_PARKED)]
        assert all(changes.park(c, start + 1, 5.0) for c in crowd)
        assert changes.full()  # the watch handler refuses the next one
        changes.closing = True
        assert not changes.park(Answered(), start + 1, 5.0)  # closing: answered at once
        changes.answer(changes.expire(float("inf")))
    assert all(c.values == [start + 1] for c in crowd)
