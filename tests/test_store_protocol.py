"""The store's compact wire forms: round trips, and malformed answers as StoreError."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from petasus.store import protocol as p
from petasus.store.errors import StoreError

u64 = st.integers(0, 2**64 - 1)
nodes = st.lists(st.tuples(st.integers(0, 2**31), st.text(max_size=20), st.binary(max_size=40)),
                 min_size=1, max_size=4, unique_by=lambda n: n[0])


@st.composite
def answers(draw: Any) -> tuple[list[tuple[int, str, bytes]], list[list[Any]]]:
    ns = draw(nodes)
    locs = []
    for _ in range(draw(st.integers(0, 6))):
        reps = [[draw(st.integers(0, len(ns) - 1)),
                 *[x for run in draw(st.lists(st.tuples(u64, u64), max_size=3)) for x in run]]
                for _ in range(draw(st.integers(0, 2)))]
        locs.append([draw(st.integers(0, 8)), draw(st.text(max_size=10)), draw(u64), draw(u64),
                     draw(st.integers(0, 2**32 - 1)), reps,
                     draw(st.lists(st.text(max_size=10), max_size=2))])
    return ns, locs


@given(answers())
def test_locations_round_trip_through_msgpack(answer: Any) -> None:
    ns, locs = answer
    wire = msgpack.unpackb(msgpack.packb(p.pack_locations(ns, locs), use_bin_type=True),
                           raw=False)
    out = p.unpack_locations(wire, len(locs))
    for loc, row in zip(out, locs, strict=True):
        assert (loc.code, loc.message, loc.size, loc.gen, loc.lease_ms) == tuple(row[:5])
        assert loc.disk_uris == row[6]
        for rep, wrep in zip(loc.replicas, row[5], strict=True):
            assert (rep.node_id, rep.uri, rep.segment) == ns[wrep[0]]
            assert [x for run in rep.runs for x in run] == wrep[1:]


@pytest.mark.parametrize("wire", [
    None, [], [[], None], [[[1, "u"]], []], [[[1, "u", b""]], [[0, "", 1, 1, 1, [[5]], []]]],
    [[[1, "u", b""]], [[0, "", 1, 1, 1, [[0, 1]], []]]],  # an odd run list
    [[], [[0, "", 1, 1, 1, [], []], "x"]],
])
def test_a_malformed_answer_is_a_store_error(wire: Any) -> None:
    with pytest.raises(StoreError, match="locate"):
        p.unpack_locations(wire, 1)


def test_a_short_answer_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="1 locations for 2 keys"):
        p.unpack_locations([[], [[0, "", 0, 0, 0, [], []]]], 2)


@pytest.mark.parametrize("rep", [{0: 1}, [-1, 0, 4096], [True, 0, 4096], [5, 0, 4096], []],
                         ids=["a map", "a negative index", "a bool", "out of range", "empty"])
def test_a_replica_naming_no_node_of_the_answer_is_a_store_error(rep: object) -> None:
    """Found by the store fuzz harness: a replica given as a map raised KeyError, and a
    negative index would have named the last node."""
    wire = [[[1, "tcp://127.0.0.1:1", b"seg"]], [[0, "", 4096, 1, 1000, [rep], []]]]
    with pytest.raises(StoreError, match="malformed answer"):
        p.unpack_locations(wire, 1)


class _Answer:
    def __init__(self, answer: bytes | BaseException) -> None:
        self.answer = answer

    def result(self) -> bytes:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class _Node:
    """A node whose ``read`` answers are scripted; records the items of each call."""

    def __init__(self, answers: list[bytes | BaseException]) -> None:
        self.answers = answers
        self.calls: list[list[Any]] = []
        self.read = self

    def future(self, nid: int, cached: bool, items: list[Any], timeout: float) -> _Answer:
        self.calls.append(items)
        return _Answer(self.answers.pop(0))


def _node_reads(answers: list[bytes | BaseException], sizes: list[int],
                batch: int = 1 << 16) -> tuple[dict[int, bytes | None], _Node]:
    from petasus.store.reads import Reads

    node = _Node(answers)
    reads = Reads()
    reads._read_batch = batch
    reads.timeout = 1.0  # type: ignore[attr-defined]
    reads._node = lambda uri: node  # type: ignore[attr-defined]
    wanted = [(i, [f"k{i}", 1, 0, size], 7, "tcp://node", size) for i, size in enumerate(sizes)]
    return reads._node_reads(wanted, True), node


@pytest.mark.parametrize(("answer", "expected"), [
    (b"\x01\x01abcde", {0: b"ab", 1: b"cde"}),
    (b"\x01\x00ab", {0: b"ab", 1: None}),
    (b"\x00\x01cde", {0: None, 1: b"cde"}),
    (b"\x00\x00", {0: None, 1: None}),
    (b"\x02\x01abcde", {0: None, 1: None}),  # a flag that is neither 0 nor 1
    (b"\x01\x01abcdef", {0: None, 1: None}),  # a byte too many
    (b"\x01\x01abcd", {0: None, 1: None}),  # a byte too few
    (b"\x01\x00abcde", {0: None, 1: None}),  # a refused item's bytes sent anyway
    (b"\x01", {0: None, 1: None}),  # flags cut short
    (b"", {0: None, 1: None}),
])
def test_a_node_read_answer_that_does_not_add_up_reads_nothing(
        answer: bytes, expected: dict[int, bytes | None]) -> None:
    out, _node = _node_reads([answer], [2, 3])
    assert out == expected


def test_a_failed_node_read_reads_nothing_and_batches_split_at_the_message_size() -> None:
    from petasus import hg

    out, node = _node_reads([hg.RPCTimeout("read", "tcp://node", "no response"),
                             b"\x01cde"], [2, 3], batch=4)
    assert [len(items) for items in node.calls] == [1, 1]
    assert out == {0: None, 1: b"cde"}
