"""Declarations: an RPC's name and types, declared once and imported by client and server
(the MERCURY_GEN_PROC of Python: procs come from the annotations)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from .procs import Proc, proc_for, record


class Declaration:
    """An RPC's name and types, declared once and imported by client and server."""

    def __init__(self, func: Callable[..., Any], *, name: str | None = None,
                 one_way: bool = False) -> None:
        self.name = name or func.__name__
        self.one_way = one_way
        self.func = func
        sig = inspect.signature(func)
        hints = typing.get_type_hints(func)
        self.params = [p.name for p in sig.parameters.values()]
        self.nparams = len(self.params)
        for p in sig.parameters.values():
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                raise TypeError(f"{self.name}: parameter {p.name!r} must be positional "
                                "(no *args, **kwargs or keyword-only parameters)")
        self.signature = sig
        fields = [proc_for(hints.get(p, Any)) for p in self.params]
        self.in_proc: Proc = record(f"{self.name}.in", fields, tuple, tuple)
        ret = hints.get("return", None if one_way else Any)
        if one_way and ret not in (None, type(None)):
            raise TypeError(f"{self.name}: a one-way RPC returns nothing (annotate -> None)")
        self.out_proc: Proc = proc_for(ret)

    def __repr__(self) -> str:
        return f"<Declaration {self.name}({', '.join(self.params)})>"

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        if not kwargs and len(args) == len(self.params):
            return args
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}") from None
        bound.apply_defaults()
        return tuple(bound.arguments.values())


def declare(func: Callable[..., Any] | None = None, *, name: str | None = None,
            one_way: bool = False) -> Any:
    """Declare an RPC from a function's signature (its body is not used)."""
    if func is None:
        return lambda f: Declaration(f, name=name, one_way=one_way)
    return Declaration(func, name=name, one_way=one_way)


def _shutdown() -> None:
    """Ask the engine to stop serving."""


_SHUTDOWN = Declaration(_shutdown, name="petasus.shutdown")
