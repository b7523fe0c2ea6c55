"""A linked list of int32 with its own proc (the Mercury tutorial's int_list_t), and the RPC
that sums one. Walking the list to encode and rebuilding it to decode is the custom part;
petasus handles the rest."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from petasus import hg

_COUNT = struct.Struct("!I")
_INT32 = struct.Struct("!i")


class IntList:
    """One node of a singly linked list of int32."""

    __slots__ = ("next", "value")

    def __init__(self, value: int, next: IntList | None = None) -> None:
        self.value = value
        self.next = next

    @classmethod
    def of(cls, values: list[int]) -> IntList | None:
        head = None
        for value in reversed(values):
            head = cls(value, head)
        return head

    def __iter__(self) -> Iterator[int]:
        node: IntList | None = self
        while node is not None:
            yield node.value
            node = node.next


def encode(head: IntList | None) -> bytes:
    values = list(head) if head is not None else []
    return _COUNT.pack(len(values)) + b"".join(_INT32.pack(v) for v in values)


def decode(buf: bytes, pos: int) -> tuple[IntList | None, int]:
    if pos + 4 > len(buf):
        raise hg.DecodeError("int_list: count truncated")
    (count,) = _COUNT.unpack_from(buf, pos)
    pos += 4
    if pos + 4 * count > len(buf):
        raise hg.DecodeError(f"int_list: {count} values claimed, {len(buf) - pos} B left")
    values = [_INT32.unpack_from(buf, pos + 4 * i)[0] for i in range(count)]
    return IntList.of(values), pos + 4 * count


hg.register_proc(IntList, encode=encode, decode=decode)


@hg.declare
def sum_list(values: IntList) -> hg.int64:
    """The sum of the list's values, on the server."""
