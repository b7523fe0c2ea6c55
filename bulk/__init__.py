"""petasus.bulk: one-sided transfers of large data between memory the user already owns.

    with engine.bulk([header, payload], bulk.READ_ONLY) as b:    # or bulk.Bulk(engine, ...)
        remote.save("name", b)                                 # the handle is an RPC argument

    # on the server, inside the handler:
    with engine.bulk(bytearray(data.size), bulk.WRITE_ONLY) as local:
        local.pull_from(data).wait()

Handles span several buffer-protocol segments (bytes, bytearray, memoryview, mmap, numpy) as one
offset space; ``select(offset, size)`` narrows either side. Transfers complete by ``wait()``,
``await`` or a callback, and can be canceled. Small read-only handles carry their bytes
(eager), so pulling them is a local copy. ``chunks()`` and ``pipeline()`` pull large regions
in chunks while the caller processes the ones that have arrived.
"""

from petasus.na import AccessError, Canceled, NAError, PeerError

from .handle import READ_ONLY, READ_WRITE, WRITE_ONLY, Bulk, Region, RemoteBulk, eager_limit
from .layout import LayoutError
from .pipeline import chunks, pipeline
from .stream import Stream
from .transfer import Driver, PluginDriver, Transfer

__all__ = [
    "READ_ONLY", "READ_WRITE", "WRITE_ONLY", "AccessError", "Bulk", "Canceled",
    "Driver", "LayoutError", "NAError", "PeerError", "PluginDriver", "Region", "RemoteBulk",
    "Stream", "Transfer", "chunks", "eager_limit", "pipeline",
]
