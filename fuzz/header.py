"""The RPC request and response headers (hg/header.py), as the target and the origin read them.

Contract (the decoders' docstrings; ``hg.target`` answers PROTOCOL_ERROR on it): ``HeaderError``
(a ValueError). Invariants: a decoded request re-encodes to the exact 12 bytes it came from
(every bit is a field); a decoded response re-encodes to the same first four bytes (the u32
after them is reserved and ignored); ``size`` bounds what is read, whatever the buffer holds
beyond it (receive buffers are reused and carry an earlier message's bytes).
"""

from __future__ import annotations

from petasus.hg import header as hd

from ._kit import Harness, check


def one_input(data: bytes) -> bool:
    if not data:
        return False
    which, body = data[0], data[1:]
    try:
        if which & 1:
            ret, flags = hd.decode_response(body)
            check(hd.encode_response(ret, flags)[:4] == body[:4], "response re-encodes")
            return True
        # Even: a request, with a message size of (which >> 1) when that is not 127, read from
        # a buffer that holds more bytes than the message.
        size = None if which >> 1 == 127 else min(which >> 1, len(body))
        rid, flags, cookie = hd.decode_request(body, size)
        check(size is None or size >= hd.REQUEST.size, f"a {size} B request decoded")
        check(hd.encode_request(rid, flags, cookie) == body[:hd.REQUEST.size],
              "request re-encodes")
        return True
    except hd.HeaderError:
        return False


def seeds() -> list[bytes]:
    out = [b"\xfe" + hd.encode_request(hd.rpc_id("sum", 3), hd.MORE_DATA, 7),
           bytes((24,)) + hd.encode_request(hd.rpc_id("x"), hd.NO_RESPONSE) + b"tail-bytes"]
    out += [b"\x01" + hd.encode_response(ret, 1) + b"payload" for ret in hd.RETURN_NAMES]
    return out


HARNESS = Harness("header", one_input, seeds, __doc__ or "")
