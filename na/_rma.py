"""Registrations and emulated RMA of the socket plugins (the generic one-sided path).

The initiator splits a transfer into chunks of at most ``rma_chunk`` bytes; each is one request
frame (a 24-byte descriptor: key, offset, length) that the *target's* progress loop serves from,
or into, the registered memory in place, after checking the key, the bounds and the rights
against its own table, never against what the request claims. Plugins with a real one-sided
path (sm's process_vm) override ``_start_rma`` and fall back to this one.
"""

from __future__ import annotations

import secrets
import struct
from typing import TYPE_CHECKING, Any

from . import framing as fr
from ._generic import rma_op
from .errors import Canceled
from .types import Access, Addr, Callback, MemHandle, Op, OpKind, as_byte_view

if TYPE_CHECKING:
    from ._sockets import _Conn

_HDR = fr.HEADER
_MAGIC = fr.MAGIC
_HANDLE = struct.Struct("<BBQQ")  # version, access, key, length
_HANDLE_VERSION = 1
# Op.state in the plugins: pending, finished (posted), canceling (finishes when acked).
_PENDING, _FINISHED, _CANCELING = 0, 1, 2
_NAK_TEXT = {fr.NAK_KEY: "unknown key (forged, or deregistered)", fr.NAK_BOUNDS: "out of bounds",
             fr.NAK_ACCESS: "not allowed by the registration's access rights",
             fr.NAK_PROTOCOL: "malformed request"}


class RmaMixin:
    """Memory registration and emulated put/get, mixed into SocketPlugin.

    It uses the host's ``_lock``, ``_check_open``, ``_post``, ``_conn_for``, ``_enqueue``,
    ``_ids`` and ``_rma_chunk``; the host's ``_Conn`` routes RMA frames to ``_serve_get``,
    ``_check_put``, ``_send_nak`` and ``_chunk_done``.
    """

    _regs: dict[int, MemHandle]
    stats: dict[str, int]

    def _handle_extra(self, handle: MemHandle) -> bytes:
        return b""

    def _parse_handle_extra(self, data: bytes) -> Any:
        if data:
            raise ValueError(f"mem_handle_deserialize: {len(data)} unexpected trailing bytes")
        return None

    # -- memory ---------------------------------------------------------------------------------
    def mem_register(self, buffer: Any, access: Access) -> MemHandle:
        access = Access(access)
        view = as_byte_view(buffer, "mem_register")
        if access & Access.WRITE_ONLY and view.readonly:
            raise ValueError("mem_register: a read-only buffer cannot be registered for remote "
                             "writes (use Access.READ_ONLY)")
        with self._lock:
            self._check_open("mem_register")
            key = secrets.randbits(64) | 1
            while key in self._regs:
                key = secrets.randbits(64) | 1
            handle = MemHandle(view, len(view), access, key, True)
            self._register_extra(handle)
            self._regs[key] = handle
        return handle

    def _register_extra(self, handle: MemHandle) -> None:
        """Plugin hook: publish a registration beyond the key table."""

    def _deregister_extra(self, handle: MemHandle) -> None:
        """Plugin hook: withdraw what _register_extra published."""

    def mem_deregister(self, handle: MemHandle) -> None:
        with self._lock:
            if not handle.local or self._regs.get(handle.key) is not handle:
                raise ValueError(f"mem_deregister: {handle!r} is not registered here")
            del self._regs[handle.key]
            self._deregister_extra(handle)
            # A put landing in this memory right now must not write into it any more.
            base = handle.view.obj  # type: ignore[union-attr]
            for conn in self._conns:
                landing = conn.reader.landing_in()
                target = conn.put_target
                if landing is not None and target is not None and target[1] is landing[1] \
                        and landing[1].obj is base:
                    conn.put_target = (target[0], None, fr.NAK_KEY)  # refused, not acked
                    conn.reader.discard_rest()
            handle.registered = False
            handle.view = None

    def mem_handle_serialize(self, handle: MemHandle) -> bytes:
        return _HANDLE.pack(_HANDLE_VERSION, handle.access, handle.key,
                            handle.length) + self._handle_extra(handle)

    def mem_handle_deserialize(self, data: bytes) -> MemHandle:
        data = bytes(data)
        if len(data) < _HANDLE.size:
            raise ValueError(f"mem_handle_deserialize: {len(data)} B is shorter than a handle")
        version, access, key, length = _HANDLE.unpack_from(data)
        if version != _HANDLE_VERSION or access not in (1, 2, 3):
            raise ValueError(f"mem_handle_deserialize: bad version {version} or access {access}")
        extra = self._parse_handle_extra(data[_HANDLE.size:])
        return MemHandle(None, length, Access(access), key, False, extra)

    # -- RMA ------------------------------------------------------------------------------------
    def put(self, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
            length: int, addr: Addr, callback: Callback | None = None) -> Op:
        return self._rma(OpKind.PUT, local, local_off, remote, remote_off, length, addr, callback)

    def get(self, local: MemHandle, local_off: int, remote: MemHandle, remote_off: int,
            length: int, addr: Addr, callback: Callback | None = None) -> Op:
        return self._rma(OpKind.GET, local, local_off, remote, remote_off, length, addr, callback)

    def _rma(self, kind: OpKind, local: MemHandle, local_off: int, remote: MemHandle,
             remote_off: int, length: int, addr: Addr, callback: Callback | None) -> Op:
        name = kind.name.lower()
        op = rma_op(kind, local, local_off, remote, remote_off, length, addr, callback)
        with self._lock:
            self._check_open(name)
            self.stats["rma_ops"] += 1
            self.stats["rma_bytes"] += length
            if length == 0:
                self._post(op)
            else:
                self._start_rma(op)
        return op

    def _start_rma(self, op: Op) -> None:
        """Emulated RMA over the peer's stream; plugins with a real one-sided path override."""
        self._emulate_rma(op)

    def _emulate_rma(self, op: Op) -> None:
        conn = self._conn_for(op.addr, op)  # type: ignore[arg-type]
        if conn is None:
            return
        chunk, length, view, key = self._rma_chunk, op.length, op.buffer, op.remote.key
        is_get = op.kind == OpKind.GET
        bufs: list[Any] = []
        total = 0
        op.remaining = 0
        for off in range(0, length, chunk):
            n = min(chunk, length - off)
            op_id = next(self._ids)
            local = view[op.local_off + off: op.local_off + off + n]
            desc = fr.RMA_DESC.pack(key, op.remote_off + off, n)
            if is_get:
                conn.rma[op_id] = (op, local)
                bufs += (_HDR.pack(_MAGIC, fr.GET_REQ, 0, 24, op_id), desc)
                total += fr.HEADER_SIZE + 24
            else:
                conn.rma[op_id] = (op, None)
                bufs += (_HDR.pack(_MAGIC, fr.PUT_REQ, 0, 24, op_id), desc,
                         _HDR.pack(_MAGIC, fr.PUT_DATA, 0, n, op_id), local)
                total += 2 * fr.HEADER_SIZE + 24 + n
            op.remaining += 1
        self._enqueue(conn, bufs, total, None)

    def _chunk_done(self, op: Op, error: BaseException | None) -> None:
        op.remaining -= 1
        if op.state == _PENDING:
            if error is not None:
                op.error = error
                self._finish(op)
            elif op.remaining == 0:
                self._finish(op)
        elif op.state == _CANCELING and op.remaining == 0:
            op.error = Canceled(op.kind.name.lower(), op.addr.uri if op.addr else None, "canceled")
            self._finish(op)

    def _lookup_reg(self, payload: memoryview, need: Access) -> tuple[memoryview | None, int]:
        if len(payload) != fr.RMA_DESC.size:
            return None, fr.NAK_PROTOCOL
        key, off, length = fr.RMA_DESC.unpack(payload)
        handle = self._regs.get(key)
        if handle is None:
            return None, fr.NAK_KEY
        if off + length > handle.length:
            return None, fr.NAK_BOUNDS
        if not handle.access & need:
            return None, fr.NAK_ACCESS
        return handle.view[off: off + length], 0  # type: ignore[index]

    def _serve_get(self, conn: _Conn, op_id: int, payload: memoryview) -> None:
        view, nak = self._lookup_reg(payload, Access.READ_ONLY)
        if view is None:
            self._send_nak(conn, op_id, nak)
            return
        self.stats["rma_served"] += 1
        n = len(view)
        self._enqueue(conn, [_HDR.pack(_MAGIC, fr.GET_RESP, 0, n, op_id), view],
                      n + fr.HEADER_SIZE, None)

    def _check_put(self, conn: _Conn, op_id: int,
                   payload: memoryview) -> tuple[int, memoryview | None, int]:
        view, nak = self._lookup_reg(payload, Access.WRITE_ONLY)
        if view is not None:
            self.stats["rma_served"] += 1
        return op_id, view, nak

    def _send_nak(self, conn: _Conn, op_id: int, reason: int) -> None:
        self.stats["rma_refused"] += 1
        self.log.warning("refused an RMA request from %s: %s", conn.name,
                         _NAK_TEXT.get(reason, reason))
        self._enqueue(conn, [_HDR.pack(_MAGIC, fr.RMA_NAK, 0, 1, op_id), bytes((reason,))],
                      fr.HEADER_SIZE + 1, None)
