"""Two-sided messages: tagged sends, the posted receive pool, matching in Python."""

from __future__ import annotations

from collections import deque
from typing import Any

from .._generic import message_view
from ..errors import NAError, PeerError
from ..types import Addr, Callback, Op, OpKind
from ._common import (
    _EXP,
    _GET_REQ,
    _IGNORE_ALL,
    _KIND_MASK,
    _MAX_TAG,
    _POOL_IGNORE,
    _PROBE,
    _PROBE_REQ,
    _PUT_REQ,
    _RMA_ACK,
    _RMA_NAK,
    _RX,
    _SEND,
    _UNEXP,
    _recv_view,
    _Req,
    _rma_salt,
    log,
)
from ._fabric import ffi, lib


class Messages:
    """Mixin of ``OfiPlugin`` (state is created in ``OfiPlugin.__init__``)."""

    # -- messages -------------------------------------------------------------------------------
    def msg_get_max_unexpected_size(self) -> int:
        return self._max_msg

    def msg_get_max_expected_size(self) -> int:
        return self._max_msg

    def msg_send_unexpected(self, addr: Addr, buf: Any, tag: int,
                            callback: Callback | None = None) -> Op:
        return self._send_msg(OpKind.SEND_UNEXPECTED, _UNEXP, addr, buf, tag, callback)

    def msg_send_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op:
        return self._send_msg(OpKind.SEND_EXPECTED, _EXP, addr, buf, tag, callback)

    def _send_msg(self, kind: OpKind, bits: int, addr: Addr, buf: Any, tag: int,
                  callback: Callback | None) -> Op:
        view = message_view(kind, buf, tag, self._max_msg)
        n = len(view)
        op = Op(kind, callback, view, addr, tag)
        data = self._hdr + view  # one staging copy: sender name + payload in one send
        with self._lock:
            self._check_open(kind.name.lower())
            if addr.dead or addr.extra is None:
                self._fail(op, PeerError(kind.name.lower(), addr.uri,
                                         addr.dead or "the peer's address is unusable"))
                return op
            self.stats["msgs_sent"] += 1
            self.stats["bytes_sent"] += n
            self._start(self._send_req(_SEND, op, addr, data, bits | tag))
        return op

    def _send_req(self, kind: int, op: Op | None, addr: Addr, data: bytes, tag: int,
                  owner: Op | None = None) -> _Req:
        if tag & _KIND_MASK in (_GET_REQ, _PUT_REQ):
            # Requests carry their id's salt right after the sender header.
            data = data[: len(self._hdr)] + _rma_salt(tag) + data[len(self._hdr):]
            tag &= _KIND_MASK | _MAX_TAG
        if len(data) <= self._inject and kind != _PROBE_REQ:
            # Probes need their completion: its error is how a dead peer shows.
            req = _Req(kind, op, addr, lib.fi_tinject, (self._ep, data, len(data), addr.extra,
                                                        tag))
            if owner is not None:
                req.owner = owner
            return req
        cbuf = ffi.from_buffer(data)
        desc = ffi.NULL
        keep: Any = (data, cbuf)
        if self._mr_mode & lib.FI_MR_LOCAL:
            reg = self._mr_reg(cbuf, len(data), lib.FI_SEND)
            desc, keep = reg.desc, (data, cbuf, reg)
        req = _Req(kind, op, addr, lib.fi_tsend,
                   (self._ep, cbuf, len(data), desc, addr.extra, tag), keep)
        if owner is not None:
            req.owner = owner
        return req

    def msg_recv_unexpected(self, buf: Any, callback: Callback | None = None) -> Op:
        op = Op(OpKind.RECV_UNEXPECTED, callback, _recv_view(buf, "msg_recv_unexpected"))
        with self._lock:
            self._check_open("msg_recv_unexpected")
            if self._unexp_queue:
                addr, tag, data = self._unexp_queue.popleft()
                self._unqueue(len(data))
                self._fill(op, addr, tag, data)
                self._post(op)
            else:
                self._unexp_posted.append(op)
        return op

    def msg_recv_expected(self, addr: Addr, buf: Any, tag: int,
                          callback: Callback | None = None) -> Op:
        if not 0 <= tag <= _MAX_TAG:
            raise ValueError(f"msg_recv_expected: tag {tag} is not a u32")
        op = Op(OpKind.RECV_EXPECTED, callback, _recv_view(buf, "msg_recv_expected"), addr, tag)
        with self._lock:
            self._check_open("msg_recv_expected")
            if addr.dead:
                self._fail(op, PeerError("recv_expected", addr.uri, addr.dead))
            else:
                self._exp_posted.setdefault((addr, tag), deque()).append(op)
        return op

    def _fill(self, op: Op, addr: Addr, tag: int, data: Any) -> None:
        n = len(data)
        op.source = addr
        op.tag = tag
        if n > len(op.buffer):
            op.error = NAError(op.kind.name.lower(), addr.uri,
                               f"message of {n} B does not fit the {len(op.buffer)} B buffer")
        else:
            op.buffer[:n] = data
            op.size = n

    def _post_slot(self, i: int) -> None:
        # One request per slot, reused: a slot is reposted only after its completion was read,
        # so its fi_context2 is free again (and a message costs no allocation here).
        req = self._slot_reqs[i]
        if req is None:
            off = i * self._slot
            req = self._slot_reqs[i] = _Req(
                _RX, None, None, lib.fi_trecv,
                (self._ep, self._rx_c + off, self._slot, self._rx_desc, _IGNORE_ALL, 0,
                 _POOL_IGNORE), slot=i)
        self._start(req)

    def _on_message(self, req: _Req, length: int, tag: int) -> None:
        off = req.slot * self._slot
        rx = self._rx_view
        n = rx[off] if length else 0
        if length < 1 + n or n == 0:
            self.stats["protocol_errors"] += 1
            log.warning("%s: dropped a %d B message without a sender header", self.scheme, length)
            self._post_slot(req.slot)
            return
        name = bytes(rx[off + 1: off + 1 + n])
        addr = self._by_name.get(name)
        if addr is None:
            addr = self._addr_for(name)
        kind = tag & _KIND_MASK
        utag = tag & _MAX_TAG
        payload = rx[off + 1 + n: off + length]
        if kind == _UNEXP:
            self.stats["msgs_received"] += 1
            self.stats["bytes_received"] += len(payload)
            if self._unexp_posted:
                op = self._unexp_posted.popleft()
                self._fill(op, addr, utag, payload)
                self._post(op)
            else:
                self._unexp_queue.append((addr, utag, bytes(payload)))
                self._queued += len(payload)
                if self._queued > self._max_queued and self.transport != "shm":
                    # Back-pressure: leave the slot unposted; the provider holds the rest
                    # (not on shm, which would discard them: see RX_BUFFERS).
                    self._held_slots.append(req.slot)
                    return
        elif kind == _EXP:
            self.stats["msgs_received"] += 1
            self.stats["bytes_received"] += len(payload)
            waiting = self._exp_posted.get((addr, utag))
            if waiting:
                op = waiting.popleft()
                if not waiting:
                    del self._exp_posted[(addr, utag)]
                self._fill(op, addr, utag, payload)
                self._post(op)
            else:
                # As in Mercury: an expected message needs a pre-posted receive; one without
                # is a late reply to something canceled or timed out.
                self.stats["expected_dropped"] += 1
                log.debug("dropped an expected message from %s, tag %d: no receive posted",
                          addr.uri, utag)
        elif kind in (_GET_REQ, _PUT_REQ):
            self._serve_rma(addr, kind, utag, payload)
        elif kind in (_RMA_ACK, _RMA_NAK):
            self._rma_answer(addr, kind, utag, payload)
        elif kind != _PROBE:
            self.stats["protocol_errors"] += 1
            log.warning("%s: dropped a message of unknown kind %#x from %s", self.scheme,
                        kind >> 32, addr.uri)
        self._post_slot(req.slot)

    def _unqueue(self, n: int) -> None:
        self._queued -= n
        if self._held_slots and self._queued <= self._max_queued // 2:
            held, self._held_slots = self._held_slots, []
            for slot in held:
                self._post_slot(slot)

