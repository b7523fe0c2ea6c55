"""verbs-only behavior beyond the conformance suites, on a real device (PETASUS_VERBS_DEVICE):
the registration cache, RMA split at a small chunk, a NIC refusal that retires one queue pair
and leaves the peer usable, credits under a burst larger than the grant, and poll_fd waking a
blocked progress. Skipped, with the reason, where no device is named."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import _VERBS_GID, _VERBS_URI, _verbs_spec_missing

from petasus import na
from petasus.na import testing
from petasus.na.verbs import _protocol as p

pytestmark = pytest.mark.skipif(bool(_verbs_spec_missing()), reason=str(_verbs_spec_missing()))


def _open(listen: bool, **options: Any) -> na.Plugin:
    return na.initialize(_VERBS_URI, listen=listen, **_VERBS_GID, **options)


@pytest.fixture
def pair() -> Iterator[tuple[na.Plugin, na.Plugin]]:
    with testing.pair(lambda listen: _open(listen, two_sided_max=0, rma_chunk=4096)) as both:
        yield both


def test_a_buffer_registered_twice_shares_one_region(pair: tuple[na.Plugin, na.Plugin]) -> None:
    server, _client = pair
    data = bytearray(1 << 16)
    first = server.mem_register(data, na.Access.READ_ONLY)
    second = server.mem_register(data, na.Access.READ_ONLY)
    other = server.mem_register(data, na.Access.READ_WRITE)
    stats = server.statistics()
    assert (stats["regions"], stats["cache_hits"]) == (2, 1) and first.key == second.key
    server.mem_deregister(first)
    assert server.statistics()["regions"] == 2
    server.mem_deregister(second)
    server.mem_deregister(other)
    assert server.statistics()["regions"] == 0


def test_a_large_get_is_split_and_lands_whole(pair: tuple[na.Plugin, na.Plugin]) -> None:
    server, client = pair
    addr = client.addr_lookup(server.addr_self().uri)
    data = bytearray(range(256)) * 4096  # 1 MiB: 256 RDMA READs of 4 KiB
    exposed = server.mem_register(data, na.Access.READ_ONLY)
    mine = bytearray(len(data))
    local = client.mem_register(mine, na.Access.READ_WRITE)
    remote = client.mem_handle_deserialize(server.mem_handle_serialize(exposed))
    op = client.get(local, 0, remote, 0, len(data), addr)
    testing.drive((server, client), lambda: op.done, what="a split get")
    op.result()
    assert mine == data and client.statistics()["rma_chunk"] == 4096


def test_a_refused_rdma_retires_one_qp_and_the_peer_stays_usable(
        pair: tuple[na.Plugin, na.Plugin]) -> None:
    server, client = pair
    addr = client.addr_lookup(server.addr_self().uri)
    data = bytearray(64)
    exposed = server.mem_register(data, na.Access.READ_ONLY)
    wire = bytearray(server.mem_handle_serialize(exposed))
    wire[1] = int(na.Access.READ_WRITE)  # claim a right the NIC will refuse
    mine = client.mem_register(bytearray(64), na.Access.READ_WRITE)
    put = client.put(mine, 0, client.mem_handle_deserialize(bytes(wire)), 0, 8, addr)
    testing.drive((server, client), lambda: put.done, what="a refused put")
    assert isinstance(put.error, na.AccessError) and "IBV_WC_REM_ACCESS_ERR" in str(put.error)
    assert client.statistics()["retired"] == 1 and data == bytearray(64)
    testing.round_trip(server, client)  # a new queue pair, the same peer
    get = client.get(mine, 0, client.mem_handle_deserialize(server.mem_handle_serialize(exposed)),
                     0, 64, addr)
    testing.drive((server, client), lambda: get.done, what="a get after the refusal")
    get.result()


def test_a_burst_past_the_credits_waits_and_arrives_in_order(
        pair: tuple[na.Plugin, na.Plugin]) -> None:
    server, client = pair
    addr = client.addr_lookup(server.addr_self().uri)
    n = 4 * p.DATA_CREDITS
    sends = [client.msg_send_unexpected(addr, i.to_bytes(4, "little"), i) for i in range(n)]
    testing.drive((server, client), lambda: all(s.done for s in sends), what="the burst")
    got = []
    for _ in range(n):
        buf = bytearray(8)
        op = server.msg_recv_unexpected(buf)
        testing.drive((server, client), lambda op=op: op.done, what="a queued message")
        got.append(int.from_bytes(op.result().buffer[:op.size], "little"))
    assert got == list(range(n))


def test_poll_fd_wakes_a_blocked_progress() -> None:
    with testing.pair(lambda listen: _open(listen, spin_us=0)) as (server, client):
        testing.round_trip(server, client)  # connected both ways
        addr = client.addr_lookup(server.addr_self().uri)
        recv = server.msg_recv_unexpected(bytearray(16))
        sender = threading.Thread(target=lambda: na.wait(
            client, client.msg_send_unexpected(addr, b"wake", 1), timeout=testing.TIMEOUT))
        sender.start()
        # Nothing else is pending on the server: progress sleeps in epoll (spin_us=0) and
        # returns True only if the completion channel woke it before the timeout.
        assert server.progress(testing.TIMEOUT)
        sender.join(testing.TIMEOUT)
        assert recv.done
