"""shm endpoints of this process: who has whom in its address vector, and when a closed one's
libfabric objects may go.

libfabric 1.17's shm reaches a peer in the same process through that endpoint's own region,
not a mapping of its own. Closing an endpoint frees its region, so another endpoint of this
process that inserted it is left pointing into freed memory: its next send to the closed peer
was a SIGSEGV (a test's client closed while the server's handler thread answered it; and any
send to a same-process peer after its close). A peer in another process keeps its own mapping
and is not at risk. So, for an shm endpoint:

- ``closing``: the endpoints of this process that may map it are told (``peer_closed``), so
  that, once they have read what it sent before closing, their operations with it fail with
  a PeerError naming it instead of waiting for a timeout (its pid is ours: the liveness probe
  would never see it gone);
- ``release``: its libfabric objects are closed only once every endpoint of this process that
  may map it (one that inserted it, or that it sent to) has closed too; until then its region
  stays (its name is still in use: a new listener cannot take that address meanwhile). A
  long-lived server keeps the objects of every same-process client that closed (a 64 MiB
  region, mostly untouched, and its receive pool) until it closes itself: ``waiting()``.

Before the first shm endpoint a process opens, the regions of unnamed endpoints whose owner
has died are unlinked (a killed process leaves its 64 MiB in /dev/shm: libfabric removes a
region only when it closes it).

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

from ._common import _pid_exited


class Endpoint(Protocol):
    """What the registry tells an endpoint (OfiPlugin)."""

    def peer_closed(self, name: bytes) -> None: ...


_lock = threading.Lock()
# name -> the live shm endpoint of that name (weakly: one never closed is not kept alive)
_open: weakref.WeakValueDictionary[bytes, Endpoint] = weakref.WeakValueDictionary()
_mappers: dict[bytes, set[bytes]] = {}      # name -> live endpoints that may map it
_deferred: dict[bytes, Callable[[], None]] = {}  # closed, waiting for their mappers to close
_closed: set[bytes] = set()  # every endpoint of this process that closed (names never repeat:
                             # shm numbers them): never inserted again
_regions: set[bytes] = set()  # names whose objects are not closed yet (an endpoint dropped
                              # without close() included): unlinked at exit


# The regions of our unnamed endpoints: PID_RANDOM (ofi/plugin.py _shm_name), then shm's
# ":0:N". A listener's chosen name is left alone: one restarted at its address keeps the pid of
# the process that first took it, dead or not.
_REGION = re.compile(r"(\d+)_[0-9a-f]{8}:\d+:\d+")
_swept = False


def _sweep() -> None:
    """Unlink the regions of our form, made by this user, whose process no longer exists: only
    their owner could use one (a process that mapped it keeps its mapping). A pid in use
    again, or not ours to signal, is taken for alive."""
    try:
        entries = os.listdir("/dev/shm")
    except OSError:
        return
    me = os.geteuid()
    for entry in entries:
        match = _REGION.fullmatch(entry)
        if match is None:
            continue
        path = os.path.join("/dev/shm", entry)
        try:
            if os.stat(path).st_uid == me and _pid_exited(match.group(1)):
                os.unlink(path)
        except OSError:
            pass


def sweep_once() -> None:
    """Before this process's first shm endpoint (and its address's check) is opened."""
    global _swept
    if not _swept:
        _swept = True
        _sweep()


def opened(name: bytes, endpoint: Endpoint) -> None:
    """``endpoint`` of this process is open at ``name`` (its region exists)."""
    with _lock:
        _open[name] = endpoint
        _mappers.setdefault(name, set())
        _regions.add(name)


def inserting(name: bytes, by: bytes) -> bool:
    """``by`` is putting ``name`` in its address vector: False if ``name`` is an endpoint of
    this process that has closed (its region may linger for others; no new peer may use it).

    Both ends count as mapping each other: ``by``'s first message makes ``name``'s progress
    map ``by`` (shm's connection request) before ``name`` inserts it, if it ever does. A no-op
    for a peer in another process."""
    if name == by:
        return True
    with _lock:
        if name in _closed:
            return False
        mappers = _mappers.get(name)
        if mappers is not None and by in _open:
            mappers.add(by)
            _mappers[by].add(name)
        return True


def is_closed(name: bytes) -> bool:
    """Whether ``name`` is an endpoint of this process that has closed."""
    with _lock:
        return name in _closed


def closing(name: bytes) -> None:
    """Tell the live endpoints that may map ``name`` that it has closed. Called without the
    closing endpoint's lock: each takes its own."""
    with _lock:
        told = [e for e in map(_open.get, _mappers.get(name, ())) if e is not None]
    for endpoint in told:
        endpoint.peer_closed(name)


def release(name: bytes, free: Callable[[], None]) -> None:
    """``name`` has closed: run ``free`` (closing its libfabric objects) now if no live endpoint
    of this process may map it, else once the last of them has closed; then what was waiting
    for ``name`` to close (its own objects first: they may still point into those regions)."""
    with _lock:
        _open.pop(name, None)
        _closed.add(name)
        for mappers in _mappers.values():
            mappers.discard(name)
        ready = [n for n in _deferred if not _mappers.get(n)]
        frees = [_deferred.pop(n) for n in ready]
        if _mappers.get(name):
            _deferred[name] = free
        else:
            ready.insert(0, name)
            frees.insert(0, free)
        for n in ready:
            _mappers.pop(n, None)
            _regions.discard(n)
    for each in frees:
        each()


def waiting() -> int:
    """Closed endpoints whose objects wait for their same-process peers to close."""
    with _lock:
        return len(_deferred)


_inherited: list[object] = []  # a forked child's copy of its parent's registry, kept


def _forget_in_child() -> None:
    """A forked child has none of its parent's endpoints: it must not unlink their regions at
    its exit (nor wait on a lock another thread of the parent held at the fork). The parent's
    tables are set aside, not emptied: dropping what they hold (closures keeping plugins'
    buffers and requests) would run finalizers here, in the fork hook, and one waiting on a
    lock held at the fork hung a subprocess started with a preexec_fn."""
    global _lock, _open, _mappers, _deferred, _closed, _regions
    _inherited.append((_open, _mappers, _deferred, _closed, _regions))
    _lock = threading.Lock()
    _open = weakref.WeakValueDictionary()
    _mappers, _deferred, _closed, _regions = {}, {}, set(), set()


os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _unlink_at_exit() -> None:
    """libfabric unlinks a region when it closes the endpoint: these it never will."""
    with _lock:
        names = list(_regions)
    for name in names:
        region = name.partition(b"://")[2]
        if region and b"/" not in region:
            try:
                os.unlink(b"/dev/shm/" + region)
            except OSError:
                pass
