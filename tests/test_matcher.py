"""The shared matcher (na/core.py) without a transport: expected receives posted on the same
peer and tag, alone or several, matched in order, canceled, failed and closed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from petasus import na
from petasus.na.core import CompletionQueue, Matcher


@pytest.fixture
def matcher() -> Iterator[Matcher]:
    cq = CompletionQueue()
    yield Matcher(cq, {"msgs_received": 0, "expected_dropped": 0}, logging.getLogger("test"),
                  1 << 20, lambda: None)
    cq.close()


def recv(addr: na.Addr, tag: int) -> na.Op:
    return na.Op(na.OpKind.RECV_EXPECTED, None, bytearray(8), addr, tag)


PEER = na.Addr("tcp://peer:1", True)


def test_several_receives_on_one_tag_match_in_posting_order(matcher: Matcher) -> None:
    ops = [recv(PEER, 7) for _ in range(3)]
    for op in ops:
        matcher.post_expected(op)
    matcher.post_expected(other := recv(PEER, 8))
    for i in range(3):
        matcher.deliver_expected(PEER, 7, bytes([i]))
    assert [bytes(op.buffer[:op.size]) for op in ops] == [b"\x00", b"\x01", b"\x02"]
    assert all(op.done for op in ops) and not other.done
    matcher.deliver_expected(PEER, 7, b"late")  # nobody waits: dropped, counted
    assert matcher.stats["expected_dropped"] == 1
    assert matcher.exp_posted == {(PEER, 8): other}


def test_cancel_takes_one_receive_out_of_several_or_of_one(matcher: Matcher) -> None:
    a, b, c = recv(PEER, 1), recv(PEER, 1), recv(PEER, 1)
    for op in (a, b, c):
        matcher.post_expected(op)
    assert matcher.cancel(b)
    assert not matcher.cancel(b)  # not posted any more
    matcher.deliver_expected(PEER, 1, b"x")
    assert a.done and not b.done and not c.done
    assert matcher.cancel(c) and matcher.exp_posted == {}
    lone = recv(PEER, 2)
    matcher.post_expected(lone)
    assert matcher.cancel(lone) and matcher.exp_posted == {}


def test_a_lost_peer_and_close_fail_every_posted_receive(matcher: Matcher) -> None:
    other = na.Addr("tcp://other:1", True)
    mine = [recv(PEER, 3), recv(PEER, 3), recv(PEER, 4)]
    theirs = [recv(other, 3)]
    for op in mine + theirs:
        matcher.post_expected(op)
    assert matcher.expected_peers() == {PEER, other}
    matcher.fail_expected(PEER, lambda op: na.PeerError("recv", PEER.uri, "gone"))
    assert all(isinstance(op.error, na.PeerError) for op in mine)
    assert theirs[0].error is None
    matcher.close("closing")
    assert isinstance(theirs[0].error, na.Canceled) and matcher.exp_posted == {}
