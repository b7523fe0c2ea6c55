"""Where a buffer's bytes are, for the plugins that hand raw addresses to C (ofi, verbs).

Never keep a cffi ``from_buffer()`` of a *memoryview*: that object is GC-tracked and holds an
export of the view, and when both fall into a garbage cycle (a plugin, its registrations and
the callbacks that refer back to it), CPython 3.11's GC clears the still-exported view
(memory_clear leaves its mbuf NULL) and deallocating it later dereferences NULL: the SIGSEGV
"in the GC" of the ofi-shm runs (valgrind: _memory_release reading address 0x18). Pinning the
exporter itself (bytearray, mmap, numpy array...) keeps memoryviews out of it.
"""

from __future__ import annotations

from typing import Any


def pin(ffi: Any, view: memoryview) -> tuple[Any, int]:
    """(holder, address) of ``view``'s bytes, where ``holder`` is ``ffi``'s view of the
    buffer's exporter and keeps the memory alive; holder None when the exporter cannot be
    viewed as bytes that contain ``view`` (the caller chooses its fallback).

    ``ffi`` is the caller's cffi instance (ofi's compiled module, verbs' own): a holder must
    come from the FFI its pointers are used with.
    """
    probe = ffi.from_buffer(view)
    addr = int(ffi.cast("uintptr_t", probe))
    ffi.release(probe)
    try:
        owner = ffi.from_buffer(view.obj)
    except (TypeError, ValueError, BufferError):
        return None, addr
    base = int(ffi.cast("uintptr_t", owner))
    if base <= addr and addr + len(view) <= base + len(owner):
        return owner, addr
    ffi.release(owner)
    return None, addr
