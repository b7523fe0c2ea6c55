"""``petasus-store``: the store's command line.

``petasus-store demo [PATH]`` opens an embedded store whose DRAM tier is smaller than what it
writes, so objects spill to disk while it runs; it reads every object back, verifies it, and
shows where the bytes are. Part 2 adds ``master`` and ``node``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import StoreError, connect
from .config import Offload, StoreConfig
from .demo import MiB, _size, cluster_demo, demo
from .metrics import serve_http


def _auth_key(args: argparse.Namespace) -> bytes | None:
    """The shared secret from ``--auth-key-file`` (a file, so the key is not in ``ps``
    output), trailing newline dropped; None when authentication is off."""
    if not args.auth_key_file:
        return None
    try:
        key = Path(args.auth_key_file).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise StoreError(f"cannot read --auth-key-file: {exc}") from None
    if len(key) < 16:
        raise StoreError(f"--auth-key-file {args.auth_key_file}: the key must be at least "
                         f"16 bytes, got {len(key)}")
    return key


def master(args: argparse.Namespace) -> int:
    from .master import MasterService

    values: dict[str, Any] = {}
    if args.config:
        values.update(StoreConfig.from_json(args.config).to_dict())
    for name in ("offload", "high_watermark", "low_watermark", "offload_queue",
                 "offload_workers", "max_value_bytes"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.force_evict:
        values["force_evict"] = True
    config = StoreConfig.from_dict(values)
    service = MasterService(args.listen, config, lease_ttl=args.lease_ttl,
                            node_ttl=args.node_ttl, put_ttl=args.put_ttl,
                            strategy=args.strategy, auth_key=_auth_key(args))
    if args.metrics_port is not None:
        serve_http(args.metrics_port, service.stats, lambda wait: True)
    print(f"listening on {service.uri}", flush=True)
    service.serve()
    return 0


def node(args: argparse.Namespace) -> int:
    from .node import NodeService

    service = NodeService(args.master, args.listen, dram_bytes=args.dram_bytes,
                          page_size=args.page_size, disk_dir=args.disk, disk_bytes=args.disk_bytes,
                          disk_fsync=args.disk_fsync, name=args.name,
                          auth_key=_auth_key(args))
    if args.metrics_port is not None:
        serve_http(args.metrics_port, service.stats, service.wait_registered)
    print(f"listening on {service.uri}", flush=True)
    service.serve()
    return 0


def stat(args: argparse.Namespace) -> int:
    with connect(args.master, timeout=args.timeout, auth_key=_auth_key(args)) as kv:
        cluster = kv.cluster()  # type: ignore[attr-defined]
    console = Console()
    table = Table(title=f"petasus store at {args.master}")
    for col in ("node", "uri", "DRAM", "used", "disk used"):
        table.add_column(col, justify="right")
    for n in cluster["nodes"]:
        table.add_row(n["name"], n["uri"], _size(n["capacity"]), _size(n["used"]),
                      _size(n["disk_used"]))
    console.print(table)
    console.print(f"objects {cluster['objects']} (DRAM {cluster['dram_objects']}, disk "
                  f"{cluster['disk_objects']}), pending puts {cluster['pending']}, policy "
                  f"{cluster['policy']}, evictions {cluster['evictions']}, offloads "
                  f"{cluster['offloads']}, lost {cluster['lost']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="petasus-store", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write more than DRAM holds, read it all back verified")
    d.add_argument("path", nargs="?", help="store directory (default: a temporary one)")
    d.add_argument("--dram", type=int, default=16, help="DRAM tier in MiB (default 16)")
    d.add_argument("--total", type=int, default=64, help="MiB to write (default 64)")
    d.add_argument("--object-kib", type=int, default=256, help="object size in KiB")
    d.add_argument("--offload", default=Offload.ON_EVICT.value,
                   choices=[o.value for o in Offload])
    d.add_argument("--cluster", metavar="URI", help="run the distributed demo instead: a "
                   "master and two nodes on this hg URI (tcp://127.0.0.1:0, sm://), processes")
    m = sub.add_parser("master", help="run a master (metadata, placement, eviction)")
    m.add_argument("--listen", default="tcp://127.0.0.1:7000", help="hg URI to listen on")
    m.add_argument("--config", help="a JSON file of store configuration fields")
    m.add_argument("--offload", choices=[o.value for o in Offload])
    m.add_argument("--force-evict", action="store_true")
    m.add_argument("--high-watermark", type=float)
    m.add_argument("--low-watermark", type=float)
    m.add_argument("--offload-queue", type=int)
    m.add_argument("--offload-workers", type=int)
    m.add_argument("--max-value-bytes", type=int)
    m.add_argument("--lease-ttl", type=float, default=5.0, help="read lease, seconds")
    m.add_argument("--node-ttl", type=float, default=10.0, help="heartbeat TTL, seconds")
    m.add_argument("--put-ttl", type=float, default=30.0, help="pending put TTL, seconds")
    m.add_argument("--strategy", default="most_free", choices=["most_free", "random"])
    m.add_argument("--metrics-port", type=int, help="serve /metrics and /health here")
    n = sub.add_parser("node", help="run a storage node (DRAM segment and disk tier)")
    n.add_argument("--master", required=True, help="the master's URI")
    n.add_argument("--listen", default="tcp://127.0.0.1:0")
    n.add_argument("--dram-bytes", type=int, default=64 * MiB)
    n.add_argument("--page-size", type=int, default=4096)
    n.add_argument("--disk", help="disk tier directory (default: a temporary one)")
    n.add_argument("--disk-bytes", type=int)
    n.add_argument("--disk-fsync", action="store_true")
    n.add_argument("--name")
    n.add_argument("--metrics-port", type=int)
    st = sub.add_parser("stat", help="print the cluster: nodes, segments, use per tier")
    st.add_argument("master")
    st.add_argument("--timeout", type=float, default=10.0)
    for p in (m, n, st):
        p.add_argument("--auth-key-file", metavar="PATH",
                       help="shared secret (>= 16 bytes) every connection must prove; the "
                       "master, the nodes and the clients use the same one")
    args = parser.parse_args(argv)
    commands = {"demo": lambda a: cluster_demo(a) if a.cluster else demo(a), "master": master,
                "node": node, "stat": stat}
    try:
        return commands[args.command](args)
    except StoreError as exc:
        print(f"petasus-store: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
