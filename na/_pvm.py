"""process_vm_readv / process_vm_writev through cffi's ABI mode: plain libc symbols, no build."""

from __future__ import annotations

import os

import cffi

_ffi = cffi.FFI()
_ffi.cdef("""
struct iovec { void *iov_base; size_t iov_len; };
ssize_t process_vm_readv(int pid, const struct iovec *local, unsigned long liovcnt,
                         const struct iovec *remote, unsigned long riovcnt, unsigned long flags);
ssize_t process_vm_writev(int pid, const struct iovec *local, unsigned long liovcnt,
                          const struct iovec *remote, unsigned long riovcnt, unsigned long flags);
""")
_libc = _ffi.dlopen(None)


def buffer_address(view: memoryview) -> int:
    """The address of a buffer. The caller's memoryview export keeps it from moving; no cffi
    object outlives this call, because a cffi buffer left for the garbage collector can be
    released after the memoryview under it (a segfault seen in the suite)."""
    pin = _ffi.from_buffer(view)
    try:
        return int(_ffi.cast("uintptr_t", pin))
    finally:
        _ffi.release(pin)


def transfer(write: bool, pid: int, local: memoryview, remote_addr: int) -> None:
    """Copy ``len(local)`` bytes between our ``local`` and ``remote_addr`` in ``pid``.

    Raises OSError with the kernel's errno (EPERM: ptrace denied; EFAULT: bad remote range;
    ESRCH: the process is gone).
    """
    total = len(local)
    liov = _ffi.new("struct iovec *")
    riov = _ffi.new("struct iovec *")
    call = _libc.process_vm_writev if write else _libc.process_vm_readv
    pin = _ffi.from_buffer(local, require_writable=not write)
    try:
        base = _ffi.cast("char *", pin)
        done = 0
        while done < total:
            liov.iov_base = base + done
            liov.iov_len = riov.iov_len = total - done
            riov.iov_base = _ffi.cast("void *", remote_addr + done)
            n = call(pid, liov, 1, riov, 1, 0)
            if n < 0:
                err = _ffi.errno
                raise OSError(err, os.strerror(err))
            if n == 0:
                raise OSError(0, "process_vm transferred nothing")
            done += n
    finally:
        _ffi.release(pin)
