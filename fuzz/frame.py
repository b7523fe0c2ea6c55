"""The socket plugins' frame codec (na/framing.py), fed in chunk splits the fuzzer picks.

Contract (``FrameReader``'s docstring, and ``SocketPlugin._on_readable``, which closes the
connection on it): malformed bytes raise ``ProtocolError``; nothing else escapes. Invariants:
every delivered frame respects its limit (``max_msg``, or ``max_direct`` for data frames), and
the frames delivered, encoded again, are exactly the bytes consumed: the codec neither invents,
drops nor reorders a byte.
"""

from __future__ import annotations

from petasus.na import framing as fr
from petasus.na.errors import ProtocolError

from ._kit import Harness, check, cuts, pieces, with_cuts

MAX_MSG = 512
MAX_DIRECT = 4096
# Small enough that the reader's compaction (moving a partial frame to the front) runs often.
BUFSIZE = 64


class _Recorder:
    """A handler that keeps every frame; every other direct payload is discarded (None)."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.landing: dict[int, bytearray | None] = {}
        self.directs = 0

    def frame(self, kind: int, flags: int, tag: int, payload: memoryview | None) -> None:
        if payload is None:
            dest = self.landing.pop(len(self.frames), None)
            data = bytes(dest) if dest is not None else None
        else:
            check(len(payload) <= MAX_MSG, f"a {len(payload)} B message passed the limit")
            data = bytes(payload)
        self.frames.append((kind, flags, tag, data))  # type: ignore[arg-type]

    def frame_header(self, kind: int, flags: int, length: int, tag: int) -> memoryview | None:
        check(kind in fr.DIRECT, f"frame_header for kind {kind}")
        check(length <= MAX_DIRECT, f"a {length} B data frame passed the limit")
        self.directs += 1
        if self.directs % 2:
            dest = self.landing[len(self.frames)] = bytearray(length)
            return memoryview(dest)
        self.landing[len(self.frames)] = None
        return None


def one_input(data: bytes) -> bool:
    sizes, stream = cuts(data)
    rec = _Recorder()
    reader = fr.FrameReader(rec, MAX_MSG, MAX_DIRECT, "fuzz peer", bufsize=BUFSIZE)
    fed = 0
    ok = True
    try:
        for piece in pieces(stream, sizes):
            at = 0
            while at < len(piece):
                buf = reader.get_buffer()
                check(len(buf) > 0, "get_buffer() offered no room")
                n = min(len(buf), len(piece) - at)
                buf[:n] = piece[at:at + n]
                at += n
                fed += n
                reader.buffer_updated(n)
    except ProtocolError:
        ok = False
    # What was delivered is a prefix of the stream, byte for byte. A discarded direct payload
    # reads back as the stream's own bytes at that place.
    out, pos = bytearray(), 0
    for kind, flags, tag, kept in rec.frames:
        payload = kept
        if payload is None:  # discarded: its length is in the stream's header
            length = fr.HEADER.unpack_from(stream, pos)[3]
            payload = stream[pos + fr.HEADER_SIZE: pos + fr.HEADER_SIZE + length]
        frame = fr.encode_header(kind, len(payload), tag, flags) + payload
        out += frame
        pos += len(frame)
    check(bytes(out) == stream[:len(out)], "delivered frames differ from the bytes sent")
    check(len(out) <= fed, "more bytes delivered than fed")
    return ok


def seeds() -> list[bytes]:
    uri = b"tcp://127.0.0.1:7000"
    hello = fr.encode_header(fr.HELLO, len(uri), 0, 1) + uri
    msg = fr.encode_header(fr.UNEXPECTED, 5, 7) + b"hello"
    exp = fr.encode_header(fr.EXPECTED, 0, 8)
    get = fr.encode_header(fr.GET_REQ, 24, 3) + fr.RMA_DESC.pack(1, 0, 16)
    resp = fr.encode_header(fr.GET_RESP, 16, 3) + bytes(range(16))
    put = (fr.encode_header(fr.PUT_REQ, 24, 4) + fr.RMA_DESC.pack(1, 0, 8)
           + fr.encode_header(fr.PUT_DATA, 8, 4) + b"12345678")
    acks = fr.encode_header(fr.RMA_ACK, 0, 4) + fr.encode_header(fr.RMA_NAK, 1, 3) + b"\x02"
    big = fr.encode_header(fr.UNEXPECTED, MAX_MSG, 9) + bytes(MAX_MSG)
    stream = hello + msg + exp + get + resp + put + acks
    return [with_cuts(hello), with_cuts(stream), with_cuts(stream, (1,)),
            with_cuts(stream, (7, 30, 3)), with_cuts(big + resp, (100,)),
            with_cuts(fr.encode_header(fr.PUT_DATA, 3000, 1) + bytes(3000), (200, 17))]


HARNESS = Harness("frame", one_input, seeds, __doc__ or "")
