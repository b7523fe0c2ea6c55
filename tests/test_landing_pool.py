"""Landings without sockets: large segments land in bytes objects that the decoder hands out
as the value, and the pool that recycles them is bounded, lets go when idle, at close and
after a failed pull, and never writes into an object somebody still holds."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from petasus import hg
from petasus.hg import adopt
from petasus.hg.overflow import Landing, Lease
from petasus.hg.procs import ANY, proc_for
from petasus.hg.scalars import bound_to

MiB = 1 << 20
U32 = struct.Struct("!I")
pytestmark = pytest.mark.skipif(not adopt.ENABLED, reason="this interpreter copies instead")


def land(lease: Lease, data: bytes) -> None:
    """What a pull does: write the encoding into the lease's segments, in order."""
    pos = 0
    for seg in lease.segments:
        seg[:] = data[pos:pos + len(seg)]
        pos += len(seg)
    assert pos == len(data)


def decode(lease: Lease, proc: hg.Proc) -> object:
    return lease.decode(lambda view, table: bound_to(proc, view, None, None, table))  # type: ignore[arg-type]


def encoded_bytes(payload: bytes) -> tuple[bytes, tuple[int, ...]]:
    """The encoding of one bytes argument and the layout an origin exposes it with."""
    return U32.pack(len(payload)) + payload, (4, len(payload))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_large_bytes_value_is_the_object_the_pull_wrote_into() -> None:
    landing = Landing(1 << 30)
    payload = os.urandom(2 * MiB)
    data, sizes = encoded_bytes(payload)
    lease = landing.take(len(data), sizes)
    assert len(lease.slots) == 1 and len(lease.segments) == 2
    slot = lease.slots[0][1]
    land(lease, data)
    value = decode(lease, proc_for(bytes))
    assert value is slot and type(value) is bytes and value == payload
    landing.give(lease)
    landing.close()


def test_the_pool_recycles_an_object_once_its_receiver_lets_go() -> None:
    landing = Landing(1 << 30)
    first, sizes = encoded_bytes(os.urandom(2 * MiB))
    lease = landing.take(len(first), sizes)
    land(lease, first)
    value = decode(lease, proc_for(bytes))
    landing.give(lease)
    ident, stale = id(value), hash(value)  # the hash is cached in the object
    # Held by its receiver: the next pull of that size lands in another object.
    second, _ = encoded_bytes(os.urandom(2 * MiB))
    lease = landing.take(len(second), sizes)
    other = lease.slots[0][1]
    assert other is not value and landing.pool.reused == 0
    land(lease, second)
    kept = decode(lease, proc_for(bytes))
    landing.give(lease)
    assert value == first[4:] and kept == second[4:]
    del value, other
    # Let go of: the next pull of that size lands in it, its cached hash forgotten.
    third, _ = encoded_bytes(os.urandom(2 * MiB))
    lease = landing.take(len(third), sizes)
    land(lease, third)
    again = decode(lease, proc_for(bytes))
    landing.give(lease)
    assert id(again) == ident and landing.pool.reused == 1
    assert again == third[4:] and hash(again) == hash(bytes(bytearray(third[4:])))
    assert hash(again) != stale
    landing.close()
    assert len(landing.pool) == 0


def test_the_pool_is_bounded_in_objects_and_bytes() -> None:
    pool = adopt.Pool(limit=10 * MiB)
    objs = [pool.lend(MiB + k, now=float(k)) for k in range(adopt.POOL_SLOTS + 3)]
    for k, obj in enumerate(objs):
        pool.keep(obj, now=float(k))  # type: ignore[arg-type]
    assert len(pool) == adopt.POOL_SLOTS and pool.held <= 10 * MiB
    big = pool.lend(11 * MiB, now=0.0)
    pool.keep(big, now=99.0)  # type: ignore[arg-type]
    assert all(obj is not big for obj in pool._kept)  # larger than the limit: never kept
    for k in range(3):
        pool.keep(pool.lend(4 * MiB + k, now=100.0), now=100.0)  # type: ignore[arg-type]
    assert pool.held <= 10 * MiB


def test_the_pool_lets_go_when_idle_and_the_trim_says_when_next() -> None:
    pool = adopt.Pool()
    pool.keep(pool.lend(MiB, now=0.0), now=0.0)  # type: ignore[arg-type]
    pool.keep(pool.lend(2 * MiB, now=1.0), now=1.0)  # type: ignore[arg-type]
    assert pool.trim(adopt.POOL_IDLE - 0.5) == adopt.POOL_IDLE and len(pool) == 2
    assert pool.trim(adopt.POOL_IDLE) == 1.0 + adopt.POOL_IDLE and len(pool) == 1
    assert pool.trim(1.0 + adopt.POOL_IDLE) is None and len(pool) == 0


def test_a_failed_pull_keeps_nothing() -> None:
    landing = Landing(1 << 30)
    data, sizes = encoded_bytes(os.urandom(2 * MiB))
    lease = landing.take(len(data), sizes)
    land(lease, data)
    decode(lease, proc_for(bytes))
    landing.give(lease)
    assert len(landing.pool) == 1
    lease = landing.take(len(data), sizes)  # the kept one, lent again
    assert landing.pool.reused == 1
    landing.give(lease, complete=False)  # a pull that failed half-way: its bytes are junk
    assert len(landing.pool) == 0 and landing.landings == 0
    landing.close()


def test_layouts_that_are_not_one_bytes_value_are_decoded_from_a_copy() -> None:
    landing = Landing(1 << 30)
    # A str split where a bytes value would be: the prefix matches, the type does not.
    text = "é" * MiB
    encoded = proc_for(str).encode(text)
    lease = landing.take(len(encoded), (4, len(encoded) - 4))
    land(lease, encoded)
    assert decode(lease, proc_for(str)) == text
    landing.give(lease)
    # Two bytes values, the large segment a peer cut across both of them.
    proc = proc_for(tuple[bytes, bytes])
    a, b = os.urandom(MiB), os.urandom(MiB)
    encoded = proc.encode((a, b))
    lease = landing.take(len(encoded), (2, MiB + 4, len(encoded) - MiB - 6))
    land(lease, encoded)
    assert decode(lease, proc) == (a, b)
    landing.give(lease)
    # Only the first value has a segment of its own: it is adopted, the second copied.
    lease = landing.take(len(encoded), (4, MiB, len(encoded) - MiB - 4))
    land(lease, encoded)
    value = decode(lease, proc)
    assert value == (a, b) and value[0] is lease.slots[0][1]  # type: ignore[index]
    landing.give(lease)
    # A decoder that fails on the bytes it did not find (msgpack reads zeros: extra data)
    # is run again on the copy.
    blob = {"blob": os.urandom(2 * MiB)}
    encoded = ANY.encode(blob)
    lease = landing.take(len(encoded), (4, len(encoded) - 4))
    land(lease, encoded)
    assert decode(lease, ANY) == blob
    landing.give(lease)
    landing.close()


def test_without_the_c_api_every_value_is_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adopt, "_API", None)
    landing = Landing(1 << 30)
    data, sizes = encoded_bytes(os.urandom(2 * MiB))
    lease = landing.take(len(data), sizes)
    assert not lease.slots and len(lease.segments) == 1
    land(lease, data)
    assert decode(lease, proc_for(bytes)) == data[4:]
    landing.give(lease)
    landing.close()


def test_a_huge_declared_segment_costs_no_resident_memory() -> None:
    landing = Landing(1 << 40, 1 << 40)
    before = rss()
    lease = landing.take(1 << 30, (4, (1 << 30) - 4))
    assert len(lease.slots) == 1 and landing.landings == 1
    assert rss() - before < 64 * MiB
    landing.give(lease, complete=False)
    assert len(landing.pool) == 0 and landing.landings == 0
    landing.close()


_TWIN = """
import threading
from petasus import hg
from petasus.hg import adopt

@hg.declare
def echo(data: bytes) -> bytes: ...

assert not adopt.ENABLED
server = hg.Engine("tcp://127.0.0.1:0", listen=True)
server.register(echo, lambda data: data[::-1])
threading.Thread(target=server.serve, kwargs={"handle_signals": False}, daemon=True).start()
with hg.Engine("tcp://127.0.0.1:0") as client:
    client.declare(echo)
    data = bytes(range(256)) * (12 << 12)  # 3 MiB: segments large enough to be adopted
    for _ in range(3):
        assert client.lookup(server.uri).echo.call(data, timeout=20) == data[::-1]
server.shutdown()
print("ok")
"""


def test_the_copy_twin_runs_end_to_end_with_petasus_adopt_0() -> None:
    """STYLE 10: the pure-Python twin (``PETASUS_ADOPT=0``) serves large bytes arguments and
    results too, in a process of its own (the switch is read at import)."""
    out = subprocess.run([sys.executable, "-c", _TWIN], env=dict(os.environ, PETASUS_ADOPT="0"),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
