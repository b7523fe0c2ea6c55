"""Every proc's decode (hg/procs.py, hg/scalars.py), as the target decodes an RPC's input and the
origin its output: ``Proc.loads`` of the whole payload.

The input's first byte picks the proc from ``PROCS`` (numbers, bool, str, bytes, buffers,
optional, lists of fixed and variable items, tuples fixed and variable, dicts, dataclasses flat
and nested, the msgpack "any", bulk handles, and a declared RPC's argument record).

Contract (``hg.errors.DecodeError``'s docstring; the target answers DECODE_ERROR): DecodeError.
Invariants: a decoded value is no larger than the bytes it came from (``footprint``: a count
cannot make us build more than the input holds), it encodes again, and that decodes to an equal
value; procs whose encoding is canonical give back the very bytes.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

from petasus import bulk, hg
from petasus.bulk import layout
from petasus.hg.errors import DecodeError
from petasus.hg.procs import proc_for

from ._kit import Harness, check, footprint, peak_bytes, same


@dataclasses.dataclass
class Point:
    x: hg.int32
    y: hg.float64
    ok: bool


@dataclasses.dataclass
class Record:
    name: str
    tags: list[str]
    where: Point | None
    blob: bytes
    extra: dict[str, Any]


@hg.declare
def call(a: hg.uint16, b: str, c: list[tuple[int, int]], d: bulk.Bulk) -> None: ...


TYPES: list[Any] = [
    hg.int8, hg.uint8, hg.int16, hg.uint16, hg.int32, hg.uint32, hg.int64, hg.uint64,
    hg.float32, hg.float64, int, float, bool, str, bytes, bytearray, str | None,
    list[hg.int32], list[hg.uint8], list[str], list[bytes], list[list[hg.uint16]],
    list[bytes | None], tuple[int, str], tuple[hg.int32, hg.float32, bool],
    tuple[str, ...], tuple[hg.uint64, ...], dict[str, int], dict[hg.uint8, list[bytes]],
    dict[str, Any], Point, Record, list[Point], Any, bulk.Bulk, list[None], dict[int, None],
    dict, dict[float, str],
]  # append only: an input's first byte is an index here, and fuzz/corpus/procs/ keeps inputs
PROCS = [proc_for(tp) for tp in TYPES] + [call.in_proc]
# What decoding may allocate, at its peak: Python objects cost tens of bytes each (a list of
# n one-byte int8 holds n int objects and n pointers), plus a constant for the small fixed
# objects of any decode. A count the decoder did not bound shows up as far more.
ALLOC_PER_BYTE = 128
ALLOC_SLACK = 64 << 10
# Procs whose decode accepts more than one encoding of a value: bool takes any non-zero byte
# as True, floats may carry a NaN whose bits do not survive float32 -> float -> float32, and
# msgpack has several encodings of one value. Their values must still round-trip.
_LOOSE = {proc_for(tp).name for tp in (bool, hg.float32, hg.float64, float, Any)}


def _canonical(proc: Any) -> bool:
    return not any(loose in proc.name for loose in _LOOSE) and proc is not proc_for(Point) \
        and proc is not proc_for(Record) and proc.name != "list[Point]"


def decode_bounded(proc: Any, body: bytes, plain: Callable[[Any], Any]) -> tuple[bool, Any]:
    """Decode ``body`` with ``proc`` under the allocation and size bounds every proc harness
    checks: (False, None) for a DecodeError, else (True, value)."""
    try:
        value, peak = peak_bytes(lambda: proc.loads(body))
    except DecodeError:
        return False, None
    check(peak <= ALLOC_PER_BYTE * len(body) + ALLOC_SLACK,
          f"{proc.name}: {len(body)} B made decode allocate {peak} B")
    size = footprint(plain(value))
    check(size <= 2 * len(body) + 64, f"{proc.name}: {len(body)} B decoded to {size} units")
    return True, value


def one_input(data: bytes) -> bool:
    if not data:
        return False
    proc, body = PROCS[data[0] % len(PROCS)], data[1:]
    ok, value = decode_bounded(proc, body, _plain)
    if not ok:
        return False
    again = proc.dumps(value)
    check(same(_plain(proc.loads(again)), _plain(value)), f"{proc.name}: no round trip")
    if _canonical(proc):
        check(again == body, f"{proc.name}: re-encoded {again.hex()} != {body.hex()}")
    proc.free(value)
    return True


def _plain(value: Any) -> Any:
    """Values with their bulk handles as wires (RemoteBulk has no equality of its own)."""
    if isinstance(value, bulk.RemoteBulk):
        return value.wire
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def seeds() -> list[bytes]:
    wire = layout.Wire(3, b"tcp://127.0.0.1:1", (10, 0, 5), (b"k" * 26, b"", b"m" * 26))
    handle = bulk.RemoteBulk(wire)
    eager = bulk.RemoteBulk(layout.Wire(1, b"sm://1/2", (4,), (), b"data"))
    values: dict[Any, Any] = {
        hg.int8: -5, hg.uint64: 2**64 - 1, hg.float32: 1.5, float: -0.0, bool: True,
        str: "héllo", bytes: b"\x00\xff", bytearray: bytearray(b"ab"), str | None: "x",
        list[hg.int32]: [1, -2, 3], list[str]: ["a", "", "bc"],
        list[list[hg.uint16]]: [[1], [], [2, 3]], list[bytes | None]: [None, b"z"],
        tuple[int, str]: (7, "seven"), tuple[str, ...]: ("a", "b"),
        dict[str, int]: {"a": 1, "b": 2}, dict[hg.uint8, list[bytes]]: {1: [b"x"], 2: []},
        dict[str, Any]: {"k": [1, "two", None, 3.0, {"n": b"b"}]},
        Point: Point(1, 2.5, False),
        Record: Record("r", ["t"], Point(-1, 0.0, True), b"blob", {"x": 1}),
        list[Point]: [Point(1, 1.0, True)], Any: {"any": [1, 2, {"x": None}]},
        bulk.Bulk: handle, list[None]: [None, None], dict[int, None]: {1: None},
        dict: {"k": 1, 2: [3]}, dict[float, str]: {0.5: "half"},
    }
    out = []
    for tp, value in values.items():
        index = TYPES.index(tp)
        out.append(bytes((index,)) + proc_for(tp).dumps(value))
    out.append(bytes((TYPES.index(bulk.Bulk),)) + eager.to_bytes())
    out.append(bytes((len(TYPES),)) + call.in_proc.dumps((1, "b", [(1, 2)], handle)))
    out.append(bytes((TYPES.index(list[hg.int32]),)) + struct.pack("!I", 3) + bytes(12))
    return out


HARNESS = Harness("procs", one_input, seeds, __doc__ or "")
