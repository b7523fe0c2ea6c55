"""The sum RPC, declared once for server and client."""

from petasus import hg


@hg.declare
def sum(x: hg.int32, y: hg.int32) -> hg.int32:
    """x + y, on the server."""
