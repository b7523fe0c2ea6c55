"""The RPCs of the RPC conformance suite, declared once for the peer and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petasus import hg


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
