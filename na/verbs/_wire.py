"""Wire formats of the verbs plugin, with no I/O: frames, the out-of-band hello, handle tails,
GIDs and URIs. Every decoder checks lengths before it slices and raises ``WireError`` (a
ValueError) on anything malformed; tests/test_verbs_core.py round-trips each with hypothesis
and feeds the hello reader one byte at a time.

A frame is one SEND into a receive slot (verbs delivers it whole: no stream reassembly)::

    version u8 | kind u8 | reserved u16 | tag u32 | acked_data u32 | acked_ctrl u32

``acked_data`` and ``acked_ctrl`` are cumulative counts (mod 2**32) of the *receiver's* frames
the sender has taken out of its slots: the credits they return (``_protocol.Credits``). RMA
frames of the two-sided path follow the header with an ``RMA_REQ`` (GET_REQ, PUT_REQ) or an
``RMA_REP`` (GET_REP, PUT_REP) record; PUT_REQ and GET_REP then carry the data.

The hello is what two ends exchange over TCP before their RC queue pairs can talk: each
side's QP number, PSN, LID, GID, MTU, the credits it grants and its own URI, length-prefixed
so that a reader can take it from a stream in any pieces.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

VERSION = 1
HEADER = struct.Struct("<BBHIII")
HEADER_SIZE = HEADER.size
RMA_REQ = struct.Struct("<QQQI")  # rma id, key (the target's rkey), offset, length
RMA_REP = struct.Struct("<QB")  # rma id, status (0, or na._regs.NAK_*)
HANDLE_TAIL = struct.Struct("<Q")  # the registration's virtual address in its owner
MASK32 = 0xFFFFFFFF

# Frame kinds: plain ints, compared on the per-message path.
UNEXPECTED, EXPECTED, CREDIT, GET_REQ, GET_REP, PUT_REQ, PUT_REP = range(1, 8)
KINDS = frozenset(range(UNEXPECTED, PUT_REP + 1))
RMA_KINDS = frozenset((GET_REQ, GET_REP, PUT_REQ, PUT_REP))


class WireError(ValueError):
    """Bytes that do not follow the verbs plugin's wire format."""


@dataclass(frozen=True)
class Frame:
    kind: int
    tag: int
    acked_data: int
    acked_ctrl: int
    rma_id: int = 0
    key: int = 0
    offset: int = 0
    length: int = 0
    status: int = 0
    body: int = HEADER_SIZE  # where the payload (message or RMA data) starts in the slot


def encode_header(kind: int, tag: int, acked_data: int, acked_ctrl: int) -> bytes:
    return HEADER.pack(VERSION, kind, 0, tag, acked_data & MASK32, acked_ctrl & MASK32)


def encode_rma_req(kind: int, acked_data: int, acked_ctrl: int, rma_id: int, key: int,
                   offset: int, length: int) -> bytes:
    return encode_header(kind, 0, acked_data, acked_ctrl) + RMA_REQ.pack(rma_id, key, offset,
                                                                         length)


def encode_rma_rep(kind: int, acked_data: int, acked_ctrl: int, rma_id: int,
                   status: int) -> bytes:
    return encode_header(kind, 0, acked_data, acked_ctrl) + RMA_REP.pack(rma_id, status)


def decode_frame(data: bytes | memoryview, max_body: int) -> Frame:
    """The frame in ``data`` (a received slot, cut to the byte count the completion gave)."""
    n = len(data)
    if n < HEADER_SIZE:
        raise WireError(f"a {n} B frame is shorter than the {HEADER_SIZE} B header")
    version, kind, _reserved, tag, acked_data, acked_ctrl = HEADER.unpack_from(data)
    if version != VERSION:
        raise WireError(f"frame version {version}, expected {VERSION}")
    if kind not in KINDS:
        raise WireError(f"unknown frame kind {kind}")
    body = HEADER_SIZE
    rma_id = key = offset = length = status = 0
    if kind in (GET_REQ, PUT_REQ):
        if n < HEADER_SIZE + RMA_REQ.size:
            raise WireError(f"a {n} B RMA request is truncated")
        rma_id, key, offset, length = RMA_REQ.unpack_from(data, HEADER_SIZE)
        body += RMA_REQ.size
        expect = body + (length if kind == PUT_REQ else 0)
        if length > max_body or n != expect:
            raise WireError(f"an RMA request of {length} B arrived in {n} B")
    elif kind in (GET_REP, PUT_REP):
        if n < HEADER_SIZE + RMA_REP.size:
            raise WireError(f"a {n} B RMA reply is truncated")
        rma_id, status = RMA_REP.unpack_from(data, HEADER_SIZE)
        body += RMA_REP.size
        length = n - body
        if kind == PUT_REP and length:
            raise WireError("a put reply carries data")
    elif kind == CREDIT and n != HEADER_SIZE:
        raise WireError("a credit frame carries a payload")
    if n - body > max_body:
        raise WireError(f"a payload of {n - body} B exceeds the {max_body} B maximum")
    return Frame(kind, tag, acked_data, acked_ctrl, rma_id, key, offset, length, status, body)


# -- the out-of-band hello -----------------------------------------------------------------------
_HELLO_MAGIC = b"PTVB"
_HELLO = struct.Struct("<4sBBBBHII16sHHIH")  # ... then uri_len bytes of the sender's URI
_LEN = struct.Struct("<H")
MAX_URI = 1024
ACCEPT, REFUSE = 1, 2


@dataclass(frozen=True)
class Hello:
    """One side of an RC connection: what the other side needs to move its QP to RTS.

    ``status`` is ACCEPT, or REFUSE with the reason in ``uri`` (a listener that cannot take the
    peer says why instead of hanging up)."""

    status: int
    mtu: int  # IBV_MTU_* enum value of the sender's active MTU
    lid: int
    qpn: int
    psn: int
    port: int
    gid: bytes
    credits: int  # data frames the sender can take from the receiver at once
    ctrl: int  # credit frames likewise
    max_msg: int
    uri: str


def encode_hello(h: Hello) -> bytes:
    uri = h.uri.encode()
    if len(uri) > MAX_URI or len(h.gid) != 16:
        raise WireError(f"hello: a {len(uri)} B URI or a {len(h.gid)} B GID")
    body = _HELLO.pack(_HELLO_MAGIC, VERSION, h.status, h.mtu, h.port, h.lid, h.qpn, h.psn,
                       h.gid, h.credits, h.ctrl, h.max_msg, len(uri)) + uri
    return _LEN.pack(len(body)) + body


def decode_hello(body: bytes) -> Hello:
    if len(body) < _HELLO.size:
        raise WireError(f"a {len(body)} B hello is shorter than {_HELLO.size} B")
    (magic, version, status, mtu, port, lid, qpn, psn, gid, credits, ctrl, max_msg,
     uri_len) = _HELLO.unpack_from(body)
    if magic != _HELLO_MAGIC or version != VERSION:
        raise WireError(f"not a petasus verbs hello (magic {magic!r}, version {version})")
    if status not in (ACCEPT, REFUSE):
        raise WireError(f"hello status {status}")
    if len(body) != _HELLO.size + uri_len or uri_len > MAX_URI:
        raise WireError(f"hello of {len(body)} B announces a {uri_len} B URI")
    if status == ACCEPT and (qpn == 0 or qpn >= 1 << 24 or credits < 1 or ctrl < 1):
        raise WireError(f"hello: QP number {qpn}, credits {credits}/{ctrl}")
    try:
        uri = body[_HELLO.size:].decode()
    except UnicodeDecodeError:
        raise WireError("hello: the URI is not UTF-8") from None
    if psn >= 1 << 24:
        raise WireError(f"hello: PSN {psn} is not 24 bits")
    return Hello(status, mtu, lid, qpn, psn, port, gid, credits, ctrl, max_msg, uri)


@dataclass(frozen=True)
class Retire:
    """The sender stops using its QP ``qpn`` of this connection (it hit an error: verbs moves
    an RC QP to the error state on a remote access violation); not a peer failure."""

    qpn: int


_RETIRE = struct.Struct("<4sBI")
_RETIRE_KIND = 0xFF  # where a hello has its version byte: a retire is never mistaken for one
MAX_RECORD = _HELLO.size + MAX_URI


def encode_retire(qpn: int) -> bytes:
    body = _RETIRE.pack(_HELLO_MAGIC, _RETIRE_KIND, qpn)
    return _LEN.pack(len(body)) + body


class OobReader:
    """Reassembles the records of the out-of-band stream (a hello, then retires) from bytes
    fed in arbitrary pieces."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Hello | Retire]:
        """The records completed by ``data``, in order."""
        buf = self._buf
        buf += data
        out: list[Hello | Retire] = []
        while len(buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_RECORD or n < _RETIRE.size:
                raise WireError(f"an out-of-band record of {n} B announced")
            if len(buf) < _LEN.size + n:
                break
            body = bytes(buf[_LEN.size:_LEN.size + n])
            del buf[:_LEN.size + n]
            if body[4] == _RETIRE_KIND:
                magic, _kind, qpn = _RETIRE.unpack(body) if n == _RETIRE.size else (b"", 0, 0)
                if magic != _HELLO_MAGIC:
                    raise WireError(f"a {n} B retire record is malformed")
                out.append(Retire(qpn))
            else:
                out.append(decode_hello(body))
        return out


# -- GIDs and URIs -------------------------------------------------------------------------------
def gid_to_bytes(text: str) -> bytes:
    """pyverbs prints a GID as eight groups of four hex digits; the wire carries 16 bytes."""
    digits = text.replace(":", "")
    if len(digits) != 32 or not re.fullmatch(r"[0-9a-fA-F]{32}", digits):
        raise WireError(f"not a GID: {text!r}")
    return bytes.fromhex(digits)


def gid_from_bytes(raw: bytes) -> str:
    if len(raw) != 16:
        raise WireError(f"a GID is 16 B, not {len(raw)}")
    h = raw.hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True)
class VerbsUri:
    """``verbs://DEVICE:PORT/HOST:TCPPORT``: the RDMA device and port, and the host and TCP
    port of the out-of-band listener through which peers connect to this one."""

    device: str
    port: int
    host: str
    tcp_port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"verbs://{self.device}:{self.port}/{host}:{self.tcp_port}"


_URI = re.compile(r"verbs://(?P<dev>[A-Za-z0-9_.-]+)(?::(?P<port>\d+))?"
                  r"(?:/(?:\[(?P<host6>[0-9A-Fa-f:.]+)\]|(?P<host>[^/:\[\]]+)):(?P<tcp>\d+))?")


def parse_uri(uri: str) -> VerbsUri:
    """The parts of a verbs URI; the device's port defaults to 1 and the listener to
    127.0.0.1:0 (port 0: the kernel picks one). ValueError names what is wrong."""
    m = _URI.fullmatch(uri)
    if m is None:
        raise ValueError(f"{uri!r} is not a verbs URI: expected verbs://DEVICE:PORT/HOST:TCPPORT "
                         "(e.g. verbs://mlx5_0:1/10.0.0.1:7000)")
    port = int(m["port"] or 1)
    tcp = int(m["tcp"] or 0)
    host = m["host6"] or m["host"] or "127.0.0.1"
    if not 1 <= port <= 255 or tcp > 65535:
        raise ValueError(f"{uri!r}: device port {port} or TCP port {tcp} out of range")
    if m["host6"]:
        ipaddress.IPv6Address(host)
    return VerbsUri(m["dev"], port, host, tcp)
