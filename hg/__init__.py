"""petasus.hg: RPCs over the network abstraction, Mercury's model with a Pythonic engine.

Low level (Mercury-like): ``Class``, ``Context``, ``RPC``, ``Handle``, ``TargetHandle``.
High level (Thallium/Margo-like): ``Engine``, ``declare``, ``Remote``.
Types for annotations: ``int8`` .. ``uint64``, ``float32``, ``float64``; plain ``int``,
``float``, ``bool``, ``str``, ``bytes``, containers, dataclasses, and ``register_proc`` for
your own.
"""

# First: it installs the choice between compiled modules and their sources (na/accel.py).
import petasus.na  # noqa: F401

from .adopt import fresh as fresh_bytes
from .context import Context
from .declarations import Declaration, declare
from .engine import Engine
from .errors import (
    Canceled,
    DecodeError,
    EncodeError,
    NoSuchRPC,
    PeerError,
    RemoteError,
    RPCError,
    RPCTimeout,
)
from .origin import Handle
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
from .registry import RPC, Class
from .remote import Remote, RemoteMethod
from .target import TargetHandle

__all__ = [
    "RPC", "Canceled", "Class", "Context", "Declaration", "DecodeError", "EncodeError", "Engine",
    "Handle", "NoSuchRPC", "PeerError", "Proc", "RPCError", "RPCTimeout", "Remote",
    "RemoteError", "RemoteMethod", "TargetHandle", "declare", "float32", "float64",
    "fresh_bytes", "gen_proc", "int8", "int16", "int32", "int64", "proc_for", "register_proc",
    "uint8", "uint16", "uint32", "uint64",
]
