"""Procs of containers and records, and the lookup from a type annotation to its proc.

``encode(value) -> bytes``; ``decode(buf, pos) -> (value, new_pos)``; ``free(value)`` releases
what decode acquired. Every decoder bounds-checks a length before it slices or allocates, and
nothing is ever unpickled. A tuple, dataclass or argument list made only of fixed-size procs
compiles to one ``struct.Struct`` (packed in network order). The leaf procs are in ``scalars``.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

from .errors import DecodeError, EncodeError
from .scalars import (
    _U32,
    ANY,
    PROCS,
    VOID,
    Decode,
    Encode,
    Proc,
    _no_free,
    float32,
    float64,
    int8,
    int16,
    int32,
    int64,
    uint8,
    uint16,
    uint32,
    uint64,
)

__all__ = [
    "ANY", "VOID", "Proc", "float32", "float64", "gen_proc", "int8", "int16", "int32", "int64",
    "mapping", "optional", "proc_for", "record", "register_proc", "sequence", "uint8", "uint16",
    "uint32", "uint64",
]

_PROCS = PROCS


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

    return Proc(f"Optional[{inner.name}]", encode, decode, free, handles=inner.handles,
                adopts=inner.adopts)


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

        return Proc(name, encode, decode, handles=False, adopts=False)

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

    return Proc(name, encode_items, decode_items, free, handles=inner.handles,
                adopts=inner.adopts)


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
            try:
                hash(k)
            except TypeError:  # an "any" key that decoded to a list or a dict
                raise DecodeError(f"{name}: a key of type {type(k).__name__} is unhashable") \
                    from None
            out[k], pos = val.decode(buf, pos)
        if len(out) != n:
            # Our encoder never repeats a key; a repeated one would make one value shadow
            # another, and what the receiver sees differ from what the bytes say.
            raise DecodeError(f"{name}: {n - len(out)} repeated keys")
        return out, pos

    def free(value: Any) -> None:
        for k, v in value.items():
            key.free(k)
            val.free(v)

    return Proc(name, encode, decode, free, handles=key.handles or val.handles,
                adopts=key.adopts or val.adopts)


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

        return Proc(name, encode, decode, fmt=fmt, flat=True, handles=False, adopts=False)

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

    return Proc(name, encode_fields, decode_fields, free, parts=parts_of_fields,
                handles=any(f.handles for f in fields), adopts=any(f.adopts for f in fields))


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
