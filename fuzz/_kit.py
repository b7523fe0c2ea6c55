"""What every harness shares: its record, the violation it raises, and input helpers.

Nothing here imports petasus: the runner imports a harness module inside
``atheris.instrument_imports()``, and a petasus module imported earlier would escape the
coverage instrumentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class Violation(AssertionError):
    """A decoder broke its contract on some input: the fuzzer reports it as a crash."""


@dataclass(frozen=True)
class Harness:
    """One decoder a peer reaches.

    ``one_input(data)`` feeds ``data`` to it and returns True when the bytes decoded to a value
    (every invariant checked), False when they were refused with the documented error; any
    other exception is a finding. ``seeds()`` are valid encodings made by the encoders, so the
    fuzzer starts past the magic, version and length checks. ``close()`` lets go of what the
    harness keeps between inputs (plugins), for a process that goes on after it.
    """

    name: str
    one_input: Callable[[bytes], bool]
    seeds: Callable[[], list[bytes]]
    doc: str
    close: Callable[[], None] = lambda: None  # releases what one_input keeps between inputs


def check(condition: bool, what: str) -> None:
    """Raise a Violation naming the broken invariant (never ``assert``: -O strips those)."""
    if not condition:
        raise Violation(what)


def cuts(data: bytes) -> tuple[list[int], bytes]:
    """Split an input into chunk sizes and a stream: the first byte says how many chunk-size
    bytes follow (at most 15), each a chunk of 1..256 bytes; the rest is fed in those chunks,
    cycling, so the fuzzer controls both the bytes and where reads end."""
    if not data:
        return [], b""
    n = data[0] & 0x0F
    sizes = [b + 1 for b in data[1:1 + n]]
    return sizes, data[1 + n:]


def pieces(stream: bytes, sizes: list[int]) -> Iterator[bytes]:
    """``stream`` in the chunk sizes of ``cuts`` (one piece when there are none)."""
    if not sizes:
        if stream:
            yield stream
        return
    pos, i = 0, 0
    while pos < len(stream):
        n = sizes[i % len(sizes)]
        yield stream[pos:pos + n]
        pos += n
        i += 1


def with_cuts(stream: bytes, sizes: tuple[int, ...] = ()) -> bytes:
    """The input that ``cuts`` reads back as (sizes, stream): how seeds are made."""
    return bytes((len(sizes), *(s - 1 for s in sizes))) + stream


def footprint(value: Any, depth: int = 0) -> int:
    """Items plus bytes a decoded value holds: what a peer made us allocate, to compare with
    the bytes it sent (containers are walked; their own overhead is one unit each)."""
    if depth > 200:
        raise Violation("a decoded value nests deeper than 200 levels")
    if isinstance(value, bytes | bytearray | memoryview | str):
        return 1 + len(value)
    if isinstance(value, dict):
        return 1 + sum(footprint(k, depth + 1) + footprint(v, depth + 1)
                       for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return 1 + sum(footprint(v, depth + 1) for v in value)
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None:
        return 1 + sum(footprint(getattr(value, f), depth + 1) for f in fields)
    return 1


def same(a: Any, b: Any) -> bool:
    """Equality that takes NaN as equal to itself (a float field may carry any NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    fields = getattr(a, "__dataclass_fields__", None)
    if fields is not None:
        return all(same(getattr(a, f), getattr(b, f)) for f in fields)
    return bool(a == b)


def peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result and the peak of Python allocations while it ran (tracemalloc), so a
    harness can bound what a decoder allocates even for a moment, not only what it returns.

    The first call starts tracemalloc for the process: it slows allocation down, which only
    the harnesses that call this pay."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        result = fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1] - before
    return result, peak
