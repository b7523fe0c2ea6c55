"""A master and storage nodes in their own processes on loopback, for the distributed store's
tests: ``Cluster`` starts them (``python -m petasus.store.cli master|node``), waits until the
master lists every node, kills any of them with SIGKILL, and stops everything it started.

``connect`` and ``shared`` are behind the cluster schemes store_kit appends to its SCHEMES:
they map the ``StoreConfig``-style options a test passes onto node flags (DRAM split across
the nodes, so the cluster has as many pages in all), master flags (policies) and client
options (limits, put timeout); a store from ``connect`` stops its cluster when closed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from petasus import store
from petasus.store import StoreError
from petasus.store.client import DistributedStore

KiB = 1 << 10
MiB = 1 << 20
# Deadline of every wait on a process or a condition: never a sleep.
DEADLINE = 60.0
# SIGTERM first (a clean shutdown), SIGKILL after this long.
STOP_TIMEOUT = 5.0

TRANSPORTS = {"tcp": "tcp://127.0.0.1:0", "sm": "sm://", "ofi-tcp": "ofi+tcp://127.0.0.1:0"}

# Options of a test (StoreConfig fields) and where the distributed scheme puts them.
NODE_OPTIONS = {"dram_bytes", "page_size", "disk_bytes", "disk_fsync"}
MASTER_OPTIONS = {"offload", "force_evict", "high_watermark", "low_watermark", "offload_queue",
                  "offload_workers", "max_value_bytes", "lease_ttl", "node_ttl", "put_ttl",
                  "strategy"}
CLIENT_OPTIONS = {"put_timeout", "max_key_bytes", "max_value_bytes", "timeout", "replicas",
                  "disk_read", "inline_bytes", "preferred"}
# StoreConfig fields the distributed scheme has no counterpart for: the only value it honours
# (the default), and why. A test asking for another value is skipped, naming the reason.
UNSUPPORTED = {"promote_on_hit": (False, "a disk hit is read from the node's disk and left "
                                         "there (no promotion back to DRAM)")}

# A read lease outlives the read by the lease TTL (the client does not release it), and
# eviction skips leased objects. The embedded scheme protects an object only while it is
# read, and the conformance tests put right after reading the whole arena, expecting eviction
# to make room within the put timeout (store_kit.PUT_TIMEOUT, 2 s): a lease of 1 s keeps the
# cluster within it while lasting far longer than the reads of these tests (64 MiB at most).
LEASE_TTL = 1.0
# The stateful model reads at most 300 KiB at a time and puts right after reading everything
# at almost every step: a shorter lease keeps its puts from waiting out their timeout.
MODEL_LEASE_TTL = 0.3


def ofi_missing() -> str | None:
    try:
        from petasus.na.ofi import _fabric  # noqa: F401
    except ImportError as exc:
        return f"ofi extension not built ({exc}); bash scripts/setup.sh installs libfabric-dev"
    return None


# Resolved here, not in the child: a child forked from a threaded process must not dlopen.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, so no cluster outlives a killed run
    (the signal follows the thread that forked: clusters start from the main thread)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _flags(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


def wait_for(kv: DistributedStore, condition: Callable[[], bool], what: str,
             deadline: float = DEADLINE) -> None:
    """Wait for ``condition``, a fact about the cluster behind ``kv``'s master, or fail naming
    it: tested again after each change of the master's state (``kv.wait_until``), never
    after a sleep."""
    if not kv.wait_until(condition, deadline):
        raise AssertionError(f"timed out after {deadline} s waiting for {what}")


class Proc:
    """One ``petasus-store`` process; its stdout and stderr go to files under the cluster's
    directory (so nothing blocks on a full pipe and a failure can show the log)."""

    def __init__(self, role: str, args: Sequence[str], root: Path) -> None:
        self.role = role
        self.out = root / f"{role}.out"
        self.err = root / f"{role}.log"
        with self.err.open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "petasus.store.cli", *args], stdout=subprocess.PIPE,
                stderr=err, stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                preexec_fn=_die_with_parent)  # noqa: PLW1509 (started from the main thread)
        self.uri = ""
        # Its first line (or b"" if it exited without one), set by the thread that copies its
        # stdout to ``out`` (so that nothing blocks on a full pipe): what wait_listening
        # waits for, rather than polling the file.
        self._first: bytes | None = None
        self._said = threading.Event()
        threading.Thread(target=self._copy_stdout, name=f"{role}-stdout", daemon=True).start()

    def _copy_stdout(self) -> None:
        pipe = self.popen.stdout
        assert pipe is not None
        with pipe, self.out.open("wb") as out:
            for line in pipe:
                out.write(line)
                out.flush()
                if self._first is None:
                    self._first = line
                    self._said.set()
        if self._first is None:
            self._first = b""  # the end of its stdout: it exited before saying anything
        self._said.set()

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.popen.returncode}"
        return f"<{self.role} pid {self.popen.pid} {self.uri or '(starting)'} {state}>"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.err.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def wait_listening(self, deadline: float = DEADLINE) -> str:
        """The URI of the first line (``listening on URI``), once it is written."""
        if not self._said.wait(deadline):
            raise AssertionError(f"timed out after {deadline} s waiting for {self.role} "
                                 "to listen")
        line = (self._first or b"").decode(errors="replace").rstrip("\n")
        if not line:
            self.popen.wait(STOP_TIMEOUT)
            raise RuntimeError(f"{self.role} exited ({self.popen.returncode}) before "
                               f"listening:\n{self.log()}")
        if not line.startswith("listening on "):
            raise RuntimeError(f"{self.role} printed {line!r}, not its address")
        self.uri = line.split()[-1]
        return self.uri

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.alive:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(DEADLINE)

    def terminate(self) -> None:
        if self.alive:
            self.popen.terminate()

    def reap(self) -> None:
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()


_LIVE: set[Cluster] = set()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


class Cluster:
    """A master and ``nodes`` storage nodes on loopback over ``listen`` (an hg URI to listen
    on: ``tcp://127.0.0.1:0``, ``sm://``, ...), under the directory ``root``.

    ``node_dram`` is each node's DRAM segment (one int for all, or one per node); ``master``
    and ``node`` are CLI options (``{"node_ttl": 1, "force_evict": True}``), ``client`` the
    defaults of ``client()`` (the admin client's too). Use as a context
    manager, or call ``stop()``: it always stops every process it started."""

    def __init__(self, listen: str, root: Path, *, nodes: int = 2,
                 node_dram: int | Sequence[int] = 16 * MiB,
                 master: dict[str, Any] | None = None,
                 node: dict[str, Any] | None = None,
                 client: dict[str, Any] | None = None) -> None:
        self.listen = listen
        self.root = root
        self.n = nodes
        self.node_dram = [node_dram] * nodes if isinstance(node_dram, int) else list(node_dram)
        if len(self.node_dram) != nodes:
            raise ValueError(f"{len(self.node_dram)} DRAM sizes for {nodes} nodes")
        self.master_options = dict(master or {})
        self.node_options = dict(node or {})
        self.client_options = dict(client or {})
        self.master: Proc | None = None
        self.nodes: list[Proc] = []
        self.admin: DistributedStore | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Cluster {self.listen} master={self.master!r} nodes={self.nodes!r}>"

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def uri(self) -> str:
        if self.master is None or not self.master.uri:
            raise RuntimeError("the cluster is not started")
        return self.master.uri

    def start(self) -> Cluster:
        _LIVE.add(self)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.master = Proc("master", ["master", "--listen", self.listen,
                                          *_flags(self.master_options)], self.root)
            self.master.wait_listening()
            for i in range(self.n):
                self.nodes.append(self._node(i))
            for proc in self.nodes:
                proc.wait_listening()
            self.admin = self.client(timeout=10.0)
            self.wait_nodes(self.n)
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, i: int) -> Proc:
        disk = self.root / f"node{i}"
        return Proc(f"node{i}", ["node", "--master", self.uri, "--listen", self.listen,
                                 "--dram-bytes", str(self.node_dram[i]), "--disk", str(disk),
                                 "--name", f"node{i}", *_flags(self.node_options)], self.root)

    def client(self, **options: Any) -> DistributedStore:
        """A client of the master (``store.connect``); the caller closes it."""
        kv = store.connect(self.uri, **{**self.client_options, **options})
        if not isinstance(kv, DistributedStore):
            raise TypeError(f"store.connect({self.uri!r}) gave a {type(kv).__name__}")
        return kv

    def info(self) -> dict[str, Any]:
        """The master's view (``DistributedStore.cluster()``)."""
        if self.admin is None:
            raise RuntimeError("the cluster is not started")
        return self.admin.cluster()

    def node_names(self) -> list[str]:
        return sorted(n["name"] for n in self.info()["nodes"])

    def wait_nodes(self, count: int, deadline: float = DEADLINE) -> None:
        """Wait until the master lists exactly ``count`` nodes."""
        def listed() -> bool:
            if self.master is not None and not self.master.alive:
                raise RuntimeError(f"the master exited:\n{self.master.log()}")
            return len(self.info()["nodes"]) == count

        if self.admin is None:
            raise RuntimeError("the cluster is not started")
        try:
            wait_for(self.admin, listed, f"the master to list {count} nodes", deadline)
        except StoreError:
            listed()  # a master that exited says so, with its log
            raise

    def kill_node(self, i: int) -> None:
        self.nodes[i].kill()

    def kill_master(self) -> None:
        if self.master is not None:
            self.master.kill()

    def stop(self, wait: bool = True) -> None:
        """Stop every process: SIGTERM, then SIGKILL after ``STOP_TIMEOUT``. Idempotent.

        ``wait=False`` reaps them on a thread of its own (not a daemon: the interpreter joins
        it before exiting), so a test does not wait for the processes' shutdown."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.admin is not None:
                self.admin.close()
        finally:
            procs = [p for p in [*self.nodes, self.master] if p is not None]
            for proc in procs:
                proc.terminate()
            _LIVE.discard(self)
            if wait:
                _reap(procs)
            else:
                threading.Thread(target=_reap, args=(procs,), name="cluster-reaper").start()


def _reap(procs: list[Proc]) -> None:
    for proc in procs:
        proc.reap()


# -- the distributed schemes of the conformance kit ----------------------------------------------
def split(config: dict[str, Any], nodes: int = 2, lease_ttl: float = LEASE_TTL,
          ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[int]]:
    """(master flags, node flags, client options, DRAM per node) for a test's options."""
    unknown = set(config) - NODE_OPTIONS - MASTER_OPTIONS - CLIENT_OPTIONS - set(UNSUPPORTED)
    if unknown:
        raise ValueError(f"the distributed scheme does not know the options {sorted(unknown)}")
    for name, (default, why) in UNSUPPORTED.items():
        if config.get(name, default) != default:
            pytest.skip(f"the distributed scheme has no {name}={config[name]!r}: {why}")
    master: dict[str, Any] = {"lease_ttl": lease_ttl}
    master.update({k: v for k, v in config.items() if k in MASTER_OPTIONS})
    client = {k: v for k, v in config.items() if k in CLIENT_OPTIONS}
    node = {k: v for k, v in config.items() if k in NODE_OPTIONS - {"dram_bytes"}}
    if node.get("disk_bytes") is not None:
        node["disk_bytes"] = node["disk_bytes"] // nodes
    page = int(config.get("page_size", 4096))
    pages = int(config.get("dram_bytes", 256 * MiB)) // page
    # The cluster has as many pages as the embedded store would: the first nodes take the
    # remainder of an uneven split.
    dram = [(pages // nodes + (i < pages % nodes)) * page for i in range(nodes)]
    return master, node, client, dram


def cluster_for(listen: str, root: Path, config: dict[str, Any], nodes: int = 2,
                **master_extra: Any) -> tuple[Cluster, dict[str, Any]]:
    """A started cluster for a test's options, and the client options to connect with."""
    master, node, client, dram = split(config, nodes)
    master.update(master_extra)
    return Cluster(listen, root, nodes=nodes, node_dram=dram, master=master,
                   node=node).start(), client


def connect(listen: str, root: Path, config: dict[str, Any]) -> store.Store:
    cluster, client = cluster_for(listen, root, config)
    try:
        kv = cluster.client(**client)
    except BaseException:
        cluster.stop()
        raise
    close = kv.close

    def close_and_stop() -> None:
        try:
            close()
        finally:
            cluster.stop(wait=False)

    kv.close = close_and_stop  # type: ignore[method-assign]
    return kv


@contextlib.contextmanager
def shared(listen: str, root: Path,
           config: dict[str, Any]) -> Iterator[Callable[[Path], store.Store]]:
    """One cluster for many stores (the stateful model's examples): each connect is a new
    client; closing it leaves the cluster running, which stops when the block ends."""
    cluster, client = cluster_for(listen, root, config, lease_ttl=MODEL_LEASE_TTL)
    with cluster:
        yield lambda _directory: cluster.client(**client)
