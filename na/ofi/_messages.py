"""Two-sided messages: tagged sends, the posted receive pool, matching in Python."""

from __future__ import annotations

from typing import Any

from ..core import MAX_TAG
from ..errors import PeerError
from ..types import Addr, Op
from ._common import (
    _EXP,
    _GET_REQ,
    _HELLO,
    _IGNORE_ALL,
    _KIND_MASK,
    _POOL_IGNORE,
    _PROBE,
    _PROBE_REQ,
    _PUT_REQ,
    _RMA_ACK,
    _RMA_NAK,
    _RX,
    _SEND,
    _SHAKE,
    _UNEXP,
    _Req,
    _rma_salt,
    log,
)
from ._fabric import ffi, lib


class Messages:
    """Mixin of ``OfiPlugin``: the transport half of messaging (matching is the core's)."""

    def _send(self, op: Op, view: memoryview | bytes, expected: bool) -> None:
        addr = op.addr
        with self._lock:
            self._check_open(op.kind.name.lower())
            if addr.dead or addr.fabric_addr is None:
                self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri,
                                            addr.dead or "the peer's address is unusable"))
                return
            self.stats["msgs_sent"] += 1
            self.stats["bytes_sent"] += len(view)
            tag = (_EXP if expected else _UNEXP) | op.tag
            if addr not in self._ready:
                self._hold(op, lambda: self._start(self._send_req(_SEND, op, addr, view, tag)))
                return
            self._start(self._send_req(_SEND, op, addr, view, tag))

    def _send_req(self, kind: int, op: Op | None, addr: Addr, body: memoryview | bytes,
                  tag: int, owner: Op | None = None) -> _Req:
        # One staging copy: header + payload in one send. The header is the session token the
        # peer gave us (a handshake's is our name: the claim it verifies).
        hdr = self._out.get(addr, self._hdr) if kind != _SHAKE else self._hdr
        if tag & _KIND_MASK in (_GET_REQ, _PUT_REQ):
            # Requests carry their id's salt right after the sender header.
            data = hdr + _rma_salt(tag) + body
            tag &= _KIND_MASK | MAX_TAG
        else:
            data = hdr + body
        if len(data) <= self._inject and kind != _PROBE_REQ:
            # Probes need their completion: its error is how a dead peer shows.
            req = _Req(kind, op, addr, lib.fi_tinject, (self._ep, data, len(data), addr.fabric_addr,
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
                   (self._ep, cbuf, len(data), desc, addr.fabric_addr, tag), keep)
        if owner is not None:
            req.owner = owner
        return req

    def _submit_slot(self, i: int) -> None:
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
            self._submit_slot(req.slot)
            return
        # Who sent it: the established peer whose session token heads it (see _handshake).
        addr = self._by_token.get(bytes(rx[off + 1: off + 1 + n]))
        if addr is None or tag & _KIND_MASK >= _HELLO:
            self._vet(tag & _KIND_MASK, bytes(rx[off + 1: off + 1 + n]),
                      bytes(rx[off + 1 + n: off + length]))
            self._submit_slot(req.slot)
            return
        kind = tag & _KIND_MASK
        utag = tag & MAX_TAG
        payload = rx[off + 1 + n: off + length]
        if kind == _UNEXP:
            self.stats["bytes_received"] += len(payload)
            if self._matcher.deliver_unexpected(addr, utag, payload) and \
                    self.transport != "shm":
                # Back-pressure: leave the slot unposted; the provider holds the rest (not on
                # shm, which would discard them: see RX_BUFFERS).
                self._held_slots.append(req.slot)
                return
        elif kind == _EXP:
            self.stats["bytes_received"] += len(payload)
            self._matcher.deliver_expected(addr, utag, payload)
        elif kind in (_GET_REQ, _PUT_REQ):
            self._serve_rma(addr, kind, utag, payload)
        elif kind in (_RMA_ACK, _RMA_NAK):
            self._rma_answer(addr, kind, utag, payload)
        elif kind != _PROBE:
            self.stats["protocol_errors"] += 1
            log.warning("%s: dropped a message of unknown kind %#x from %s", self.scheme,
                        kind >> 32, addr.uri)
        self._submit_slot(req.slot)

    def _repost_held(self) -> None:
        """The matcher's queue drained: take messages from the provider again."""
        held, self._held_slots = self._held_slots, []
        for slot in held:
            self._submit_slot(slot)
