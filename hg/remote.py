"""``Remote``: a peer (address, provider id) whose declared RPCs are attributes, called
blocking, as a handle to wait on later, or awaited."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from petasus import na

from .context import Context
from .declarations import _SHUTDOWN, Declaration
from .origin import Handle
from .registry import RPC


class Caller(Protocol):
    """What a ``Remote`` calls through (an ``engine.Engine``)."""

    context: Context
    timeout: float
    _declared: dict[str, Declaration]

    def _rpc_for(self, decl: Declaration, provider_id: int) -> RPC: ...

    def wait(self, handle: Handle) -> Any: ...

    def acall(self, addr: na.Addr, rpc: RPC, args: tuple[Any, ...],
              timeout: float | None = None) -> Coroutine[Any, Any, Any]: ...

    def declare(self, *items: Any) -> None: ...

    rpc: Callable[..., Any]


class Remote:
    """A peer (address and provider id) whose declared RPCs are attributes."""

    def __init__(self, engine: Caller, addr: na.Addr, provider_id: int = 0) -> None:
        self.engine = engine
        self.addr = addr
        self.provider_id = provider_id

    def __repr__(self) -> str:
        return f"<Remote {self.addr.uri} provider={self.provider_id}>"

    def __getattr__(self, name: str) -> RemoteMethod:
        decl = self.engine._declared.get(name)
        if decl is None:
            raise AttributeError(f"{name!r} is not a declared RPC; declare it with "
                                 f"engine.declare(...) or define it with @engine.rpc")
        method = RemoteMethod(self, decl)
        self.__dict__[name] = method
        return method

    def call(self, name: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return getattr(self, name).call(*args, timeout=timeout, **kwargs)

    def shutdown(self) -> None:
        """Ask the peer's engine to stop serving (it must allow remote shutdown)."""
        RemoteMethod(self, _SHUTDOWN)()


class RemoteMethod:
    """``remote.name(...)`` blocks; ``.future(...)`` returns a Handle; ``.async_(...)`` awaits."""

    __slots__ = ("addr", "decl", "engine", "rpc")

    def __init__(self, remote: Remote, decl: Declaration) -> None:
        self.engine = remote.engine
        self.addr = remote.addr
        self.decl = decl
        self.rpc = remote.engine._rpc_for(decl, remote.provider_id)

    def __repr__(self) -> str:
        return f"<RemoteMethod {self.decl.name} on {self.addr.uri}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        engine, decl = self.engine, self.decl
        if kwargs or len(args) != decl.nparams:
            args = decl.bind(args, kwargs)
        # The blocking wait enforces the deadline itself: no context timer to arm.
        return engine.wait(Handle(engine.context, self.addr, self.rpc).forward(
            args, None, engine.timeout, arm=False))

    def call(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        engine = self.engine
        return engine.wait(Handle(engine.context, self.addr, self.rpc).forward(
            self.decl.bind(args, kwargs), None, timeout or engine.timeout, arm=False))

    def future(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Handle:
        """Send now; ``engine.wait(handle)`` or ``handle.result()`` later (they enforce the
        timeout, so no context timer is armed)."""
        engine, decl = self.engine, self.decl
        if kwargs or len(args) != decl.nparams:
            args = decl.bind(args, kwargs)
        return Handle(engine.context, self.addr, self.rpc).forward(
            args, None, timeout or engine.timeout, arm=False)

    def async_(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        decl = self.decl
        if kwargs or len(args) != decl.nparams:
            args = decl.bind(args, kwargs)
        return self.engine.acall(self.addr, self.rpc, args, timeout)
