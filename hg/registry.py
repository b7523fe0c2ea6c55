"""The registry: ``RPC`` (name, provider, procs, handler) and ``Class`` (Mercury's hg_class).

Procs of fixed size are fused with the header into one ``struct.Struct``, so a call such as
``sum(int32, int32) -> int32`` costs one pack and one unpack on each side.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from petasus import na

from . import header as hd
from .procs import Proc


class Call(Protocol):
    """What a low-level handler receives (a ``target.TargetHandle``): the call's input and
    how to answer it, once."""

    @property
    def input(self) -> tuple[Any, ...]: ...

    def respond(self, value: Any = None) -> None: ...

    def fail(self, exc: BaseException) -> None: ...

_REQ, _RESP = hd.REQUEST, hd.RESPONSE


class RPC:
    """One registered RPC: name, provider, procs, and on the target its handler."""

    __slots__ = ("handler", "id", "impl", "in_proc", "name", "one_way", "out_proc", "provider_id",
                 "req_fused", "resp_fused")

    def __init__(self, name: str, in_proc: Proc, out_proc: Proc, *, one_way: bool = False,
                 provider_id: int = 0, handler: Callable[[Call], None] | None = None,
                 impl: Callable[..., Any] | None = None) -> None:
        self.name = name
        self.provider_id = provider_id
        self.id = hd.rpc_id(name, provider_id)
        self.in_proc = in_proc
        self.out_proc = out_proc
        self.one_way = one_way
        self.handler = handler
        self.impl = impl
        self.req_fused = struct.Struct(_REQ.format + in_proc.fmt) if in_proc.flat else None
        self.resp_fused = struct.Struct(_RESP.format + out_proc.fmt) if out_proc.scalar else None

    def __repr__(self) -> str:
        kind = "one-way " if self.one_way else ""
        return f"<RPC {kind}{self.name} provider={self.provider_id} id=0x{self.id:016x}>"


class Class:
    """The registry of RPCs over one NA plugin instance (Mercury's hg_class)."""

    def __init__(self, plugin: na.Plugin, listening: bool) -> None:
        self.na = plugin
        self.listening = listening
        self.rpcs: dict[int, RPC] = {}

    def register(self, rpc: RPC) -> RPC:
        existing = self.rpcs.get(rpc.id)
        if existing is not None and existing.name != rpc.name:
            raise ValueError(f"register: {rpc.name!r} and {existing.name!r} hash to the same "
                             "RPC id; rename one")
        self.rpcs[rpc.id] = rpc
        return rpc

    def deregister(self, name: str, provider_id: int = 0) -> None:
        if self.rpcs.pop(hd.rpc_id(name, provider_id), None) is None:
            raise KeyError(f"deregister: no RPC {name!r} for provider {provider_id}")

    def registered(self, name: str, provider_id: int = 0) -> bool:
        return hd.rpc_id(name, provider_id) in self.rpcs
