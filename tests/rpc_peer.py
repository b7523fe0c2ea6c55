"""Serves rpc_api over any plugin: a process (``python tests/rpc_peer.py URI [json-options]``,
first line ``listening on <uri>``) or a thread (``start_in_thread``)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import rpc_api as api

from petasus import bulk, hg, na

ERRORS = {"KeyError": KeyError, "ValueError": ValueError, "RuntimeError": RuntimeError}


def build(uri: str, **options: Any) -> hg.Engine:
    engine = hg.Engine(uri, listen=True, allow_remote_shutdown=True, **options)
    received: list[str] = []
    engine.register(api.sum, lambda x, y: x + y)
    engine.register(api.describe, lambda p, tags, scores, maybe: (
        f"{p.label}@({p.x},{p.y}) {','.join(tags)} {sorted(scores.items())} {maybe}", len(tags)))
    engine.register(api.echo_any, lambda v: v)
    engine.register(api.echo_bytes, lambda d: d)
    engine.register(api.flip, lambda f: api.Fixed(-f.a, f.b + 1, f.c * 2, not f.ok))
    engine.register(api.fail, _fail)
    gate = Gate()
    engine.register(api.hold, gate.hold, blocking=True)
    engine.register(api.release, gate.release)
    engine.register(api.note, received.append)
    engine.register(api.notes, lambda: list(received))
    # The same name served twice: provider 0 and provider 7 answer differently.
    engine.register(api.whoami, lambda: "provider 0")
    engine.register(api.whoami, lambda: "provider 7", provider_id=7)
    engine.register(api.async_double, _async_double)
    engine.register(api.pooled_double, lambda x: 2 * x, blocking=True)
    engine.register(api.bad_result, lambda: -1)  # not bytes: the server must answer, not die
    engine.register(api.relay, lambda x, y: engine.lookup(engine.uri).sum(x, y))
    BulkServer(engine, received)
    return engine


class BulkServer:
    """The bulk RPCs of the suite. Handlers run inline on the progress thread and wait for
    their transfers there (a nested wait), as a plain handler would."""

    def __init__(self, engine: hg.Engine, received: list[str]) -> None:
        self.engine = engine
        self.exposed: bulk.Bulk | None = None
        self.received = received
        engine.register(api.expose, self.expose)
        engine.register(api.exposed_digest, lambda: hashlib.sha256(
            b"".join(self.exposed.views)).digest())  # type: ignore[union-attr]
        engine.register(api.pull, self.pull)
        engine.register(api.push, self.push)
        engine.register(api.relay_pull, self.relay_pull)
        engine.register(api.pipelined_digest, self.pipelined_digest)
        engine.register(api.digest, lambda data: hashlib.sha256(data).digest())
        engine.register(api.make, lambda size, seed: api.pattern(seed, size))
        engine.register(api.deposit,
                        lambda data: received.append(hashlib.sha256(data).hexdigest()))

    def expose(self, size: int, seed: int, access: int, segments: int,
               eager: bool | None) -> bulk.Bulk:
        if self.exposed is not None:
            self.exposed.close()
        self.exposed = self.engine.bulk(api.split(api.pattern(seed, size), segments),
                                        na.Access(access), eager=eager)
        return self.exposed

    def pull(self, src: bulk.RemoteBulk, offset: int, size: int) -> bytes:
        n = src.size - offset if size < 0 else size
        with self.engine.bulk(bytearray(n), bulk.WRITE_ONLY) as local:
            local.pull_from(src, n, offset=offset).wait()
            return hashlib.sha256(local.views[0]).digest()

    def push(self, dst: bulk.RemoteBulk, offset: int, size: int, seed: int) -> None:
        with self.engine.bulk(api.pattern(seed, size), bulk.READ_ONLY, eager=False) as local:
            local.push_to(dst, size, offset=offset).wait()

    def relay_pull(self, other: str, src: bulk.RemoteBulk) -> bytes:
        return self.engine.lookup(other).pull(src, 0, -1)  # type: ignore[no-any-return]

    def pipelined_digest(self, src: bulk.RemoteBulk, chunk_size: int, depth: int) -> bytes:
        h = hashlib.sha256()
        done = bulk.pipeline(self.engine, src, lambda _off, view: h.update(view),
                             chunk_size=chunk_size, depth=depth)
        if done != src.size:
            raise RuntimeError(f"pipeline consumed {done} of {src.size} B")
        return h.digest()


def _fail(kind: str, message: str) -> None:
    raise ERRORS[kind](message)


class Gate:
    """A slow handler that the test controls: each hold() answers when it takes one of the
    tokens that release() hands out, in whatever order the two arrive, so tests wait on a
    condition rather than on a clock. ``seconds`` only bounds a hold nobody releases.

    Tokens go to the holds already waiting, oldest first, as release() runs: a hold that
    arrives later cannot take the token of one that was woken but has not run yet. (A test
    whose call timed out leaves its hold waiting; the next test's release(2) is meant for it
    and that test's own hold. Taken by whichever thread got the lock first, a busy host let
    the next test's hold take it and answer at once.)"""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tokens = 0  # released while no hold waited
        self._waiting: deque[list[bool]] = deque()  # one [granted] per waiting hold

    def hold(self, seconds: float) -> float:
        self.take(seconds)
        return seconds

    def take(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a token; whether one came."""
        with self._cond:
            if self._tokens:
                self._tokens -= 1
                return True
            slot = [False]
            self._waiting.append(slot)
            self._cond.notify_all()  # for wait_holds
            if not self._cond.wait_for(lambda: slot[0], timeout=seconds):
                self._waiting.remove(slot)  # nobody released it: it gives up its place
                return False
        return True

    def wait_holds(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` holds are waiting for a token (each has let go of the lock
        in its wait, so a release now is theirs)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._waiting) >= count, timeout)

    def release(self, count: int) -> None:
        with self._cond:
            waiting = self._waiting
            while count and waiting:
                waiting.popleft()[0] = True
                count -= 1
            self._tokens += count
            self._cond.notify_all()


async def _async_double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


def start_in_thread(uri: str, **options: Any) -> tuple[hg.Engine, threading.Thread]:
    engine = build(uri, **options)
    thread = threading.Thread(target=engine.serve, kwargs={"handle_signals": False},
                              daemon=True, name=f"rpc peer {engine.uri}")
    thread.start()
    return engine, thread


def main() -> None:
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    engine = build(sys.argv[1], **options)
    print(f"listening on {engine.uri}", flush=True)
    engine.serve()
    engine.close()


if __name__ == "__main__":
    main()
