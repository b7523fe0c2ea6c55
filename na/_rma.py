"""Emulated RMA of the socket plugins: one-sided for the user, served by the target's loop.

The initiator splits a transfer into chunks of at most ``rma_chunk`` bytes; each is one request
frame (a 24-byte descriptor: key, offset, length) that the *target's* progress loop serves
from, or into, the registered memory in place, after checking key, bounds and rights against
its own ``Registrations``, never against what the request claims. The connection routes the
RMA frame kinds to the methods of one ``EmulatedRma``; nothing here knows sockets beyond the
connection's ``rma`` and ``put_target`` fields and the outbox it queues frames on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import framing as fr
from ._conn import Conn, Outbox
from ._regs import NAK_KEY, NAK_PROTOCOL, REFUSALS, Registrations
from .core import CompletionQueue, canceled
from .errors import AccessError, ProtocolError
from .types import Access, MemHandle, Op, OpKind, OpState

_HDR = fr.HEADER
_MAGIC = fr.MAGIC


@dataclass(eq=False)
class EmulatedRma:
    """Both ends of emulated put/get over a connection's stream: the completion queue and
    registrations it serves from, the outbox it sends on, chunks of at most ``chunk`` bytes."""

    cq: CompletionQueue
    regs: Registrations
    outbox: Outbox
    stats: dict[str, int]
    log: logging.Logger
    chunk: int
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def routes(self) -> dict[int, Any]:
        """The frame kinds this object serves, for the connection's routing table."""
        return {fr.GET_RESP: self.chunk_answered, fr.RMA_ACK: self.chunk_answered,
                fr.RMA_NAK: self.chunk_refused, fr.GET_REQ: self.serve_get,
                fr.PUT_REQ: self.check_put, fr.PUT_DATA: self.put_landed}

    # -- initiator -------------------------------------------------------------------------------
    def start(self, op: Op, conn: Conn) -> None:
        chunk, length, view, key = self.chunk, op.length, op.buffer, op.remote.key
        is_get = op.kind == OpKind.GET
        bufs: list[Any] = []
        op.remaining = 0
        for off in range(0, length, chunk):
            n = min(chunk, length - off)
            op_id = next(self._ids)
            local = view[op.local_off + off: op.local_off + off + n]
            desc = fr.RMA_DESC.pack(key, op.remote_off + off, n)
            if is_get:
                conn.rma[op_id] = (op, local)
                bufs += (_HDR.pack(_MAGIC, fr.GET_REQ, 0, 24, op_id), desc)
            else:
                conn.rma[op_id] = (op, None)
                bufs += (_HDR.pack(_MAGIC, fr.PUT_REQ, 0, 24, op_id), desc,
                         _HDR.pack(_MAGIC, fr.PUT_DATA, 0, n, op_id), local)
            op.remaining += 1
        self.outbox.enqueue(conn, bufs, None)

    def chunk_answered(self, conn: Conn, tag: int, payload: memoryview | None) -> None:
        entry = conn.rma.pop(tag, None)
        if entry is not None:
            self._chunk_done(entry[0], None)

    def chunk_refused(self, conn: Conn, tag: int, payload: memoryview | None) -> None:
        entry = conn.rma.pop(tag, None)
        reason = payload[0] if payload else NAK_PROTOCOL
        if entry is not None:
            op = entry[0]
            self._chunk_done(op, AccessError(op.kind.name.lower(), conn.name,
                                             REFUSALS.get(reason, f"refused ({reason})")))

    def _chunk_done(self, op: Op, error: BaseException | None) -> None:
        op.remaining -= 1
        if op.state == OpState.PENDING:
            if error is not None:
                op.error = error
                self.cq.post(op)
            elif op.remaining == 0:
                self.cq.post(op)
        elif op.state == OpState.CANCELING and op.remaining == 0:
            op.error = canceled(op)
            self.cq.post(op)

    def landing(self, conn: Conn, kind: int, length: int, tag: int) -> memoryview | None:
        """Where a direct frame's payload lands: a get's reply in the initiator's memory, or
        a put's data in the target's registration (None: discard it)."""
        if kind == fr.GET_RESP:
            entry = conn.rma.get(tag)
            if entry is None or entry[0].state != OpState.PENDING:
                return None
            dest = entry[1]
            if dest is None:
                raise ProtocolError("get", conn.name, f"data for operation {tag}, which is a put")
            if len(dest) != length:
                raise ProtocolError("get", conn.name, f"reply of {length} B to a {len(dest)} B get")
            return dest
        target = conn.put_target
        if target is None:
            raise ProtocolError("put", conn.name, "put data without a put request")
        dest = target[1]
        if dest is not None and len(dest) != length:
            raise ProtocolError("put", conn.name, f"{length} B of data for a {len(dest)} B put")
        return dest

    def stop_landing(self, op: Op, conn: Conn | None) -> None:
        """A canceled get: a chunk arriving right now must stop landing in the user's memory
        before the cancel completes (later chunks are discarded by ``landing``)."""
        landing = conn.reader.landing_in() if conn is not None else None
        if landing is not None:
            entry = conn.rma.get(landing[0])  # type: ignore[union-attr]
            if entry is not None and entry[0] is op:
                conn.reader.discard_rest()  # type: ignore[union-attr]

    # -- target ----------------------------------------------------------------------------------
    def _lookup(self, payload: memoryview | None, need: Access) -> tuple[memoryview | None, int]:
        if payload is None or len(payload) != fr.RMA_DESC.size:
            return None, NAK_PROTOCOL
        key, off, length = fr.RMA_DESC.unpack(payload)
        handle, nak = self.regs.check(key, off, length, need)
        if handle is None:
            return None, nak
        return handle.view[off: off + length], 0  # type: ignore[index]

    def serve_get(self, conn: Conn, op_id: int, payload: memoryview | None) -> None:
        view, nak = self._lookup(payload, Access.READ_ONLY)
        if view is None:
            self._refuse(conn, op_id, nak)
            return
        self.stats["rma_served"] += 1
        self.outbox.enqueue(conn, [_HDR.pack(_MAGIC, fr.GET_RESP, 0, len(view), op_id), view],
                            None)

    def check_put(self, conn: Conn, op_id: int, payload: memoryview | None) -> None:
        if conn.put_target is not None:
            raise ProtocolError("put", conn.name, "two put requests without data between")
        view, nak = self._lookup(payload, Access.WRITE_ONLY)
        if view is not None:
            self.stats["rma_served"] += 1
        conn.put_target = (op_id, view, nak)

    def put_landed(self, conn: Conn, tag: int, payload: memoryview | None) -> None:
        op_id, _dest, nak = conn.put_target  # type: ignore[misc]
        conn.put_target = None
        if nak:
            self._refuse(conn, op_id, nak)
        else:
            self.outbox.enqueue(conn, [_HDR.pack(_MAGIC, fr.RMA_ACK, 0, 0, op_id)], None)

    def _refuse(self, conn: Conn, op_id: int, reason: int) -> None:
        self.stats["rma_refused"] += 1
        self.log.warning("refused an RMA request from %s: %s", conn.name,
                         REFUSALS.get(reason, reason))
        self.outbox.enqueue(conn, [_HDR.pack(_MAGIC, fr.RMA_NAK, 0, 1, op_id), bytes((reason,))],
                            None)

    def withdraw(self, handle: MemHandle, conns: set[Conn]) -> None:
        """``handle`` is being deregistered: a put landing in it right now must not write
        into it any more, and is refused instead of acknowledged."""
        base = handle.view.obj  # type: ignore[union-attr]
        for conn in conns:
            landing = conn.reader.landing_in()
            target = conn.put_target
            if landing is not None and target is not None and target[1] is landing[1] \
                    and landing[1].obj is base:
                conn.put_target = (target[0], None, NAK_KEY)
                conn.reader.discard_rest()
