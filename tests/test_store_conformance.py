"""The store conformance suite: the same tests for every scheme (store_kit.SCHEMES).

What every scheme guarantees (store/api.py): a reader never sees a partial object, a failed
put leaves nothing behind, an atomic group is visible at once or not at all, errors name the
key and the tier, and a missing object is NotFound, never wrong bytes.
"""

from __future__ import annotations

import asyncio
import mmap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import store_kit
from store_kit import (
    DEADLINE,
    KiB,
    MiB,
    Opener,
    check_error,
    pattern,
    version_of,
    versioned,
    wait_until,
)

from petasus.store import (
    AlreadyExists,
    InvalidKey,
    NotFound,
    Pin,
    Store,
    StoreClosed,
    StoreError,
    StoreFull,
    ValueTooLarge,
)

# The fixtures of the kit: every test below runs once per scheme.
scheme = store_kit.scheme
open_store = store_kit.open_store

# Around the page size (4 KiB), across runs of pages, and up to a 64 MiB tensor.
SIZES = [0, 1, 4095, 4096, 4097, 64 * KiB + 3, 1 * MiB, 16 * MiB + 1]


def run_threads(targets: list[Callable[[], None]]) -> None:
    """Run each target in a thread; re-raise the first failure (never a silent one)."""
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
        assert not t.is_alive(), "a client thread did not finish"
    if errors:
        raise errors[0]


# -- single objects ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_put_get_get_into_size(open_store: Opener, size: int) -> None:
    kv = open_store()
    value = pattern("k", size)
    kv.put("k", value)
    assert kv.exists("k")
    assert kv.size("k") == size
    got = kv.get("k")
    assert isinstance(got, bytes)
    assert got == value
    out = bytearray(size)
    assert kv.get_into("k", out) == size
    assert out == value


def test_sixty_four_mib(open_store: Opener) -> None:
    kv = open_store(dram_bytes=160 * MiB)
    size = 64 * MiB
    value = pattern("big", size)
    kv.put_from("big", value)
    assert kv.size("big") == size
    out = np.zeros(size, dtype=np.uint8)
    assert kv.get_into("big", out) == size
    assert out.tobytes() == value
    assert kv.get("big") == value


@pytest.mark.parametrize("size", [0, 4096, 100 * KiB + 7])
def test_put_from(open_store: Opener, size: int) -> None:
    kv = open_store()
    value = bytearray(pattern("src", size))
    kv.put_from("src", value)
    kv.put_from("view", memoryview(value)[size // 3: size // 2])
    assert kv.get("src") == value
    assert kv.get("view") == value[size // 3: size // 2]


def test_the_stored_copy_is_independent_of_the_source(open_store: Opener) -> None:
    kv = open_store()
    source = bytearray(pattern("k", 10 * KiB))
    kv.put("k", source)
    kv.put_from("k2", source)
    source[:] = bytes(len(source))
    assert kv.get("k") == pattern("k", 10 * KiB)
    assert kv.get("k2") == pattern("k", 10 * KiB)


def test_get_into_larger_buffer_writes_the_prefix_only(open_store: Opener) -> None:
    kv = open_store()
    value = pattern("k", 5000)
    kv.put("k", value)
    out = bytearray(b"\xee" * 9000)
    assert kv.get_into("k", out) == 5000
    assert out[:5000] == value
    assert out[5000:] == b"\xee" * 4000
    # Into the middle of a larger region: a memoryview slice is a destination like any other.
    region = bytearray(b"\xee" * 20000)
    assert kv.get_into("k", memoryview(region)[7000:13000]) == 5000
    assert region[7000:12000] == value
    assert region[:7000] == b"\xee" * 7000
    assert region[12000:] == b"\xee" * 8000


def test_get_into_too_small_buffer_is_an_error(open_store: Opener) -> None:
    kv = open_store()
    kv.put("k", pattern("k", 5000))
    with pytest.raises(ValueError, match=r"4999|5000"):
        kv.get_into("k", bytearray(4999))
    with pytest.raises(ValueError):
        kv.get_into("k", bytearray(0))
    kv.put("empty", b"")
    assert kv.get_into("empty", bytearray(0)) == 0


def test_get_into_a_read_only_buffer_is_misuse(open_store: Opener) -> None:
    kv = open_store()
    kv.put("k", b"abc")
    with pytest.raises((TypeError, ValueError)):
        kv.get_into("k", b"xxxx")


@pytest.mark.parametrize("value", [12, "a str is not bytes", None])
def test_a_value_without_the_buffer_protocol_is_a_type_error(open_store: Opener,
                                                              value: Any) -> None:
    kv = open_store()
    with pytest.raises(TypeError):
        kv.put("k", value)
    assert not kv.exists("k")


def test_overwrite(open_store: Opener) -> None:
    kv = open_store()
    kv.put("k", pattern("k", 3000, 1))
    with pytest.raises(AlreadyExists) as info:
        kv.put("k", pattern("k", 10, 2))
    check_error(info.value, "k")
    with pytest.raises(AlreadyExists):
        kv.put_from("k", pattern("k", 10, 2))
    assert kv.get("k") == pattern("k", 3000, 1)
    for version, size in ((3, 70 * KiB), (4, 10), (5, 0), (6, 4096)):
        kv.put("k", pattern("k", size, version), overwrite=True)
        assert kv.get("k") == pattern("k", size, version)
        assert kv.size("k") == size
    kv.put_from("k", pattern("k", 9, 7), overwrite=True)
    assert kv.get("k") == pattern("k", 9, 7)
    # overwrite=True on an absent key is an ordinary put.
    kv.put("fresh", b"new", overwrite=True)
    assert kv.get("fresh") == b"new"


def test_remove(open_store: Opener) -> None:
    kv = open_store()
    kv.put("k", b"value")
    kv.remove("k")
    assert not kv.exists("k")
    for op in (kv.get, kv.size, kv.remove, lambda k: kv.get_into(k, bytearray(10))):
        with pytest.raises(NotFound) as info:
            op("k")
        check_error(info.value, "k")
    kv.put("k", b"again")  # a removed key is free again, without overwrite
    assert kv.get("k") == b"again"


def test_not_found_names_the_key(open_store: Opener) -> None:
    kv = open_store()
    assert not kv.exists("nothing/here")
    with pytest.raises(NotFound) as info:
        kv.get("nothing/here")
    check_error(info.value, "nothing/here")
    assert isinstance(info.value, KeyError)
    assert "nothing/here" in str(info.value)
    with pytest.raises(NotFound):
        kv.pin("nothing/here", Pin.HARD)


def test_keys_are_unicode_and_distinct(open_store: Opener) -> None:
    kv = open_store()
    keys = ["a", "A", "a ", "é", "e\u0301", "块/0", "emoji/\U0001f600", "x" * 4096,
            "é" * 2048, "/", "a/b", "a%2Fb", "..", "\n"]
    for i, key in enumerate(keys):
        kv.put(key, pattern(key, i * 100))
    for i, key in enumerate(keys):
        assert kv.get(key) == pattern(key, i * 100), key


# -- key validation ---------------------------------------------------------------------------
BAD_KEYS = [("empty", ""), ("too long", "x" * 4097), ("too many bytes", "é" * 2049),
            ("lone surrogate", "\ud800"), ("surrogate inside", "block/\udcff/0")]


@pytest.mark.parametrize(("why", "key"), BAD_KEYS, ids=[w for w, _ in BAD_KEYS])
def test_invalid_keys(open_store: Opener, why: str, key: str) -> None:
    kv = open_store()
    ops: list[Callable[[], object]] = [
        lambda: kv.put(key, b"v"), lambda: kv.put_from(key, b"v"), lambda: kv.get(key),
        lambda: kv.get_into(key, bytearray(8)), lambda: kv.remove(key), lambda: kv.exists(key),
        lambda: kv.size(key), lambda: kv.pin(key, Pin.SOFT)]
    for op in ops:
        with pytest.raises(InvalidKey) as info:
            op()
        assert info.value.key == key
        assert isinstance(info.value, ValueError)
    assert kv.stats()["dram"]["objects"] == 0


def test_max_key_bytes_is_configurable(open_store: Opener) -> None:
    kv = open_store(max_key_bytes=8)
    kv.put("12345678", b"v")
    with pytest.raises(InvalidKey, match="123456789"):
        kv.put("123456789", b"v")


@pytest.mark.parametrize("key", [b"bytes-key", 7, None, ("tuple",)])
def test_non_str_keys_are_a_type_error(open_store: Opener, key: Any) -> None:
    kv = open_store()
    for op in (lambda: kv.put(key, b"v"), lambda: kv.get(key), lambda: kv.exists(key),
               lambda: kv.remove(key), lambda: kv.size(key),
               lambda: kv.get_into(key, bytearray(4))):
        with pytest.raises(TypeError):
            op()


def test_value_too_large(open_store: Opener) -> None:
    kv = open_store(max_value_bytes=64 * KiB)
    kv.put("fits", bytes(64 * KiB))
    with pytest.raises(ValueTooLarge) as info:
        kv.put("big", bytes(64 * KiB + 1))
    check_error(info.value, "big")
    assert "65537" in str(info.value) or "64 KiB" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueTooLarge):
        kv.put_from("big", np.zeros(64 * KiB + 1, dtype=np.uint8))
    # Too large to replace an existing object: the old one stays.
    with pytest.raises(ValueTooLarge):
        kv.put("fits", bytes(64 * KiB + 1), overwrite=True)
    assert not kv.exists("big")
    assert kv.size("fits") == 64 * KiB


# -- buffers: numpy and mmap ------------------------------------------------------------------
def test_numpy_values_and_destinations(open_store: Opener) -> None:
    kv = open_store()
    flat = np.frombuffer(pattern("flat", 1 * MiB), dtype=np.uint8).copy()
    tensor = np.arange(4 * 64 * 128, dtype=np.float32).reshape(4, 64, 128)
    wide = np.arange(3 * 1000, dtype=np.int64).reshape(3, 1000)
    kv.put_from("flat", flat)
    kv.put_from("tensor", tensor)
    kv.put("wide", wide)
    assert kv.size("tensor") == tensor.nbytes
    assert kv.get("tensor") == tensor.tobytes()
    assert kv.get("wide") == wide.tobytes()

    out = np.empty_like(tensor)
    assert kv.get_into("tensor", out) == tensor.nbytes
    np.testing.assert_array_equal(out, tensor)
    out_wide = np.zeros((3, 1000), dtype=np.int64)
    assert kv.get_into("wide", out_wide) == wide.nbytes
    np.testing.assert_array_equal(out_wide, wide)
    # A destination of another dtype and shape receives the same bytes.
    as_bytes = np.zeros(tensor.nbytes + 100, dtype=np.uint8)
    assert kv.get_into("tensor", as_bytes) == tensor.nbytes
    assert as_bytes[: tensor.nbytes].tobytes() == tensor.tobytes()
    assert not as_bytes[tensor.nbytes:].any()
    flat_out = np.zeros(1 * MiB, dtype=np.uint8)
    assert kv.get_into("flat", flat_out) == 1 * MiB
    np.testing.assert_array_equal(flat_out, flat)
    # Too small, counted in bytes whatever the dtype.
    with pytest.raises(ValueError):
        kv.get_into("tensor", np.empty(tensor.size - 1, dtype=np.float32))


def test_mmap_values_and_destinations(open_store: Opener, tmp_path: Path) -> None:
    kv = open_store()
    size = 256 * KiB + 5
    value = pattern("m", size)
    with mmap.mmap(-1, size) as anon:
        anon[:] = value
        kv.put_from("anon", anon)
    backing = tmp_path / "mapped"
    backing.write_bytes(value[::-1])
    with backing.open("r+b") as f, mmap.mmap(f.fileno(), size) as mapped:
        kv.put("file", mapped)
    assert kv.get("anon") == value
    assert kv.get("file") == value[::-1]
    with mmap.mmap(-1, 2 * size) as dest:
        assert kv.get_into("anon", dest) == size
        assert dest[:size] == value
        assert dest[size:] == bytes(size)
    out_file = tmp_path / "out"
    out_file.write_bytes(bytes(size))
    with out_file.open("r+b") as f, mmap.mmap(f.fileno(), size) as dest:
        assert kv.get_into("file", dest) == size
        dest.flush()
    assert out_file.read_bytes() == value[::-1]


# -- pins -------------------------------------------------------------------------------------
def fill_with_hard_pins(kv: Store, size: int, limit: int) -> tuple[list[str], str]:
    """Put hard-pinned objects until one does not fit; return the stored keys and the one
    that failed (checked: StoreFull naming it)."""
    stored: list[str] = []
    for i in range(limit):
        key = f"hard/{i}"
        try:
            kv.put(key, pattern(key, size), pin=Pin.HARD, timeout=0.2)
        except StoreFull as exc:
            check_error(exc, key)
            return stored, key
        stored.append(key)
    raise AssertionError(f"{limit} hard-pinned objects of {size} B all fit in the arena")


@pytest.mark.parametrize("offload", ["on_put", "on_evict", "off"])
def test_hard_pins_are_never_evicted_and_a_failed_put_leaves_nothing(open_store: Opener,
                                                                      offload: str) -> None:
    kv = open_store(dram_bytes=1 * MiB, offload=offload)
    stored, failed = fill_with_hard_pins(kv, 64 * KiB, 17)
    assert len(stored) >= 11  # at least up to the high watermark (0.9 of 16 objects)
    assert not kv.exists(failed)
    with pytest.raises(NotFound):
        kv.get(failed)
    for key in stored:
        assert kv.get(key) == pattern(key, 64 * KiB)
    # A failed overwrite keeps the old object.
    with pytest.raises(StoreFull):
        kv.put(stored[0], bytes(512 * KiB), overwrite=True, timeout=0.2)
    assert kv.get(stored[0]) == pattern(stored[0], 64 * KiB)
    # Once some are unpinned, eviction makes room (under "off" by dropping them, but never
    # the object the put is making room for: it is visible when its put returns).
    for key in stored[:4]:
        kv.unpin(key)
    kv.put(failed, pattern(failed, 64 * KiB))
    assert kv.get(failed) == pattern(failed, 64 * KiB)
    if offload != "off":
        for key in stored[:4]:
            assert kv.get(key) == pattern(key, 64 * KiB)
    for key in stored[4:]:
        assert kv.get(key) == pattern(key, 64 * KiB)


def test_pin_modes_and_unpin(open_store: Opener) -> None:
    kv = open_store(dram_bytes=1 * MiB)
    kv.put("a", pattern("a", 64 * KiB), pin=Pin.SOFT)
    kv.put("b", pattern("b", 64 * KiB))
    kv.pin("b")  # soft by default
    kv.pin("b", Pin.HARD)
    kv.pin("b", Pin.HARD)  # idempotent
    kv.unpin("b")
    kv.unpin("b")
    kv.pin("a", Pin.NONE)
    assert kv.get("a") == pattern("a", 64 * KiB)
    assert kv.get("b") == pattern("b", 64 * KiB)
    # Removing a pinned object is allowed: a pin protects from eviction, not from the owner.
    kv.pin("a", Pin.HARD)
    kv.remove("a")
    assert not kv.exists("a")


def test_soft_pins_go_after_everything_else(open_store: Opener) -> None:
    kv = open_store(dram_bytes=1 * MiB, offload="on_evict")
    kv.put("soft", pattern("soft", 64 * KiB), pin=Pin.SOFT)  # the least recently used
    for i in range(24):  # 1.5 arenas: eviction runs several times
        kv.put(f"u/{i}", pattern(f"u/{i}", 64 * KiB))
    before = kv.stats()
    assert kv.get("soft") == pattern("soft", 64 * KiB)
    after = kv.stats()
    assert after["dram"]["hits"] == before["dram"]["hits"] + 1, "the soft pin was evicted"
    assert after["dram"]["evictions"] >= 8
    for i in range(24):
        assert kv.get(f"u/{i}") == pattern(f"u/{i}", 64 * KiB)


# -- tiers: more than DRAM holds --------------------------------------------------------------
@pytest.mark.parametrize("offload", ["on_put", "on_evict"])
def test_spill_to_disk_and_read_everything_back(scheme: Any, open_store: Opener,
                                                offload: str) -> None:
    if not scheme.has_disk:
        pytest.skip(f"the {scheme.id} scheme has no disk tier")
    kv = open_store(dram_bytes=2 * MiB, offload=offload)
    sizes = [(i * 37 * KiB) % (300 * KiB) + i for i in range(40)]  # ~6 MiB in all
    for i, size in enumerate(sizes):
        kv.put(f"obj/{i}", pattern(f"obj/{i}", size))
    stats = kv.stats()
    assert stats["dram"]["used"] <= stats["dram"]["capacity"] <= 2 * MiB
    assert stats["dram"]["evictions"] > 0
    assert stats["disk"]["objects"] > 0
    assert stats["offload"]["force_dropped"] == 0
    out = bytearray(300 * KiB + 40)
    for i, size in enumerate(sizes):
        assert kv.size(f"obj/{i}") == size
        assert kv.get(f"obj/{i}") == pattern(f"obj/{i}", size)
        assert kv.get_into(f"obj/{i}", out) == size
        assert out[:size] == pattern(f"obj/{i}", size)
    assert kv.exists_prefix([f"obj/{i}" for i in range(40)]) == 40


# -- batches ----------------------------------------------------------------------------------
@pytest.mark.parametrize("offload", ["on_put", "on_evict"])
def test_put_many_of_more_than_dram_holds(scheme: Any, open_store: Opener,
                                          offload: str) -> None:
    """A batch is no weaker than the same puts one at a time: with a disk tier, a batch of
    1.5 arenas spills like single puts do."""
    if not scheme.has_disk:
        pytest.skip(f"the {scheme.id} scheme has no disk tier")
    kv = open_store(dram_bytes=1 * MiB, offload=offload)
    items = [(f"m/{i}", pattern(f"m/{i}", 128 * KiB)) for i in range(12)]
    assert kv.put_many(items) == [None] * 12
    for key, value in items:
        assert kv.get(key) == value


def test_put_many_reports_per_key(open_store: Opener) -> None:
    kv = open_store(max_value_bytes=100 * KiB)
    kv.put("old", b"old")
    items = [("n/0", pattern("n/0", 10)), ("old", b"new"), ("n/1", pattern("n/1", 5000)),
             ("n/2", bytes(100 * KiB + 1)), ("n/3", np.arange(10, dtype=np.int16))]
    results = kv.put_many(items)
    assert len(results) == 5
    assert results[0] is None and results[2] is None and results[4] is None
    assert isinstance(results[1], AlreadyExists)
    check_error(results[1], "old")
    assert isinstance(results[3], ValueTooLarge)
    check_error(results[3], "n/2")
    assert kv.get("old") == b"old"
    assert kv.get("n/0") == pattern("n/0", 10)
    assert kv.get("n/1") == pattern("n/1", 5000)
    assert not kv.exists("n/2")
    assert kv.get("n/3") == np.arange(10, dtype=np.int16).tobytes()
    assert kv.put_many([("old", b"newer"), ("n/0", b"")], overwrite=True) == [None, None]
    assert kv.get("old") == b"newer"
    assert kv.get("n/0") == b""
    assert kv.put_many([]) == []
    assert kv.put_many(iter([("gen", b"from a generator")])) == [None]
    assert kv.get("gen") == b"from a generator"
    # A bad key is that key's error too; a non-str key is misuse of the call.
    results = kv.put_many([("ok/1", b"1"), ("", b"empty"), ("ok/2", b"2")])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], InvalidKey)
    assert kv.get_many(["ok/1", "ok/2"]) == [b"1", b"2"]
    with pytest.raises(TypeError):
        kv.put_many([("ok/3", b"3"), (b"bytes", b"x")])  # type: ignore[list-item]


def test_put_many_atomic(open_store: Opener) -> None:
    kv = open_store(max_value_bytes=1 * MiB)
    kv.put("kv/present", b"before")
    group = [(f"kv/{i}", pattern(f"kv/{i}", 3000 + i)) for i in range(8)]
    with pytest.raises(AlreadyExists) as info:
        kv.put_many([*group, ("kv/present", b"after")], atomic=True)
    check_error(info.value, "kv/present")
    assert kv.exists_many([k for k, _ in group]) == [False] * 8
    assert kv.get("kv/present") == b"before"

    with pytest.raises(ValueTooLarge):
        kv.put_many([*group, ("kv/huge", bytes(1 * MiB + 1))], atomic=True)
    assert kv.exists_many([k for k, _ in group]) == [False] * 8

    with pytest.raises(InvalidKey):
        kv.put_many([*group, ("", b"bad key")], atomic=True)
    assert kv.exists_many([k for k, _ in group]) == [False] * 8
    with pytest.raises(ValueError, match="kv/0"):  # the same key twice in one group
        kv.put_many([*group, ("kv/0", b"again")], atomic=True)
    assert kv.exists_many([k for k, _ in group]) == [False] * 8

    assert kv.put_many(group, atomic=True) == [None] * 8
    for key, value in group:
        assert kv.get(key) == value
    replaced = [(k, v[::-1]) for k, v in group]
    assert kv.put_many(replaced, atomic=True, overwrite=True) == [None] * 8
    for key, value in replaced:
        assert kv.get(key) == value


def test_put_many_atomic_full_leaves_nothing(open_store: Opener) -> None:
    kv = open_store(dram_bytes=1 * MiB, offload="off")
    kv.put("pinned", bytes(512 * KiB), pin=Pin.HARD)
    group = [(f"g/{i}", pattern(f"g/{i}", 128 * KiB)) for i in range(6)]  # 768 KiB: no room
    with pytest.raises(StoreFull):
        kv.put_many(group, atomic=True, timeout=0.2)
    assert kv.exists_many([k for k, _ in group]) == [False] * 6
    assert kv.stats()["dram"]["objects"] == 1
    assert kv.get("pinned") == bytes(512 * KiB)


def test_get_many_and_get_into_many(open_store: Opener) -> None:
    kv = open_store()
    keys = [f"b/{i}" for i in range(5)]
    for i, key in enumerate(keys):
        kv.put(key, pattern(key, i * 1000))
    asked = [keys[0], "b/missing", keys[3], keys[4], keys[3]]
    got = kv.get_many(asked)
    assert got[0] == b""
    assert isinstance(got[1], NotFound)
    check_error(got[1], "b/missing")
    assert got[2] == pattern(keys[3], 3000) and got[4] == got[2]
    assert got[3] == pattern(keys[4], 4000)

    buffers = [bytearray(5000) for _ in asked]
    sizes = kv.get_into_many(asked, buffers)
    assert sizes[0] == 0
    assert isinstance(sizes[1], NotFound)
    assert sizes[2] == 3000 and sizes[3] == 4000 and sizes[4] == 3000
    assert buffers[2][:3000] == pattern(keys[3], 3000)
    assert buffers[3][:4000] == pattern(keys[4], 4000)
    assert buffers[1] == bytes(5000)
    with pytest.raises(ValueError, match="2 keys but 1 buffers"):
        kv.get_into_many(keys[:2], [bytearray(10)])
    assert kv.get_many([]) == []
    assert kv.get_into_many([], []) == []


def test_exists_many_remove_many_exists_prefix(open_store: Opener) -> None:
    kv = open_store()
    blocks = [f"seq/{i}" for i in range(6)]
    for key in blocks[:4]:
        kv.put(key, key.encode())
    assert kv.exists_many(blocks) == [True] * 4 + [False] * 2
    assert kv.exists_prefix(blocks) == 4
    assert kv.exists_prefix(["seq/missing", *blocks]) == 0
    assert kv.exists_prefix([]) == 0
    assert kv.exists_prefix(blocks[:3]) == 3
    results = kv.remove_many(["seq/1", "seq/5", "seq/2"])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], NotFound)
    check_error(results[1], "seq/5")
    assert kv.exists_many(blocks) == [True, False, False, True, False, False]
    assert kv.exists_prefix(blocks) == 1
    assert kv.remove_many([]) == []


# -- asyncio twins ----------------------------------------------------------------------------
def test_aio_twins(open_store: Opener) -> None:
    kv = open_store()

    async def main() -> None:
        aio = kv.aio
        await aio.put("a", pattern("a", 7000))
        await aio.put_from("b", np.arange(100, dtype=np.float64))
        with pytest.raises(AlreadyExists):
            await aio.put("a", b"x")
        await aio.put("a", b"replaced", overwrite=True)
        assert await aio.get("a") == b"replaced"
        assert await aio.exists("b")
        assert await aio.size("b") == 800
        out = bytearray(1000)
        assert await aio.get_into("b", out) == 800
        assert out[:800] == np.arange(100, dtype=np.float64).tobytes()
        results = await aio.put_many([("c", b"c"), ("d", b"d"), ("a", b"x")])
        assert results[:2] == [None, None] and isinstance(results[2], AlreadyExists)
        got = await aio.get_many(["c", "nope"])
        assert got[0] == b"c" and isinstance(got[1], NotFound)
        bufs = [bytearray(8), bytearray(8)]
        assert await aio.get_into_many(["c", "d"], bufs) == [1, 1]
        assert await aio.exists_many(["a", "zz"]) == [True, False]
        assert await aio.exists_prefix(["a", "b", "c", "zz", "d"]) == 3
        removed = await aio.remove_many(["c", "zz"])
        assert removed[0] is None and isinstance(removed[1], NotFound)
        assert not await aio.exists("c")
        await aio.remove("d")
        with pytest.raises(NotFound):
            await aio.get("d")
        # Concurrent coroutines on one store.
        await asyncio.gather(*(aio.put(f"g/{i}", pattern(f"g/{i}", 4096)) for i in range(16)))
        values = await asyncio.gather(*(aio.get(f"g/{i}") for i in range(16)))
        assert values == [pattern(f"g/{i}", 4096) for i in range(16)]

    asyncio.run(main())


# -- closed -----------------------------------------------------------------------------------
def test_closed_store_raises_store_closed(open_store: Opener) -> None:
    kv = open_store()
    kv.put("k", b"v")
    kv.close()
    kv.close()  # idempotent
    ops: list[Callable[[], object]] = [
        lambda: kv.put("k2", b"v"), lambda: kv.put_from("k2", b"v"), lambda: kv.get("k"),
        lambda: kv.get_into("k", bytearray(4)), lambda: kv.remove("k"), lambda: kv.exists("k"),
        lambda: kv.size("k"), lambda: kv.pin("k"), lambda: kv.unpin("k"),
        lambda: kv.put_many([("k3", b"v")]), lambda: kv.get_many(["k"]),
        lambda: kv.exists_many(["k"]), lambda: kv.remove_many(["k"]),
        lambda: kv.exists_prefix(["k"]), lambda: kv.get_into_many(["k"], [bytearray(4)])]
    for op in ops:
        with pytest.raises(StoreClosed):
            op()
    with pytest.raises(StoreClosed):
        asyncio.run(kv.aio.get("k"))


def test_close_wakes_a_put_waiting_for_room(open_store: Opener) -> None:
    kv = open_store(dram_bytes=1 * MiB)
    fill_with_hard_pins(kv, 128 * KiB, 9)
    outcome: list[BaseException] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        try:
            kv.put("late", bytes(128 * KiB), timeout=DEADLINE)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    started.wait(DEADLINE)
    kv.close()
    thread.join(DEADLINE / 4)
    assert not thread.is_alive(), "close left a put waiting for room"
    assert len(outcome) == 1 and isinstance(outcome[0], StoreClosed), outcome


def test_context_manager_closes(scheme: Any, tmp_path: Path) -> None:
    with scheme.connect(tmp_path / "ctx", {"dram_bytes": 1 * MiB}) as kv:
        kv.put("k", b"v")
        assert kv.get("k") == b"v"
    with pytest.raises(StoreClosed):
        kv.get("k")


def test_stats_shape(open_store: Opener) -> None:
    kv = open_store(dram_bytes=1 * MiB, offload="on_put")
    kv.put("k", pattern("k", 10000))
    kv.get("k")
    with pytest.raises(NotFound):
        kv.get("absent")
    stats = kv.stats()
    dram, disk, offload, ops = stats["dram"], stats["disk"], stats["offload"], stats["ops"]
    assert dram["capacity"] == 1 * MiB
    assert dram["pages_total"] == 256
    assert dram["pages_used"] == 3  # 10000 B: two full pages and a partial tail
    assert dram["objects"] == 1
    assert dram["used"] in (10000, 3 * 4096)
    assert dram["hits"] >= 1
    assert dram["bytes_in"] >= 10000 and dram["bytes_out"] >= 10000
    assert offload["policy"] == "on_put"
    assert offload["force_evict"] is False
    assert ops["put"] == 1 and ops["get"] >= 1
    assert dram["misses"] >= 1
    for name in ("capacity", "used", "objects", "hits", "misses", "bytes_in", "bytes_out",
                 "errors", "full", "last_error"):
        assert name in disk
    for name in ("queued", "in_flight", "completed", "deferred", "force_dropped", "failed"):
        assert isinstance(offload[name], int)
    for phase in ("allocate", "load", "write", "release"):
        assert set(stats["phases"][phase]) >= {"count", "sum_s", "buckets"}
    kv.remove("k")
    assert kv.stats()["dram"]["objects"] == 0
    # A distributed store keeps a removed object's pages until the read lease of the get
    # above lapses (nobody may reuse pages a reader may still be copying); embedded frees
    # them at once.
    wait_until(kv, lambda: kv.stats()["dram"]["pages_used"] == 0, "the removed object's pages")


# -- concurrent clients -----------------------------------------------------------------------
def test_concurrent_clients(open_store: Opener) -> None:
    kv = open_store(dram_bytes=16 * MiB)
    sizes = [8 * KiB, 100 * KiB + 3, 300 * KiB, 20]
    kv.put("shared", versioned(0, sizes[0]))
    seen: set[int] = set()

    def writer(w: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(1, 150):
                version = w * 1000 + i
                kv.put("shared", versioned(version, sizes[version % 4]), overwrite=True)
        return run

    def reader() -> None:
        out = bytearray(max(sizes))
        for _ in range(300):
            data = kv.get("shared")
            version = version_of(data)
            assert data == versioned(version, sizes[version % 4]), "a mixed version"
            n = kv.get_into("shared", out)
            version = version_of(out)
            assert n == sizes[version % 4]
            assert out[:n] == versioned(version, n), "a mixed version (get_into)"
            seen.add(version)

    def own_keys(t: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(60):
                key = f"t{t}/{i % 7}"
                value = pattern(key, (i * 4099) % (64 * KiB), i)
                kv.put(key, value, overwrite=True)
                assert kv.get(key) == value
                assert kv.size(key) == len(value)
                if i % 5 == 0:
                    kv.remove(key)
                    assert not kv.exists(key)
                kv.stats()
        return run

    run_threads([writer(1), writer(2), reader, reader, own_keys(1), own_keys(2), own_keys(3)])
    assert len(seen) > 1
    final = kv.get("shared")
    assert final == versioned(version_of(final), sizes[version_of(final) % 4])


def test_a_reader_never_sees_a_partial_object(open_store: Opener) -> None:
    kv = open_store(dram_bytes=64 * MiB)
    size = 8 * MiB
    done = threading.Event()
    observed = {"missing": 0, "whole": 0}

    def writer() -> None:
        try:
            for i in range(6):
                kv.put(f"big/{i}", pattern(f"big/{i}", size))
        finally:
            done.set()

    def reader() -> None:
        out = bytearray(size)
        i = 0
        while i < 6:
            finished = done.is_set()
            try:
                n = kv.get_into(f"big/{i}", out)
            except NotFound:
                assert not finished, f"big/{i} missing after its put returned"
                observed["missing"] += 1
                continue
            assert n == size and out == pattern(f"big/{i}", size), f"big/{i} partial"
            observed["whole"] += 1
            i += 1

    run_threads([writer, reader])
    assert observed["whole"] == 6


def test_an_atomic_group_appears_all_at_once(open_store: Opener) -> None:
    kv = open_store(dram_bytes=32 * MiB)
    groups = [[(f"grp{g}/{i}", pattern(f"grp{g}/{i}", 16 * KiB)) for i in range(16)]
              for g in range(10)]
    done = threading.Event()

    def writer() -> None:
        try:
            for group in groups:
                assert kv.put_many(group, atomic=True) == [None] * 16
        finally:
            done.set()

    def reader() -> None:
        # Probing the keys one after the other, a group that appears at once reads as some
        # False then only True: a True before a False means part of the group was visible.
        g = 0
        while g < len(groups):
            finished = done.is_set()
            present = kv.exists_many([k for k, _ in groups[g]])
            assert present == sorted(present), f"group {g} partly visible: {present}"
            if all(present):
                g += 1
            else:
                assert not finished, f"group {g} incomplete after put_many returned"

    run_threads([writer, reader])


def test_a_failed_atomic_group_is_never_visible(open_store: Opener) -> None:
    kv = open_store()
    kv.put("guard", b"present")
    group = [(f"ghost/{i}", pattern(f"ghost/{i}", 32 * KiB)) for i in range(16)]
    stop = threading.Event()

    def writer() -> None:
        try:
            for _ in range(40):
                with pytest.raises(AlreadyExists):
                    kv.put_many([*group, ("guard", b"x")], atomic=True)
        finally:
            stop.set()

    def reader() -> None:
        while not stop.is_set():
            assert not any(kv.exists_many([k for k, _ in group])), "a ghost became visible"

    run_threads([writer, reader])
    assert kv.stats()["dram"]["objects"] == 1


def test_errors_are_one_hierarchy() -> None:
    for cls in (NotFound, AlreadyExists, StoreFull, InvalidKey, ValueTooLarge, StoreClosed):
        assert issubclass(cls, StoreError)
    err = NotFound("no such object", key="k/1", tier="dram")
    assert (err.key, err.tier) == ("k/1", "dram")
    assert "'k/1'" in str(err) and "dram" in str(err)
