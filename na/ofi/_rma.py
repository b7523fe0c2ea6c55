"""Registrations and one-sided transfers: checked emulation (the default on every provider),
or native fi_read/fi_write for trusted peers (``rma="native"``; why not by default: see
``plugin``'s docstring)."""

from __future__ import annotations

import secrets
from typing import Any

from .._regs import NAK_PROTOCOL, REFUSALS, pack_handle, register_view, unpack_handle
from ..core import MAX_TAG
from ..errors import AccessError, Canceled, PeerError
from ..types import Access, Addr, MemHandle, Op, OpKind, OpState
from ._common import (
    _BASE,
    _GET_DATA,
    _GET_REQ,
    _IGNORE_ALL,
    _PUT_DATA,
    _PUT_REQ,
    _PUT_SINK,
    _RMA,
    _RMA_ACK,
    _RMA_DESC,
    _RMA_NAK,
    _SEND,
    _SERVE,
    _fid,
    _pin,
    _Reg,
    _Remote,
    _Req,
    _rma_salt,
    log,
)
from ._fabric import ffi, lib
from .errors import FabricError, check_rc


class Rma:
    """Mixin of ``OfiPlugin`` (state is created in ``OfiPlugin.__init__``)."""

    # -- memory ---------------------------------------------------------------------------------
    def _mr_reg(self, cbuf: Any, length: int, access: int, holder: Any = None) -> _Reg:
        mr = ffi.new("struct fid_mr **")
        for _attempt in range(8):
            key = 0
            if not self._mr_mode & lib.FI_MR_PROV_KEY:
                key = secrets.randbits(8 * min(self._key_size, 8)) or 1
            rc = lib.fi_mr_reg(self._domain, cbuf, length, access, 0, key, 0, mr, ffi.NULL)
            if rc != -lib.FI_ENOKEY:
                break
        check_rc(rc, "fi_mr_reg", op="mem_register", length=length, access=hex(access))
        if self._mr_mode & lib.FI_MR_ENDPOINT:
            try:
                check_rc(lib.fi_mr_bind(mr[0], _fid(self._ep), 0), "fi_mr_bind",
                         op="mem_register")
                check_rc(lib.fi_mr_enable(mr[0]), "fi_mr_enable", op="mem_register")
            except FabricError:
                lib.fi_close(_fid(mr[0]))
                raise
        return _Reg(mr[0], cbuf, int(ffi.cast("uintptr_t", cbuf)), lib.fi_mr_desc(mr[0]),
                    holder)

    def mem_register(self, buffer: Any, access: Access) -> MemHandle:
        view, access = register_view(buffer, access)
        # Zero bytes still need an address: register one byte of a private buffer instead.
        holder, cbuf = _pin(view if len(view) else memoryview(bytearray(1)))
        flags = lib.FI_READ | lib.FI_SEND
        if not view.readonly:
            flags |= lib.FI_WRITE | lib.FI_RECV
        if access & Access.READ_ONLY:
            flags |= lib.FI_REMOTE_READ
        if access & Access.WRITE_ONLY:
            flags |= lib.FI_REMOTE_WRITE
        with self._lock:
            self._check_open("mem_register")
            reg = self._mr_reg(cbuf, max(len(view), 1), flags, holder)
            native = self._rma_mode == "native"
            key = int(lib.fi_mr_key(reg.mr)) if native else self._keys.new_key()
            handle = MemHandle(view, len(view), access, key, True, reg)
            self._regs[id(handle)] = handle
            if not native:
                self._keys.add(handle)
        return handle

    def mem_deregister(self, handle: MemHandle) -> None:
        with self._lock:
            self._unregister(self._regs, handle)
            if self._rma_mode != "native":
                self._keys.remove(handle)
            check_rc(lib.fi_close(_fid(handle.record.mr)), "fi_close", op="mem_deregister")
            handle.registered = False
            handle.view = None

    def mem_handle_serialize(self, handle: MemHandle) -> bytes:
        if not handle.local:
            base = handle.record.base  # a deserialized handle keeps the remote base as is
        else:
            base = handle.record.base if self._mr_mode & lib.FI_MR_VIRT_ADDR else 0
        return pack_handle(handle, _BASE.pack(base))

    def mem_handle_deserialize(self, data: bytes) -> MemHandle:
        access, key, length, tail = unpack_handle(data, self.scheme, _BASE.size)
        return MemHandle(None, length, access, key, False, _Remote(*_BASE.unpack(tail)))

    # -- RMA ------------------------------------------------------------------------------------
    def _start_transfer(self, op: Op) -> None:
        addr = op.addr
        if addr.fabric_addr is None:
            self._cq.fail(op, PeerError(op.kind.name.lower(), addr.uri, "unusable address"))
        elif addr not in self._ready:
            self._hold(op, lambda: self._start_pieces(op))
        else:
            self._start_pieces(op)

    def _start_pieces(self, op: Op) -> None:
        chunk, length = self._rma_chunk, op.length
        op.remaining = -(-length // chunk)
        start = self._start_native if self._rma_mode == "native" else self._start_checked
        for off in range(0, length, chunk):
            start(op, off, min(chunk, length - off))

    def _start_native(self, op: Op, off: int, n: int) -> None:
        """One fi_read/fi_write. The target's provider is trusted with key, bounds and rights,
        which shm and tcp;ofi_rxm (libfabric 1.17) do not enforce cleanly: opt-in only. A write
        may complete here before the target's memory has it (seen over tcp;ofi_rxm under load:
        the target's progress places it later), where a checked put completes on the target's
        acknowledgement."""
        reg, remote = op.local.record, op.remote
        base = remote.record.base if not remote.local else (
            reg.base if self._mr_mode & lib.FI_MR_VIRT_ADDR else 0)
        fn = lib.fi_read if op.kind == OpKind.GET else lib.fi_write
        self._start(_Req(_RMA, op, op.addr, fn,
                         (self._ep, reg.cbuf + op.local_off + off, n, reg.desc, op.addr.fabric_addr,
                          base + op.remote_off + off, remote.key), keep=reg))

    def _start_checked(self, op: Op, off: int, n: int) -> None:
        """One piece of checked RMA: a request the target's progress loop checks against its
        own registrations, and the data as one tagged message between the two registered
        buffers (libfabric moves it without a copy: rendezvous on rxm, CMA on shm).

        get: post the receive into our memory, then ask; the target sends from its memory.
        put: ask and send the data at once; the target receives it into its memory once the
        request passes (until then the provider holds it as unexpected) and acknowledges.
        """
        reg, addr = op.local.record, op.addr
        rma_id = self._salt | (next(self._rma_ids) & MAX_TAG)
        desc = _RMA_DESC.pack(op.remote.key, op.remote_off + off, n)
        local = reg.cbuf + op.local_off + off
        if op.kind == OpKind.GET:
            # keep=reg: pointer arithmetic on cdata does not keep the buffer alive.
            data = _Req(_RMA, op, addr, lib.fi_trecv,
                        (self._ep, local, n, reg.desc, _IGNORE_ALL, _GET_DATA | rma_id, 0),
                        keep=reg)
            data.rma_id = rma_id
            self._rma_wait[rma_id] = data
            self._start(data)
            self._start(self._send_req(_SEND, None, addr, desc, _GET_REQ | rma_id,
                                       owner=op))
        else:
            wait = _Req(_RMA, op, addr, None, ())
            wait.rma_id = rma_id
            self._rma_wait[rma_id] = wait
            self._start(self._send_req(_SEND, None, addr, desc, _PUT_REQ | rma_id,
                                       owner=op))
            data = _Req(_SEND, None, addr, lib.fi_tsend,
                        (self._ep, local, n, reg.desc, addr.fabric_addr, _PUT_DATA | rma_id),
                        keep=reg)
            data.owner = op
            self._start(data)

    def _serve_rma(self, addr: Addr, kind: int, utag: int, payload: memoryview) -> None:
        """A peer's get or put request: check it against our own table, never the claim."""
        rma_id = self._rma_id_of(utag, payload)
        if addr.fabric_addr is None:
            # No answer can reach a sender whose name the provider would not insert, and
            # posting one raises TypeError (no fi_addr) out of progress() (fuzz/ofi.py).
            self.stats["rma_refused"] += 1
            log.warning("%s: dropped an RMA request from %s: %s", self.scheme, addr.uri,
                        addr.dead or "its address is unusable")
            return
        if len(payload) != _RMA_DESC.size + 2:
            self._rma_refuse(addr, rma_id, NAK_PROTOCOL, kind, 0)
            return
        key, off, n = _RMA_DESC.unpack_from(payload, 2)
        need = Access.READ_ONLY if kind == _GET_REQ else Access.WRITE_ONLY
        handle, nak = self._keys.check(key, off, n, need)
        if handle is None:
            self._rma_refuse(addr, rma_id, nak, kind, n)
            return
        self.stats["rma_served"] += 1
        reg = handle.record  # type: ignore[union-attr]
        if kind == _GET_REQ:
            self._start(_Req(_SERVE, None, addr, lib.fi_tsend,
                             (self._ep, reg.cbuf + off, n, reg.desc, addr.fabric_addr,
                              _GET_DATA | rma_id), keep=handle))
        else:
            sink = _Req(_PUT_SINK, None, addr, lib.fi_trecv,
                        (self._ep, reg.cbuf + off, n, reg.desc, _IGNORE_ALL,
                         _PUT_DATA | rma_id, 0), keep=handle)
            sink.rma_id = rma_id
            self._start(sink)

    def _rma_id_of(self, utag: int, payload: memoryview) -> int:
        # The salt travels in the first two payload bytes (the tag's bits above 35 are the
        # data tags'); see _send_req.
        salt = int.from_bytes(payload[:2], "little") if len(payload) >= 2 else 0
        return (salt << 44) | utag

    def _rma_refuse(self, addr: Addr, rma_id: int, nak: int, kind: int, n: int) -> None:
        self.stats["rma_refused"] += 1
        log.warning("%s: refused an RMA request from %s: %s", self.scheme, addr.uri,
                    REFUSALS[nak])
        if kind == _PUT_REQ:
            # Take the refused data off the provider's unexpected queue into scratch memory of
            # its size (tcp;ofi_rxm stalls the connection on a truncated receive); a claim
            # above one RMA piece gets a zero-byte receive (never from an honest initiator).
            scratch = bytearray(n if n <= self._rma_chunk else 0)
            cscratch = ffi.from_buffer(scratch) if n else self._rx_c
            sink = _Req(_PUT_SINK, None, addr, lib.fi_trecv,
                        (self._ep, cscratch, len(scratch), ffi.NULL, _IGNORE_ALL,
                         _PUT_DATA | rma_id, 0), keep=(scratch, cscratch))
            sink.rma_id = -1
            self._start(sink)
        self._send_answer(addr, rma_id, _RMA_NAK, bytes((nak,)))

    def _rma_answer(self, addr: Addr, kind: int, utag: int, payload: memoryview) -> None:
        rma_id = self._rma_id_of(utag, payload)
        req = self._rma_wait.pop(rma_id, None)
        if req is None or req.addr is not addr:
            return  # the answer to something canceled, failed or forged
        op = req.op
        if kind == _RMA_ACK:
            op.remaining -= 1  # type: ignore[union-attr]
            if op.remaining == 0:  # type: ignore[union-attr]
                self._cq.complete(op)  # type: ignore[arg-type]
            return
        reason = payload[2] if len(payload) > 2 else NAK_PROTOCOL
        what = op.kind.name.lower()  # type: ignore[union-attr]
        self._cancel_chunks(op)  # type: ignore[arg-type]
        error: BaseException = AccessError(what, addr.uri,
                                           REFUSALS.get(reason, f"refused ({reason})"))
        if op.state == OpState.CANCELING:  # type: ignore[union-attr]
            error = Canceled(what, addr.uri, "canceled")
        self._cq.fail(op, error)  # type: ignore[arg-type]

    def _send_answer(self, addr: Addr, rma_id: int, kind: int, extra: bytes) -> None:
        self._start(self._send_req(_SERVE, None, addr, _rma_salt(rma_id) + extra,
                                   kind | (rma_id & MAX_TAG)))

