"""petasus.hg: RPCs over the network abstraction, Mercury's model with a Pythonic engine.

Low level (Mercury-like): ``Class``, ``Context``, ``RPC``, ``Handle``, ``TargetHandle``.
High level (Thallium/Margo-like): ``Engine``, ``declare``, ``Remote``.
Types for annotations: ``int8`` .. ``uint64``, ``float32``, ``float64``; plain ``int``,
``float``, ``bool``, ``str``, ``bytes``, containers, dataclasses, and ``register_proc`` for
your own.
"""

from .core import RPC, Class, Context, Handle, PeerError, TargetHandle
from .engine import Declaration, Engine, Remote, RemoteMethod, declare
from .errors import (
    Canceled,
    DecodeError,
    EncodeError,
    NoSuchRPC,
    RemoteError,
    RPCError,
    RPCTimeout,
)
from .procs import (
    Proc,
    float32,
    float64,
    gen_proc,
    int8,
    int16,
    int32,
    int64,
    proc_for,
    register_proc,
    uint8,
    uint16,
    uint32,
    uint64,
)

__all__ = [
    "RPC", "Canceled", "Class", "Context", "Declaration", "DecodeError", "EncodeError", "Engine",
    "Handle", "NoSuchRPC", "PeerError", "Proc", "RPCError", "RPCTimeout", "Remote",
    "RemoteError", "RemoteMethod", "TargetHandle", "declare", "float32", "float64", "gen_proc",
    "int8", "int16", "int32", "int64", "proc_for", "register_proc", "uint8", "uint16", "uint32",
    "uint64",
]
