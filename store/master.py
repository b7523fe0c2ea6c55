"""The master service: ``MasterState`` behind RPCs, and a maintenance thread for time.

Handlers are plain functions on the progress thread: each takes the state lock for
microseconds, so metadata never waits on a node. What must happen on nodes (disk copies,
deletes) is queued by the state and carried out by a small pool, whose results come back
into the state under the same lock.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from petasus import hg

from . import protocol as p
from .api import validate_key
from .config import Pin, StoreConfig
from .errors import StoreError
from .master_changes import Changes
from .master_state import MasterState, Node
from .metrics import Histogram

log = logging.getLogger("petasus.store.master")

TICK_S = 0.05  # pending puts, node heartbeats, held leases and watches are checked this often
class MasterService:
    def __init__(self, uri: str, config: StoreConfig, *, lease_ttl: float = 5.0,
                 node_ttl: float = 10.0, put_ttl: float = 30.0, strategy: str = "most_free",
                 rpc_timeout: float = 30.0, clock: Any = time.monotonic,
                 auth_key: bytes | str | None = None) -> None:
        self.config = config
        self.clock = clock
        self.state = MasterState(config, lease_ttl=lease_ttl, node_ttl=node_ttl,
                                 put_ttl=put_ttl, strategy=strategy)
        self.lock = threading.Lock()
        self.changes = Changes(self.lock)
        self.engine = hg.Engine(uri, listen=True, timeout=rpc_timeout,
                                allow_remote_shutdown=True, auth_key=auth_key)
        self.engine.declare(p.NODE_RPCS)
        self._pool = ThreadPoolExecutor(max(2, config.offload_workers),
                                        thread_name_prefix="petasus-store-master")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._nodes: dict[str, hg.Remote] = {}
        self.latency: dict[str, Histogram] = {}
        self.phases = {"allocate": Histogram(), "release": Histogram()}
        handlers = {
            p.register_node: self._register_node, p.heartbeat: self._heartbeat,
            p.put_start: self._put_start,
            p.put_abort: self._put_abort, p.locate: self._locate,
            p.exists: self._exists, p.pin: self._pin, p.cluster_stats: self.stats,
            p.register_blocks: self._register_blocks, p.revoke_blocks: self._revoke_blocks,
            p.revoke_tier: self._revoke_tier, p.match_blocks: self._match_blocks,
        }
        for decl, impl in handlers.items():
            self.engine.register(decl, self._timed(decl.name, impl),
                                 provider_id=p.MASTER_PROVIDER)
        for decl, impl in ((p.put_end, self._put_end), (p.remove, self._remove)):
            self._register_retiring(decl, impl)
        self.engine.register(p.flush, self._flush, provider_id=p.MASTER_PROVIDER, blocking=True)
        watch = hg.RPC(p.watch.name, p.watch.in_proc, p.watch.out_proc,
                       provider_id=p.MASTER_PROVIDER)
        watch.handler = self._watch
        self.engine.hg.register(watch)
        self._thread = threading.Thread(target=self._maintain, name="petasus-store-maintain",
                                        daemon=True)
        self._thread.start()

    def _timed(self, name: str, impl: Any) -> Any:
        """The handler, its service time recorded per RPC (the /metrics latency)."""
        hist = self.latency[name] = Histogram()

        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return impl(*args)
            finally:
                hist.observe(time.perf_counter() - started)
        return timed

    def _register_retiring(self, decl: Any, impl: Any) -> None:
        """Serve an RPC that may retire leased copies (an overwrite, a remove): ``impl``
        returns its answer and the retired copies per node; the answer goes out once every
        such node has acknowledged ``retire``, so that no client reads the old generation
        through a location it cached after the caller saw its overwrite or remove done. The
        handler answers later without blocking the progress thread."""
        hist = self.latency[decl.name] = Histogram()
        rpc = hg.RPC(decl.name, decl.in_proc, decl.out_proc, provider_id=p.MASTER_PROVIDER)
        ttl_ms = int(self.state.lease_ttl * 1000) + 1000
        timeout = min(self.state.node_ttl, self.engine.timeout)

        def handler(handle: hg.TargetHandle) -> None:
            started = time.perf_counter()
            value, retired = impl(*handle.args)
            left = [len(retired) + 1]

            def done(_call: Any = None) -> None:
                # A node that does not answer is one no client reaches either (or one the
                # master drops after its TTL): the answer goes out regardless.
                left[0] -= 1
                if not left[0]:
                    hist.observe(time.perf_counter() - started)
                    handle.respond(value)
            for node, (keys, gens) in retired.items():
                method = self._node(node).retire
                try:
                    self.engine.forward(method.addr, method.rpc, (keys, gens, ttl_ms), timeout,
                                        done)
                except (hg.RPCError, hg.PeerError, OSError) as exc:
                    log.warning("retire on node %s: %s", node.name, exc)
                    done()
            done()
        rpc.handler = handler
        self.engine.hg.register(rpc)

    @property
    def uri(self) -> str:
        return self.engine.uri

    def serve(self, handle_signals: bool = True) -> None:
        try:
            self.engine.serve(handle_signals=handle_signals)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self.lock:
            self.changes.closing = True  # no more parked; a waiting flush returns
            self.changes.changed.notify_all()
        self._thread.join(5)
        with self.lock:
            parked = self.changes.expire(float("inf"))
        self.changes.answer(parked)  # a watcher hears the last version, not a timeout
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.engine.close()

    # --- handlers (progress thread) -------------------------------------------------------
    def _register_node(self, uri: str, segment: bytes, capacity: int, page_size: int,
                       name: str) -> p.NodeHello:
        with self.changes:
            node = self.state.register_node(name, uri, segment, capacity, page_size,
                                            self.clock())
        return p.NodeHello(node.node_id, self.state.node_ttl / 4)

    def _heartbeat(self, node_id: int, disk_used: int) -> bool:
        with self.changes:
            node = self.state.nodes.get(node_id)
            if node is None or node.disk_used == disk_used:  # a beat alone is no change
                self.changes.unchanged()
            return self.state.heartbeat(node_id, disk_used, self.clock())

    def _put_start(self, client: str, keys: list[str], sizes: list[int], replicas: int,
                   overwrite: bool, pin: str, preferred: str) -> list[p.PutGrant]:
        out = []
        checked: list[StoreError | None] = [self._check(k) for k in keys]
        started = time.perf_counter()
        with self.changes:
            grants = self.state.put_start(
                [k for k, e in zip(keys, checked) if e is None],
                [s for s, e in zip(sizes, checked) if e is None], replicas, overwrite,
                Pin(pin), preferred, self.clock())
        self.phases["allocate"].observe(time.perf_counter() - started)
        self._wake.set()
        it = iter(grants)
        for err in checked:
            g = err if err is not None else next(it)
            if isinstance(g, StoreError):
                out.append(p.PutGrant(p.code_of(g), str(g), 0, []))
            else:
                out.append(p.PutGrant(p.OK, "", g.token, [
                    p.Replica(n.node_id, n.uri, n.segment, runs) for n, runs in g.replicas]))
        return out

    def _check(self, key: str) -> StoreError | None:
        try:
            validate_key(key, self.config.max_key_bytes)
        except StoreError as exc:
            return exc
        return None

    def _put_end(self, tokens: list[int], atomic: bool) -> tuple[list[p.Status], Any]:
        with self.changes:
            errors = self.state.put_end(tokens, atomic, self.clock())
            retired = self.state.take_retired()
        self._wake.set()
        return [p.Status(p.OK, "") if e is None else p.Status(p.code_of(e), str(e))
                for e in errors], retired

    def _put_abort(self, tokens: list[int]) -> None:
        with self.changes:
            self.state.put_abort(tokens)

    def _locate(self, keys: list[str], preferred: str) -> Any:
        locs: list[list[Any]] = []
        index: dict[int, int] = {}  # node id -> its place in ``nodes``
        nodes: list[tuple[int, str, bytes]] = []
        now = self.clock()
        lease_ms = int(self.state.lease_ttl * 1000)
        with self.lock:
            for key in keys:
                try:
                    obj = self.state.locate(key, preferred, now)
                except StoreError as exc:
                    locs.append([p.code_of(exc), str(exc), 0, 0, 0, [], []])
                    continue
                reps = []
                for c in obj.copies:
                    node = c.node
                    at = index.get(node.node_id)
                    if at is None:
                        at = index[node.node_id] = len(nodes)
                        nodes.append((node.node_id, node.uri, node.segment))
                    rep = [at]
                    for off, length in node.runs(c.alloc, obj.size):
                        rep += (off, length)
                    reps.append(rep)
                disk = [n.uri for n in obj.disk] if not reps else []
                locs.append([p.OK, "", obj.size, obj.gen, lease_ms, reps, disk])
        return p.pack_locations(nodes, locs)

    def _remove(self, keys: list[str]) -> tuple[list[p.Status], Any]:
        out = []
        with self.changes:
            for key in keys:
                try:
                    self.state.remove(key, self.clock())
                    out.append(p.Status(p.OK, ""))
                except StoreError as exc:
                    out.append(p.Status(p.code_of(exc), str(exc)))
            retired = self.state.take_retired()
            if all(s.code != p.OK for s in out):  # nothing removed
                self.changes.unchanged()
        self._wake.set()
        return out, retired

    def _exists(self, keys: list[str]) -> list[bool]:
        with self.lock:
            return [self.state.exists(k) for k in keys]

    def _pin(self, key: str, mode: str) -> p.Status:
        with self.changes:
            try:
                self.state.pin(key, Pin(mode))
            except StoreError as exc:
                self.changes.unchanged()
                return p.Status(p.code_of(exc), str(exc))
        return p.Status(p.OK, "")

    def stats(self) -> Any:
        with self.lock:
            return {**self.state.stats(), "version": self.changes.version,
                    "phases": {k: h.snapshot() for k, h in self.phases.items()},
                    "latency": {k: h.snapshot() for k, h in self.latency.items() if h.count}}

    def _register_blocks(self, node: str, hashes: list[int], tier: str) -> int:
        with self.changes:
            return self._counted(self.state.blocks.register(node, hashes, tier))

    def _revoke_blocks(self, node: str, hashes: list[int], tier: str) -> int:
        with self.changes:
            return self._counted(self.state.blocks.revoke(node, hashes, tier))

    def _revoke_tier(self, node: str, tier: str) -> int:
        with self.changes:
            return self._counted(self.state.blocks.revoke_tier(node, tier))

    def _counted(self, changed: int) -> int:
        """A block-index update's count (inside ``with self.changes``): none changed, no
        change."""
        if not changed:
            self.changes.unchanged()
        return changed

    def _match_blocks(self, hashes: list[int]) -> Any:
        with self.lock:
            return self.state.blocks.match(hashes)

    def _flush(self, timeout: float) -> p.Status:
        """Give every DRAM-only object a disk copy, and wait until none is missing. It looks
        again (a scan of every object) when a disk copy ends or a node leaves, not at every
        change of the state and not on a timer."""
        deadline = time.monotonic() + timeout
        changes, state = self.changes, self.state

        def progress() -> tuple[int, ...]:
            return (state.c["offloads"], state.c["offload_failed"], state.c["nodes_dropped"],
                    state.offloads_in_flight, changes.closing)
        while True:
            with changes:
                missing = [(o, c) for o in self.state.objects.values() if o.state == "ready"
                           for c in o.copies if c.node not in o.disk]
                queued = len(self.state.actions)
                for obj, copy in missing:
                    if not self.state._offload(obj, copy):
                        break
                done = not missing and not self.state.offloads_in_flight
                if len(self.state.actions) == queued:  # no disk copy handed out
                    changes.unchanged()
                seen = progress()
            if done:
                return p.Status(p.OK, "")
            self._wake.set()  # the maintenance thread hands the copies out
            left = deadline - time.monotonic()
            if left <= 0 or changes.closing:
                return p.Status(3, f"flush: {len(missing)} objects still without a disk copy")
            with self.lock:
                changes.waiting += 1
                try:  # (in slices: a Condition refuses waits past threading.TIMEOUT_MAX)
                    changes.changed.wait_for(lambda: progress() != seen,  # noqa: B023
                                             min(left, 3600.0))
                finally:
                    changes.waiting -= 1

    def _watch(self, handle: hg.TargetHandle) -> None:
        with self.lock:
            answer = self.changes.watch(handle, self.clock())
        if answer is not None:
            answer()

    # --- maintenance (its own thread) -----------------------------------------------------
    def _maintain(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            with self.lock:
                now = self.clock()
                answer = self.changes.bump() if self.state.tick(now) else []
                answer += self.changes.expire(now)
                actions = self.state.take_actions()
            self.changes.answer(answer)
            for action in actions:
                self._pool.submit(self._carry_out, action)

    def _node(self, node: Node) -> hg.Remote:
        remote = self._nodes.get(node.uri)
        if remote is None:
            remote = self._nodes[node.uri] = self.engine.lookup(node.uri,
                                                                provider_id=p.NODE_PROVIDER)
        return remote

    def _carry_out(self, action: tuple[Any, ...]) -> None:
        kind, node = action[0], action[1]
        try:
            if kind == "offload":
                _, _, key, gen, runs, size = action
                ok = False
                try:
                    status = self._node(node).offload(key, gen, runs, size)
                    ok = status.code == p.OK
                    if not ok:
                        log.warning("disk copy of %r on node %s failed: %s", key, node.name,
                                    status.message)
                except (hg.RPCError, hg.PeerError) as exc:
                    log.warning("disk copy of %r on node %s failed: %s", key, node.name, exc)
                started = time.perf_counter()
                with self.changes:
                    self.state.offload_done(key, gen, node, ok, self.clock())
                self.phases["release"].observe(time.perf_counter() - started)
                self._wake.set()
            elif kind == "delete":
                _, _, key, gen = action
                self._node(node).disk_delete(key, gen)
        except (hg.RPCError, hg.PeerError) as exc:
            log.info("%s on node %s: %s", kind, node.name, exc)
        except Exception:
            log.exception("%s on node %s failed", kind, node.name)
