"""A store cluster with a shared secret (``--auth-key-file``, ``auth_key=``): the master and
the nodes prove the key to each other and to every client, and a client without it is told
why, over tcp and sm (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_cluster import TRANSPORTS, Cluster

from petasus import store

KEY = b"store-secret-0123456789abcdef"


@pytest.mark.parametrize("transport", ["tcp", "sm"])
def test_a_keyed_cluster_serves_key_holders_only(transport: str, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")  # as an editor saves it: the newline is not the key
    flag = {"auth_key_file": str(key_file)}
    with Cluster(TRANSPORTS[transport], tmp_path / "cluster", node_dram=1 << 20, master=flag,
                 node=flag, client={"auth_key": KEY}) as cluster:
        with cluster.client() as kv:
            kv.put("k", b"v" * 100_000)  # one-sided, to a node that checks the key too
            assert kv.get("k") == b"v" * 100_000
        for key, why in ((None, "requires an auth_key"),
                         (b"x" * 32, "could not prove it holds the auth_key")):
            with pytest.raises(store.StoreError, match=f"authentication failed: the peer {why}"), \
                    store.connect(cluster.uri, auth_key=key, timeout=10.0) as kv:
                kv.get("k")
        with cluster.client() as kv:
            assert kv.get("k") == b"v" * 100_000


def test_a_short_key_file_is_refused(tmp_path: Path) -> None:
    from petasus.store import cli

    key_file = tmp_path / "key"
    key_file.write_bytes(b"short\n")
    assert cli.main(["stat", "tcp://127.0.0.1:9", "--auth-key-file", str(key_file)]) == 1
