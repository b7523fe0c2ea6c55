"""petasus.store: a tiered object store (DRAM and disk) behind one client interface.

    from petasus import store

    with store.connect("embedded:///var/lib/kv", dram_bytes=1 << 30) as kv:
        kv.put("block/0", tensor)               # any buffer: bytes, numpy, mmap ...
        kv.get_into("block/0", out)             # straight into your memory
        kv.exists_prefix(["block/0", "block/1"])

``embedded://PATH`` keeps every tier in this process (``embedded://`` uses a temporary
directory, removed on close); a master's URI (``tcp://HOST:PORT``, ``sm://...``,
``ofi+tcp://...``) gives the distributed scheme, the same interface over a master and storage
nodes (``petasus-store master`` / ``node``). docs/store.md describes the model.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from .api import AsyncStore, Buffer, Store
from .config import Offload, Pin, StoreConfig
from .errors import (
    AlreadyExists,
    ConfigError,
    InvalidKey,
    NotFound,
    ObjectLost,
    StoreClosed,
    StoreError,
    StoreFull,
    ValueTooLarge,
)


def connect(uri: str, *, config: StoreConfig | None = None, **options: Any) -> Store:
    """Open a store by URI. Keyword options are ``StoreConfig`` fields (or pass ``config``)."""
    if not isinstance(uri, str):
        raise TypeError(f"store.connect: the URI must be a str, not {type(uri).__name__}")
    if config is not None and options:
        raise ValueError("store.connect: pass either config= or keyword options, not both")
    if uri.startswith("embedded://"):
        from .embedded import EmbeddedStore

        path = unquote(uri[len("embedded://"):]) or None
        return EmbeddedStore(path, config or StoreConfig.from_dict(options))
    if "://" in uri:
        from .client import DistributedStore

        if config is not None:
            raise ValueError("store.connect: a master URI takes client options, not a "
                             "StoreConfig (the master and nodes hold the store's config)")
        return DistributedStore(uri, **options)
    raise ValueError(f"store.connect: unsupported URI {uri!r}; use embedded://[PATH] or a "
                     "master's URI (tcp://HOST:PORT, sm://..., ofi+tcp://...)")


__all__ = [
    "AlreadyExists", "AsyncStore", "Buffer", "ConfigError", "InvalidKey", "NotFound",
    "ObjectLost", "Offload", "Pin", "Store", "StoreClosed", "StoreConfig", "StoreError",
    "StoreFull", "ValueTooLarge", "connect",
]
