"""One small hierarchy for every store error, whichever scheme raised it.

Each error names the key (where there is one) and the tier, so a log line says which object
and which layer of the store is at fault without a traceback.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises on purpose."""

    def __init__(self, message: str, *, key: str | None = None, tier: str | None = None) -> None:
        shown = key if key is None or len(key) <= 80 else f"{key[:64]}...({len(key)} chars)"
        where = ", ".join(p for p in (f"key {shown!r}" if key is not None else "",
                                      f"tier {tier}" if tier else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.key = key
        self.tier = tier


class NotFound(StoreError, KeyError):
    """The key is not in the store (never put, removed, or dropped by eviction)."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the sentence
        return Exception.__str__(self)


class AlreadyExists(StoreError):
    """A put of a key that is present, without ``overwrite=True``."""


class StoreFull(StoreError):
    """No room for the object after waiting up to the put's timeout for eviction."""


class NeverFits(StoreFull):
    """The object is larger than any DRAM segment: waiting for eviction cannot help."""


class ObjectLost(StoreError):
    """The store knew the object but its bytes are gone or damaged (a failed checksum)."""


class InvalidKey(StoreError, ValueError):
    """The key is empty, not UTF-8 encodable, or too long."""


class ValueTooLarge(StoreError, ValueError):
    """The value exceeds the store's configured size cap."""


class ConfigError(StoreError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class StoreClosed(StoreError):
    """The store was closed."""
