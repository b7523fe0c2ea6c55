"""Errors of the RPC layer. Remote failures carry the RPC, the peer and the remote's words."""

from __future__ import annotations


class RPCError(Exception):
    """Base of failures of a call that involve the peer."""

    def __init__(self, rpc: str, peer: str | None, cause: str) -> None:
        self.rpc = rpc
        self.peer = peer
        self.cause = cause
        where = f" on {peer}" if peer else ""
        super().__init__(f"{rpc}{where}: {cause}")


class RemoteError(RPCError):
    """The handler raised; ``remote_type`` and ``remote_message`` are the remote exception's."""

    def __init__(self, rpc: str, peer: str | None, remote_type: str, remote_message: str) -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        super().__init__(rpc, peer, f"remote {remote_type}: {remote_message}")


class NoSuchRPC(RPCError):
    """The peer has no handler registered for this RPC (name and provider id)."""


class RPCTimeout(RPCError, TimeoutError):
    """No response arrived within the call's timeout; a late one is dropped."""


class Canceled(RPCError):
    """The call was canceled; a late response is dropped."""


class DecodeError(ValueError):
    """Bytes that do not decode with the expected proc: truncated, trailing or hostile."""


class EncodeError(ValueError):
    """A value that the proc cannot encode (wrong type, out of range)."""


class PeerError(RPCError, ConnectionError):
    """The transport failed the call: the peer is unreachable or went away."""
