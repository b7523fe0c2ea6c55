"""The store's protocol messages (store/protocol.py): every master and node RPC's input, as the
server decodes it, and its output, as the client decodes it. The input's first byte picks the
RPC and the direction.

Contract: DecodeError (the procs'; the target answers DECODE_ERROR, the client raises it).
Invariants: a decoded message is no larger than its bytes, and encodes again to a message that
decodes to an equal value.
"""

from __future__ import annotations

from typing import Any

from petasus import bulk
from petasus.bulk import layout
from petasus.store import protocol as p
from petasus.store.errors import StoreError

from ._kit import Harness, check, same
from .procs import decode_bounded

RPCS = p.MASTER_RPCS + p.NODE_RPCS
PROCS = [proc for rpc in RPCS for proc in (rpc.in_proc, rpc.out_proc)]
LOCATED = next(rpc.out_proc for rpc in RPCS if rpc.name == "locate")


def _plain(value: Any) -> Any:
    if isinstance(value, bulk.RemoteBulk):
        return value.wire
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def one_input(data: bytes) -> bool:
    if not data:
        return False
    proc, body = PROCS[data[0] % len(PROCS)], data[1:]
    ok, value = decode_bounded(proc, body, _plain)
    if not ok:
        return False
    check(same(_plain(proc.loads(proc.dumps(value))), _plain(value)),
          f"{proc.name}: no round trip")
    if proc is LOCATED:
        try:  # the client reads locate's msgpack answer as Locations
            p.unpack_locations(value, len(value[1]) if isinstance(value, list) and
                               len(value) == 2 and isinstance(value[1], list) else 0)
        except StoreError:
            pass
    return True


def seeds() -> list[bytes]:
    segment = layout.encode(layout.Wire(3, b"tcp://127.0.0.1:1", (4096,), (b"k" * 26,)))
    replica = p.Replica(1, "tcp://127.0.0.1:1", segment, [(0, 10), (4096, 3)])
    dest = bulk.RemoteBulk(layout.Wire(2, b"tcp://127.0.0.1:2", (64,), (b"h" * 26,)))
    inputs: dict[str, tuple[Any, ...]] = {
        "register_node": ("tcp://n:1", segment, 1 << 30, 4096, "node-a"),
        "heartbeat": (3, 12345),
        "put_start": ("c", ["a", "b"], [10, 20], 2, True, "", "tcp://n:1"),
        "put_end": ([1, 2], False), "put_abort": ([9],), "locate": (["a"], ""),
        "remove": (["a", "b"],), "exists": (["a"],), "pin": ("a", "dram"), "flush": (1.5,),
        "cluster_stats": (), "register_blocks": ("n", [1, 2], "dram"),
        "revoke_blocks": ("n", [3], "disk"), "revoke_tier": ("n", "disk"),
        "match_blocks": ([1, 2, 3],), "offload": ("k", 2, [(0, 4)], 4),
        "disk_push": ("k", 2, True, dest), "disk_stage": ("k", 1, False), "disk_release": (5,),
        "disk_delete": ("k", 1), "node_stats": (), "read": (3, True, [["k", 1, 0, 4]]),
        "retire": (["k"], [1], 6000),
        "write_inline": ([[(0, 4)]], [b"data"]),
    }
    outputs: dict[str, Any] = {
        "register_node": p.NodeHello(3, 0.5), "heartbeat": True,
        "put_start": [p.PutGrant(0, "", 7, [replica])],
        "put_end": [p.Status(0, ""), p.Status(3, "full")],
        "locate": p.pack_locations([(1, "tcp://127.0.0.1:1", segment)],
                                   [[0, "", 13, 1, 500, [[0, 0, 10, 4096, 3]], ["tcp://n:2"]]]),
        "cluster_stats": {"nodes": 2, "used": [1, 2]}, "register_blocks": 2,
        "match_blocks": {"n": [1, 2]}, "offload": p.Status(0, ""),
        "disk_stage": p.Staged(4, segment), "node_stats": {"x": 1.0},
        "read": b"\x01\x00data", "exists": [True, False],
    }
    out = []
    for i, rpc in enumerate(RPCS):
        if rpc.name in inputs:
            out.append(bytes((2 * i,)) + rpc.in_proc.dumps(inputs[rpc.name]))
        if rpc.name in outputs:
            out.append(bytes((2 * i + 1,)) + rpc.out_proc.dumps(outputs[rpc.name]))
    return out


HARNESS = Harness("store", one_input, seeds, __doc__ or "")
