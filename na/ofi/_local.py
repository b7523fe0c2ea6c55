"""shm endpoints of this process: who has whom in its address vector, and when a closed one's
libfabric objects may go.

libfabric 1.17's shm reaches a peer in the same process through that endpoint's own region,
not a mapping of its own. Closing an endpoint frees its region, so another endpoint of this
process that inserted it is left pointing into freed memory: its next send to the closed peer
was a SIGSEGV (a test's client closed while the server's handler thread answered it; and any
send to a same-process peer after its close). A peer in another process keeps its own mapping
and is not at risk. So, for an shm endpoint:

- ``closing``: the endpoints of this process that inserted it are told (``peer_closed``), so
  that their operations with it fail at once with a PeerError naming it, instead of writing
  into a region nobody reads until a timeout (its pid is ours: the liveness probe would never
  see it gone);
- ``release``: its libfabric objects are closed only once every endpoint of this process that
  inserted it has closed too; until then its region stays (its name is still in use: a new
  listener cannot take that address in this process meanwhile).

Before the first shm endpoint a process opens, the regions whose owner has died are unlinked (a
killed process leaves its 64 MiB in /dev/shm: libfabric removes a region only when it closes
it; and a listener restarted at its address would find it taken).

At exit, the regions of endpoints still open (closed or not: one dropped without ``close()``
too) or waiting are unlinked (their names only: the mappings last until the process ends),
where libfabric would leave them in /dev/shm.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
import weakref
from collections.abc import Callable
from typing import Protocol


class Endpoint(Protocol):
    def peer_closed(self, name: bytes) -> None: ...


_lock = threading.Lock()
# name -> the live shm endpoint of that name (weakly: one never closed is not kept alive)
_open: weakref.WeakValueDictionary[bytes, Endpoint] = weakref.WeakValueDictionary()
_mappers: dict[bytes, set[bytes]] = {}      # name -> live endpoints that inserted it
_deferred: dict[bytes, Callable[[], None]] = {}  # closed, waiting for their mappers to close
_regions: set[bytes] = set()  # names whose objects are not closed yet (an endpoint dropped
                              # without close() included): unlinked at exit


# The regions our endpoints make: PID_NAME (ofi/plugin.py _shm_name), then shm's ":0:N".
_REGION = re.compile(r"(\d+)_[^/]+:\d+:\d+")
_swept = False


def _sweep() -> None:
    """Unlink the regions of processes that no longer exist: only their owner could use one
    (a process that mapped it keeps its mapping). A pid in use again, or not ours to signal,
    is taken for alive."""
    try:
        entries = os.listdir("/dev/shm")
    except OSError:
        return
    for entry in entries:
        match = _REGION.fullmatch(entry)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join("/dev/shm", entry))
            except OSError:
                pass
        except (OSError, OverflowError):
            pass


def sweep_once() -> None:
    """Before this process's first shm endpoint (and its address's check) is opened."""
    global _swept
    if not _swept:
        _swept = True
        _sweep()


def opened(name: bytes, endpoint: Endpoint) -> None:
    with _lock:
        _open[name] = endpoint
        _mappers.setdefault(name, set())
        _regions.add(name)


def inserting(name: bytes, by: bytes) -> bool:
    """``by`` is putting ``name`` in its address vector: False if ``name`` is an endpoint of
    this process that has closed (its region lingers for others; no new peer may use it).
    A no-op for a peer in another process."""
    if name == by:
        return True
    with _lock:
        if name in _deferred:
            return False
        mappers = _mappers.get(name)
        if mappers is not None and by in _open:
            mappers.add(by)
        return True


def closing(name: bytes) -> None:
    """Tell the live endpoints that inserted ``name`` that it is closing. Called without the
    closing endpoint's lock: each takes its own."""
    with _lock:
        told = [e for e in map(_open.get, _mappers.get(name, ())) if e is not None]
    for endpoint in told:
        endpoint.peer_closed(name)


def release(name: bytes, free: Callable[[], None]) -> None:
    """``name`` has closed: run ``free`` (closing its libfabric objects) now if no live endpoint
    of this process inserted it, else once the last of them has closed; and run what was
    waiting for ``name`` to close."""
    with _lock:
        _open.pop(name, None)
        for mappers in _mappers.values():
            mappers.discard(name)
        ready = [n for n in _deferred if not _mappers.get(n)]
        frees = [_deferred.pop(n) for n in ready]
        if _mappers.get(name):
            _deferred[name] = free
        else:
            ready.append(name)
            frees.append(free)
        for n in ready:
            _mappers.pop(n, None)
            _regions.discard(n)
    for each in frees:
        each()


def waiting() -> int:
    """Closed endpoints whose objects wait for their same-process peers to close."""
    with _lock:
        return len(_deferred)


def _forget_in_child() -> None:
    """A forked child has none of its parent's endpoints: it must not unlink their regions at
    its exit (nor wait on a lock another thread of the parent held at the fork)."""
    global _lock
    _lock = threading.Lock()
    _open.clear()
    _mappers.clear()
    _deferred.clear()
    _regions.clear()


os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _unlink_at_exit() -> None:
    with _lock:
        names = list(_regions)
    for name in names:
        region = name.partition(b"://")[2]
        if region and b"/" not in region:
            try:
                os.unlink(b"/dev/shm/" + region)
            except OSError:
                pass
