"""Serialized bulk handles (bulk/layout.py's wire decode, through ``RemoteBulk``), as the target
reads an overflowing request's input, the origin an overflowing output, and any proc a bulk
argument.

Contract (``layout.LayoutError``'s docstring; the bulk proc turns it into DecodeError):
LayoutError (a ValueError). Invariants: the handle re-encodes to exactly the bytes it was
decoded from (the format is canonical: a handle forwarded to a third process arrives
unchanged); its size, segment table and eager bytes are no larger than the input allows (a
segment count or a length cannot make us allocate what was not sent); its rights are a known
combination; every range of it can be planned (``select`` and ``plan`` see the claimed sizes);
it resolves against a tcp or sm plugin (the first byte's top bit) as the target resolves an
overflowing input, or fails with ValueError.
"""

from __future__ import annotations

from typing import Any

from petasus import na
from petasus.bulk import RemoteBulk
from petasus.bulk import layout as lo

# sm and tcp are imported here, not on first use, so that atheris instruments them.
from petasus.na import _regs, core, sm, tcp  # noqa: F401

from ._kit import Harness, check, peak_bytes


def one_input(data: bytes) -> bool:
    if not data:
        return False
    pos, body = data[0] % 8, data[1:]
    try:
        (handle, end), peak = peak_bytes(lambda: RemoteBulk.decode(body, pos))
    except lo.LayoutError:
        return False
    # Per byte: a segment of 10 wire bytes is a size and a bytes object in two lists.
    check(peak <= 64 * len(body) + (16 << 10), f"{len(body)} B made decode allocate {peak} B")
    wire = handle.wire
    check(pos < end <= len(body), f"decoded {pos}..{end} of {len(body)} B")
    check(lo.encode(wire) == bytes(body[pos:end]), "the handle does not re-encode to its bytes")
    check(len(wire.sizes) <= lo.MAX_SEGMENTS and len(wire.sizes) <= end - pos,
          f"{len(wire.sizes)} segments from {end - pos} B")
    check(len(wire.handles) == (0 if handle.eager else len(wire.sizes)), "segments and keys")
    check(sum(map(len, wire.handles)) + len(wire.owner) + len(wire.data or b"") <= end - pos,
          "more bytes held than sent")
    check(handle.access in (na.Access.READ_ONLY, na.Access.WRITE_ONLY, na.Access.READ_WRITE),
          f"access {handle.access!r}")
    check(not handle.eager or handle.access == na.Access.READ_ONLY, "a writable eager handle")
    size = handle.size
    if size:
        region = handle.select(size // 3, size - size // 3)
        sizes = [s for s in wire.sizes if s] or [size]
        pieces = lo.plan(lo.Layout([region.size]), 0, lo.Layout(wire.sizes),
                         region.offset, min(region.size, 1 << 20))
        check(all(n > 0 for *_rest, n in pieces) and len(pieces) <= len(sizes),
              "a transfer plan of empty or extra pieces")
    repr(handle)
    if not handle.eager:
        # As the target resolves an overflowing input: against its own plugin, the owner
        # being the request's source (no address lookup of what the handle claims).
        plugin = _plugins()[data[0] >> 7]
        try:
            _addr, handles = handle.resolve(plugin, "pull the input", plugin.addr_self())
        except ValueError:
            return True
        check(len(handles) == len(wire.sizes), "a key per segment")
        check(all(h is None or not h.local for h in handles), "a resolved key is local")
    return True


_made: list[Any] = []


def _plugins() -> list[Any]:
    if not _made:
        _made.append(na.initialize("tcp://127.0.0.1:0", listen=False))
        _made.append(na.initialize("sm://", listen=False))
    return _made


def seeds() -> list[bytes]:
    wires = [
        lo.Wire(1, b"tcp://127.0.0.1:7000", (4,), (), b"data"),
        lo.Wire(3, b"sm://1/2", (10, 0, 20), (b"k" * 26, b"", b"m" * 46)),
        lo.Wire(2, b"ofi+tcp://127.0.0.1:9", (1 << 40,), (b"x" * 34,)),
        lo.Wire(1, b"", (), ()),
    ]
    def key(size: int, tail: bytes) -> bytes:
        return _regs.pack_handle(na.MemHandle(None, size, na.Access.READ_WRITE, 77, False), tail)

    tcp_wire = lo.Wire(3, b"tcp://127.0.0.1:1", (10, 0, 5), (key(10, b""), b"", key(5, b"")))
    sm_wire = lo.Wire(1, b"sm://1/2", (8,), (key(8, bytes(20)),))
    return ([b"\x00" + lo.encode(w) for w in wires] + [b"\x03abc" + lo.encode(wires[1]) + b"zz"]
            + [b"\x00" + lo.encode(tcp_wire), b"\x80" + lo.encode(sm_wire)])


def close() -> None:
    for plugin in _made:
        plugin.close()
    _made.clear()


HARNESS = Harness("bulk", one_input, seeds, __doc__ or "", close)
