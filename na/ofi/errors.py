"""The one translator from libfabric return codes to NA errors (STYLE 6: no second copy).

Every ``fi_*`` call of the plugin goes through ``check_rc`` (synchronous returns) or
``error_for`` (error completions read with ``fi_cq_readerr``). The exception type says whose
fault it is: the caller's (``FabricUsageError``, a ``ValueError``), the peer's or the path's
(``FabricPeerError``), the target's refusal (``FabricAccessError``), a cancel, or a local
resource or capability problem (``FabricError``). Each names the call, its arguments, the peer
and libfabric's own ``fi_strerror`` text, with the symbolic code (``FI_ECONNREFUSED``).
"""

from __future__ import annotations

from typing import Any

from ..errors import AccessError, Canceled, NAError, PeerError
from ._fabric import ffi, lib


class FabricError(NAError):
    """A libfabric call failed; ``code`` is the positive fi_errno, ``call`` the function."""

    def __init__(self, op: str, peer: str | None, cause: str, *, code: int = 0,
                 call: str = "", arguments: dict[str, Any] | None = None) -> None:
        self.code = code
        self.call = call
        self.arguments = arguments or {}
        super().__init__(op, peer, cause)


class FabricUsageError(FabricError, ValueError):
    """The call was given something libfabric rejects (a local bug, not a peer's doing)."""


class FabricPeerError(FabricError, PeerError):
    """The peer could not be reached, or its connection broke."""


class FabricAccessError(FabricError, AccessError):
    """The target refused a one-sided access (key, bounds or rights)."""


class FabricCanceled(FabricError, Canceled):
    """The operation was canceled before it completed."""


def _codes(*names: str) -> dict[int, str]:
    return {getattr(lib, name): name for name in names}


# Codes by meaning. Connection-level failures name the peer; "could not connect" is reserved
# for the codes that mean the peer was never reached (callers and tests match on it).
_UNREACHABLE = _codes("FI_ECONNREFUSED", "FI_EHOSTUNREACH", "FI_ENETUNREACH", "FI_EHOSTDOWN",
                      "FI_EADDRNOTAVAIL", "FI_ENOENT")
_BROKEN = _codes("FI_ECONNRESET", "FI_ECONNABORTED", "FI_ENOTCONN", "FI_ESHUTDOWN",
                 "FI_ENETDOWN", "FI_ETIMEDOUT", "FI_EIO", "FI_EREMOTEIO", "FI_ECRC")
_ACCESS = _codes("FI_EACCES", "FI_EPERM", "FI_EKEYREJECTED", "FI_ENOKEY")
_CANCELED = _codes("FI_ECANCELED")
_USAGE = _codes("FI_EINVAL", "FI_EBADFLAGS", "FI_EMSGSIZE", "FI_E2BIG", "FI_ETOOSMALL",
                "FI_ETRUNC", "FI_EOVERFLOW", "FI_EFAULT", "FI_EBADF", "FI_ENOPROTOOPT",
                "FI_EISCONN", "FI_EALREADY", "FI_EOPBADSTATE", "FI_ENOEQ", "FI_ENOCQ",
                "FI_ENOAV", "FI_EDOMAIN")
_LOCAL = _codes("FI_EAGAIN", "FI_ENOMEM", "FI_ENOSPC", "FI_ENOBUFS", "FI_EMFILE", "FI_EBUSY",
                "FI_ENODEV", "FI_ENOSYS", "FI_EOPNOTSUPP", "FI_ENODATA", "FI_ENOMSG",
                "FI_EADDRINUSE", "FI_EINTR", "FI_EINPROGRESS", "FI_EAVAIL", "FI_EOTHER",
                "FI_EOVERRUN")

KINDS: dict[int, tuple[str, type[FabricError]]] = {}
for _table, _cls in ((_LOCAL, FabricError), (_USAGE, FabricUsageError),
                     (_BROKEN, FabricPeerError), (_UNREACHABLE, FabricPeerError),
                     (_ACCESS, FabricAccessError), (_CANCELED, FabricCanceled)):
    for _code, _name in _table.items():
        KINDS[_code] = (_name, _cls)
UNREACHABLE = frozenset(_UNREACHABLE)
PEER_FAILURES = frozenset(_UNREACHABLE) | frozenset(_BROKEN)

_ACCESS_HINT = ("refused by the target: unknown key (forged, or deregistered), out of bounds, "
                "or not allowed by the registration's access rights")


def strerror(code: int) -> str:
    return ffi.string(lib.fi_strerror(code)).decode("utf-8", "replace")


def _fmt(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items())


def error_for(code: int, call: str, *, op: str | None = None, peer: str | None = None,
              detail: str = "", **arguments: Any) -> FabricError:
    """The exception for fi_errno ``code`` (either sign) returned by ``call(**arguments)``."""
    code = abs(code)
    name, cls = KINDS.get(code, (f"fi_errno {code}", FabricError))
    text = f"{strerror(code)} ({name}) in {call}({_fmt(arguments)})"
    if detail:
        text += f"; provider says: {detail}"
    if code in _UNREACHABLE:
        text = f"could not connect: {text}"
    elif code in _BROKEN:
        text = f"connection closed or reset: {text}"
    elif code in _ACCESS:
        text = f"{_ACCESS_HINT}: {text}"
    return cls(op or call, peer, text, code=code, call=call, arguments=arguments)


def check_rc(rc: int, call: str, *, op: str | None = None, peer: str | None = None,
             **arguments: Any) -> int:
    """Return ``rc`` if it is not an error, else raise the translated exception."""
    if rc >= 0:
        return rc
    raise error_for(rc, call, op=op, peer=peer, **arguments)
