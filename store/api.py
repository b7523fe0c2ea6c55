"""The one client interface every store scheme implements (embedded now, distributed next).

As UMBP has one client interface and a factory that picks Standalone or Distributed at run
time, ``petasus.store.connect(uri)`` returns a ``Store`` and callers never learn which scheme
serves them: the same methods, the same errors, the same guarantees, one conformance suite.

Guarantees, whatever the scheme:
- a reader never sees a partial object: an object becomes visible when its put returns;
- a failed put leaves nothing behind; ``put_many(..., atomic=True)`` makes the group visible
  at once or not at all;
- putting a present key raises ``AlreadyExists`` unless ``overwrite=True``;
- a missing object raises ``NotFound``, a known object whose bytes are gone or damaged raises
  ``ObjectLost``: never wrong bytes.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from .config import Pin
from .errors import InvalidKey, StoreClosed, StoreError

Buffer = Any  # any object with the buffer protocol: bytes, bytearray, memoryview, mmap, numpy
T = TypeVar("T")


class Store(abc.ABC):
    """A key -> bytes store over tiers. Blocking methods; ``aio`` gives the asyncio twins."""

    # --- single objects -------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, key: str, value: Buffer, *, overwrite: bool = False, pin: Pin = Pin.NONE,
            timeout: float | None = None) -> None:
        """Store a copy of ``value``. Waits up to ``timeout`` (the store's ``put_timeout`` by
        default) for eviction to make room, then raises ``StoreFull``."""

    def put_from(self, key: str, buffer: Buffer, *, overwrite: bool = False,
                 pin: Pin = Pin.NONE, timeout: float | None = None) -> None:
        """``put`` from a buffer read in place (numpy arrays, mmaps): no intermediate copy.

        The buffer must not change until the call returns."""
        self.put(key, buffer, overwrite=overwrite, pin=pin, timeout=timeout)

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def get_into(self, key: str, buffer: Buffer) -> int:
        """Copy the object into the front of a writable buffer; returns its size. A buffer
        smaller than the object is an error (never a silent truncation)."""

    @abc.abstractmethod
    def remove(self, key: str) -> None: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def pin(self, key: str, mode: Pin = Pin.SOFT) -> None:
        """Soft pins are evicted only when nothing else can be; hard pins never are."""

    def unpin(self, key: str) -> None:
        self.pin(key, Pin.NONE)

    # --- batches (one call, a result per key, in order) ------------------------------------
    @abc.abstractmethod
    def put_many(self, items: Iterable[tuple[str, Buffer]], *, overwrite: bool = False,
                 atomic: bool = False, timeout: float | None = None) -> list[StoreError | None]:
        """A result per item: None or the error for that key. With ``atomic=True`` the whole
        group becomes visible at once or, on the first error, none of it does (raised)."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        return [_attempt(self.get, key) for key in keys]

    def get_into_many(self, keys: Sequence[str],
                      buffers: Sequence[Buffer]) -> list[int | StoreError]:
        if len(keys) != len(buffers):
            raise ValueError(f"get_into_many: {len(keys)} keys but {len(buffers)} buffers")
        return [_attempt(self.get_into, key, buf) for key, buf in zip(keys, buffers)]

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.exists(key) for key in keys]

    def remove_many(self, keys: Sequence[str]) -> list[StoreError | None]:
        return [_attempt(self.remove, key) for key in keys]

    def exists_prefix(self, keys: Sequence[str]) -> int:
        """How many leading keys are present: the KV-cache prefix probe."""
        found = 0
        for present in self.exists_many(keys):
            if not present:
                break
            found += 1
        return found

    # --- the rest --------------------------------------------------------------------------
    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters per tier (``dram``, ``disk``), ``offload`` and ``ops``; plain numbers."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    def aio(self) -> AsyncStore:
        return AsyncStore(self)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attempt(fn: Any, *args: Any) -> Any:
    """The per-key result of a batch: the value or the key's error; a closed store is not a
    per-key condition and raises."""
    try:
        return fn(*args)
    except StoreClosed:
        raise
    except StoreError as exc:
        return exc


class AsyncStore:
    """The asyncio face of a store: the same methods as coroutines.

    The embedded scheme's operations are memory copies and disk reads that would stall the
    event loop, so they run in the loop's default executor; a scheme with a native asyncio
    path overrides ``Store.aio``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def put(self, key: str, value: Buffer, **kwargs: Any) -> None:
        await self._run(self.store.put, key, value, **kwargs)

    async def put_from(self, key: str, buffer: Buffer, **kwargs: Any) -> None:
        await self._run(self.store.put_from, key, buffer, **kwargs)

    async def get(self, key: str) -> bytes:
        return await self._run(self.store.get, key)

    async def get_into(self, key: str, buffer: Buffer) -> int:
        return await self._run(self.store.get_into, key, buffer)

    async def remove(self, key: str) -> None:
        await self._run(self.store.remove, key)

    async def exists(self, key: str) -> bool:
        return await self._run(self.store.exists, key)

    async def size(self, key: str) -> int:
        return await self._run(self.store.size, key)

    async def put_many(self, items: Iterable[tuple[str, Buffer]],
                       **kwargs: Any) -> list[StoreError | None]:
        return await self._run(self.store.put_many, list(items), **kwargs)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        return await self._run(self.store.get_many, keys)

    async def get_into_many(self, keys: Sequence[str],
                            buffers: Sequence[Buffer]) -> list[int | StoreError]:
        return await self._run(self.store.get_into_many, keys, buffers)

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return await self._run(self.store.exists_many, keys)

    async def remove_many(self, keys: Sequence[str]) -> list[StoreError | None]:
        return await self._run(self.store.remove_many, keys)

    async def exists_prefix(self, keys: Sequence[str]) -> int:
        return await self._run(self.store.exists_prefix, keys)


def validate_key(key: object, max_bytes: int) -> None:
    """Keys are non-empty UTF-8 strings of bounded length (the same rule on every scheme)."""
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, not {type(key).__name__}")
    if not key:
        raise InvalidKey("the key is empty", key=key)
    try:
        n = len(key.encode())
    except UnicodeEncodeError:
        raise InvalidKey("the key is not encodable as UTF-8", key=key) from None
    if n > max_bytes:
        raise InvalidKey(f"the key is {n} bytes, over the limit of {max_bytes}", key=key)


def readable(value: Buffer, op: str) -> memoryview:
    """A flat byte view of any C-contiguous buffer, without copying it."""
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(f"{op}: the value must support the buffer protocol (bytes, bytearray, "
                        f"memoryview, numpy, mmap), not {type(value).__name__}") from None
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError:
            raise ValueError(f"{op}: the buffer must be C-contiguous") from None
    return view


def writable(buffer: Buffer, op: str) -> memoryview:
    view = readable(buffer, op)
    if view.readonly:
        raise TypeError(f"{op}: the buffer is read-only")
    return view
