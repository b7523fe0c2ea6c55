"""A store client that dies in the middle of a put: ``store_stalled_writer.py MASTER_URI KEY
SIZE`` asks the master for room (``put_start``), writes half of the value into the granted
pages, prints ``granted TOKEN``, and then waits on stdin for ever, to be killed before it calls
``put_end``. The master must reclaim the pending pages after its put TTL.
"""

from __future__ import annotations

import sys

from petasus import bulk, hg
from petasus.store import protocol as p


def main(uri: str, key: str, size: int) -> int:
    engine = hg.Engine(uri, timeout=10.0)
    engine.declare(p.MASTER_RPCS, p.NODE_RPCS)
    master = engine.lookup(uri, provider_id=p.MASTER_PROVIDER)
    grant = master.put_start.call(f"stalled:{key}", [key], [size], 1, False, "none", "",
                                  timeout=10.0)[0]
    if grant.code != p.OK:
        print(f"refused {grant.code} {grant.message}", flush=True)
        return 1
    value = bytearray(b"\x5a" * size)
    rep = grant.replicas[0]
    with engine.bulk(value, bulk.READ_ONLY, eager=False) as handle:
        seg = bulk.RemoteBulk.from_bytes(rep.segment)
        off, length = rep.runs[0]
        handle.push_to(seg, length // 2, offset=off).wait(10.0)
    print(f"granted {grant.token}", flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
