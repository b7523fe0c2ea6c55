"""The registration table every NA plugin checks peers' RMA requests against: unguessable keys,
the one bounds-and-rights rule, and the wire form of a memory handle. No I/O."""

from __future__ import annotations

import os
import struct
from typing import Any

from .types import Access, MemHandle, access_of, as_byte_view

# Why a target refused an RMA request; the codes travel in the refusal (one byte).
NAK_KEY, NAK_BOUNDS, NAK_ACCESS, NAK_PROTOCOL = 1, 2, 3, 4
REFUSALS = {NAK_KEY: "unknown key (forged, or deregistered)", NAK_BOUNDS: "out of bounds",
            NAK_ACCESS: "not allowed by the registration's access rights",
            NAK_PROTOCOL: "malformed request"}

_HANDLE = struct.Struct("<BBQQ")  # version, access, key, length; a plugin's tail follows
_KEYS = struct.Struct("<512Q")  # registration keys drawn at once
_HANDLE_VERSION = 1


def refusal(length: int, access: int, offset: int, size: int, need: int) -> int:
    """Why a request for ``size`` bytes at ``offset`` of a registration is refused (0: it is
    not). The one bounds-and-rights rule of every plugin, whatever table holds the entry."""
    if offset < 0 or size < 0 or offset + size > length:
        return NAK_BOUNDS
    if not int(access) & int(need):  # as ints: IntFlag's own & builds a member (~1 us)
        return NAK_ACCESS
    return 0


class Registrations:
    """Local registrations by their unguessable key, checked for every peer request."""

    __slots__ = ("by_key", "keys")

    def __init__(self) -> None:
        self.by_key: dict[int, MemHandle] = {}
        self.keys: list[int] = []  # unguessable keys drawn ahead, 512 per getrandom() call

    def new_key(self) -> int:
        # One getrandom() per registration was a syscall on every pull of a fresh buffer;
        # keys read ahead from the same source are as unguessable.
        keys = self.keys
        while True:
            if not keys:
                keys.extend(_KEYS.unpack(os.urandom(_KEYS.size)))
            key = keys.pop() | 1
            if key not in self.by_key:
                return key

    def add(self, handle: MemHandle) -> None:
        self.by_key[handle.key] = handle

    def remove(self, handle: MemHandle) -> None:
        """Withdraw ``handle``; ValueError if it is not ours."""
        if not handle.local or self.by_key.get(handle.key) is not handle:
            raise ValueError(f"mem_deregister: {handle!r} is not registered here")
        del self.by_key[handle.key]

    def check(self, key: int, offset: int, length: int,
              access: Access) -> tuple[MemHandle | None, int]:
        """(the registration, 0) if a peer may access the range with ``access``, else
        (None, the refusal code): the table decides, never what the request claims."""
        handle = self.by_key.get(key)
        if handle is None:
            return None, NAK_KEY
        nak = refusal(handle.length, handle.access, offset, length, access)
        return (None, nak) if nak else (handle, 0)

    def __len__(self) -> int:
        return len(self.by_key)


def register_view(buffer: Any, access: Access) -> tuple[memoryview, Access]:
    """The checked view and rights of a buffer to register."""
    access = access_of(access)
    view = as_byte_view(buffer, "mem_register")
    if int(access) & 2 and view.readonly:  # Access.WRITE_ONLY, as an int (see refusal)
        raise ValueError("mem_register: a read-only buffer cannot be registered for remote "
                         "writes (use Access.READ_ONLY)")
    return view, access


def pack_handle(handle: MemHandle, tail: bytes) -> bytes:
    return _HANDLE.pack(_HANDLE_VERSION, handle.access, handle.key, handle.length) + tail


def unpack_handle(data: bytes, scheme: str, tail_size: int) -> tuple[Access, int, int, bytes]:
    """(access, key, length, plugin tail) of a serialized handle; ValueError if malformed."""
    data = bytes(data)
    if len(data) != _HANDLE.size + tail_size:
        raise ValueError(f"mem_handle_deserialize: {len(data)} B is not a "
                         f"{_HANDLE.size + tail_size} B {scheme} handle")
    version, access, key, length = _HANDLE.unpack_from(data)
    if version != _HANDLE_VERSION or access not in (1, 2, 3):
        raise ValueError(f"mem_handle_deserialize: bad version {version} or access {access}")
    return access_of(access), key, length, data[_HANDLE.size:]
