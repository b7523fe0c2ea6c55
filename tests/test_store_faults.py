"""Crashes and faults of the embedded scheme's disk tier: kill -9 mid-offload, damaged and
truncated object files, a full disk (a budget, and a real ENOSPC on a 1 MiB tmpfs), unusable
paths, bad configuration, a directory in use, disk-only reads and promotion, restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from store_kit import DEADLINE, KiB, MiB, check_error, pattern

from petasus import store
from petasus.store import (
    ConfigError,
    NotFound,
    ObjectLost,
    Pin,
    StoreConfig,
    StoreError,
    StoreFull,
)

HERE = Path(__file__).resolve().parent


def connect(path: Path, **config: object) -> store.Store:
    config.setdefault("put_timeout", 2.0)
    return store.connect(f"embedded://{path}", **config)


def flush(kv: store.Store) -> None:
    kv.flush(timeout=DEADLINE)  # type: ignore[attr-defined]


# -- (a) kill -9 in the middle of offloads ----------------------------------------------------
@pytest.mark.parametrize("rounds", [1, 3])
def test_kill_during_offload_keeps_every_durable_object(tmp_path: Path, rounds: int) -> None:
    directory = tmp_path / "crash"
    writer = subprocess.Popen([sys.executable, str(HERE / "store_crash_writer.py"),
                               str(directory)], stdout=subprocess.PIPE, text=True)
    durable: dict[str, int] = {}
    acked: dict[str, int] = {}
    watchdog = threading.Timer(DEADLINE, writer.kill)  # a hung writer ends the read below
    watchdog.start()
    try:
        # Kill once `rounds` flushes are reported and the next round's puts (whose disk
        # copies are queued or being written) are under way.
        after = 0
        for line in writer.stdout:  # type: ignore[union-attr]
            what, key, size = line.split()
            (durable if what == "durable" else acked)[key] = int(size)
            if what == "acked" and len(durable) >= rounds * 6:
                after += 1
                if after == 4:
                    break
        else:
            pytest.fail(f"the writer exited ({writer.wait(DEADLINE)}) before it was killed")
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(DEADLINE) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if writer.poll() is None:
            writer.kill()
            writer.wait(DEADLINE)
        writer.stdout.close()  # type: ignore[union-attr]
    assert len(durable) >= rounds * 6

    with connect(directory, offload="on_put") as kv:
        for key, size in durable.items():
            assert kv.get(key) == pattern(key, size), f"durable {key} damaged after kill -9"
        # Acknowledged but maybe not yet on disk, and the put in progress at the kill: absent
        # or exact, never torn, never lost as damaged.
        last = max(int(k.split("/")[1]) for k in acked)
        for i in range(last + 2):
            key = f"obj/{i}"
            if key in durable:
                continue
            try:
                data = kv.get(key)
            except NotFound as exc:
                check_error(exc, key)
                continue
            assert data == pattern(key, len(data)), f"{key} torn after kill -9"
        assert kv.stats()["disk"]["objects"] >= len(durable)


# -- (b) damaged and truncated object files ---------------------------------------------------
def file_holding(directory: Path, value: bytes) -> tuple[Path, int]:
    """The file under ``directory`` whose bytes contain ``value``, and where it starts."""
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        offset = path.read_bytes().find(value)
        if offset >= 0:
            return path, offset
    raise AssertionError(f"no file under {directory} holds the object's bytes")


def persisted(directory: Path, objects: dict[str, bytes]) -> None:
    with connect(directory, offload="on_put") as kv:
        for key, value in objects.items():
            kv.put(key, value)
        flush(kv)


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def damaged(directory: Path, while_open: bool, damage: Callable[[], object]) -> store.Store:
    """The store over ``directory`` with an object file damaged before it opens (found at
    restart) or after (found by the read)."""
    if while_open:
        kv = connect(directory)
        damage()
        return kv
    damage()
    return connect(directory)


@pytest.mark.parametrize("while_open", [False, True], ids=["after-restart", "while-open"])
def test_a_damaged_object_is_lost_never_wrong_bytes(tmp_path: Path, while_open: bool) -> None:
    directory = tmp_path / "damaged"
    victim, bystander = pattern("victim", 200 * KiB + 3), pattern("bystander", 50 * KiB)
    persisted(directory, {"victim": victim, "bystander": bystander})
    path, offset = file_holding(directory, victim)
    with damaged(directory, while_open, lambda: flip(path, offset + 100 * KiB)) as kv:
        with pytest.raises(ObjectLost) as info:
            kv.get("victim")
        check_error(info.value, "victim")
        assert info.value.tier == "disk"
        with pytest.raises(ObjectLost):
            kv.get_into("victim", bytearray(300 * KiB))
        assert kv.get("bystander") == bystander
        assert kv.get_many(["bystander"]) == [bystander]


@pytest.mark.parametrize("while_open", [False, True], ids=["after-restart", "while-open"])
def test_a_truncated_object_is_lost_never_short(tmp_path: Path, while_open: bool) -> None:
    directory = tmp_path / "truncated"
    victim, bystander = pattern("victim", 300 * KiB), pattern("bystander", 10 * KiB)
    persisted(directory, {"victim": victim, "bystander": bystander})
    path, offset = file_holding(directory, victim)
    with damaged(directory, while_open, lambda: os.truncate(path, offset + 100 * KiB)) as kv:
        with pytest.raises(ObjectLost) as info:
            kv.get("victim")
        check_error(info.value, "victim")
        with pytest.raises(ObjectLost):
            kv.get_into("victim", np.zeros(300 * KiB, dtype=np.uint8))
        assert kv.get("bystander") == bystander


# -- (c) a full disk --------------------------------------------------------------------------
def assert_kept_in_dram(kv: store.Store, objects: dict[str, bytes]) -> None:
    stats = kv.stats()
    assert stats["disk"]["full"] is True
    assert stats["offload"]["failed"] >= 1
    assert stats["disk"]["errors"] >= 1
    assert stats["disk"]["last_error"]
    assert stats["offload"]["force_dropped"] == 0
    for key, value in objects.items():
        assert kv.get(key) == value


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_budget_full_keeps_data_in_dram(tmp_path: Path, workers: int) -> None:
    # With two workers the one copy that fits can finish after the others failed for
    # space: the disk is still full (nothing was freed), and stats must still say so.
    objects = {f"o/{i}": pattern(f"o/{i}", 64 * KiB) for i in range(8)}
    with connect(tmp_path / "budget", offload="on_put", dram_bytes=4 * MiB,
                 disk_bytes=100 * KiB, offload_workers=workers) as kv:
        for key, value in objects.items():
            kv.put(key, value)
        with pytest.raises(StoreFull) as info:
            flush(kv)
        assert info.value.tier == "disk"
        assert_kept_in_dram(kv, objects)
        stats = kv.stats()
        assert stats["disk"]["used"] <= 100 * KiB
        assert stats["offload"]["completed"] + stats["offload"]["failed"] >= 8
        assert stats["dram"]["objects"] == 8


def test_disk_budget_full_under_pressure_is_store_full_not_loss(tmp_path: Path) -> None:
    with connect(tmp_path / "pressure", offload="on_evict", dram_bytes=1 * MiB,
                 disk_bytes=64 * KiB) as kv:
        objects: dict[str, bytes] = {}
        for i in range(12):  # 1.5 MiB of 128 KiB objects: none fits the disk budget
            key = f"p/{i}"
            try:
                kv.put(key, pattern(key, 128 * KiB), timeout=0.3)
            except StoreFull as exc:
                check_error(exc, key)
                assert not kv.exists(key)
                break
            objects[key] = pattern(key, 128 * KiB)
        else:
            pytest.fail("1.5 MiB fit in a 1 MiB arena with a 64 KiB disk")
        assert len(objects) >= 7
        assert_kept_in_dram(kv, objects)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_real_enospc_keeps_data_in_dram(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=1m") as mnt:
        objects = {f"e/{i}": pattern(f"e/{i}", 256 * KiB) for i in range(6)}
        kv = connect(mnt / "store", offload="on_put", dram_bytes=8 * MiB)
        try:
            for key, value in objects.items():
                kv.put(key, value)
            with pytest.raises(StoreFull):
                flush(kv)
            assert_kept_in_dram(kv, objects)
            assert "space" in kv.stats()["disk"]["last_error"].lower()
        finally:
            kv.close()
        # What did reach the disk is complete: a restart finds exact bytes or nothing.
        with connect(mnt / "store") as again:
            for key, value in objects.items():
                try:
                    assert again.get(key) == value
                except NotFound:
                    pass


# -- (d) unusable paths, bad configuration ----------------------------------------------------
def test_a_path_under_a_regular_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a directory")
    for path in (plain / "store", plain):
        with pytest.raises(StoreError, match=str(path)):
            connect(path)
    assert plain.read_text() == "not a directory"


def test_a_read_only_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt, \
            pytest.raises(StoreError, match=str(mnt / "store")):
        connect(mnt / "store")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any directory")
def test_an_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(StoreError, match=str(locked)):
        connect(locked)


BAD_OPTIONS = [
    {"dram_bytes": -1}, {"dram_bytes": 0}, {"dram_bytes": "1 GiB"}, {"dram_bytes": True},
    {"dram_bytes": 1.5 * MiB}, {"page_size": 3000}, {"page_size": 0},
    {"dram_bytes": 4096, "page_size": 8192}, {"high_watermark": 0.5, "low_watermark": 0.8},
    {"high_watermark": 1.5}, {"low_watermark": 0}, {"low_watermark": -0.1},
    {"offload": "sometimes"}, {"max_key_bytes": 0}, {"max_value_bytes": -1},
    {"offload_queue": 0}, {"offload_workers": 0}, {"put_timeout": -1},
    {"put_timeout": "soon"}, {"disk_bytes": -5}, {"disk_bytes": "lots"}, {"no_such_knob": 1},
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=[json.dumps(o) for o in BAD_OPTIONS])
def test_bad_configuration_is_a_config_error(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        store.connect("embedded://", **options)
    assert isinstance(info.value, ValueError)
    named = next(iter(options))
    assert named in str(info.value) or "watermark" in str(info.value)


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dram_byte"):
        store.connect(f"embedded://{tmp_path}", dram_byte=1 * MiB)
    assert not (tmp_path / "LOCK").exists()


def test_config_from_json(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    config = StoreConfig(dram_bytes=2 * MiB, offload="on_put", high_watermark=0.8)
    good.write_text(json.dumps(config.to_dict()))
    loaded = StoreConfig.from_json(good)
    assert loaded == config
    with store.connect(f"embedded://{tmp_path / 's'}", config=loaded) as kv:
        assert kv.stats()["dram"]["capacity"] == 2 * MiB
        assert kv.stats()["offload"]["policy"] == "on_put"

    cases = {"missing.json": None, "syntax.json": "{dram_bytes: 1", "list.json": "[1, 2]",
             "unknown.json": '{"dram_bytes": 1048576, "colour": "blue"}',
             "value.json": '{"dram_bytes": -1}', "type.json": '{"offload": 3}'}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError) as info:
            StoreConfig.from_json(path)
        if name in ("missing.json", "syntax.json", "list.json"):
            assert str(path) in str(info.value)


def test_bad_uris() -> None:
    with pytest.raises(ValueError, match="redis://"):
        store.connect("redis://localhost")
    with pytest.raises(TypeError):
        store.connect(b"embedded://")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.connect("embedded://", config=StoreConfig(), dram_bytes=MiB)


# -- (e) one store per directory --------------------------------------------------------------
OPEN_IN_CHILD = """
import sys
from petasus import store
try:
    store.connect("embedded://" + sys.argv[1]).close()
except store.StoreError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("opened")
"""


def open_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", OPEN_IN_CHILD, str(path)], capture_output=True,
                          text=True, timeout=DEADLINE, check=False)


def test_a_directory_in_use_by_another_process(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    with connect(directory) as kv:
        kv.put("k", b"v")
        child = open_in_child(directory)
        assert child.returncode == 3, child.stdout + child.stderr
        assert "in use" in child.stdout and str(directory) in child.stdout
        with pytest.raises(StoreError, match=str(directory)):
            connect(directory)  # nor twice in one process
        assert kv.get("k") == b"v"
    child = open_in_child(directory)
    assert child.returncode == 0, child.stdout + child.stderr
    assert child.stdout.strip() == "opened"


# -- (f) disk-only objects, promotion, restarts -----------------------------------------------
def evict_to_disk(kv: store.Store, value: bytes) -> None:
    """Put ``value`` as "cold", give it a disk copy, then fill DRAM with hard-pinned objects
    until it must leave: it is the only object eviction may take."""
    kv.put("cold", value)
    flush(kv)
    kv.put("hard/0", bytes(256 * KiB), pin=Pin.HARD)
    kv.put("hard/1", bytes(256 * KiB), pin=Pin.HARD)
    kv.put("hard/2", bytes(400 * KiB), pin=Pin.HARD)  # does not fit beside "cold"
    assert kv.stats()["dram"]["evictions"] == 1


@pytest.mark.parametrize("offload", ["on_put", "on_evict"])
def test_a_disk_only_object_reads_back_exactly(tmp_path: Path, offload: str) -> None:
    value = pattern("cold", 128 * KiB + 1)
    with connect(tmp_path / "s", offload=offload, dram_bytes=1 * MiB) as kv:
        evict_to_disk(kv, value)
        before = kv.stats()
        assert kv.exists("cold") and kv.size("cold") == len(value)
        assert kv.get("cold") == value
        out = np.full(200 * KiB, 7, dtype=np.uint8)
        assert kv.get_into("cold", out) == len(value)
        assert out[: len(value)].tobytes() == value and (out[len(value):] == 7).all()
        after = kv.stats()
        assert after["disk"]["hits"] == before["disk"]["hits"] + 2
        assert after["dram"]["hits"] == before["dram"]["hits"]
        assert after["disk"]["bytes_out"] >= before["disk"]["bytes_out"] + 2 * len(value)
        assert kv.get_many(["cold", "hard/0"]) == [value, bytes(256 * KiB)]


def test_promote_on_hit_brings_it_back_to_dram(tmp_path: Path) -> None:
    value = pattern("cold", 128 * KiB)
    with connect(tmp_path / "s", offload="on_put", dram_bytes=1 * MiB,
                 promote_on_hit=True) as kv:
        evict_to_disk(kv, value)
        kv.remove("hard/2")  # room for the promotion
        first = kv.stats()
        assert kv.get("cold") == value  # from disk, copied back
        second = kv.stats()
        assert second["disk"]["hits"] == first["disk"]["hits"] + 1
        assert second["ops"]["promotions"] == first["ops"]["promotions"] + 1
        assert kv.get("cold") == value  # from DRAM
        third = kv.stats()
        assert third["dram"]["hits"] == second["dram"]["hits"] + 1
        assert third["disk"]["hits"] == second["disk"]["hits"]


def test_without_promotion_it_stays_on_disk(tmp_path: Path) -> None:
    value = pattern("cold", 128 * KiB)
    with connect(tmp_path / "s", offload="on_put", dram_bytes=1 * MiB) as kv:
        evict_to_disk(kv, value)
        kv.remove("hard/2")
        first = kv.stats()
        assert kv.get("cold") == value
        assert kv.get("cold") == value
        second = kv.stats()
        assert second["disk"]["hits"] == first["disk"]["hits"] + 2
        assert second["dram"]["hits"] == first["dram"]["hits"]


def test_restart_finds_every_offloaded_object(tmp_path: Path) -> None:
    directory = tmp_path / "restart"
    with connect(directory, offload="on_put") as kv:
        for i in range(10):
            kv.put(f"r/{i}", pattern(f"r/{i}", i * 10 * KiB))
        kv.put("r/3", pattern("r/3", 5000, 2), overwrite=True)  # the newer version wins
        kv.remove("r/4")  # and a removed object stays removed
        flush(kv)
    with connect(directory, offload="on_evict") as kv:
        kv.put("hot", b"only in DRAM")
        flush(kv)  # flush gives DRAM-only objects a disk copy under on_evict too
    with connect(directory, offload="on_put") as kv:
        for i in range(10, 20):  # a clean close finishes the queued copies
            kv.put(f"r/{i}", pattern(f"r/{i}", 300 * KiB))
    with connect(directory) as kv:
        for i in range(10, 20):
            assert kv.get(f"r/{i}") == pattern(f"r/{i}", 300 * KiB)
        for i in range(10):
            if i == 4:
                assert not kv.exists("r/4")
                continue
            expected = pattern("r/3", 5000, 2) if i == 3 else pattern(f"r/{i}", i * 10 * KiB)
            assert kv.get(f"r/{i}") == expected
        assert kv.get("hot") == b"only in DRAM"
        assert kv.stats()["disk"]["objects"] == 20


def test_a_temporary_store_removes_its_directory() -> None:
    kv = store.connect("embedded://", dram_bytes=1 * MiB, offload="on_put")
    kv.put("k", b"v")
    flush(kv)
    path = Path(kv.path)  # type: ignore[attr-defined]
    assert path.is_dir()
    kv.close()
    assert not path.exists()
