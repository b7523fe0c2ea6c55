"""Connection limits applied to a socket plugin: the driver of ``na._limits.ConnPolicy``.

It closes what the policy names through the plugin's own failure path (the connection's ops
fail with a ``PeerError`` naming the cause), counts every cause in ``statistics()``, logs the
first of each at warning level and the rest at debug level (an attack is 1,000 connections:
one line, not 1,000), and pauses and resumes the reads of a peer whose replies pile up.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ._conn import EPOLLIN, PAUSE_BACKLOG, Conn, Outbox
from ._limits import BACKLOG, CAP, EMFILE, HANDSHAKE, ConnPolicy, Limits, over_total
from ._loop import EventLoop
from .core import Matcher
from .types import Addr

# Out of descriptors with none to give back (or out of memory): accepts stop this long
# instead of spinning on a listener that stays readable.
ACCEPT_PAUSE = 0.1
STATS = ("closed_handshake_timeout", "closed_idle", "closed_cap", "closed_emfile",
         "closed_backlog", "refused_cap", "reads_paused")


class Guarded(Protocol):
    """What the guard uses of its plugin (``na._sockets.SocketPlugin``)."""

    stats: dict[str, int]
    log: logging.Logger
    scheme: str
    _closed: bool
    _conns: set[Conn]
    _listener: socket.socket | None
    _loop: EventLoop
    _matcher: Matcher
    _outbox: Outbox

    def addr_self(self) -> Addr: ...
    def _new_conn(self, sock: socket.socket, name: str, connecting: bool, *,
                  accepted: bool = ..., handshaking: bool | None = ...) -> Conn: ...
    def _conn_failed(self, conn: Conn, cause: str, closing: bool = ...) -> None: ...
    def _rearm(self, conn: Conn) -> None: ...


class ConnGuard:
    """The limits of one plugin's connections; all calls run under the plugin's lock."""

    def __init__(self, plugin: Guarded, limits: Limits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.plugin = plugin
        self.limits = limits
        self.clock = clock
        self.policy = ConnPolicy(limits, clock(), self._pending)
        self.stats = plugin.stats
        self.stats.update(dict.fromkeys(STATS, 0))
        self._logged: set[str] = set()
        self._accept_resume = math.inf
        plugin._loop.on_timer = self.on_timer
        plugin._outbox.backlog = self.backlog

    def _pending(self, conns: Iterable[Conn]) -> Callable[[Conn], bool]:
        """Whether the user has work riding on a connection: RMA of ours in flight on it, or
        a posted receive for a reply from its peer. One pass over the posted receives for
        all the candidates of a sweep."""
        expected = self.plugin._matcher.expected_peers()
        return lambda conn: bool(conn.rma) or (conn.addr is not None and conn.addr in expected)

    # -- the plugin's hooks -------------------------------------------------------------------
    def opened(self, conn: Conn, accepted: bool, handshaking: bool) -> None:
        conn.accepted = accepted
        self.policy.opened(conn, self.clock(), handshaking=handshaking)
        self.plugin._loop.arm(self.policy.due())

    def closed(self, conn: Conn) -> None:
        self.policy.closed(conn)

    def accept(self, _ev: int) -> None:
        """The listener's handler: accept every pending peer that there is room for."""
        plugin = self.plugin
        listener = plugin._listener
        while listener is not None:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self.make_room(EMFILE):
                    continue  # a descriptor is free again: the pending peer takes it
                self._log("accept_paused", "%s: accept failed (%s); pausing accepts for "
                          "%.1f s", plugin.addr_self().uri, exc, ACCEPT_PAUSE)
                plugin._loop.modify(listener.fileno(), 0)
                self._accept_resume = self.clock() + ACCEPT_PAUSE
                plugin._loop.arm(self._accept_resume)
                return
            if not self.admit():
                sock.close()
                continue
            sock.setblocking(False)
            plugin._new_conn(sock, f"{plugin.scheme} peer {peer or 'local'}", False,
                             accepted=True)

    def admit(self) -> bool:
        """Room for a connection just accepted: at ``max_connections``, close a victim to
        make it, or refuse the newcomer (False) when every accepted connection has work."""
        if self.policy.admits() or self.make_room(CAP):
            return True
        self.stats["refused_cap"] += 1
        self._log("refused_cap", "%s: refused a connection: %d connections open "
                  "(max_connections) and every accepted one has work pending",
                  self.plugin.addr_self().uri, len(self.policy))
        return False

    def make_room(self, cause: str) -> bool:
        """Close the policy's victim for ``cause`` (CAP or EMFILE); False if there is none."""
        victim = self.policy.victim()
        if victim is None:
            return False
        why = (f"closed to make room for a new connection ({self.limits.max_connections} "
               "open, max_connections)" if cause == CAP else
               "closed to make room for a new connection (out of file descriptors)")
        self._close(victim, cause, why)
        return True

    def on_timer(self, now: float) -> float:
        """Deadlines due at ``now``; returns when the next one is."""
        listener = self.plugin._listener
        if now >= self._accept_resume:
            self._accept_resume = math.inf
            if listener is not None and not self.plugin._closed:
                self.plugin._loop.modify(listener.fileno(), EPOLLIN)
        close, quiet = self.policy.expire(now)
        for conn, cause in close:
            if cause == HANDSHAKE:
                why = f"no handshake within {self.limits.handshake_timeout} s"
            else:
                why = f"idle for {self.limits.idle_timeout} s"
            self._close(conn, cause, why)
        for conn in quiet:
            if not conn.closed:
                conn.reader.shrink()
        if quiet:
            self.check_total(quiet, now)
        return min(self.policy.due(), self._accept_resume)

    def check_total(self, quiet: list[Conn], now: float) -> None:
        """At a sweep: while the bytes queued to all accepted peers exceed
        ``max_queued_total``, close the ``quiet`` ones with no traffic for two sweeps
        holding the most. Never from inside a send."""
        total = sum(conn.queued for conn in self.plugin._conns if conn.accepted and conn.writing)
        limit = self.limits.max_queued_total
        if total <= limit:
            return
        stale = now - 2 * self.policy.sweep
        stalled = [(conn, conn.queued) for conn in quiet if conn.accepted and conn.writing
                   and not conn.closed and conn.last <= stale]
        for conn in over_total(total, stalled, limit):
            self._close(conn, BACKLOG, f"{conn.queued} B queued to it unread while all peers "
                        f"together had more than {limit} B queued (max_queued_total)")

    def backlog(self, conn: Conn) -> None:
        """Stop reading an accepted peer's requests while more than ``max_queued_bytes`` are
        queued to it; read again once its queue is below half that.

        Its requests (and whatever else it sends) wait in the kernel's socket buffers, which
        are bounded, instead of turning into replies in ours, which were not: 300,000
        unread replies held 150 MB. Other connections are not affected.

        Why this cannot deadlock a well-behaved peer: only the accepting end of a connection
        pauses, so every connection has one end, the one that dialled, that never stops
        reading for this reason. A well-behaved dialler reads what we send, our queue
        drains, and we read it again: pausing only delays its next requests until it has
        taken the replies to its earlier ones. Were both ends to pause, two peers moving
        bulk to each other at once (a push one way while serving a get the other) could
        each wait for the other to read first.
        """
        outbox = self.plugin._outbox
        if conn.queued > outbox.high and not conn.paused & PAUSE_BACKLOG:
            conn.paused |= PAUSE_BACKLOG
            self.stats["reads_paused"] += 1
            self._log("reads_paused", "%s: stopped reading requests from %s: %d B of replies "
                      "queued to it (max_queued_bytes=%d); reading again below half that",
                      self.plugin.addr_self().uri, conn.name, conn.queued, outbox.high)
        elif conn.paused & PAUSE_BACKLOG and conn.queued < outbox.low:
            conn.paused &= ~PAUSE_BACKLOG
        else:
            return
        if not conn.closed:
            self.plugin._rearm(conn)

    def paused(self) -> int:
        return sum(1 for conn in self.plugin._conns if conn.paused & PAUSE_BACKLOG)

    # -- closing and logging -----------------------------------------------------------------
    def _close(self, conn: Conn, cause: str, why: str) -> None:
        key = f"closed_{cause}"
        self.stats[key] += 1
        peer = conn.addr.uri if conn.addr is not None else conn.name
        self._log(key, "%s: closing connections: %s (first: %s)",
                  self.plugin.addr_self().uri, why, peer)
        self.plugin._conn_failed(conn, why)

    def _log(self, key: str, fmt: str, *args: Any) -> None:
        if key in self._logged:
            self.plugin.log.debug(fmt, *args)
            return
        self._logged.add(key)
        self.plugin.log.warning(fmt + "; further ones are counted in statistics()[%r] and "
                                "logged at debug level", *args, key)
