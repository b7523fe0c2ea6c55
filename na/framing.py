"""Frame codec of the socket plugins (tcp, sm): bytes in, frames out, no I/O.

Every frame is a 16-byte little-endian header followed by ``length`` payload bytes::

    magic u8 | kind u8 | flags u16 | length u32 | tag u64

``tag`` is the message tag for messages and the initiator's operation id for RMA frames.
RMA requests carry a 24-byte descriptor (key u64, offset u64, length u64).

The reader has the shape of asyncio's ``BufferedProtocol``: the driver asks ``get_buffer()``
where the next bytes should land, reads into it, and reports ``buffer_updated(n)``. Small frames
are parsed from one reusable buffer, several per read. Frames that carry bulk data (``DIRECT``
kinds) ask the handler for their destination, so the driver's ``recv_into`` lands the payload in
the user's registered memory with no copy in Python.

The buffer is lazy: it starts at ``SMALL`` bytes and doubles only when a read fills it (a
burst, or a frame larger than it), up to its working size; ``shrink()`` gives the memory back
once the connection is quiet. A peer therefore makes us hold at most twice what it has
actually sent, not a working-size buffer for every connection it opens (1,000 connections
that sent half a header held 256 KiB each, 261 KiB of RSS per connection measured).
"""

from __future__ import annotations

import struct
from typing import Protocol

from .errors import ProtocolError

MAGIC = 0xA7
HEADER = struct.Struct("<BBHIQ")
HEADER_SIZE = HEADER.size
RMA_DESC = struct.Struct("<QQQ")

# Frame kinds. Plain ints: they are compared on the per-message path.
HELLO = 1  # payload: [nonce] the sender's URI, the first frame of a connection (na._peering)
UNEXPECTED = 2
EXPECTED = 3
GET_REQ = 4  # payload: RMA descriptor
GET_RESP = 5  # payload: the data (direct)
PUT_REQ = 6  # payload: RMA descriptor; the next frame on the stream is its PUT_DATA
PUT_DATA = 7  # payload: the data (direct)
RMA_ACK = 8
RMA_NAK = 9  # payload: u8 reason (na._regs.NAK_*)
AUTH_CHALLENGE = 10  # payload: u8 status, then the listener's nonce and proof (na._peering)
AUTH_PROOF = 11  # payload: the dialler's proof (na._peering)

KINDS = frozenset(range(HELLO, AUTH_PROOF + 1))
DIRECT = frozenset((GET_RESP, PUT_DATA))

# Direct payloads land in 256 KiB slices of a scratch buffer when they are discarded.
_SCRATCH = 256 * 1024
# A quiet connection's buffer: a HELLO and a few small requests per read fit, and growing costs
# one copy of at most this much per doubling, only after a read filled the buffer.
SMALL = 4096


class FrameHandler(Protocol):
    def frame(self, kind: int, flags: int, tag: int, payload: memoryview | None) -> None:
        """A complete frame. ``payload`` is None for a direct frame (it is in place already);
        otherwise it is valid only during the call."""

    def frame_header(self, kind: int, flags: int, length: int, tag: int) -> memoryview | None:
        """Where the payload of a direct frame goes: ``length`` bytes, or None to discard it."""


def encode_header(kind: int, length: int, tag: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, kind, flags, length, tag)


class FrameReader:
    """Incremental decoder; raises ``ProtocolError`` on the first malformed byte."""

    __slots__ = (
        "_buf",
        "_cap",
        "_dest",
        "_dest_pos",
        "_discard",
        "_end",
        "_filled",
        "_handler",
        "_max_direct",
        "_max_msg",
        "_pending",
        "_scratch",
        "_size",
        "_start",
        "_view",
        "peer",
    )

    def __init__(self, handler: FrameHandler, max_msg: int, max_direct: int,
                 peer: str = "peer", bufsize: int = 256 * 1024) -> None:
        self._handler = handler
        self._max_msg = max_msg
        self._max_direct = max_direct
        # The working size: two largest frames, so that a partial one moves to the front at
        # most once per frame.
        self._cap = max(bufsize, 2 * (HEADER_SIZE + max_msg))
        self._size = min(SMALL, self._cap)
        # The last read filled the buffer: grow it at the next get_buffer, even if the frames
        # it held are consumed by then (a data frame just larger than the buffer lands the
        # rest of its payload directly, and would take two reads every time).
        self._filled = False
        self._buf = bytearray(self._size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._dest: memoryview | None = None
        self._dest_pos = 0
        self._discard = 0
        self._scratch: memoryview | None = None
        self._pending: tuple[int, int, int] | None = None
        self.peer = peer

    @property
    def in_payload(self) -> bool:
        """True while a direct payload is arriving: more bytes are likely already in flight."""
        return self._dest is not None or self._discard > 0

    def landing_in(self) -> tuple[int, memoryview] | None:
        """(tag, destination) of the direct payload being received now, if any."""
        if self._dest is None or self._pending is None:
            return None
        return self._pending[2], self._dest

    def discard_rest(self) -> None:
        """Drop the rest of the current direct payload instead of writing it: its destination
        has been withdrawn (a canceled get, a deregistered target)."""
        if self._dest is not None:
            self._discard = len(self._dest) - self._dest_pos
            self._dest = None
            if not self._discard:
                self._finish_direct()

    def get_buffer(self) -> memoryview:
        if self._dest is not None:
            return self._dest[self._dest_pos:]
        if self._discard:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_SCRATCH))
            return self._scratch[: min(self._discard, _SCRATCH)]
        start, end = self._start, self._end
        size = self._size
        if (end == size or self._filled) and size < self._cap:
            # The last read filled the buffer: more is waiting, or the frame is larger.
            self._filled = False
            self._resize(min(2 * size, self._cap))
        elif start == end:
            self._start = self._end = 0
        elif size - end < HEADER_SIZE + self._max_msg:
            # Only a partial frame (< HEADER_SIZE + max_msg bytes) is left; move it to the front.
            self._buf[: end - start] = self._view[start:end]
            self._start, self._end = 0, end - start
        return self._view[self._end:]

    @property
    def buffer_size(self) -> int:
        """Bytes this reader holds for the peer (its buffer and discard scratch)."""
        return self._size + (len(self._scratch) if self._scratch is not None else 0)

    def shrink(self) -> None:
        """Give back what a burst grew: keep the partial frame, if any, in the smallest buffer
        that holds it (a stalled peer keeps at most twice what it sent). Called when the
        connection has been quiet, never per read."""
        if not self._discard:
            self._scratch = None
        self._filled = False
        held = self._end - self._start
        size = SMALL
        while size < held:
            size *= 2
        if size < self._size:
            self._resize(size)

    def _resize(self, size: int) -> None:
        start, end = self._start, self._end
        buf = bytearray(size)
        buf[: end - start] = self._view[start:end]
        self._buf, self._view, self._size = buf, memoryview(buf), size
        self._start, self._end = 0, end - start

    def buffer_updated(self, nbytes: int) -> None:
        if self._dest is not None:
            self._dest_pos += nbytes
            if self._dest_pos == len(self._dest):
                self._dest = None
                self._finish_direct()
            return
        if self._discard:
            self._discard -= nbytes
            if not self._discard:
                self._finish_direct()
            return
        end = self._end = self._end + nbytes
        if end == self._size:
            self._filled = True
        self._parse()

    def _finish_direct(self) -> None:
        kind, flags, tag = self._pending  # type: ignore[misc]
        self._pending = None
        self._handler.frame(kind, flags, tag, None)
        self._parse()

    def _parse(self) -> None:
        view, handler = self._view, self._handler
        start, end = self._start, self._end
        while end - start >= HEADER_SIZE:
            magic, kind, flags, length, tag = HEADER.unpack_from(view, start)
            if magic != MAGIC:
                raise ProtocolError("read frame", self.peer, f"bad magic 0x{magic:02x}")
            if kind not in KINDS:
                raise ProtocolError("read frame", self.peer, f"unknown frame kind {kind}")
            body = start + HEADER_SIZE
            if kind in DIRECT:
                if length > self._max_direct:
                    raise ProtocolError("read frame", self.peer,
                                        f"data frame of {length} B exceeds {self._max_direct} B")
                dest = handler.frame_header(kind, flags, length, tag)
                if dest is not None and len(dest) != length:
                    raise ValueError("frame_header returned a buffer of the wrong size")
                have = min(end - body, length)
                if dest is not None and have:
                    dest[:have] = view[body: body + have]
                start = body + have
                if have == length:
                    self._start = start
                    handler.frame(kind, flags, tag, None)
                    start, end = self._start, self._end
                    continue
                self._start = self._end = 0
                self._pending = (kind, flags, tag)
                if dest is None:
                    self._discard = length - have
                else:
                    self._dest, self._dest_pos = dest, have
                return
            if length > self._max_msg:
                raise ProtocolError("read frame", self.peer,
                                    f"frame of {length} B exceeds the {self._max_msg} B limit")
            if end - body < length:
                break
            self._start = start = body + length
            handler.frame(kind, flags, tag, view[body:start])
            # The handler may have been re-entered; re-read the cursors.
            start, end = self._start, self._end
        self._start = start
