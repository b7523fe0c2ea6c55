"""Procs: one encode / decode / free per type, as Mercury's hg_proc, derived from annotations.

``encode(value) -> bytes``; ``decode(buf, pos) -> (value, new_pos)``; ``free(value)`` releases
what decode acquired (a no-op for plain values). Every decoder bounds-checks a length before it
slices or allocates, and nothing is ever unpickled: the fallback for ``Any`` is msgpack.

Procs whose every field has a fixed size carry a ``struct.Struct`` format, and a tuple, dataclass
or argument list made only of them compiles to one ``struct.Struct`` (packed in network order).
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

import msgpack

from petasus.bulk import Bulk, LayoutError, RemoteBulk

from .errors import DecodeError, EncodeError

Encode = Callable[[Any], bytes]
Decode = Callable[[Any, int], tuple[Any, int]]

_U32 = struct.Struct("!I")
_VIEW_MIN = 64 << 10  # values from this size on are encoded as views of themselves (parts)


def _no_free(value: Any) -> None:
    """Plain values own nothing that needs releasing."""


class Proc:
    """How one type crosses the wire. ``fmt`` is its struct code when it has a fixed size."""

    __slots__ = ("decode", "encode", "flat", "fmt", "free", "name", "parts", "scalar", "struct")

    def __init__(self, name: str, encode: Encode, decode: Decode,
                 free: Callable[[Any], None] = _no_free, fmt: str | None = None,
                 scalar: bool = False, flat: bool = False,
                 parts: Callable[[Any], list[Any]] | None = None) -> None:
        self.name = name
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

    return Proc(name, encode, decode, fmt=code, scalar=True)


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
_PROCS: dict[Any, Proc] = {}
for _t, _c in _FIXED.items():
    _check = _bool if _t is bool else _float if _c in "fd" else _int
    _PROCS[_t] = _fixed(_t.__name__, _c, _check)


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
        try:
            return build(buf[start:end]), end
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{name}: {exc}") from None

    def parts(value: Any) -> list[Any]:
        if views and not isinstance(value, str | int):
            try:
                view = memoryview(value)
            except TypeError:
                view = None
            if view is not None and view.nbytes >= _VIEW_MIN and view.c_contiguous:
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B")
                if view.nbytes > 0xFFFFFFFF:
                    raise EncodeError(f"{name}: {view.nbytes} B exceed the u32 length prefix")
                return [_U32.pack(view.nbytes), view]  # no copy of the caller's buffer
        return [encode(value)]

    return Proc(name, encode, decode, parts=parts)


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, str | int):  # bytes(5) would be five zero bytes, not an error
        raise TypeError(f"{type(value).__name__} is not a bytes-like object")
    return bytes(value)


_PROCS[str] = _var_bytes("str", lambda v: v.encode() if isinstance(v, str) else _not(v, "str"),
                         lambda b: str(b, "utf-8"), views=False)
_PROCS[bytes] = _var_bytes("bytes", _to_bytes, bytes)
_PROCS[bytearray] = _var_bytes("buffer", _to_bytes, bytearray)
_PROCS[memoryview] = _PROCS[bytearray]


def _bulk() -> Proc:
    """A bulk handle travels serialized; the receiver gets a RemoteBulk it can pull from or
    push to (or hand on to a third process)."""
    def encode(value: Any) -> bytes:
        if not isinstance(value, Bulk | RemoteBulk):
            raise TypeError(f"expected a Bulk or RemoteBulk, got {type(value).__name__}")
        return value.to_bytes()

    def decode(buf: Any, pos: int) -> tuple[Any, int]:
        try:
            return RemoteBulk.decode(buf, pos)
        except LayoutError as exc:
            raise DecodeError(str(exc)) from None

    return Proc("bulk", encode, decode)


_PROCS[Bulk] = _PROCS[RemoteBulk] = _bulk()


def _not(value: Any, what: str) -> bytes:
    raise TypeError(f"expected {what}, got {type(value).__name__}")


def _void() -> Proc:
    def encode(value: Any) -> bytes:
        if value is not None:
            raise EncodeError(f"None: the RPC returns nothing, got {value!r}")
        return b""

    return Proc("None", encode, lambda buf, pos: (None, pos))


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
            value = msgpack.unpackb(bytes(buf[start:end]), raw=False, strict_map_key=False,
                                    use_list=True)
        except Exception as exc:  # msgpack raises several types for malformed input
            raise DecodeError(f"any (msgpack): {type(exc).__name__}: {exc}") from None
        return value, end

    return Proc("any", encode, decode)


ANY = _any()
_PROCS[typing.Any] = ANY


def optional(inner: Proc) -> Proc:
    def encode(value: Any) -> bytes:
        return b"\x00" if value is None else b"\x01" + inner.encode(value)

    def decode(buf: Any, pos: int) -> tuple[Any, int]:
        if pos >= len(buf):
            raise DecodeError(f"Optional[{inner.name}]: presence byte missing")
        flag = buf[pos]
        if flag == 0:
            return None, pos + 1
        if flag != 1:
            raise DecodeError(f"Optional[{inner.name}]: presence byte is {flag}")
        return inner.decode(buf, pos + 1)

    def free(value: Any) -> None:
        if value is not None:
            inner.free(value)

    return Proc(f"Optional[{inner.name}]", encode, decode, free)


def _count(name: str, buf: Any, pos: int, item_size: int) -> tuple[int, int]:
    if pos + 4 > len(buf):
        raise DecodeError(f"{name}: count truncated at offset {pos}")
    (n,) = _U32.unpack_from(buf, pos)
    left = len(buf) - pos - 4
    # Fixed items: exactly n * size bytes must follow. Variable items take at least one byte
    # each (a length, a count or a presence flag), so n <= left bounds what a peer can make us
    # allocate; the slack admits short lists of zero-size values.
    if (n * item_size > left) if item_size else (n > left + 64):
        raise DecodeError(f"{name}: claims {n} items, only {left} B left")
    return n, pos + 4


def sequence(inner: Proc, kind: type = list) -> Proc:
    name = f"{kind.__name__}[{inner.name}]"
    if inner.scalar:
        code, size = inner.fmt, struct.calcsize("!" + inner.fmt)

        def encode(value: Any) -> bytes:
            try:
                return _U32.pack(len(value)) + struct.pack(f"!{len(value)}{code}", *value)
            except (struct.error, TypeError) as exc:
                raise EncodeError(f"{name}: cannot encode: {exc}") from None

        def decode(buf: Any, pos: int) -> tuple[Any, int]:
            n, pos = _count(name, buf, pos, size)
            return kind(struct.unpack_from(f"!{n}{code}", buf, pos)), pos + n * size

        return Proc(name, encode, decode)

    def encode_items(value: Any) -> bytes:
        try:
            count = len(value)
        except TypeError:
            raise EncodeError(f"{name}: expected a sized sequence, got "
                              f"{type(value).__name__}") from None
        return _U32.pack(count) + b"".join([inner.encode(item) for item in value])

    def decode_items(buf: Any, pos: int) -> tuple[Any, int]:
        n, pos = _count(name, buf, pos, 0)
        out = []
        for _ in range(n):
            item, pos = inner.decode(buf, pos)
            out.append(item)
        return kind(out), pos

    def free(value: Any) -> None:
        for item in value:
            inner.free(item)

    return Proc(name, encode_items, decode_items, free)


def mapping(key: Proc, val: Proc) -> Proc:
    name = f"dict[{key.name}, {val.name}]"

    def encode(value: Any) -> bytes:
        if not isinstance(value, dict):
            raise EncodeError(f"{name}: expected a dict, got {type(value).__name__}")
        parts = [_U32.pack(len(value))]
        for k, v in value.items():
            parts.append(key.encode(k))
            parts.append(val.encode(v))
        return b"".join(parts)

    def decode(buf: Any, pos: int) -> tuple[Any, int]:
        n, pos = _count(name, buf, pos, 0)
        out = {}
        for _ in range(n):
            k, pos = key.decode(buf, pos)
            out[k], pos = val.decode(buf, pos)
        return out, pos

    def free(value: Any) -> None:
        for k, v in value.items():
            key.free(k)
            val.free(v)

    return Proc(name, encode, decode, free)


def record(name: str, fields: list[Proc], build: Callable[[tuple[Any, ...]], Any],
           split: Callable[[Any], tuple[Any, ...]]) -> Proc:
    """A fixed sequence of fields (tuple, dataclass, argument list); fields that are all
    fixed-size scalars compile to one Struct (nested records encode field by field)."""
    count = len(fields)
    if all(f.scalar for f in fields):
        fmt = "".join(f.fmt for f in fields)  # type: ignore[misc]
        packer = struct.Struct("!" + fmt)
        size = packer.size

        def encode(value: Any) -> bytes:
            try:
                return packer.pack(*split(value))
            except (struct.error, TypeError) as exc:
                raise EncodeError(f"{name}: cannot encode {value!r}: {exc}") from None

        def decode(buf: Any, pos: int) -> tuple[Any, int]:
            if pos + size > len(buf):
                raise DecodeError(f"{name}: needs {size} B at offset {pos}, "
                                  f"{len(buf) - pos} left")
            return build(packer.unpack_from(buf, pos)), pos + size

        return Proc(name, encode, decode, fmt=fmt, flat=True)

    def encode_fields(value: Any) -> bytes:
        values = split(value)
        if len(values) != count:
            raise EncodeError(f"{name}: expected {count} fields, got {len(values)}")
        return b"".join([f.encode(v) for f, v in zip(fields, values)])

    def parts_of_fields(value: Any) -> list[Any]:
        values = split(value)
        if len(values) != count:
            raise EncodeError(f"{name}: expected {count} fields, got {len(values)}")
        out: list[Any] = []
        for f, v in zip(fields, values):
            out += f.parts(v)
        return out

    def decode_fields(buf: Any, pos: int) -> tuple[Any, int]:
        out = []
        for f in fields:
            v, pos = f.decode(buf, pos)
            out.append(v)
        return build(tuple(out)), pos

    def free(value: Any) -> None:
        for f, v in zip(fields, split(value)):
            f.free(v)

    return Proc(name, encode_fields, decode_fields, free, parts=parts_of_fields)


def _dataclass(cls: type) -> Proc:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    fields = [proc_for(hints.get(n, Any)) for n in names]

    def split(obj: Any) -> tuple[Any, ...]:
        if not isinstance(obj, cls):
            raise TypeError(f"expected {cls.__name__}, got {type(obj).__name__}")
        return tuple(getattr(obj, n) for n in names)

    return record(cls.__name__, fields, lambda values: cls(*values), split)


def register_proc(tp: Any, proc: Proc | None = None, *, encode: Encode | None = None,
                  decode: Decode | None = None, free: Callable[[Any], None] = _no_free) -> Proc:
    """Teach petasus a custom type: a ready Proc, or its encode/decode/free functions."""
    if proc is None:
        if encode is None or decode is None:
            raise TypeError("register_proc needs a Proc, or both encode= and decode=")
        proc = Proc(getattr(tp, "__name__", str(tp)), encode, decode, free)
    _PROCS[tp] = proc
    return proc


def proc_for(tp: Any) -> Proc:
    """The proc for a type annotation (raises TypeError naming the type when there is none)."""
    if tp is None or tp is type(None):
        return VOID
    try:
        known = _PROCS.get(tp)
    except TypeError:
        known = None
    if known is not None:
        return known
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return optional(proc_for(rest[0]))
        return ANY
    if origin in (list, typing.List) or tp is list:  # noqa: UP006
        return sequence(proc_for(args[0] if args else Any), list)
    if origin is tuple or tp is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return sequence(proc_for(args[0] if args else Any), tuple)
        fields = [proc_for(a) for a in args]
        return record(f"tuple[{', '.join(f.name for f in fields)}]", fields, tuple, tuple)
    if origin is dict or tp is dict:
        k, v = args if args else (Any, Any)
        return mapping(proc_for(k), proc_for(v))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        proc = _PROCS[tp] = _dataclass(tp)
        return proc
    custom = getattr(tp, "__petasus_proc__", None)
    if isinstance(custom, Proc):
        return custom
    raise TypeError(f"no proc for type {tp!r}: use petasus types, plain int/float/str/bytes, "
                    "containers of them, dataclasses, or hg.register_proc")


def gen_proc(name: str, *fields: tuple[str, Any]) -> type:
    """MERCURY_GEN_PROC in Python: a dataclass with these fields, and its proc registered."""
    cls = dataclasses.make_dataclass(name, [(n, t) for n, t in fields])
    proc_for(cls)
    return cls
