"""The ofi plugin's message header, as a peer reaches it: every message that lands in a receive
slot is ``sender-name length u8 | sender name | payload`` under a 64-bit tag whose bits 32-35
say its kind (message, expected, probe, RMA request or answer); RMA requests carry a salt and
a descriptor (``OfiPlugin._on_message``, ``_serve_rma``, ``_rma_answer``).

Any process can send to an endpoint, so every byte and the tag are the peer's. The input's
first byte picks an ofi+tcp or an ofi+shm plugin, the next eight are the tag (as the receive
pool admits it: bits 36 and up are zero), the rest is the message. It is handed to
``_on_message`` as a completion of one receive slot, under the plugin's lock, as progress does;
what the plugin would post in answer is recorded, not posted, so no byte leaves this process.

Contract: ``_on_message`` never raises (an exception would escape ``progress()`` and stop the
server); a malformed message is counted and dropped. Invariants: a sender name reaches
``fi_av_insert`` only as a whole address of the endpoint's format (the provider reads as many
bytes as the format's address has, whatever the peer sent); an RMA request is served only
from the registration it names, inside its bounds, or refused with a known code.
"""

from __future__ import annotations

import socket
import struct
from types import SimpleNamespace
from typing import Any

from petasus import na
from petasus.na import _regs
from petasus.na.ofi import _addressing, _common
from petasus.na.ofi import plugin as _plugin_module  # noqa: F401 -- for atheris to instrument
from petasus.na.ofi._fabric import lib

from ._kit import Harness, check

KEY_RO, KEY_RW = 0x5EED0001, 0x5EED0003
SIZE = 64
MAX_MSG = 1024
_ADDR_LEN = {lib.FI_SOCKADDR_IN: (16, socket.AF_INET), lib.FI_SOCKADDR_IN6: (28, socket.AF_INET6)}


class _CheckedLib:
    """``lib`` as ``_addressing`` sees it, with ``fi_av_insert`` checking what it is given."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.format = 0  # the address format of the plugin being fuzzed; 0: check nothing

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def fi_av_insert(self, av: Any, raw: bytes, count: int, fi_addr: Any, flags: int,
                     ctx: Any) -> int:
        need = _ADDR_LEN.get(self.format)
        if need is not None:
            size, family = need
            check(len(raw) == size and int.from_bytes(raw[:2], "little") == family,
                  f"fi_av_insert of a {len(raw)} B name {raw.hex()} as a {size} B address")
        elif self.format == lib.FI_ADDR_STR:
            check(raw.endswith(b"\0"), "fi_av_insert of a string address without its NUL")
        return self.real.fi_av_insert(av, raw, count, fi_addr, flags, ctx)  # type: ignore[no-any-return]


_checked = _CheckedLib(lib)
_plugins: dict[str, Any] = {}
_uses: dict[str, int] = {}
# A fresh plugin after this many inputs: each new sender name the fuzzer invents becomes an
# entry of the plugin's address vector (see the report of issue 11: the table has no bound).
_RENEW = 20000


def _plugin(uri: str) -> Any:
    plugin = _plugins.get(uri)
    if plugin is not None and _uses[uri] < _RENEW:
        _uses[uri] += 1
        return plugin
    if plugin is not None:
        plugin.close()
    plugin = na.initialize(uri, listen=True, max_msg_size=MAX_MSG, rma_chunk=SIZE,
                           max_queued=4 * MAX_MSG, spin_us=0)
    posted: list[Any] = []
    plugin._start = posted.append
    plugin._submit_slot = lambda slot: None
    plugin.posted = posted
    plugin.rx = bytearray(plugin._slot)
    plugin._rx_view = memoryview(plugin.rx)
    for key, access, data in ((KEY_RO, na.Access.READ_ONLY, bytes(range(SIZE))),
                              (KEY_RW, na.Access.READ_WRITE, bytearray(SIZE))):
        handle = plugin.mem_register(data, access)
        plugin._keys.remove(handle)
        handle.key = key
        plugin._keys.add(handle)
    plugin.initial = (dict(plugin._peers), dict(plugin._by_name))
    _plugins[uri], _uses[uri] = plugin, 0
    return plugin


def one_input(data: bytes) -> bool:
    if len(data) < 9:
        return False
    uri = "ofi+shm://" if data[0] & 1 else "ofi+tcp://127.0.0.1:0"
    tag = struct.unpack_from("<Q", data, 1)[0] & _common._POOL_IGNORE
    _checked.format = 0  # a plugin being made inserts its own name
    plugin = _plugin(uri)
    message = data[9:9 + plugin._slot]
    plugin.rx[:len(message)] = message
    _checked.format = plugin.addr_format
    posted = plugin.posted
    errors = plugin.stats["protocol_errors"]
    if not plugin._matcher.unexp_posted:
        plugin.msg_recv_unexpected(bytearray(MAX_MSG))
    _addressing.lib = _checked  # type: ignore[assignment]
    try:
        with plugin._lock:
            plugin._on_message(SimpleNamespace(slot=0), len(message), tag)
        plugin.trigger()
        for req in posted:
            _check_posted(plugin, req)
    finally:
        _addressing.lib = lib
        _checked.format = 0
        posted.clear()
        plugin._held_slots.clear()
        plugin._peers, plugin._by_name = (dict(d) for d in plugin.initial)
        plugin._matcher.unexp_queue.clear()
        plugin._matcher.queued = 0
        plugin._matcher.throttled = False
    return plugin.stats["protocol_errors"] == errors


def _check_posted(plugin: Any, req: Any) -> None:
    """What the plugin would post in answer: a reply moves bytes of the named registration only,
    a refusal carries a known code; and it can be posted at all (cffi raises TypeError for
    a None argument, out of progress())."""
    check(all(a is not None for a in req.args),
          f"a request to {req.addr} with an argument of None: {req.args}")
    fn = req.fn
    if req.kind == _common._SERVE and fn is lib.fi_tsend and req.args[5] & _common._GET_DATA:
        handle = req.keep
        check(isinstance(handle, na.MemHandle) and handle.key in (KEY_RO, KEY_RW),
              "a get served from memory that is not the registration it named")
        check(req.args[2] <= handle.length, f"a get of {req.args[2]} B served")
    elif req.kind == _common._SERVE:  # an answer: salt, then the refusal code for a NAK
        data = req.args[1] if fn is lib.fi_tinject else bytes(req.keep[0])
        hdr = len(plugin._hdr)
        if req.args[-1] & _common._KIND_MASK == _common._RMA_NAK:
            check(len(data) == hdr + 3 and data[hdr + 2] in _regs.REFUSALS,
                  f"a refusal {data[hdr:].hex()}")
    elif req.kind == _common._PUT_SINK:
        check(req.args[2] <= SIZE, f"a put sink of {req.args[2]} B (the chunk is {SIZE} B)")


def seeds() -> list[bytes]:
    out = []
    for first, name in ((0, bytes((2, 0, 0x1F, 0x90, 127, 0, 0, 1)) + bytes(8)),
                        (1, b"fi_shm://1234_abcd:0:0")):
        hdr = bytes((len(name),)) + name

        def seed(kind: int, tag: int, body: bytes, first: int = first, hdr: bytes = hdr) -> bytes:
            return bytes((first,)) + struct.pack("<Q", kind | tag) + hdr + body

        salt = b"\x01\x00"
        out += [seed(_common._UNEXP, 7, b"hello"), seed(_common._EXP, 8, b"reply"),
                seed(_common._PROBE, 0, b""),
                seed(_common._GET_REQ, 9, salt + _common._RMA_DESC.pack(KEY_RO, 8, 16)),
                seed(_common._GET_REQ, 9, salt + _common._RMA_DESC.pack(KEY_RO, 60, 16)),
                seed(_common._PUT_REQ, 10, salt + _common._RMA_DESC.pack(KEY_RW, 0, 8)),
                seed(_common._PUT_REQ, 10, salt + _common._RMA_DESC.pack(KEY_RO, 0, 8)),
                seed(_common._PUT_REQ, 10, salt + _common._RMA_DESC.pack(99, 0, 1 << 30)),
                seed(_common._RMA_ACK, 11, salt), seed(_common._RMA_NAK, 12, salt + b"\x02")]
    return out


def close() -> None:
    for plugin in _plugins.values():
        plugin.close()
    _plugins.clear()


HARNESS = Harness("ofi", one_input, seeds, __doc__ or "", close)
