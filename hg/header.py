"""RPC wire headers, laid out like Mercury's core headers (network byte order). No I/O.

Request (12 bytes): identifier 0xD7 | protocol | u64 RPC id | flags | cookie.
Response (8 bytes): identifier 0xD7 | protocol | return code | flags | u32 reserved.

The RPC id is the 64-bit djb2 hash of the name shifted left 16 bits, with the provider id in the
low 16 bits (as Margo multiplexes providers), so one name serves many providers.
The NA tag of the request carries the call's identity: the response comes back on it.
"""

from __future__ import annotations

import struct
from typing import Any

IDENTIFIER = 0xD7
PROTOCOL = 1
REQUEST = struct.Struct("!BBQBB")
RESPONSE = struct.Struct("!BBBBI")

# From this size a message goes to NA as its header and the value's encoded parts (a gather:
# na.interface), not joined into one bytes first; below it the join costs less than the
# longer iovec (memcpy ~10 GB/s here: ~1.6 us for 16 KiB). Only parts that are ``bytes``
# are gathered: a part viewing the caller's memory is copied at the call, as a join does.
GATHER_MIN = 16 << 10


def gather(head: bytes, parts: list[Any], size: int) -> bytes | list[Any]:
    """``head`` and ``parts`` as one message of ``size`` bytes: joined, or gathered."""
    if size < GATHER_MIN or any(type(part) is not bytes for part in parts):
        return b"".join([head, *parts])
    return [head, *parts]


# Request flags.
MORE_DATA = 0x01  # the input continues in a bulk region (overflow)
NO_RESPONSE = 0x02  # one-way: the target sends nothing back

# Response return codes.
SUCCESS = 0
NO_SUCH_RPC = 1
DECODE_ERROR = 2
HANDLER_ERROR = 3
OVERFLOW = 4
PROTOCOL_ERROR = 5
SHUTTING_DOWN = 6
RETURN_NAMES = {SUCCESS: "success", NO_SUCH_RPC: "no such RPC", DECODE_ERROR: "decode error",
                HANDLER_ERROR: "handler error", OVERFLOW: "overflow",
                PROTOCOL_ERROR: "protocol error", SHUTTING_DOWN: "shutting down"}

MASK64 = (1 << 64) - 1
MAX_PROVIDER = 0xFFFF


def djb2_64(name: str) -> int:
    """Mercury hashes RPC names with djb2; this is its 64-bit form over the UTF-8 bytes."""
    h = 5381
    for byte in name.encode():
        h = ((h << 5) + h + byte) & MASK64
    return h


def rpc_id(name: str, provider_id: int = 0) -> int:
    if not 0 <= provider_id <= MAX_PROVIDER:
        raise ValueError(f"provider id {provider_id} is outside 0..{MAX_PROVIDER}")
    return ((djb2_64(name) << 16) & MASK64) | provider_id


class HeaderError(ValueError):
    """A header that is not ours: too short, wrong identifier or protocol."""


def decode_request(buf: bytes | bytearray | memoryview,
                   size: int | None = None) -> tuple[int, int, int]:
    """(rpc id, flags, cookie) of a request of ``size`` bytes (all of ``buf`` by default: a
    receive buffer is reused, so its length is not the message's); raises HeaderError."""
    n = len(buf) if size is None else size
    if n < REQUEST.size:
        raise HeaderError(f"request of {n} B is shorter than its {REQUEST.size} B header")
    ident, proto, rid, flags, cookie = REQUEST.unpack_from(buf)
    if ident != IDENTIFIER or proto != PROTOCOL:
        raise HeaderError(f"not a petasus request (identifier 0x{ident:02x}, protocol {proto})")
    return rid, flags, cookie


def decode_response(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(return code, flags) of a response; raises HeaderError."""
    if len(buf) < RESPONSE.size:
        raise HeaderError(f"response of {len(buf)} B is shorter than its {RESPONSE.size} B header")
    ident, proto, ret, flags, _reserved = RESPONSE.unpack_from(buf)
    if ident != IDENTIFIER or proto != PROTOCOL:
        raise HeaderError(f"not a petasus response (identifier 0x{ident:02x}, protocol {proto})")
    return ret, flags


def encode_request(rid: int, flags: int = 0, cookie: int = 0) -> bytes:
    return REQUEST.pack(IDENTIFIER, PROTOCOL, rid, flags, cookie)


def encode_response(ret: int, flags: int = 0) -> bytes:
    return RESPONSE.pack(IDENTIFIER, PROTOCOL, ret, flags, 0)
