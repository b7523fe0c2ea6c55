"""Posting (with FI_EAGAIN backlog), completions, peer failure, progress and cancel."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

from .._regs import NAK_PROTOCOL
from ..errors import Canceled, PeerError
from ..types import Addr, Op, OpKind, OpState
from ._common import (
    _PROBE,
    _PROBE_REQ,
    _PUT_SINK,
    _RMA,
    _RMA_ACK,
    _RMA_NAK,
    _RX,
    _SEND,
    _SERVE,
    _SHAKE,
    CQ_BATCH,
    SHM_TICK_US,
    _bell_address,
    _fid,
    _Req,
    _shm_gone,
    _tcp_refused,
    _uri,
    log,
)
from ._fabric import ffi, lib
from .errors import PEER_FAILURES, check_rc, error_for


class Progress:
    """Mixin of ``OfiPlugin`` (state is created in ``OfiPlugin.__init__``)."""

    # -- posting and completions ----------------------------------------------------------------
    def _start(self, req: _Req) -> None:
        """Post ``req`` (caller holds the lock); FI_EAGAIN queues it for the progress loop.

        Order is kept per peer (a get's data receive must be posted before its request goes
        out), not across peers: a peer whose connection cannot take more (rxm answers FI_EAGAIN
        forever to a dead one) must not hold back the others.
        """
        if req.addr in self._blocked:
            self._queue(req)
            return
        rc = self._submit_req(req)
        if rc == -lib.FI_EAGAIN:
            self.stats["eagain"] += 1
            self._queue(req)
        elif rc:
            self._req_failed(req, rc, "")

    def _submit_req(self, req: _Req) -> int:
        if req.fn is lib.fi_tinject:
            rc = int(lib.fi_tinject(*req.args))  # no context: no completion will come
            if rc == 0:
                if req.op is not None:
                    self._cq.complete(req.op)
                if self._bell is not None:
                    self._ring(req.addr)  # type: ignore[arg-type]
            return rc
        key = int(ffi.cast("uintptr_t", req.ctx))
        self._reqs[key] = req  # before the call: the completion may be read by another thread
        rc = int(req.fn(*req.args, req.ctx))
        if rc:
            del self._reqs[key]
            return rc
        if self._cq.polling:
            os.eventfd_write(self._cq.wake_fd, 1)  # the sleeping poller must drive it
        if self._bell is not None and req.kind != _RX and req.fn is lib.fi_tsend:
            self._ring(req.addr)  # type: ignore[arg-type]
        return rc

    def _ring(self, addr: Addr) -> None:
        """Wake a shm peer that may be asleep in progress() (see ``_doorbell``)."""
        bell = self._bells.get(addr)
        if bell is None:
            bell = self._bells[addr] = _bell_address(self._name_of(addr.uri))
        try:
            self._bell.sendto(b"", bell)  # type: ignore[union-attr]
        except OSError:
            pass  # full, or no doorbell there (not petasus): the peer's tick still runs

    def _queue(self, req: _Req) -> None:
        self._backlog.append(req)
        self._blocked[req.addr] = self._blocked.get(req.addr, 0) + 1

    def _retry_backlog(self) -> None:
        """Post what FI_EAGAIN held back, oldest first; drop what was failed or canceled."""
        backlog, self._backlog = self._backlog, deque()
        self._blocked = {}
        refused: set[Addr | None] = set()
        for req in backlog:
            owner = req.owner
            if owner is not None and owner.state == OpState.FINISHED:
                continue  # failed or canceled while it waited: never posted, nothing to undo
            if owner is None and req.addr is not None and (req.addr.dead
                                                           or self._stale_shake(req)):
                continue  # a probe or an answer to a peer known dead, a handshake given up
            if req.addr in refused:
                self._queue(req)
                continue
            rc = self._submit_req(req)
            if rc == -lib.FI_EAGAIN:
                refused.add(req.addr)
                self._queue(req)
            elif rc:
                self._req_failed(req, rc, "")

    def _call_name(self, req: _Req) -> str:
        """The libfabric call that failed (a checked get's failure is its fi_trecv's)."""
        return str(getattr(req.fn, "__name__", "fi_tsend"))

    def _req_failed(self, req: _Req, code: int, detail: str) -> None:
        code = abs(code)
        kind = req.kind
        if kind == _RX:
            if code != lib.FI_ECANCELED:
                self.stats["protocol_errors"] += 1
                log.warning("%s: receive slot failed: %s", self.scheme,
                            error_for(code, "fi_trecv", detail=detail))
                if not self._closed:
                    self._submit_slot(req.slot)
            return
        if kind == _PUT_SINK:
            if req.rma_id != -1 and req.addr is not None and not self._closed:
                self._send_answer(req.addr, req.rma_id, _RMA_NAK, bytes((NAK_PROTOCOL,)))
            return
        addr = req.addr
        op = req.owner
        if kind == _RMA:
            self._rma_wait.pop(req.rma_id, None)
        name = op.kind.name.lower() if op is not None else (
            "handshake" if kind == _SHAKE else "probe")
        exc: BaseException = error_for(code, self._call_name(req), op=name, peer=_uri(addr),
                                       detail=detail)
        if kind == _PROBE_REQ:
            self._probing.discard(addr)  # type: ignore[arg-type]
        if code in PEER_FAILURES and addr is not None:
            self._peer_failed(addr, exc.cause)  # type: ignore[attr-defined]
        if kind == _SERVE:
            log.info("%s: serving an RMA request failed: %s", self.scheme, exc)
            return
        if op is not None:
            if op.state == OpState.CANCELING:
                exc = Canceled(name, _uri(addr), "canceled")
            if op.state != OpState.FINISHED:
                self._cancel_chunks(op)
            self._cq.fail(op, exc)

    def _cancel_chunks(self, op: Op) -> int:
        """Withdraw the receives still posted into ``op``'s memory (checked get data); return
        how many were withdrawn.

        Only requests in ``_reqs`` were accepted by the provider; one still in the backlog was
        never posted (fi_cancel of it would name a context libfabric does not know) and is
        dropped by ``_retry_backlog`` once ``op`` is finished.
        """
        n = 0
        for req in list(self._reqs.values()):
            if req.owner is op and req.kind == _RMA and req.fn is lib.fi_trecv:
                lib.fi_cancel(_fid(self._ep), req.ctx)
                n += 1
        return n

    def _read_cq(self) -> int:
        """One batch of completions (caller holds the lock); returns how many were read."""
        entries = self._cq_entries
        n = lib.fi_cq_read(self._cq_fid, entries, CQ_BATCH)
        if n > 0:
            reqs = self._reqs
            for i in range(n):
                e = entries[i]
                req = reqs.pop(int(ffi.cast("uintptr_t", e.op_context)), None)
                if req is None:
                    continue
                kind = req.kind
                if kind == _RX:
                    self._on_message(req, e.len, e.tag)
                elif kind == _SEND:
                    if req.op is not None:
                        self._cq.complete(req.op)
                elif kind == _RMA:
                    if req.rma_id:
                        self._rma_wait.pop(req.rma_id, None)
                    op = req.op
                    op.remaining -= 1  # type: ignore[union-attr]
                    if op.remaining == 0:  # type: ignore[union-attr]
                        self._cq.complete(op)  # type: ignore[arg-type]
                elif kind == _PUT_SINK:
                    if req.rma_id != -1:
                        self._send_answer(req.addr, req.rma_id, _RMA_ACK, b"")  # type: ignore[arg-type]
                elif kind == _PROBE_REQ:
                    self._probing.discard(req.addr)  # type: ignore[arg-type]
            return n
        if n == -lib.FI_EAVAIL:
            err = ffi.new("struct fi_cq_err_entry *")
            if lib.fi_cq_readerr(self._cq_fid, err, 0) != 1:
                return 0
            req = self._reqs.pop(int(ffi.cast("uintptr_t", err.op_context)), None)
            if req is not None:
                self._req_failed(req, err.err, self._cq_detail(err))
            return 1
        if n != -lib.FI_EAGAIN:
            check_rc(n, "fi_cq_read", op="progress", count=CQ_BATCH)
        return 0

    def _cq_detail(self, err: Any) -> str:
        buf = ffi.new("char[]", 256)
        text = lib.fi_cq_strerror(self._cq_fid, err.prov_errno, err.err_data, buf, 256)
        return ffi.string(text).decode("utf-8", "replace") if text != ffi.NULL else ""

    # -- peer failure ---------------------------------------------------------------------------
    def _peer_failed(self, addr: Addr, cause: str) -> None:
        """Fail every pending operation with ``addr``: none of them will complete normally."""
        self.stats["peer_failures"] += 1
        log.info("%s: peer %s failed: %s", self.scheme, addr.uri, cause)
        # Later operations fail at once instead of waiting for a provider that may only
        # ever answer FI_EAGAIN (rxm keeps trying to reconnect to a dead peer).
        addr.dead = addr.dead or cause
        if self._shake.busy(addr):
            self._shake.forget(addr)
            self.stats["handshake_failures"] += 1
        self._fail_held(addr, cause)
        self._matcher.fail_expected(
            addr, lambda op: PeerError(op.kind.name.lower(), addr.uri, cause))
        for req in itertools.chain(list(self._reqs.values()), self._backlog,
                                   list(self._rma_wait.values())):
            op = req.owner
            if req.addr is addr and op is not None and op.state != OpState.FINISHED:
                # The provider may still hold the buffer: the request stays in _reqs (its
                # late completion is ignored) so that the memory stays alive.
                self._cancel_chunks(op)
                self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, cause))

    def _check_peers(self) -> None:
        """Probe the peers that pending operations wait for (caller holds the lock)."""
        for gone in self._gone:  # after the CQ was read dry: what they sent has landed
            self._peer_failed(gone, "the peer closed its endpoint (connection closed)")
        self._gone.clear()
        busy = self._matcher.expected_peers()
        busy.update(r.addr for r in itertools.chain(self._reqs.values(), self._rma_wait.values(),
                                                    self._backlog)
                    if r.owner is not None and r.owner.state != OpState.FINISHED)
        busy.discard(None)  # type: ignore[arg-type]
        self._expire_shakes()
        for addr in busy:
            if addr.dead or addr is self._self_addr or addr not in self._ready:
                continue  # a peer in its handshake has the handshake's deadline
            if self.transport == "shm":
                cause = _shm_gone(addr.uri)
                if cause:
                    addr.dead = cause  # a process id never comes back
                    self._peer_failed(addr, cause)
            elif addr in self._probing and addr in self._blocked:
                # The last probe could not even be posted: the provider cannot reach the
                # peer. Ask the kernel whether anyone still listens at its address.
                cause = _tcp_refused(addr.uri)
                if cause:
                    self._peer_failed(addr, cause)
            elif addr not in self._probing and addr.fabric_addr is not None:
                self._probing.add(addr)
                self.stats["probes"] += 1
                self._start(self._send_req(_PROBE_REQ, None, addr, b"", _PROBE))

    # -- progress (the loop is na._polled's) ----------------------------------------------------
    def _pass(self, now: float) -> int:
        """Retry the FI_EAGAIN backlog, read the CQ dry, and probe the peers when due."""
        if self._backlog:
            self._retry_backlog()
        got = n = self._read_cq()
        while n == CQ_BATCH:
            n = self._read_cq()
            got += n
        if now >= self._next_probe:
            self._next_probe = now + self._probe_interval
            self._check_peers()
        return got

    def _may_block(self, wait: float) -> float | None:
        """Sleep at most until the next probe is due; on the CQ's wait descriptor once
        fi_trywait allows it (not when something is ready, or the provider wants progress),
        or, on shm, which has none, in ticks."""
        wait = min(wait, self._probe_interval)
        if self._wait_fd < 0:
            return min(wait, SHM_TICK_US / 1e6)
        return wait if lib.fi_trywait(self._fabric, self._cq_fids, 1) == 0 else None

    def _on_events(self, events: list[tuple[int, int]]) -> None:
        for fd, _ev in events:
            if fd in (self._cq.wake_fd, self._timer_fd):
                try:
                    os.read(fd, 8)
                except OSError:
                    pass
            elif self._bell is not None and fd == self._bell.fileno():
                self._drain_bell()

    def _pending(self) -> Iterator[Op | None]:
        for req in itertools.chain(self._reqs.values(), self._backlog):
            yield req.op
        for op, _start in itertools.chain(*self._held.values()):
            yield op

    def _drain_bell(self) -> None:
        for _ in range(256):
            try:
                self._bell.recv(1)  # type: ignore[union-attr]
            except OSError:
                return

    def _cancel_transfer(self, op: Op) -> bool:
        if op.kind == OpKind.GET and self._rma_mode == "checked":
            # The data receives are withdrawn (fi_cancel); each reports FI_ECANCELED, or
            # completes if its data was already landing, and the op then ends as canceled.
            op.state = OpState.CANCELING
            # Nothing of it reached the provider yet (all in the FI_EAGAIN backlog, say to a
            # peer that does not progress): nothing will report back, so it ends now.
            return self._cancel_chunks(op) > 0
        if any(r.owner is op for r in itertools.chain(self._reqs.values(),
                                                       self._rma_wait.values())):
            # Posted to libfabric, which cannot withdraw sends or RMA: it completes as
            # canceled once the provider hands the buffer back.
            op.state = OpState.CANCELING
            return True
        return False  # still in the backlog (never posted): skipped when retried
