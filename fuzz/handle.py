"""NA memory handles as a peer sends them (inside every bulk handle): ``mem_handle_deserialize``
of each plugin, which is ``na._regs.unpack_handle`` and the plugin's own tail parse (tcp: none;
sm: pid, instance, slot, base; ofi and verbs: the base address).

Contract (``unpack_handle``'s docstring; ``RemoteBulk.resolve`` turns it into the transfer's
error): ``ValueError``. Invariants: a decoded handle is remote (no memory of ours behind it),
its fields are in range, and serializing it again gives back the very bytes (the format is
canonical, and a handle forwarded to a third process must arrive unchanged).

The input's first byte picks the plugin. tcp and sm are live instances; ofi and verbs run their
methods on a stand-in that has only what deserializing reads (their scheme), as no fabric or
RDMA device is needed to parse bytes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from petasus import na

# sm and tcp are imported here, not on first use, so that atheris instruments them.
from petasus.na import _regs, core, sm, tcp  # noqa: F401
from petasus.na.verbs.plugin import VerbsPlugin

try:
    from petasus.na.ofi.plugin import OfiPlugin
except ImportError:  # no libfabric: its parse is not reachable here either
    OfiPlugin = None  # type: ignore[assignment,misc]

from ._kit import Harness, check

_plugins: list[Any] = []


def _all() -> list[Any]:
    if not _plugins:
        _plugins.append(na.initialize("tcp://127.0.0.1:0", listen=False))
        _plugins.append(na.initialize("sm://", listen=False))
        if OfiPlugin is not None:
            _plugins.append(_Standin(OfiPlugin, "ofi+tcp"))
        _plugins.append(_Standin(VerbsPlugin, "verbs"))
    return _plugins


class _Standin:
    """A plugin class's handle methods bound to an object that has only its scheme."""

    def __init__(self, cls: type, scheme: str) -> None:
        self.cls = cls
        self.self = SimpleNamespace(scheme=scheme, _mr_mode=0)

    def mem_handle_deserialize(self, data: bytes) -> na.MemHandle:
        return self.cls.mem_handle_deserialize(self.self, data)  # type: ignore[no-any-return]

    def mem_handle_serialize(self, handle: na.MemHandle) -> bytes:
        return self.cls.mem_handle_serialize(self.self, handle)  # type: ignore[no-any-return]


def one_input(data: bytes) -> bool:
    if not data:
        return False
    plugins = _all()
    plugin = plugins[data[0] % len(plugins)]
    body = data[1:]
    try:
        handle = plugin.mem_handle_deserialize(body)
    except ValueError:
        return False
    check(not handle.local and handle.view is None, f"a deserialized handle is local: {handle}")
    check(handle.access in (na.Access.READ_ONLY, na.Access.WRITE_ONLY, na.Access.READ_WRITE),
          f"access {handle.access!r}")
    check(0 <= handle.key < 1 << 64 and 0 <= handle.length < 1 << 64, "key or length range")
    again = plugin.mem_handle_serialize(handle)
    check(again == body, f"re-serialized {again.hex()} != {body.hex()}")
    return True


def seeds() -> list[bytes]:
    out = []
    tails = [b"", bytes(range(20)), (1234).to_bytes(8, "little"), (1 << 40).to_bytes(8, "little")]
    for index, tail in enumerate(tails):
        for access in (na.Access.READ_ONLY, na.Access.WRITE_ONLY, na.Access.READ_WRITE):
            h = na.MemHandle(None, 4096, access, 0x0123456789ABCDEF, False)
            out.append(bytes((index,)) + _regs.pack_handle(h, tail))
    return out


def close() -> None:
    for plugin in _plugins:
        if not isinstance(plugin, _Standin):
            plugin.close()
    _plugins.clear()


HARNESS = Harness("handle", one_input, seeds, __doc__ or "", close)
