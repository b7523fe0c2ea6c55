"""A keyed (or not) Engine serving ``add`` and ``take`` on a thread, counting every handler it
runs: the server of the auth_key tests of every plugin (test_identity, test_hostile_ofi), and
``wait_for`` a condition on its state."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from conftest import TIMEOUT

from petasus import hg


@hg.declare
def add(x: hg.int32, y: hg.int32) -> hg.int32: ...


@hg.declare
def take(data: bytes) -> hg.uint64: ...


def wait_served(engine: hg.Engine, condition: Callable[[], bool], what: str) -> None:
    """Wait for state that the thread serving ``engine`` changes: the engine wakes its
    waiters after each progress pass of that thread, so this waits on the condition, not on
    time."""
    assert engine.wait_until(condition, TIMEOUT), f"timed out after {TIMEOUT} s waiting for {what}"


class Served:
    def __init__(self, uri: str, key: bytes | None = None, **options: Any) -> None:
        self.calls = 0
        self.engine = hg.Engine(uri, listen=True, auth_key=key, **options)
        self.engine.register(add, self._add)
        self.engine.register(take, self._take)
        self.thread = threading.Thread(target=self.engine.serve,
                                       kwargs={"handle_signals": False}, daemon=True)
        self.thread.start()

    def _add(self, x: int, y: int) -> int:
        self.calls += 1
        return x + y

    def _take(self, data: bytes) -> int:
        self.calls += 1
        return len(data)

    @property
    def uri(self) -> str:
        return self.engine.uri

    def stats(self) -> dict[str, Any]:
        return self.engine.na.statistics()

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        wait_served(self.engine, condition, what)

    def close(self) -> None:
        self.engine.shutdown()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        self.engine.close()

