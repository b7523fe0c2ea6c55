"""Property tests of every proc and the RPC headers: round trips, truncations, garbage."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petasus import hg
from petasus.hg import header as hd
from petasus.hg.procs import ANY, proc_for

INT_RANGES = {hg.int8: 8, hg.int16: 16, hg.int32: 32, hg.int64: 64}
UINT_RANGES = {hg.uint8: 8, hg.uint16: 16, hg.uint32: 32, hg.uint64: 64}


@dataclasses.dataclass
class Flat:
    a: hg.int16
    b: hg.float64
    c: bool


@dataclasses.dataclass
class Nested:
    name: str
    flat: Flat
    items: list[hg.uint8]
    extra: dict[str, int] | None


floats = st.floats(allow_nan=False)
f32 = st.floats(width=32, allow_nan=False)
flat_values = st.builds(Flat, st.integers(-2**15, 2**15 - 1), floats, st.booleans())
any_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | floats | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=12)

CASES: list[tuple[Any, st.SearchStrategy[Any]]] = [
    *((t, st.integers(-2**(b - 1), 2**(b - 1) - 1)) for t, b in INT_RANGES.items()),
    *((t, st.integers(0, 2**b - 1)) for t, b in UINT_RANGES.items()),
    (hg.float32, f32), (hg.float64, floats), (int, st.integers(-2**63, 2**63 - 1)),
    (float, floats), (bool, st.booleans()), (str, st.text()), (bytes, st.binary()),
    (bytearray, st.binary().map(bytearray)),
    (int | None, st.none() | st.integers(-2**63, 2**63 - 1)),
    (list[hg.int32], st.lists(st.integers(-2**31, 2**31 - 1))),
    (list[str], st.lists(st.text(max_size=8), max_size=8)),
    (tuple[int, str, bool], st.tuples(st.integers(-2**63, 2**63 - 1), st.text(), st.booleans())),
    (tuple[hg.int8, ...], st.lists(st.integers(-128, 127)).map(tuple)),
    (dict[str, list[float]], st.dictionaries(st.text(max_size=6), st.lists(floats, max_size=3),
                                             max_size=4)),
    (Flat, flat_values),
    (Nested, st.builds(Nested, st.text(), flat_values, st.lists(st.integers(0, 255)),
                       st.none() | st.dictionaries(st.text(max_size=4),
                                                   st.integers(-2**63, 2**63 - 1), max_size=3))),
    (Any, any_values),
]
IDS = [getattr(t, "__name__", str(t)) for t, _ in CASES]


@pytest.mark.parametrize(("tp", "values"), CASES, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip(tp: Any, values: st.SearchStrategy[Any], data: st.DataObject) -> None:
    proc = proc_for(tp)
    value = data.draw(values)
    wire = proc.encode(value)
    assert b"".join(proc.parts(value)) == wire  # the scatter form says the same bytes
    back = proc.loads(wire)
    if tp is hg.float32:
        assert back == struct.unpack("!f", struct.pack("!f", value))[0]
    else:
        assert back == value
    proc.free(back)


@pytest.mark.parametrize(("tp", "values"), CASES, ids=IDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_truncation_fails_cleanly(tp: Any, values: st.SearchStrategy[Any],
                                        data: st.DataObject) -> None:
    proc = proc_for(tp)
    wire = proc.encode(data.draw(values))
    for cut in range(len(wire)):
        with pytest.raises(hg.DecodeError):
            proc.loads(wire[:cut])
    with pytest.raises(hg.DecodeError, match="trailing"):
        proc.loads(wire + b"\x00")


@pytest.mark.parametrize(("tp", "values"), CASES, ids=IDS)
@settings(max_examples=80, deadline=None)
@given(garbage=st.binary(max_size=64))
def test_garbage_never_crashes_a_decoder(tp: Any, values: st.SearchStrategy[Any],
                                         garbage: bytes) -> None:
    try:
        proc_for(tp).loads(garbage)
    except hg.DecodeError:
        pass


def test_a_hostile_count_does_not_allocate() -> None:
    for tp in (list[hg.int64], list[str], dict[str, str], bytes, str):
        with pytest.raises(hg.DecodeError, match="claims"):
            proc_for(tp).loads(b"\xff\xff\xff\xff" + bytes(8))


def test_fixed_structs_compile_to_one_struct() -> None:
    assert proc_for(Flat).struct is not None and proc_for(Flat).struct.format == "!hd?"
    assert proc_for(tuple[hg.int32, hg.float32]).flat
    assert proc_for(Nested).struct is None


def test_encode_errors_name_the_type() -> None:
    with pytest.raises(hg.EncodeError, match="int8"):
        proc_for(hg.int8).encode(300)
    with pytest.raises(hg.EncodeError, match="str"):
        proc_for(str).encode(b"bytes are not text")
    with pytest.raises(hg.EncodeError, match="msgpack"):
        ANY.encode(object())
    with pytest.raises(TypeError, match="no proc for type"):
        proc_for(complex)


def test_gen_proc_and_custom_procs() -> None:
    SumIn = hg.gen_proc("sum_in_t", ("x", hg.int32), ("y", hg.int32))
    assert proc_for(SumIn).loads(proc_for(SumIn).encode(SumIn(1, 2))) == SumIn(1, 2)

    class Celsius(float):
        pass

    freed = []
    hg.register_proc(Celsius, encode=lambda v: struct.pack("!d", v),
                     decode=lambda b, p: (Celsius(struct.unpack_from("!d", b, p)[0]), p + 8),
                     free=freed.append)
    proc = proc_for(list[Celsius])
    value = proc.loads(proc.encode([Celsius(1.5)]))
    assert value == [1.5] and isinstance(value[0], Celsius)
    proc.free(value)
    assert freed == [1.5]


# -- headers ----------------------------------------------------------------------------------
@given(st.text(), st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255))
def test_request_header_round_trip(name: str, provider: int, flags: int, cookie: int) -> None:
    rid = hd.rpc_id(name, provider)
    wire = hd.encode_request(rid, flags, cookie)
    assert len(wire) == 12
    assert hd.decode_request(wire) == (rid, flags, cookie)
    assert rid & 0xFFFF == provider


@given(st.sampled_from(sorted(hd.RETURN_NAMES)), st.integers(0, 255))
def test_response_header_round_trip(ret: int, flags: int) -> None:
    wire = hd.encode_response(ret, flags)
    assert len(wire) == hd.RESPONSE.size == 8
    assert hd.decode_response(wire) == (ret, flags)
    with pytest.raises(hd.HeaderError, match="not a petasus response"):
        hd.decode_response(b"\x00" + wire[1:])


@given(st.binary(max_size=20))
def test_header_garbage(garbage: bytes) -> None:
    for decode in (hd.decode_request, hd.decode_response):
        try:
            decode(garbage)
        except hd.HeaderError:
            pass


def test_rpc_ids_are_djb2() -> None:
    assert hd.djb2_64("") == 5381
    assert hd.djb2_64("a") == 5381 * 33 + ord("a")
    assert hd.rpc_id("sum") != hd.rpc_id("sum", 1) != hd.rpc_id("sun")
    with pytest.raises(ValueError, match="provider"):
        hd.rpc_id("x", 1 << 16)


@pytest.mark.parametrize("tp", [bytes, bytearray, memoryview])
def test_large_buffers_are_sent_as_views_of_themselves(tp: Any) -> None:
    data = tp(bytes(range(256)) * 1024)
    record = proc_for(tuple[str, tp, int])
    parts = record.parts(("name", data, 7))
    assert any(isinstance(p, memoryview) and p.obj is (data.obj if tp is memoryview else data)
               for p in parts)
    assert b"".join(parts) == record.encode(("name", data, 7))
    with pytest.raises(hg.EncodeError):
        proc_for(str).parts(b"x" * (1 << 17))  # a str parameter never takes bytes, large or not


def test_procs_say_whether_a_value_may_be_a_landed_bytes_object() -> None:
    """``adopts``: only values that may be a ``bytes`` decoded by the bytes proc let an
    overflow land in objects of their own (hg/adopt.py); a custom proc may build on it."""
    from petasus import bulk
    from petasus.hg.procs import record, register_proc

    @dataclasses.dataclass
    class Blob:
        name: str
        data: bytes

    yes = [bytes, list[bytes], dict[str, bytes], bytes | None, Blob]
    no = [str, int, hg.int32, float, bytearray, list[int], dict[str, float], bulk.Bulk, Any,
          None]
    assert [proc_for(t).adopts for t in yes] == [True] * len(yes)
    assert [proc_for(t).adopts for t in no] == [False] * len(no)
    assert record("r", [proc_for(str), proc_for(bulk.Bulk)], tuple, tuple).adopts is False

    class Custom:
        pass

    assert register_proc(Custom, encode=lambda v: b"", decode=lambda b, p: (Custom(), p)).adopts

