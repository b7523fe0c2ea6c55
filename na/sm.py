"""sm plugin: same-host peers. Messages over Unix-domain sockets; RMA by one process_vm copy.

URIs are ``sm://<pid>/<instance>``; ``sm://`` opens a fresh one. Socket and table files live in
a private runtime directory (``$PETASUS_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/petasus``, else
``/tmp/petasus-<uid>``), are removed on close, and those left by dead processes are reclaimed.

RMA, as Mercury's na+sm does it: the initiator moves the bytes with one ``process_vm_readv`` or
``process_vm_writev``; the target's CPU is not involved. A copy of at most 1 MiB is made
inside ``put``/``get``, as na+sm makes every copy (its completion still goes through the
queue: callbacks run from ``trigger()``), up to 4 MiB of them between two progress passes; a
larger one, or one behind a queued copy, is queued and made by the next ``progress()`` (and
can be canceled until then). Unlike na+sm, the target still decides
what may be touched: it publishes each registration (key, base, length, rights) in a table file
that peers map read-only, and the initiator checks the table, not the handle it was given, so a
forged or stale key, a range past the end or a write into a read-only registration is refused.

Trust model: process_vm access is granted by the kernel to same-user processes, so sm trusts
every process of the same user on the host. Where the kernel denies it (no CAP_SYS_PTRACE in a
container, Yama ptrace_scope >= 2), ``rma="auto"`` (the default) falls back to the copy path:
RMA emulated over the socket and served by the target, as tcp does. ``rma="copy"`` forces that
path (no cross-process memory access at all); ``rma="process_vm"`` fails instead of falling back.
The mode in use is in ``repr()`` and ``statistics()["rma_mode"]``. Override the default with
``PETASUS_SM_RMA``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import re
import socket
import struct
import weakref
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

from . import _pvm
from ._regs import NAK_KEY, REFUSALS, refusal
from ._sockets import SocketPlugin
from ._transport import peer_pid
from .core import canceled, detached
from .errors import AccessError, NAError, PeerError
from .types import Access, Addr, MemHandle, Op, OpKind

_URI = re.compile(r"^sm://(\d+)/(\d+)$")
_TABLE_MAGIC = b"PETASMR1"
_TABLE_HEAD = 16
_SLOT = struct.Struct("<QQQQ")  # key, base address, length, access (key 0 = free)
_EXTRA = struct.Struct("<iIIQ")  # pid, instance, slot, base address
# Copies one progress pass runs before it serves the sockets again: one 4 MiB chunk of a pull
# (bulk.Stream) takes ~1-3 ms here, so that is what another peer's call may wait behind.
_PASS_BYTES = 4 << 20
# Copies up to this size are made inside the call. Queued, each cost more than the syscall
# itself (an eventfd write, a progress pass, and a slower copy: bench/bulk.py's sm pull at one
# in flight ran at 0.80-0.89x, 4 KiB to 1 MiB, ~6 us more per op at 64 KiB and ~11 us at
# 1 MiB); a copy this size is bounded work (105-120 us per 1 MiB get in that loop), not a wait
# on the peer. The inline bytes
# between two progress passes are capped at _PASS_BYTES, so a pull in small chunks started
# from completion callbacks still lets the sockets be served.
_INLINE_MAX = 1 << 20
_instances = itertools.count()
PTRACE_HINT = ("the kernel denied cross-process memory access (EPERM). Run with CAP_SYS_PTRACE, "
               "lower /proc/sys/kernel/yama/ptrace_scope, have the target call "
               "prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY), or use rma='copy'")


def runtime_dir() -> Path:
    base = os.environ.get("PETASUS_RUNTIME_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "petasus") if xdg else f"/tmp/petasus-{os.getuid()}"
    path = Path(base)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"sm: runtime directory {path} must be owned by uid {os.getuid()} "
                              f"with mode 0700 (it is uid {st.st_uid}, "
                              f"mode {st.st_mode & 0o777:o})")
    return path


def _unlink(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale(directory: Path) -> int:
    """Remove the files of processes that died without closing; returns how many."""
    removed = 0
    for entry in directory.iterdir():
        m = re.match(r"^(\d+)-\d+\.(sock|reg)$", entry.name)
        if m and not _alive(int(m.group(1))):
            try:
                entry.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


class SmRegion(NamedTuple):
    """Where an sm registration lives: the owner's process and instance, its slot in the
    owner's table, and its base address there (what process_vm needs)."""

    pid: int
    inst: int
    slot: int
    base: int


class UnixTransport:
    """Unix-domain stream sockets in the private runtime directory, named by pid/instance."""

    scheme = "sm"

    def __init__(self, directory: Path, pid: int, inst: int) -> None:
        self.dir = directory
        self.pid = pid
        self.inst = inst
        self.sock_path = directory / f"{pid}-{inst}.sock"

    def open(self, listen: bool) -> tuple[str, socket.socket | None]:
        sock = None
        if listen:
            try:
                self.sock_path.unlink()
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(self.sock_path))
            except OSError:
                sock.close()
                raise
        return f"sm://{self.pid}/{self.inst}", sock

    def canonical(self, uri: str) -> str:
        if _URI.match(uri) is None:
            raise ValueError(f"{uri!r} is not an sm address (sm://<pid>/<instance>)")
        return uri

    def connect(self, uri: str) -> tuple[socket.socket, bool]:
        pid, inst = _URI.match(uri).groups()  # type: ignore[union-attr]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Never blocks (the caller holds the plugin's lock): a Unix socket connects at once or
        # fails, with EAGAIN when the listener's backlog is full.
        sock.setblocking(False)
        err = sock.connect_ex(str(self.dir / f"{pid}-{inst}.sock"))
        if err:
            sock.close()
            if err == errno.ENOENT:
                raise OSError(err, "no such sm listener (the process exited or never "
                              "listened)")
            if err == errno.EAGAIN:
                raise OSError(err, "the sm listener's backlog is full (it is not accepting)")
            raise OSError(err, os.strerror(err))
        return sock, False

    def tune(self, sock: socket.socket) -> None:
        """Unix sockets need no options."""

    def vouch(self, sock: socket.socket, uri: str) -> bool:
        # The kernel says which process is on the other end of a Unix socket, and an sm URI
        # names its process: a claim of another process's URI is false.
        match = _URI.match(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not an sm address")
        pid = peer_pid(sock)
        if pid != int(match.group(1)):
            raise ValueError(f"the peer claims {uri} but the kernel says it is pid {pid}")
        return True


class SmPlugin(SocketPlugin):
    log = logging.getLogger("petasus.na.sm")
    _TAIL_SIZE = _EXTRA.size

    def __init__(self, uri: str = "sm://", listen: bool = False, *, rma: str | None = None,
                 table_slots: int = 65536, **options: int) -> None:
        mode = rma or os.environ.get("PETASUS_SM_RMA", "auto")
        if mode not in ("auto", "process_vm", "copy"):
            raise ValueError(f"sm: rma must be 'auto', 'process_vm' or 'copy', not {mode!r}")
        if listen and uri.rstrip("/") not in ("sm:", "sm"):
            # A listener's address is made fresh; a client may name any sm:// URI (its peer's).
            raise ValueError(f"sm: cannot listen at {uri!r}; use 'sm://' for a fresh address")
        self._mode = mode
        self._slots = table_slots
        self._copy_peers: set[Addr] = set()
        self._copies: deque[Op] = deque()  # process_vm copies waiting for progress
        self._inline_left = _PASS_BYTES  # bytes copies may still make inline before a pass
        self._denied = False
        self._tables: dict[tuple[int, int], mmap.mmap] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._dir = runtime_dir()
        reclaim_stale(self._dir)
        self._pid = os.getpid()
        self._inst = next(_instances)
        transport = UnixTransport(self._dir, self._pid, self._inst)
        self._sock_path = transport.sock_path
        self._table_path = self._sock_path.with_suffix(".reg")
        self._table = self._create_table()
        # A process that exits without close() still removes its files; peers reclaim the files
        # of processes that were killed.
        self._cleanup = weakref.finalize(self, _unlink, self._sock_path, self._table_path)
        try:
            super().__init__(transport, listen, **options)
        except BaseException:
            self._on_close()
            raise

    def _create_table(self) -> mmap.mmap:
        size = _TABLE_HEAD + self._slots * _SLOT.size
        fd = os.open(self._table_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            table = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        table[:_TABLE_HEAD] = _TABLE_MAGIC + struct.pack("<II", self._slots, 0)
        return table

    def _on_close(self) -> None:
        for table in self._tables.values():
            table.close()
        self._tables.clear()
        if getattr(self, "_table", None) is not None:
            self._table.close()
        self._cleanup()

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]} rma={self.rma_mode}>"

    @property
    def rma_mode(self) -> str:
        if self._mode == "copy":
            return "copy"
        if self._denied:
            return "copy (process_vm denied)" if self._mode == "auto" else "process_vm (denied)"
        return "process_vm"

    def statistics(self) -> dict[str, Any]:
        out = super().statistics()
        out["rma_mode"] = self.rma_mode
        return out

    # -- registrations: published in the table peers check --------------------------------------
    def _publish(self, handle: MemHandle) -> None:
        if self._free_slots:
            slot = self._free_slots.pop()
        elif self._next_slot < self._slots:
            slot = self._next_slot
            self._next_slot += 1
        else:
            raise ValueError(f"mem_register: all {self._slots} sm registration slots are in use "
                             "(raise table_slots)")
        base = _pvm.buffer_address(handle.view)  # type: ignore[arg-type]
        handle.record = SmRegion(self._pid, self._inst, slot, base)
        off = _TABLE_HEAD + slot * _SLOT.size
        # Key last: a reader that sees the key sees the rest of the entry.
        _SLOT.pack_into(self._table, off, 0, base, handle.length, int(handle.access))
        struct.pack_into("<Q", self._table, off, handle.key)

    def _withdraw(self, handle: MemHandle) -> None:
        slot = handle.record.slot
        _SLOT.pack_into(self._table, _TABLE_HEAD + slot * _SLOT.size, 0, 0, 0, 0)
        self._free_slots.append(slot)
        handle.record = None

    def _handle_tail(self, handle: MemHandle) -> bytes:
        # A remote handle is forwarded to a third process as it came.
        if handle.record is None:
            raise ValueError(f"mem_handle_serialize: {handle!r} is deregistered")
        return _EXTRA.pack(*handle.record)

    def _parse_handle_tail(self, tail: bytes) -> SmRegion:
        return SmRegion(*_EXTRA.unpack(tail))

    # -- one-sided RMA --------------------------------------------------------------------------
    def _start_transfer(self, op: Op) -> None:
        """Make a small copy now (``_INLINE_MAX``), or queue it for the next progress pass,
        where a cancel before progress withdraws it. The wake-up eventfd makes ``poll_fd()``
        readable so an event loop runs that pass."""
        if self._mode == "copy" or (op.addr in self._copy_peers and not self._copies):
            # (behind queued copies, even a peer now emulated waits its turn: rma_ordered)
            self._emulate_rma(op)
            return
        n = op.length
        if n <= _INLINE_MAX and n <= self._inline_left and not self._copies:
            self._inline_left -= n
            self._copy(op)  # completes it: its callback runs from trigger()
            return
        self._copies.append(op)
        os.eventfd_write(self._cq.wake_fd, 1)

    def progress(self, timeout: float = 0.0) -> bool:
        self._inline_left = _PASS_BYTES
        if not self._copies:
            return super().progress(timeout)
        self._check_open("progress")
        # Messages first, then at most _PASS_BYTES of copies: a pull in chunks queues its
        # next copies from each completion, and passes of copies alone starved every other
        # peer's calls until the last chunk (a 1 GiB input held small RPCs for seconds).
        super().progress(0)
        budget = _PASS_BYTES
        with self._lock:
            copies = self._copies
            while copies and budget > 0:
                op = copies.popleft()
                budget -= op.length
                self._copy(op)
        return True

    def _cancel_transfer(self, op: Op) -> bool:
        if op in self._copies:
            self._copies.remove(op)
            return False  # never started: it ends now, canceled
        return super()._cancel_transfer(op)

    def close(self) -> None:
        with self._lock:
            copies, self._copies = self._copies, deque()
            for op in copies:
                self._cq.fail(op, canceled(op, "the plugin was closed"))
        super().close()

    def _copy(self, op: Op) -> None:
        """One process_vm_readv/writev, checked against the target's table first."""
        addr = op.addr
        if addr in self._copy_peers:  # denied since this copy was queued
            self._emulate_rma(op)
            return
        name = "put" if op.kind == OpKind.PUT else "get"
        remote = op.remote
        try:
            pid, inst, slot, base = remote.record
            if addr is not None and addr.uri != f"sm://{pid}/{inst}":
                # Only the peer's own memory: a handle naming a third process is refused even
                # where that process's table would allow it (bulk binds handles to peers).
                raise AccessError(name, addr.uri, f"the handle belongs to sm://{pid}/{inst}, "
                                  "not to this peer")
            remote_addr = self._checked_address(name, addr, pid, inst, slot, base, remote.key,
                                                op.remote_off, op.length, op.kind)
            local = op.buffer[op.local_off: op.local_off + op.length]
            _pvm.transfer(op.kind == OpKind.PUT, pid, local, remote_addr)
        except NAError as exc:
            op.error = detached(exc)  # its frames hold this op, and the op its buffer
        except OSError as exc:
            if exc.errno == errno.EPERM:
                self._denied = True
                if self._mode == "auto":
                    self.log.warning("sm: process_vm access to %s denied; using the copy path "
                                     "for this peer", addr.uri)  # type: ignore[union-attr]
                    self._copy_peers.add(addr)  # type: ignore[arg-type]
                    self._emulate_rma(op)
                    return
                op.error = AccessError(name, addr.uri, PTRACE_HINT)  # type: ignore[union-attr]
            elif exc.errno == errno.ESRCH:
                op.error = PeerError(name, addr.uri, "the process has exited")  # type: ignore[union-attr]
            else:
                op.error = AccessError(name, addr.uri, f"process_vm failed: {exc}")  # type: ignore[union-attr]
        self._cq.post(op)

    def _checked_address(self, name: str, addr: Addr | None, pid: int, inst: int, slot: int,
                         base: int, key: int, off: int, length: int, kind: OpKind) -> int:
        peer = addr.uri if addr is not None else f"sm://{pid}/{inst}"
        table = self._peer_table(name, peer, pid, inst)
        if slot >= (len(table) - _TABLE_HEAD) // _SLOT.size:
            raise AccessError(name, peer, REFUSALS[NAK_KEY])
        t_key, t_base, t_len, t_access = _SLOT.unpack_from(table, _TABLE_HEAD + slot * _SLOT.size)
        if t_key != key or t_base != base:
            raise AccessError(name, peer, REFUSALS[NAK_KEY])
        need = Access.WRITE_ONLY if kind == OpKind.PUT else Access.READ_ONLY
        nak = refusal(t_len, t_access & 3, off, length, need)
        if nak:
            raise AccessError(name, peer, REFUSALS[nak])
        return t_base + off

    def _peer_table(self, name: str, peer: str, pid: int, inst: int) -> mmap.mmap:
        if pid == self._pid and inst == self._inst:
            return self._table
        table = self._tables.get((pid, inst))
        if table is None:
            try:
                fd = os.open(self._dir / f"{pid}-{inst}.reg", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise PeerError(name, peer, "its registration table is gone "
                                "(the process exited)") from None
            try:
                table = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            if table[:8] != _TABLE_MAGIC:
                table.close()
                raise AccessError(name, peer, "not an sm registration table")
            self._tables[(pid, inst)] = table
        return table
