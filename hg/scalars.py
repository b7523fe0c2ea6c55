"""Leaf procs: the ``Proc`` type and the procs of numbers, bytes, strings, bulk handles, None
and the msgpack fallback. Containers, records and the annotation lookup are in ``procs``.

One encode / decode / free per type, as Mercury's hg_proc, derived from annotations.

``encode(value) -> bytes``; ``decode(buf, pos) -> (value, new_pos)``; ``free(value)`` releases
what decode acquired (a no-op for plain values). Every decoder bounds-checks a length before it
slices or allocates, and nothing is ever unpickled: the fallback for ``Any`` is msgpack.

Procs whose every field has a fixed size carry a ``struct.Struct`` format, and a tuple, dataclass
or argument list made only of them compiles to one ``struct.Struct`` (packed in network order).
"""

from __future__ import annotations

import struct
import threading
import typing
from collections.abc import Callable
from typing import Any

import msgpack

from petasus import na
from petasus.bulk import Bulk, LayoutError, RemoteBulk

from .adopt import ADOPT_MIN
from .errors import DecodeError, EncodeError

Encode = Callable[[Any], bytes]
Decode = Callable[[Any, int], tuple[Any, int]]

_U32 = struct.Struct("!I")
# Values from this size on are encoded as views of themselves (``Proc.parts``), and an
# overflowing call exposes them as bulk segments of their own (``overflow.segments``): below
# it, joining small pieces into one buffer costs less than registering each.
LARGE = 64 << 10


def _no_free(value: Any) -> None:
    """Plain values own nothing that needs releasing."""


class Proc:
    """How one type crosses the wire. ``fmt`` is its struct code when it has a fixed size."""

    __slots__ = ("adopts", "decode", "encode", "flat", "fmt", "free", "handles", "name", "parts",
                 "scalar", "struct")

    def __init__(self, name: str, encode: Encode, decode: Decode,
                 free: Callable[[Any], None] = _no_free, fmt: str | None = None,
                 scalar: bool = False, flat: bool = False,
                 parts: Callable[[Any], list[Any]] | None = None, handles: bool = True,
                 adopts: bool = True) -> None:
        self.name = name
        # Whether a decoded value may hold bulk handles, which are then bound to the peer that
        # sent them (``bound_to``). A proc of unknown content (a custom one) may: only the
        # procs that certainly hold none skip the binding, and its cost.
        self.handles = handles
        # Whether a decoded value may be a large ``bytes`` taken as is from the object an
        # overflow landed it in (hg/adopt.py). Where none can be, an overflow lands in plain
        # memory: a segment landed in an object no value takes is copied out and decoded
        # again (an RPC carrying a 1 MiB eager bulk handle over ofi: ~200 us a call). A
        # custom proc may build on the bytes proc, so it may.
        self.adopts = adopts
        self.encode = encode
        # The encoding as a list of buffers whose concatenation is ``encode(value)``: large
        # values appear as views of themselves, so an overflowing call exposes the caller's
        # own memory instead of a copy.
        self.parts = parts or (lambda value: [encode(value)])
        self.decode = decode
        self.free = free
        self.fmt = fmt
        self.scalar = scalar  # one fixed-size value: its struct field *is* the value
        self.flat = flat  # a record of scalars: its values are exactly its struct's fields
        self.struct = struct.Struct("!" + fmt) if fmt else None

    def __repr__(self) -> str:
        return f"<Proc {self.name}{' fixed ' + self.fmt if self.fmt else ''}>"

    def dumps(self, value: Any) -> bytes:
        return self.encode(value)

    def loads(self, data: Any) -> Any:
        """Decode a whole buffer: every byte must be consumed."""
        value, pos = self.decode(data, 0)
        if pos != len(data):
            raise DecodeError(f"{self.name}: {len(data) - pos} trailing bytes after the value")
        return value


def _fixed(name: str, code: str, check: Callable[[Any], Any]) -> Proc:
    packer = struct.Struct("!" + code)
    size = packer.size

    def encode(value: Any) -> bytes:
        try:
            return packer.pack(check(value))
        except (struct.error, TypeError, ValueError) as exc:
            raise EncodeError(f"{name}: cannot encode {value!r}: {exc}") from None

    def decode(buf: Any, pos: int) -> tuple[Any, int]:
        if pos + size > len(buf):
            raise DecodeError(f"{name}: needs {size} B at offset {pos}, {len(buf) - pos} left")
        return packer.unpack_from(buf, pos)[0], pos + size

    return Proc(name, encode, decode, fmt=code, scalar=True, handles=False, adopts=False)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {type(value).__name__}")
    return value


def _float(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"expected a float, got {type(value).__name__}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a bool, got {type(value).__name__}")
    return value


# Annotation markers: ``def sum(x: int32, y: int32) -> int32``. They are ints at run time.
class int8(int): ...
class uint8(int): ...
class int16(int): ...
class uint16(int): ...
class int32(int): ...
class uint32(int): ...
class int64(int): ...
class uint64(int): ...
class float32(float): ...
class float64(float): ...


_FIXED = {int8: "b", uint8: "B", int16: "h", uint16: "H", int32: "i", uint32: "I", int64: "q",
          uint64: "Q", float32: "f", float64: "d", int: "q", float: "d", bool: "?"}
PROCS: dict[Any, Proc] = {}  # type -> proc; procs.register_proc adds to it
for _t, _c in _FIXED.items():
    _check = _bool if _t is bool else _float if _c in "fd" else _int
    PROCS[_t] = _fixed(_t.__name__, _c, _check)


def _span(name: str, buf: Any, pos: int) -> tuple[int, int]:
    """Where a u32-length-prefixed value lies, checked against the bytes that are left."""
    if pos + 4 > len(buf):
        raise DecodeError(f"{name}: length prefix truncated at offset {pos}")
    (n,) = _U32.unpack_from(buf, pos)
    end = pos + 4 + n
    if end > len(buf):
        raise DecodeError(f"{name}: claims {n} B, {len(buf) - pos - 4} B left")
    return pos + 4, end


def _var_bytes(name: str, to_bytes: Callable[[Any], bytes], build: Callable[[Any], Any],
               views: bool = True) -> Proc:
    """Length-prefixed bytes; ``views``: buffers may be sent as views of themselves."""
    def encode(value: Any) -> bytes:
        try:
            data = to_bytes(value)
        except (TypeError, UnicodeEncodeError) as exc:
            raise EncodeError(f"{name}: cannot encode {type(value).__name__}: {exc}") from None
        return _U32.pack(len(data)) + data

    def decode(buf: Any, pos: int) -> tuple[Any, int]:
        start, end = _span(name, buf, pos)
        if adopts and end - start >= ADOPT_MIN and buf is _DECODING.base:
            # An overflow landed these bytes in a bytes object of their own: that object
            # is the value (``overflow.Lease``), not a copy of it.
            table = _DECODING.adopt
            obj = table.get(start) if table is not None else None
            if obj is not None and len(obj) == end - start:
                del table[start]  # type: ignore[union-attr]
                return obj, end
        try:
            return build(buf[start:end]), end
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{name}: {exc}") from None

    adopts = build is bytes

    def parts(value: Any) -> list[Any]:
        if views and not isinstance(value, str | int):
            try:
                view = memoryview(value)
            except TypeError:
                view = None
            if view is not None and view.nbytes >= LARGE and view.c_contiguous:
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B")
                if view.nbytes > 0xFFFFFFFF:
                    raise EncodeError(f"{name}: {view.nbytes} B exceed the u32 length prefix")
                return [_U32.pack(view.nbytes), view]  # no copy of the caller's buffer
        return [encode(value)]

    return Proc(name, encode, decode, parts=parts, handles=False, adopts=adopts)


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, str | int):  # bytes(5) would be five zero bytes, not an error
        raise TypeError(f"{type(value).__name__} is not a bytes-like object")
    return bytes(value)


PROCS[str] = _var_bytes("str", lambda v: v.encode() if isinstance(v, str) else _not(v, "str"),
                         lambda b: str(b, "utf-8"), views=False)
PROCS[bytes] = _var_bytes("bytes", _to_bytes, bytes)
PROCS[bytearray] = _var_bytes("buffer", _to_bytes, bytearray)
PROCS[memoryview] = PROCS[bytearray]


class _Decoding(threading.local):
    """The peer whose message is being decoded on this thread, if any (``bound_to``), and
    the bytes objects that parts of ``base`` landed in, by offset (``overflow.Lease``)."""

    peer: na.Addr | None = None
    allow: Callable[[str], bool] | None = None
    base: Any = None
    adopt: dict[int, bytes] | None = None


_DECODING = _Decoding()


def bound_to(proc: Proc, data: Any, peer: na.Addr,
             allow: Callable[[str], bool] | None,
             adopt: dict[int, bytes] | None = None) -> Any:
    """``proc.loads(data)``, the handles in it bound to ``peer``, the process that sent them:
    a handler's transfers with them go to that peer over its connection, never to an owner
    the bytes name, unless ``allow(owner URI)`` (``Engine(bulk_peers=...)``). ``adopt``:
    bytes objects holding the bytes of ``data`` at their offsets, which a ``bytes`` value
    spanning exactly one of them is (each taken is removed from it)."""
    if not proc.handles and not adopt:
        return proc.loads(data)
    state = _DECODING
    state.peer, state.allow, state.base, state.adopt = peer, allow, data, adopt
    try:
        return proc.loads(data)
    finally:
        state.peer = state.allow = state.base = state.adopt = None


def _bulk() -> Proc:
    """A bulk handle travels serialized; the receiver gets a RemoteBulk it can pull from or
    push to (or hand on to a third process)."""
    def encode(value: Any) -> bytes:
        if not isinstance(value, Bulk | RemoteBulk):
            raise TypeError(f"expected a Bulk or RemoteBulk, got {type(value).__name__}")
        return value.to_bytes()

    def decode(buf: Any, pos: int) -> tuple[Any, int]:
        try:
            handle, end = RemoteBulk.decode(buf, pos)
        except LayoutError as exc:
            raise DecodeError(str(exc)) from None
        peer = _DECODING.peer
        if peer is not None:
            handle.bind(peer, _DECODING.allow)
        return handle, end

    return Proc("bulk", encode, decode, adopts=False)


PROCS[Bulk] = PROCS[RemoteBulk] = _bulk()


def _not(value: Any, what: str) -> bytes:
    raise TypeError(f"expected {what}, got {type(value).__name__}")


def _void() -> Proc:
    def encode(value: Any) -> bytes:
        if value is not None:
            raise EncodeError(f"None: the RPC returns nothing, got {value!r}")
        return b""

    return Proc("None", encode, lambda buf, pos: (None, pos), handles=False, adopts=False)


VOID = _void()


def _any() -> Proc:
    packer = msgpack.Packer(use_bin_type=True)

    def encode(value: Any) -> bytes:
        try:
            data = packer.pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"any (msgpack): cannot encode {type(value).__name__}: {exc}") \
                from None
        return _U32.pack(len(data)) + data

    def decode(buf: Any, pos: int) -> tuple[Any, int]:
        start, end = _span("any", buf, pos)
        try:
            # msgpack reads the view in place and copies out only the values: a copy of the
            # whole encoding first would double the cost of a large overflowed input.
            value = msgpack.unpackb(buf[start:end], raw=False, strict_map_key=False,
                                    use_list=True)
        except Exception as exc:  # msgpack raises several types for malformed input
            raise DecodeError(f"any (msgpack): {type(exc).__name__}: {exc}") from None
        return value, end

    return Proc("any", encode, decode, handles=False, adopts=False)


ANY = _any()
PROCS[typing.Any] = ANY
