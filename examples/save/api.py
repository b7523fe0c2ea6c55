"""The save RPC of Mercury's tutorial, declared once for server and client."""

from petasus import bulk, hg


@hg.declare
def save(name: str, data: bulk.Bulk) -> hg.uint64:
    """Pull ``data`` and write it to OUTDIR/name on the server; returns the bytes written."""
