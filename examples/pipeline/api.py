"""The pipelined write RPC, declared once for server and client."""

from petasus import bulk, hg


@hg.declare
def write(data: bulk.Bulk, chunk_size: hg.uint64, depth: hg.uint32) -> tuple[str, float]:
    """Pull ``data`` and hash it on the server; return (sha256 hex, seconds spent).

    ``depth`` > 0 pulls in ``chunk_size`` chunks with that many in flight and hashes each chunk
    as it arrives; 0 pulls everything first, then hashes (the unpipelined way)."""
