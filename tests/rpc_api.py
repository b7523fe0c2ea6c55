"""The RPCs of the RPC conformance suite, declared once for the peer and the tests."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

from petasus import bulk, hg


@dataclass
class Point:
    x: hg.float64
    y: hg.float64
    label: str


@dataclass
class Fixed:
    a: hg.int8
    b: hg.uint16
    c: hg.float32
    ok: bool


@hg.declare
def sum(x: hg.int32, y: hg.int32) -> hg.int32: ...


@hg.declare
def describe(p: Point, tags: list[str], scores: dict[str, float],
             maybe: int | None = None) -> tuple[str, int]: ...


@hg.declare
def echo_any(value: Any) -> Any: ...


@hg.declare
def echo_bytes(data: bytes) -> bytes: ...


@hg.declare
def flip(f: Fixed) -> Fixed: ...


@hg.declare
def fail(kind: str, message: str) -> None: ...


@hg.declare
def hold(seconds: float) -> float:
    """Answer ``seconds`` once a release() arrives (``seconds`` also bounds the wait)."""


@hg.declare
def release(count: int = 1) -> None:
    """Let ``count`` holds answer, whenever they run."""


@hg.declare(one_way=True)
def note(text: str) -> None: ...


@hg.declare
def notes() -> list[str]: ...


@hg.declare
def whoami() -> str: ...


@hg.declare
def async_double(x: int) -> int: ...


@hg.declare
def pooled_double(x: int) -> int: ...


@hg.declare
def never_registered(x: int) -> int: ...


@hg.declare
def bad_result() -> bytes: ...


@hg.declare
def relay(x: hg.int32, y: hg.int32) -> hg.int32:
    """The server calls sum on itself, blocking, from inside a handler."""


# -- bulk --------------------------------------------------------------------------------------
def pattern(seed: int, size: int) -> bytes:
    """Deterministic bytes both sides can compute."""
    return random.Random(seed).randbytes(size)


def split(data: bytes, segments: int) -> list[bytearray]:
    """``data`` cut into ``segments`` uneven pieces (one of them empty when there are 3+)."""
    cuts = sorted({0, len(data), *(len(data) * i // (segments + 1) for i in range(1, segments))})
    pieces = [bytearray(data[a:b]) for a, b in itertools.pairwise(cuts)]
    if segments >= 3:
        pieces.insert(1, bytearray())
    return pieces


@hg.declare
def expose(size: int, seed: int, access: int, segments: int, eager: bool | None) -> bulk.Bulk:
    """The server exposes ``pattern(seed, size)`` in several segments and keeps it."""


@hg.declare
def exposed_digest() -> bytes:
    """sha256 of what the server exposed last (to check pushes into it)."""


@hg.declare
def pull(src: bulk.Bulk, offset: int, size: int) -> bytes:
    """The server pulls ``size`` bytes (-1: the rest) at ``offset``; returns their sha256."""


@hg.declare
def push(dst: bulk.Bulk, offset: int, size: int, seed: int) -> None:
    """The server pushes ``pattern(seed, size)`` into ``dst`` at ``offset``."""


@hg.declare
def relay_pull(other: str, src: bulk.Bulk) -> bytes:
    """The server hands ``src`` on to ``other``, which pulls it (a third party)."""


@hg.declare
def pipelined_digest(src: bulk.Bulk, chunk_size: int, depth: int) -> bytes:
    """The server pulls ``src`` with ``bulk.pipeline``, hashing each chunk as it arrives."""


@hg.declare
def digest(data: bytes) -> bytes: ...


@hg.declare
def make(size: int, seed: int) -> bytes: ...


@hg.declare(one_way=True)
def deposit(data: bytes) -> None:
    """One way: remember the digest of ``data`` (read back with ``notes``)."""
