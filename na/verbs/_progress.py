"""Progress of the verbs plugin: completions polled in batches, frames received from the SRQ
and dispatched (messages to the matcher, two-sided RMA served from our own table), the
out-of-band sockets, and spin-then-block on ``poll_fd()``.

The completion channel's descriptor is in the epoll set with the sockets; blocking is always
preceded by arming the CQ and one more poll (a completion that arrived before the arm made no
event), so neither ``progress()`` nor an asyncio loop waiting on ``poll_fd()`` misses one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .._regs import NAK_KEY, REFUSALS, refusal
from ..errors import AccessError, NAError, PeerError, ProtocolError
from ..types import Access, Addr, Op, OpState
from . import _protocol as p
from . import _wire as w
from ._driver import RECV_BIT
from ._links import DEAD, RETIRED, UP, Conn, log

CQ_BATCH = 64


class Progress:
    """Mixin of ``VerbsPlugin`` (its state is created in ``VerbsPlugin.__init__``)."""

    # -- progress (the loop is na._polled's) ----------------------------------------------------
    def _poll_cq(self) -> int:
        """Read and handle completions until the CQ is empty (caller holds the lock)."""
        total = 0
        while True:
            wcs = self._dev.poll(CQ_BATCH)  # type: ignore[union-attr]
            for wc in wcs:
                if wc.wr_id & RECV_BIT:
                    self._on_recv(wc)
                else:
                    self._on_send_done(wc)
            total += len(wcs)
            if len(wcs) < CQ_BATCH:
                return total

    def _on_recv(self, wc: Any) -> None:
        slot = wc.wr_id & ~RECV_BIT
        if self._closed:
            return
        conn = self._by_qpn.get(wc.qp_num)
        # A retired connection's frames still count: they arrived before its QP failed, and
        # their senders' NICs consider them delivered. A dead peer's are dropped.
        if wc.status == p.WC_SUCCESS and conn is not None and conn.state != DEAD:
            chunk, off = self._recv_pool.where(slot)
            view = self._recv_views[chunk][off:off + wc.byte_len]
            try:
                self._on_frame(conn, view)
            finally:
                view.release()
        elif wc.status not in (p.WC_SUCCESS, p.WC_FLUSH):
            log.warning("%s: a receive failed: %s", self._self_addr.uri,
                        p.WC_NAMES.get(wc.status, wc.status))
        self._post_recv(slot)
        if conn is not None:
            self._flush(conn)

    def _on_send_done(self, wc: Any) -> None:
        entry = self._work.pop(wc.wr_id, None)
        if entry is None:
            return
        conn, out, slot = entry
        conn.sq.done()
        if slot >= 0:
            self._send_pool.give(slot)
        op: Op | None = out.op
        status = wc.status
        if status == p.WC_SUCCESS:
            if op is not None and out.kind in (w.UNEXPECTED, w.EXPECTED):
                self._cq.complete(op)
            elif op is not None and out.kind == 0:
                op.remaining -= 1
                if op.remaining == 0:
                    self._cq.complete(op)  # Canceled if a cancel waited for the NIC
        elif status == p.WC_FLUSH:
            if op is not None and op.state == OpState.CANCELING and out.kind == 0:
                op.remaining -= 1  # canceled while posted: flushed pieces need no retry
                if op.remaining == 0:
                    self._cq.complete(op)
            else:
                self._requeue(conn, out)
        else:
            peer = conn.addr.uri if conn.addr is not None else None
            error = p.wc_error(status, op.kind.name.lower() if op else "send", peer)
            if isinstance(error, PeerError) and conn.addr is not None:
                self._peer_failed(conn.addr, error.cause)
            else:
                if op is not None:
                    self._cq.fail(op, error)
                self._retire(conn, error.cause)
        if conn.state in (RETIRED, DEAD):
            self._maybe_destroy(conn)
        else:
            self._flush(conn)

    def _on_events(self, events: list[tuple[int, int]]) -> None:
        for fd, ev in events:
            if fd == self._cq.wake_fd:
                self._cq.drain_wake()
            elif self._dev is not None and fd == self._dev.fd:
                self._dev.take_event()
            elif fd == self._listener.fileno():
                self._accept()
            else:
                conn = self._fds.get(fd)
                if conn is not None:
                    self._on_socket(conn, ev)

    def _pass(self, now: float) -> int:
        """One non-blocking pass over the CQ and the sockets."""
        got = self._poll_cq()
        events = self._poll_set.poll(0)
        if events:
            self._on_events(events)
            got += len(events) + self._poll_cq()
        return got

    def _arm(self) -> int:
        """Arm the CQ so that the channel wakes poll_fd() at the next completion; poll once
        more after arming (a completion before it made no event) until nothing came."""
        got = 0
        while True:
            self._dev.arm()  # type: ignore[union-attr]
            n = self._poll_cq()
            got += n
            if not n:
                return got

    def _may_block(self, wait: float) -> float | None:
        """Sleep only once the CQ is armed and the poll after arming found nothing: a
        completion that came before the arm makes no event on the channel."""
        return None if self._arm() else wait

    def _leave(self) -> None:
        self._arm()  # whoever waits on poll_fd() next must be woken

    def _pending(self) -> Iterator[Op | None]:
        for conn in self._conns:
            for out in conn.sq.queue:
                yield out.op
        for _conn, out, _slot in self._work.values():
            yield out.op
        for op, _addr in self._rma_wait.values():
            yield op

    # -- receiving ------------------------------------------------------------------------------
    def _on_frame(self, conn: Conn, data: memoryview) -> None:
        """One received frame (valid until its slot is posted again, after this returns)."""
        try:
            frame = w.decode_frame(data, self._slot_body)
            conn.credits.on_receive(frame.kind, frame.acked_data, frame.acked_ctrl)
        except (w.WireError, p.CreditError) as exc:
            self._protocol_error(conn, str(exc))
            return
        kind, addr = frame.kind, conn.addr
        payload = data[frame.body:]
        if kind == w.UNEXPECTED:
            self.stats["bytes_received"] += len(payload)
            if self._matcher.deliver_unexpected(addr, frame.tag, payload):  # type: ignore[arg-type]
                self._withhold(True)
        elif kind == w.EXPECTED:
            self.stats["bytes_received"] += len(payload)
            self._matcher.deliver_expected(addr, frame.tag, payload)  # type: ignore[arg-type]
        elif kind == w.GET_REQ:
            self._serve(conn, frame, Access.READ_ONLY, None)
        elif kind == w.PUT_REQ:
            self._serve(conn, frame, Access.WRITE_ONLY, payload)
        elif kind in (w.GET_REP, w.PUT_REP):
            self._answered(addr, frame, payload)  # type: ignore[arg-type]
        conn.credits.on_freed(kind)

    def _withhold(self, on: bool) -> None:
        """Back-pressure: stop (or resume) returning data credits to every peer."""
        for conn in self._conns:
            conn.credits.withheld = on
            if not on:
                self._flush(conn)

    def _serve(self, conn: Conn, frame: w.Frame, need: Access, data: memoryview | None) -> None:
        """A peer's two-sided get or put: our table decides, never what the request claims."""
        region = self._by_rkey.get(frame.key)
        nak = NAK_KEY if region is None else refusal(region.length, region.access,
                                                     frame.offset, frame.length, need)
        reply: Any = None
        if nak:
            self.stats["rma_refused"] += 1
            log.warning("%s: refused an RMA request from %s: %s", self._self_addr.uri,
                        conn.addr.uri, REFUSALS[nak])  # type: ignore[union-attr]
        else:
            self.stats["rma_served"] += 1
            view = region.view[frame.offset:frame.offset + frame.length]  # type: ignore[union-attr]
            if data is None:
                reply = view
            else:
                view[:] = data
        kind = w.GET_REP if need == Access.READ_ONLY else w.PUT_REP
        target = conn if conn.state == UP else self._conn_for(conn.addr)  # type: ignore[arg-type]
        target.sq.push(p.Out(kind, None, reply, extra=(frame.rma_id, nak)))
        if target is not conn:
            self._flush(target)

    def _answered(self, addr: Addr, frame: w.Frame, payload: memoryview) -> None:
        entry = self._rma_wait.get(frame.rma_id)
        if entry is None or entry[1] is not addr:
            return  # the answer to something canceled or failed
        del self._rma_wait[frame.rma_id]
        op = entry[0]
        if frame.status:
            error: NAError = AccessError(op.kind.name.lower(), addr.uri,
                                         REFUSALS.get(frame.status, f"refused ({frame.status})"))
            self._cq.fail(op, error)
        elif frame.kind == w.GET_REP:
            if len(payload) != op.length:
                self._cq.fail(op, ProtocolError("get", addr.uri, f"{len(payload)} B answered "
                                                f"for {op.length}"))
                return
            op.buffer[op.local_off:op.local_off + op.length] = payload
            self._cq.complete(op)
        else:
            self._cq.complete(op)
