"""petasus.na: the network abstraction.

``initialize(uri, listen=...)`` picks the plugin from the URI scheme and returns an object that
implements ``Plugin`` (see ``interface``). Nothing here knows about RPCs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# First: importing it installs the finder that chooses between each compiled module and its
# source (na/accel.py), before any of them is imported here or by hg and bulk.
from . import accel
from .aio_driver import AsyncioDriver
from .driver import BlockingDriver, PluginSource, Source
from .errors import AccessError, Canceled, NAError, PeerError, ProtocolError
from .interface import Plugin
from .types import Access, Addr, MemHandle, Op, OpKind

__all__ = [
    "Access", "AccessError", "Addr", "AsyncioDriver", "BlockingDriver", "Canceled",
    "MemHandle", "NAError", "Op", "OpKind", "PeerError", "Plugin", "PluginSource",
    "ProtocolError", "Source", "accel", "available_plugins", "initialize", "register_plugin",
    "wait",
]

_PLUGINS: dict[str, Callable[..., Plugin]] = {}


def register_plugin(scheme: str, factory: Callable[..., Plugin]) -> None:
    """Make ``scheme://`` URIs open ``factory(uri, listen=..., **options)``."""
    _PLUGINS[scheme] = factory


def _tcp(uri: str, listen: bool = False, **options: Any) -> Plugin:
    from .tcp import TcpPlugin

    return TcpPlugin(uri, listen, **options)


def _sm(uri: str, listen: bool = False, **options: Any) -> Plugin:
    from .sm import SmPlugin

    return SmPlugin(uri, listen, **options)


def _ofi(uri: str, listen: bool = False, **options: Any) -> Plugin:
    # Imports libfabric only now, so that ``import petasus.na`` never needs it.
    from .ofi import open_plugin

    return open_plugin(uri, listen, **options)  # type: ignore[no-any-return]


def _verbs(uri: str, listen: bool = False, **options: Any) -> Plugin:
    # Imports pyverbs only now, so that ``import petasus.na`` never needs it.
    from .verbs import open_plugin

    return open_plugin(uri, listen, **options)  # type: ignore[no-any-return]


register_plugin("tcp", _tcp)
register_plugin("sm", _sm)
for _scheme in ("ofi+tcp", "ofi+shm", "ofi+sockets", "ofi+verbs"):
    register_plugin(_scheme, _ofi)
register_plugin("verbs", _verbs)


def available_plugins() -> list[str]:
    return sorted(_PLUGINS)


def initialize(uri: str, listen: bool = False, **options: Any) -> Plugin:
    """Open a plugin instance for ``uri`` (``tcp://127.0.0.1:0``, ``sm://``, ...).

    ``listen=True`` accepts connections; the address to give peers is ``addr_self()``.
    Options: ``max_msg_size``, ``spin_us`` (0 = always block), ``rma_chunk``, ``max_queued``,
    and plugin-specific ones (tcp and sm: the connection limits ``handshake_timeout``,
    ``idle_timeout``, ``max_connections``, ``max_queued_bytes``, ``max_queued_peer``, see
    docs/architecture.md; sm: ``rma="auto"|"process_vm"|"copy"``; ofi:
    ``rma="checked"|"native"``, ``rx_buffers``, ``probe_interval``; verbs: ``two_sided_max``,
    ``gid_index``, ``srq_size``).
    """
    scheme = uri.split("://", 1)[0] if "://" in uri else uri
    factory = _PLUGINS.get(scheme)
    if factory is None:
        raise ValueError(f"no NA plugin for {uri!r}; available schemes: "
                         f"{', '.join(available_plugins())}")
    return factory(uri, listen=listen, **options)


def wait(plugin: Plugin, *ops: Op, timeout: float) -> None:
    """Drive ``plugin`` until every op has completed and been triggered, or raise TimeoutError.

    Errors of the ops are not raised here; call ``op.result()`` for that.
    """
    driver = BlockingDriver(PluginSource(plugin))
    if not driver.wait_until(lambda: all(op.done for op in ops), time.monotonic() + timeout):
        pending = [op for op in ops if not op.done]
        raise TimeoutError(f"wait: {len(pending)} operation(s) still pending after "
                           f"{timeout} s: {pending[:3]}")
