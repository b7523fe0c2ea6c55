"""A pull in chunks into one local handle, driven by completions alone (no waiting thread).

One NA ``get`` of a whole region tells nobody how far it has come until it ends, so a caller
that must tell a slow transfer from a stalled one (the RPC layer's overflow timeout) cannot.
``Stream`` pulls the region as ``chunk``-sized transfers, ``depth`` of them in flight, and
reports each landed chunk to ``on_chunk``; it completes once, after the last chunk, or after
the first failure once every chunk still in flight has ended (so nothing writes into the
local memory after its callback). Unlike ``pipeline()``, the chunks land in place: the local
handle is the whole destination.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from petasus import na

from .handle import Bulk, RemoteBulk
from .transfer import Transfer

log = logging.getLogger("petasus.bulk")

# 4 MiB: a chunk's request costs ~30 us, its bytes ~1 ms at loopback rates, so chunking costs
# nothing measurable; at 1 MB/s one chunk still lands every 4 s, well inside a stall timeout.
CHUNK = 4 << 20
DEPTH = 4  # enough chunks in flight to keep the link busy while each completion is handled


class Stream:
    """``size`` bytes of ``remote`` pulled into ``local`` (both from offset 0), in chunks."""

    __slots__ = ("_inflight", "_launching", "_next", "addr", "callback", "canceled", "chunk",
                 "depth", "done", "error", "local", "moved", "on_chunk", "remote", "size")

    def __init__(self, local: Bulk, remote: RemoteBulk, size: int, *, addr: na.Addr,
                 callback: Callable[[Stream], Any],
                 on_chunk: Callable[[int], Any] | None = None,
                 chunk: int = CHUNK, depth: int = DEPTH) -> None:
        if chunk < 1 or depth < 1:
            raise ValueError("Stream: chunk and depth must be positive")
        self.local = local
        self.remote = remote
        self.size = size
        self.addr = addr
        self.callback = callback
        self.on_chunk = on_chunk
        self.chunk = chunk
        self.depth = depth
        self.moved = 0
        self.done = False
        self.canceled = False
        self.error: BaseException | None = None
        self._next = 0
        self._inflight: list[Transfer] = []
        self._launching = False

    def __repr__(self) -> str:
        return (f"<Stream {self.moved}/{self.size} B from {self.addr.uri} "
                f"{'done' if self.done else f'{len(self._inflight)} chunks in flight'}>")

    def start(self) -> Stream:
        """Post the first chunks. A refusal before any byte moved (a bad range, a handle
        that does not resolve) raises here, as ``pull_from`` does; later ones are the
        stream's error."""
        first = self._post()
        if first is not None:
            self._launch(first)
        else:
            self._finish()
        return self

    def cancel(self) -> None:
        """Stop: no more chunks start, the ones in flight are canceled; the stream then
        completes with ``Canceled``."""
        self.canceled = True
        for t in list(self._inflight):
            t.cancel()
        self._settle()

    # -- internals --------------------------------------------------------------------------------
    def _post(self) -> Transfer | None:
        """Start the next chunk (None when there is none), its callback not yet added."""
        if self._next >= self.size:
            return None
        offset = self._next
        n = min(self.chunk, self.size - offset)
        transfer = self.local.pull_from(self.remote, n, offset=offset, local_offset=offset,
                                        addr=self.addr)
        self._next = offset + n
        self._inflight.append(transfer)
        return transfer

    def _launch(self, first: Transfer | None = None) -> None:
        # Transfers that complete at once (an eager handle) run their callback inside this
        # loop; the flag keeps that callback from starting chunks of its own, out of order.
        if self._launching:
            return
        self._launching = True
        try:
            pending = [first] if first is not None else []
            while True:
                while self.error is None and not self.canceled and self._next < self.size \
                        and len(self._inflight) < self.depth:
                    try:
                        pending.append(self._post())  # type: ignore[arg-type]
                    except (ValueError, na.NAError) as exc:
                        self.error = exc
                        for t in self._inflight:
                            if t not in pending:
                                t.cancel()
                if not pending:
                    break
                for t in pending:
                    t.add_done_callback(self._on_chunk)
                pending = []
        finally:
            self._launching = False
        self._settle()

    def _on_chunk(self, transfer: Transfer) -> None:
        self._inflight.remove(transfer)
        if transfer.error is not None:
            if self.error is None:
                self.error = transfer.error
                for t in list(self._inflight):
                    t.cancel()  # the rest would only fail the same way, or finish later
        else:
            self.moved += transfer.size
            if self.on_chunk is not None:
                self.on_chunk(transfer.size)
        self._launch()

    def _settle(self) -> None:
        if self.done or self._launching or self._inflight:
            return
        if self.error is None and self.canceled and self.moved < self.size:
            self.error = na.Canceled("pull_from", self.addr.uri, "canceled")
        self._finish()

    def _finish(self) -> None:
        self.done = True
        callback, self.callback = self.callback, _nothing
        try:
            callback(self)
        except Exception:  # a user's callback must not take the progress loop down
            log.exception("%r: the completion callback raised", self)


def _nothing(_stream: Stream) -> None:
    """A finished stream's callback: it ran already."""
