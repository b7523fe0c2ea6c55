"""The store against a dict: hypothesis drives random puts, batches, overwrites, reads, removes,
pins and bursts of eviction pressure through a tiny arena (1 MiB of 4 KiB pages), under every
offload policy, on every scheme of store_kit.SCHEMES.

The invariants (DESIGN.md, Store; store/api.py):
- with a disk tier and force_evict=False, no acknowledged object is ever lost or altered:
  every read returns exactly the model's bytes (a put may fail with StoreFull, and then the
  model, old value included, is unchanged);
- with force_evict=True or offload="off" an object may vanish, but then it is NotFound
  (everywhere: get, get_into, size, exists, remove, pin), never wrong bytes; the model learns
  it is gone. A hard-pinned object never vanishes;
- whatever the policy, the store never has a key the model does not (a put that failed, a
  removed key), and DRAM use stays within the arena.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import store_kit
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from store_kit import PUT_TIMEOUT, KiB, MiB, Scheme, check_error, pattern

from petasus.store import AlreadyExists, NotFound, Pin, Store, StoreFull

scheme = store_kit.scheme

ARENA = 1 * MiB
PAGE = 4096
KEYS = [f"k{i}" for i in range(10)]
BURST_KEYS = [f"burst/{i}" for i in range(8)]
ALL_KEYS = KEYS + BURST_KEYS
# Hard pins are capped at a quarter of the arena (counting every key that may still be
# hard-pinned), so that eviction always has room to work with: a model whose arena is all
# hard pins would spend each step waiting put_timeout for a StoreFull.
HARD_BUDGET_PAGES = ARENA // PAGE // 4

# A short offload queue, so that eviction outruns the disk copies: candidates are deferred
# (force_evict=False) or dropped (force_evict=True), not only written.
OFFLOAD_QUEUE = 2

keys = st.sampled_from(ALL_KEYS)
# Small objects and large ones (a few fill the arena): both page tails and pressure.
sizes = st.one_of(st.integers(0, 2 * PAGE + 1), st.integers(0, 300 * KiB))
pins = st.sampled_from([Pin.NONE, Pin.SOFT, Pin.HARD])

SETTINGS = settings(max_examples=50, stateful_step_count=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow], database=None)


def pages(size: int) -> int:
    return -(-size // PAGE)


def config(offload: str, force_evict: bool) -> dict[str, Any]:
    return {"dram_bytes": ARENA, "page_size": PAGE, "offload": offload,
            "force_evict": force_evict, "put_timeout": PUT_TIMEOUT,
            "offload_queue": OFFLOAD_QUEUE, "offload_workers": 1}


class StoreMachine(RuleBasedStateMachine):
    scheme: Scheme
    offload: str
    force_evict: bool
    # Opens the example's store in a directory (store_kit.Scheme.shared).
    open: Callable[[Path], Store]

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="petasus-model-"))
        self.kv = self.open(self.dir / "store")
        # A backend shared by the examples (a cluster) starts each one empty: whatever an
        # earlier example left (it failed before its teardown) goes first.
        self.shared = self.scheme.share is not None
        if self.shared:
            self.kv.remove_many(ALL_KEYS)
            assert not any(self.kv.exists_many(ALL_KEYS)), "the shared store is not empty"
        # Objects may vanish (and then must be NotFound) only when the store may drop them.
        self.lossy = self.force_evict or self.offload == "off" or not self.scheme.has_disk
        self.model: dict[str, bytes] = {}
        self.maybe_hard: set[str] = set()  # may be hard-pinned (the budget counts these)
        self.hard: set[str] = set()  # certainly hard-pinned: never dropped
        self.version = 0

    def teardown(self) -> None:
        try:
            self.check_everything()
        finally:
            try:
                if self.shared:
                    self.kv.remove_many(ALL_KEYS)
            finally:
                self.kv.close()
                shutil.rmtree(self.dir, ignore_errors=True)

    # --- the model's bookkeeping ------------------------------------------------------------
    def value(self, key: str, size: int) -> bytes:
        self.version += 1
        return pattern(key, size, self.version)

    def hard_pages(self, key: str | None = None, size: int = 0) -> int:
        """Pages that may be hard-pinned, with ``key`` (hard-pinned) at ``size`` bytes."""
        held = {k: len(self.model.get(k, b"")) for k in self.maybe_hard}
        if key is not None:
            held[key] = max(size, held.get(key, 0))
        return sum(pages(n) for n in held.values())

    def gone(self, key: str, how: str) -> None:
        """The store says ``key`` is absent: fine if the model agrees, or if objects may
        vanish (then the model learns), a lost object otherwise."""
        if key not in self.model:
            return
        assert self.lossy, f"acknowledged object {key!r} lost ({how}, offload={self.offload})"
        assert key not in self.hard, f"hard-pinned {key!r} was dropped ({how})"
        del self.model[key]
        self.maybe_hard.discard(key)

    def present(self, key: str, how: str) -> None:
        assert key in self.model, f"the store has {key!r}, which the model does not ({how})"

    # --- rules ------------------------------------------------------------------------------
    @rule(key=keys, size=sizes, overwrite=st.booleans(), pin=pins)
    def put(self, key: str, size: int, overwrite: bool, pin: Pin) -> None:
        if pin is Pin.HARD and self.hard_pages(key, size) > HARD_BUDGET_PAGES:
            pin = Pin.SOFT
        if key in self.maybe_hard and self.hard_pages(key, size) > HARD_BUDGET_PAGES:
            return  # a pin may survive the overwrite: keep within the budget
        value = self.value(key, size)
        try:
            self.kv.put(key, value, overwrite=overwrite, pin=pin)
        except AlreadyExists as exc:
            check_error(exc, key)
            assert not overwrite, f"AlreadyExists for {key!r} with overwrite=True"
            self.present(key, "put raised AlreadyExists")
            return
        except StoreFull as exc:
            check_error(exc, key)  # allowed; the model (and the old value) stay as they were
            return
        if key in self.model and not overwrite:
            assert self.lossy, f"put of present {key!r} without overwrite succeeded"
            assert key not in self.hard, f"hard-pinned {key!r} was dropped (put succeeded)"
        self.model[key] = value
        self.hard.discard(key)
        if pin is Pin.HARD:
            self.maybe_hard.add(key)
            self.hard.add(key)

    @rule(batch=st.lists(st.tuples(keys, sizes), min_size=1, max_size=4,
                         unique_by=lambda item: item[0]),
          overwrite=st.booleans(), atomic=st.booleans())
    def put_many(self, batch: list[tuple[str, int]], overwrite: bool, atomic: bool) -> None:
        batch = [(k, n) for k, n in batch if k not in self.maybe_hard]  # the pin budget
        items = [(key, self.value(key, size)) for key, size in batch]
        try:
            results = self.kv.put_many(items, overwrite=overwrite, atomic=atomic)
        except AlreadyExists as exc:
            assert atomic and not overwrite, f"put_many raised {exc!r}"
            self.present(exc.key or "", "put_many raised AlreadyExists")
            return
        except StoreFull as exc:
            assert atomic, f"put_many raised {exc!r}"
            return  # nothing of the group is visible, nothing changed
        assert len(results) == len(items)
        if atomic:
            assert results == [None] * len(items)
        for (key, value), result in zip(items, results):
            if isinstance(result, AlreadyExists):
                check_error(result, key)
                assert not overwrite
                self.present(key, "put_many reported AlreadyExists")
                continue
            if isinstance(result, StoreFull):
                check_error(result, key)
                continue
            assert result is None, f"put_many {key!r}: {result!r}"
            if key in self.model and not overwrite:
                assert self.lossy, f"put_many of present {key!r} without overwrite succeeded"
                assert key not in self.hard, f"hard-pinned {key!r} was dropped (put_many)"
            self.model[key] = value
            self.hard.discard(key)

    @rule(key=keys)
    def get(self, key: str) -> None:
        try:
            data = self.kv.get(key)
        except NotFound as exc:
            check_error(exc, key)
            self.gone(key, "get")
            return
        self.present(key, "get")
        assert data == self.model[key], f"wrong bytes for {key!r}"

    @rule(key=keys, extra=st.integers(0, 5000))
    def get_into(self, key: str, extra: int) -> None:
        size = len(self.model.get(key, b""))
        buf = bytearray(b"\xa5" * (size + extra))
        try:
            n = self.kv.get_into(key, buf)
        except NotFound as exc:
            check_error(exc, key)
            self.gone(key, "get_into")
            return
        self.present(key, "get_into")
        assert n == size
        assert buf[:n] == self.model[key], f"wrong bytes for {key!r} (get_into)"
        assert buf[n:] == b"\xa5" * extra, f"get_into {key!r} wrote past the object"

    # Rules draw from fixed strategies only: which keys the model holds depends on the
    # store's background threads (what got dropped when), and hypothesis replays a test case
    # by replaying its draws.
    @rule(key=keys)
    def get_into_too_small(self, key: str) -> None:
        if not self.model.get(key):
            return
        try:
            with pytest.raises(ValueError):
                self.kv.get_into(key, bytearray(len(self.model[key]) - 1))
        except NotFound as exc:
            check_error(exc, key)
            self.gone(key, "get_into (too small)")

    @rule(key=keys)
    def size_and_exists(self, key: str) -> None:
        present = self.kv.exists(key)
        if not present:
            self.gone(key, "exists")
            with pytest.raises(NotFound):
                self.kv.size(key)
            return
        self.present(key, "exists")
        try:
            assert self.kv.size(key) == len(self.model[key])
        except NotFound:
            self.gone(key, "size")

    @rule(key=keys)
    def remove(self, key: str) -> None:
        try:
            self.kv.remove(key)
        except NotFound as exc:
            check_error(exc, key)
            self.gone(key, "remove")
            return
        self.present(key, "remove")
        del self.model[key]
        self.maybe_hard.discard(key)
        self.hard.discard(key)

    @rule(key=keys, mode=pins)
    def pin(self, key: str, mode: Pin) -> None:
        if mode is Pin.HARD and self.hard_pages(key, len(self.model.get(key, b""))) > \
                HARD_BUDGET_PAGES:
            mode = Pin.SOFT
        try:
            self.kv.pin(key, mode)
        except NotFound as exc:
            check_error(exc, key)
            self.gone(key, "pin")
            return
        self.present(key, "pin")
        if mode is Pin.HARD:
            self.maybe_hard.add(key)
            self.hard.add(key)
        else:
            self.maybe_hard.discard(key)
            self.hard.discard(key)

    @rule(key=keys)
    def unpin(self, key: str) -> None:
        self.pin(key, Pin.NONE)

    @rule(first=st.integers(0, len(BURST_KEYS) - 1), count=st.integers(2, 6),
          size=st.integers(100 * KiB, 250 * KiB))
    def burst(self, first: int, count: int, size: int) -> None:
        """Several large overwrites in a row: up to 1.5 arenas, so eviction must run."""
        for i in range(count):
            key = BURST_KEYS[(first + i) % len(BURST_KEYS)]
            self.put(key, size + i * PAGE, True, Pin.NONE)

    @rule()
    def check_everything(self) -> None:
        for key in ALL_KEYS:
            if key in self.model:
                self.get(key)
            else:
                assert not self.kv.exists(key), f"{key!r} is in the store, not in the model"

    @invariant()
    def dram_within_the_arena(self) -> None:
        stats = self.kv.stats()
        assert stats["dram"]["pages_used"] <= stats["dram"]["pages_total"] == ARENA // PAGE
        assert stats["dram"]["used"] <= stats["dram"]["capacity"]
        if not self.force_evict:
            assert stats["offload"]["force_dropped"] == 0


def machine(scheme: Scheme, offload: str, force_evict: bool,
            open_: Callable[[Path], Store]) -> type[StoreMachine]:
    name = f"Store_{scheme.id}_{offload}_{'force' if force_evict else 'keep'}"
    attrs: dict[str, Any] = {"scheme": scheme, "offload": offload, "force_evict": force_evict,
                             "open": staticmethod(open_)}
    return type(name, (StoreMachine,), attrs)


@pytest.mark.parametrize("force_evict", [False, True], ids=["keep", "force"])
@pytest.mark.parametrize("offload", ["on_put", "on_evict", "off"])
def test_store_matches_the_model(scheme: Scheme, offload: str, force_evict: bool,
                                 tmp_path: Path) -> None:
    with scheme.shared(tmp_path / "shared", config(offload, force_evict)) as open_:
        run_state_machine_as_test(machine(scheme, offload, force_evict, open_),
                                  settings=settings(SETTINGS, max_examples=scheme.model_examples))
