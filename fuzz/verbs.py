"""The verbs plugin's wire (na/verbs/_wire.py): frames received in a slot, and the out-of-band
stream (a hello, then retires) read in chunk splits the fuzzer picks, with the URI a hello
carries parsed as the plugin parses it.

Contract (the module docstring): ``WireError`` (a ValueError), and ``parse_uri``'s ValueError.
Invariants: a decoded frame re-encodes to its bytes (the reserved u16 aside) and its payload
lies inside the slot within ``max_body``; the stream reader never holds more than one record's
worth of bytes; a hello re-encodes to its record. The acknowledgement counts of the frame
headers then drive a connection's ``_protocol.Credits``, whose ``CreditError`` is the contract:
whatever the peer acknowledges, we never have more frames in flight than its grant, and it
never holds more of our slots than ours.
"""

from __future__ import annotations

from petasus.na.verbs import _protocol as p
from petasus.na.verbs import _wire as w

from ._kit import Harness, check, cuts, pieces, with_cuts

MAX_BODY = 256


def _frame(body: bytes) -> bool:
    try:
        f = w.decode_frame(body, MAX_BODY)
    except w.WireError:
        return False
    check(w.HEADER_SIZE <= f.body <= len(body) and len(body) - f.body <= MAX_BODY,
          f"payload {f.body}..{len(body)}")
    # The tag of an RMA frame is not read (encoders write 0), so it is compared as decoded.
    again = w.encode_header(f.kind, f.tag, f.acked_data, f.acked_ctrl)
    if f.kind in (w.GET_REQ, w.PUT_REQ):
        again += w.RMA_REQ.pack(f.rma_id, f.key, f.offset, f.length)
        check(f.length <= MAX_BODY, f"an RMA request of {f.length} B passed")
    elif f.kind in (w.GET_REP, w.PUT_REP):
        again += w.RMA_REP.pack(f.rma_id, f.status)
    check(again[:2] + again[4:] == body[:2] + body[4:f.body], "the frame does not re-encode")
    return True


def _stream(data: bytes) -> bool:
    sizes, stream = cuts(data)
    reader = w.OobReader()
    records: list[w.Hello | w.Retire] = []
    try:
        for piece in pieces(stream, sizes):
            records += reader.feed(piece)
            check(len(reader._buf) < 2 + w.MAX_RECORD, f"{len(reader._buf)} B held")
    except w.WireError:
        return False
    out = b""
    for rec in records:
        if isinstance(rec, w.Retire):
            out += w.encode_retire(rec.qpn)
            continue
        out += w.encode_hello(rec)
        try:
            w.parse_uri(rec.uri)
        except ValueError:
            pass
    check(out == stream[:len(out)], "the records do not re-encode to the stream")
    return True


def _credits(data: bytes) -> bool:
    """A connection's credits driven by the peer's frame headers: each step is one byte of
    ours (low two bits: we send a data frame, a credit frame, free one of the peer's frames,
    or a peer frame arrives), an arriving frame's header taken from the input."""
    credits = p.Credits(LIMIT, GRANT)
    pos = 0
    try:
        while pos < len(data):
            step = data[pos] & 3
            pos += 1
            if step == 0 and credits.can_send(w.UNEXPECTED):
                credits.on_send(w.UNEXPECTED)
            elif step == 1 and credits.can_send(w.CREDIT):
                credits.on_send(w.CREDIT)
            elif step == 2 and w.MASK32 & (credits.received[0] - credits.freed[0]):
                credits.on_freed(w.UNEXPECTED)
            elif step == 3:
                header = data[pos:pos + w.HEADER_SIZE]
                pos += w.HEADER_SIZE
                if len(header) < w.HEADER_SIZE:
                    break
                _v, kind, _r, _tag, acked_data, acked_ctrl = w.HEADER.unpack(header)
                kind = w.CREDIT if kind & 1 else w.UNEXPECTED
                credits.on_receive(kind, acked_data, acked_ctrl)
            for i in (0, 1):
                check(p._diff(credits.sent[i], credits.acked[i]) <= LIMIT[i],
                      f"{p._diff(credits.sent[i], credits.acked[i])} frames in flight")
                check(p._diff(credits.received[i], credits.advertised[i]) <= GRANT[i],
                      "the peer holds more of our slots than granted")
    except p.CreditError:
        return False
    return True


LIMIT, GRANT = (4, 2), (4, 2)


def one_input(data: bytes) -> bool:
    if not data:
        return False
    mode, body = data[0] % 3, data[1:]
    if mode == 2:
        return _credits(body)
    return _frame(body) if mode == 1 else _stream(body)


def seeds() -> list[bytes]:
    hello = w.Hello(w.ACCEPT, 5, 3, 0x1234, 0x42, 1, bytes(range(16)), 16, 4, 4096,
                    "verbs://mlx5_0:1/10.0.0.1:7000")
    refuse = w.Hello(w.REFUSE, 0, 0, 0, 0, 1, bytes(16), 0, 0, 0, "too many peers")
    stream = w.encode_hello(hello) + w.encode_retire(0x1234) + w.encode_retire(7)
    frames = [w.encode_header(w.UNEXPECTED, 9, 1, 2) + b"message",
              w.encode_header(w.CREDIT, 0, 3, 4),
              w.encode_rma_req(w.GET_REQ, 0, 0, 1, 2, 3, 64),
              w.encode_rma_req(w.PUT_REQ, 0, 0, 1, 2, 3, 4) + b"data",
              w.encode_rma_rep(w.GET_REP, 0, 0, 1, 0) + b"reply",
              w.encode_rma_rep(w.PUT_REP, 0, 0, 1, 2)]
    exchange = (b"\x00\x00" + b"\x03" + w.encode_header(w.UNEXPECTED, 0, 2, 0) + b"\x02"
                + b"\x03" + w.encode_header(w.CREDIT, 0, 2, 0) + b"\x01\x00")
    return ([b"\x00" + with_cuts(stream), b"\x00" + with_cuts(stream, (3, 50)),
             b"\x00" + with_cuts(w.encode_hello(refuse), (1,))]
            + [b"\x01" + f for f in frames] + [b"\x02" + exchange])


HARNESS = Harness("verbs", one_input, seeds, __doc__ or "")
