"""Connection limits of the socket plugins, as policy without I/O: which connection to close,
when, and which to sacrifice when descriptors run out.

The plugin tells ``ConnPolicy`` when a connection opens, completes its handshake and closes.
Its read and send paths mark a connection ``active`` (one attribute store per readable event
or per flush: no clock call, nothing per message); ``expire(now)``, run from progress when
``due()`` says, turns those marks into "last seen" times. The policy answers with connections
to close and why; it never touches a socket, so the tests drive it with a fake clock.

Rules:
- handshake: a connection still handshaking ``handshake_timeout`` after it opened is closed;
- idle: an accepted connection with no traffic for ``idle_timeout`` and nothing pending (no
  RMA of ours in flight on it, no reply of the peer's awaited by a posted receive) is closed.
  A queue of replies the peer has not read for that long is no traffic either. Connections
  we dialled are never closed as idle: they close under the user's own operations or not at
  all;
- room: at ``max_connections``, or when accept fails with EMFILE/ENFILE, ``victim()`` names the
  accepted connection to close so a new peer can be served: the oldest still handshaking, or
  else the one quiet the longest with nothing pending. None means refuse the newcomer;
- backlog: bytes queued to all accepted peers together past ``max_queued_total``
  (``over_total``): the stalled peers (nothing read from or written to them for two whole
  sweeps) holding the most are closed, largest first, until the rest fit.
  ``max_queued_bytes`` bounds each peer; this bounds how many such peers add up. A peer
  whose queue moves is never closed for it: many clients pulling large registrations at
  once queue a lot, zero-copy. A peer that reads just enough to stay active is not caught
  (each is still capped by ``max_queued_bytes``).
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

# Causes, as counted in statistics() (closed_<cause>) and logged once each.
HANDSHAKE = "handshake_timeout"
IDLE = "idle"
CAP = "cap"
EMFILE = "emfile"
BACKLOG = "backlog"

# Descriptors kept out of ``max_connections``: the listener, epoll, eventfds, the store's files
# and the user's own. An eighth of the limit, at least 32.
_HEADROOM_FRACTION = 8
_HEADROOM_MIN = 32
_SWEEP_MAX = 1.0  # how stale "last seen" may be; idle timeouts are minutes


class Tracked(Protocol):
    """What the policy reads and writes on a connection (``na._conn.Conn`` has these)."""

    accepted: bool
    active: bool
    last: float


def default_max_connections() -> int:
    """The soft RLIMIT_NOFILE less headroom: the cap is reached before accept() fails."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - max(_HEADROOM_MIN, soft // _HEADROOM_FRACTION))


@dataclass(frozen=True)
class Limits:
    """The plugin options of this module; ``None`` (or 0) disables a timeout."""

    handshake_timeout: float | None = 5.0
    # Accepted connections only. Five minutes: longer than a client's pause between bursts
    # (reconnecting costs a handshake) and than any handler we expect to hold a connection
    # silent; short enough that peers that vanished without a FIN (a crashed host, a dropped
    # NAT entry) give their descriptors back within minutes. Pressure on descriptors is the
    # cap's job, not this timer's.
    idle_timeout: float | None = 300.0
    max_connections: int = 0  # 0: default_max_connections()
    # Bytes queued to one accepted peer before its requests stop being read (``na._guard``).
    max_queued_bytes: int = 64 * 1024 * 1024
    # Bytes queued to all accepted peers together before the largest holders are closed:
    # sixteen peers at their full share, instead of max_connections of them (64 GiB).
    max_queued_total: int = 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{name} must be a non-negative number of seconds or None, "
                                 f"not {value!r}")
        if self.max_connections < 0 or self.max_queued_bytes < 1 or self.max_queued_total < 1:
            raise ValueError("max_connections must be >= 0, max_queued_bytes and "
                             "max_queued_total positive")
        if not self.max_connections:
            object.__setattr__(self, "max_connections", default_max_connections())


def over_total(total: int, stalled: Iterable[tuple[Any, int]], limit: int) -> list[Any]:
    """The stalled connections to close so that the ``total`` bytes queued come within
    ``limit``: the largest holders first."""
    victims = []
    for conn, n in sorted(stalled, key=lambda item: item[1], reverse=True):
        if total <= limit:
            break
        victims.append(conn)
        total -= n
    return victims


class ConnPolicy:
    """Deadlines and eviction over a set of connections; see the module docstring."""

    def __init__(self, limits: Limits, now: float,
                 pending: Callable[[Iterable[Any]], Callable[[Any], bool]]) -> None:
        self.limits = limits
        self._pending = pending  # conns -> a predicate: has the user work pending on it?
        hs, idle = limits.handshake_timeout or 0.0, limits.idle_timeout or 0.0
        self._hs = hs
        self._idle = idle
        self._sweep = min(_SWEEP_MAX, idle / 4) if idle else _SWEEP_MAX
        self._next_sweep = now + self._sweep
        # Deadlines in insertion order, which is deadline order (one timeout for all): the
        # due ones are a prefix, so a check costs nothing per connection still in time.
        self._handshaking: dict[Any, float] = {}
        self._conns: dict[Any, None] = {}  # every connection, oldest first

    def __len__(self) -> int:
        return len(self._conns)

    def opened(self, conn: Tracked, now: float, *, handshaking: bool) -> None:
        conn.active = False
        conn.last = now
        if not self._conns:
            self._next_sweep = now + self._sweep  # nothing was due while there was none
        self._conns[conn] = None
        if handshaking and self._hs:
            self._handshaking[conn] = now + self._hs

    def handshake_done(self, conn: Any) -> None:
        self._handshaking.pop(conn, None)

    def handshaking(self, conn: Any) -> bool:
        return conn in self._handshaking

    def closed(self, conn: Any) -> None:
        self._conns.pop(conn, None)
        self._handshaking.pop(conn, None)

    @property
    def sweep(self) -> float:
        """Seconds between sweeps (how stale "last seen" may be)."""
        return self._sweep

    def due(self) -> float:
        """When ``expire`` next has something to do (never, without connections: a plugin
        with none does not wake up for it)."""
        if not self._conns:
            return math.inf
        first = next(iter(self._handshaking.values()), math.inf)
        return min(first, self._next_sweep)

    def expire(self, now: float) -> tuple[list[tuple[Any, str]], list[Any]]:
        """(connections to close with their cause, connections quiet for a whole sweep
        whose read buffers can shrink)."""
        close: list[tuple[Any, str]] = []
        for conn, deadline in self._handshaking.items():
            if deadline > now:
                break
            close.append((conn, HANDSHAKE))
        for conn, _cause in close:
            del self._handshaking[conn]
        quiet: list[Any] = []
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep
            candidates = []
            for conn in self._conns:
                if conn.active:
                    conn.active = False
                    conn.last = now
                    continue
                quiet.append(conn)
                if self._idle and conn.accepted and now - conn.last >= self._idle \
                        and conn not in self._handshaking:
                    candidates.append(conn)
            if candidates:
                pending = self._pending(candidates)
                close += [(conn, IDLE) for conn in candidates if not pending(conn)]
        return close, quiet

    def admits(self) -> bool:
        """Whether one more connection fits under ``max_connections``."""
        return len(self._conns) < self.limits.max_connections

    def victim(self) -> Any | None:
        """The accepted connection to close to make room, or None (refuse the newcomer)."""
        for conn in self._handshaking:
            if conn.accepted:
                return conn
        accepted = [conn for conn in self._conns if conn.accepted]
        if not accepted:
            return None
        pending = self._pending(accepted)
        best = None
        best_key = (True, math.inf)
        # Not marked active since the last sweep, then seen longest ago; the dict's order
        # (oldest first) breaks ties, so among equals the oldest goes.
        for conn in accepted:
            key = (conn.active, conn.last)
            if key < best_key and not pending(conn):
                best, best_key = conn, key
        return best
