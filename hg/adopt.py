"""``bytes`` objects that an overflow pull lands in directly, recycled once their user lets go.

Why: on this project's VMs a page faulted in for the first time costs ~3.5 us (64 MiB:
56 ms with MAP_POPULATE, 76 ms for ``bytes(view)``), while a pull into memory already
faulted in moves 64 MiB in ~21 ms over tcp. A large ``bytes`` argument or result decoded as
``bytes(landing[a:b])`` therefore paid for a fresh allocation on every call (glibc serves
every allocation above 32 MiB with a fresh mmap, and gives it back to the kernel on free):
0.48 GB/s for a 64 MiB argument over tcp, where the same bytes as a handle pulled into the
application's own memory moved 2.0 GB/s (``bench/large.py --quick``, same run). The value
a handler or caller receives must be memory already faulted in, and the pull must write
straight into it.

So the large segments of an overflow land in ``bytes`` objects made with the C API's
``PyBytes_FromStringAndSize(NULL, n)`` (uninitialized, and untouched: malloc maps fresh
pages for large sizes, so a hostile declared size costs no resident memory until bytes
arrive), which the C API allows to be written until the object is shared. The ``bytes``
decoder then hands out that very object when its value spans exactly the segment
(``overflow.Lease.decode``, ``scalars.bound_to(adopt=...)``). The pool keeps a
reference to the objects it made; one whose only reference left is the pool's is, to
everyone else, a fresh uninitialized object again, and the next pull of the same size
lands in it (its cached hash cleared first).

This depends on CPython's object layout, so it checks that layout once at import (the
offset of the data, and of the cached hash) and is off where the check fails, or when
``PETASUS_ADOPT=0``: decoders then copy out of the landing as before (the pure-Python twin).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any

# Segments from this size on land in a bytes object of their own: below it a fresh
# allocation comes from malloc's heap, already faulted in, and the copy costs less than the
# bookkeeping (``scalars.LARGE``, the size from which values travel as segments of their own).
ADOPT_MIN = 1 << 20
POOL_SLOTS = 4  # objects the pool keeps track of (in use by their receiver, or free)
POOL_BYTES = 256 << 20  # and their bytes: at most this much kept faulted in when idle
POOL_IDLE = 2.0  # seconds a kept object may go unused before it is let go


def _probe() -> tuple[Any, Any] | None:
    """The two C API calls, if this interpreter lays bytes objects out as we expect."""
    if os.environ.get("PETASUS_ADOPT", "1") == "0" or sys.implementation.name != "cpython":
        return None
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
        data = ctypes.pythonapi.PyBytes_AsString
        data.restype, data.argtypes = ctypes.c_void_p, (ctypes.py_object,)
        probe = new(None, 64)
        ptr = data(probe)
        if ptr - id(probe) != sys.getsizeof(b"") - 1:
            return None
        ctypes.memmove(ptr, b"petasus" * 9, 63)
        if ctypes.c_ssize_t.from_address(ptr - 8).value != -1:
            return None  # a fresh object has no cached hash: ob_shash is not where we look
        if hash(probe) != ctypes.c_ssize_t.from_address(ptr - 8).value:
            return None
    except (AttributeError, OSError, TypeError, ValueError):
        return None
    return new, data


_API = _probe()
ENABLED = _API is not None


def writable(obj: bytes) -> memoryview:
    """A writable view of ``obj``'s data. The view keeps ``obj`` alive (through the ctypes
    array it is made of), so memory an NA operation still views is never freed under it,
    and an object still viewed is never taken for one nobody uses."""
    array = (ctypes.c_char * len(obj)).from_address(_API[1](obj))  # type: ignore[index]
    array.owner = obj  # type: ignore[attr-defined]
    return memoryview(array).cast("B")


def fresh(size: int) -> tuple[bytes, memoryview] | None:
    """A new, uninitialized ``bytes`` of ``size`` and a writable view of it, for a transfer
    to land in: how a layer above returns bytes it pulled without copying them once more
    (the store's one-sided gets). The object must stay unshared (unhashed, unseen) until
    every write through the view is done. None where the layout check failed or
    ``PETASUS_ADOPT=0``, or memory is short: the caller lands elsewhere and copies."""
    if _API is None:
        return None
    try:
        obj = _API[0](None, size)
    except MemoryError:
        return None
    return obj, writable(obj)


class Pool:
    """The bytes objects overflows landed in: bounded in number (``POOL_SLOTS``) and bytes
    (``limit``), each let go ``POOL_IDLE`` s after it was last lent, and all at ``close``.
    Only objects whose pull completed are kept: a failed pull's memory goes at once."""

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self._kept: list[bytes] = []
        self._used: list[float] = []  # when each was last lent or kept
        self._lock = threading.Lock()
        self.reused = 0  # lent again instead of made (``statistics()``)

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def held(self) -> int:
        return sum(map(len, self._kept))

    def lend(self, size: int, now: float) -> bytes | None:
        """An object of ``size`` bytes nobody else references (a kept one, else a new one);
        None if this interpreter cannot, or memory is short (the caller copies then)."""
        if _API is None:
            return None
        with self._lock:
            kept = self._kept
            for i in range(len(kept)):
                # Two references: the list's and getrefcount's argument. Nobody else can
                # reach it, so nobody can see it change.
                if len(kept[i]) == size and sys.getrefcount(kept[i]) == 2:
                    obj = kept[i]
                    ctypes.c_ssize_t.from_address(_API[1](obj) - 8).value = -1  # the hash
                    self._used[i] = now
                    self.reused += 1
                    return obj
        try:
            return _API[0](None, size)  # type: ignore[no-any-return]
        except MemoryError:
            return None

    def keep(self, obj: bytes, now: float) -> None:
        """Track ``obj`` (its pull completed), making room by letting go of the oldest."""
        size = len(obj)
        if size > self.limit:
            return
        with self._lock:
            for i, known in enumerate(self._kept):
                if known is obj:
                    self._used[i] = now
                    return
            while self._kept and (len(self._kept) >= POOL_SLOTS or
                                  sum(map(len, self._kept)) + size > self.limit):
                oldest = self._used.index(min(self._used))
                del self._kept[oldest], self._used[oldest]
            self._kept.append(obj)
            self._used.append(now)

    def forget(self, obj: bytes) -> None:
        """A failed pull wrote part of ``obj``: stop tracking it, so that it goes now."""
        with self._lock:
            for i, known in enumerate(self._kept):
                if known is obj:
                    del self._kept[i], self._used[i]
                    return

    def trim(self, now: float) -> float | None:
        """Let go of what was unused for ``POOL_IDLE`` s; when the next one would be due."""
        with self._lock:
            live = [i for i, used in enumerate(self._used) if now - used < POOL_IDLE]
            self._kept = [self._kept[i] for i in live]
            self._used = [self._used[i] for i in live]
            return min(self._used) + POOL_IDLE if self._used else None

    def close(self) -> None:
        with self._lock:
            self._kept, self._used = [], []
