"""The NA benchmark's far end: echoes every unexpected message back as an expected one on the
same tag, and exposes a 64 MiB registration. First stdout line: ``URI HANDLE-HEX``."""

from __future__ import annotations

import sys
import threading

from _common import pin_from_env, touched

from petasus import na

SIZE = 64 << 20


def main() -> None:
    pin_from_env()
    uri, spin_us = sys.argv[1], int(sys.argv[2])
    plugin = na.initialize(uri, listen=True, spin_us=spin_us)
    memory = touched(SIZE)
    handle = plugin.mem_register(memory, na.Access.READ_WRITE)
    print(plugin.addr_self().uri, plugin.mem_handle_serialize(handle).hex(), flush=True)
    size = plugin.msg_get_max_unexpected_size()

    def on_request(op: na.Op) -> None:
        if op.error is None:
            reply = op.buffer[: op.size]
            plugin.msg_send_expected(op.source, reply, op.tag, repost)

    def repost(send: na.Op) -> None:
        plugin.msg_recv_unexpected(send.buffer.obj, on_request)

    for _ in range(64):
        plugin.msg_recv_unexpected(bytearray(size), on_request)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not stop.is_set():
        plugin.progress(0.2)
        plugin.trigger()
    plugin.close()


if __name__ == "__main__":
    main()
