"""NA echo server: answers each message with the same bytes and exposes a read-only buffer.

    python examples/na_echo/server.py [URI]      (default tcp://127.0.0.1:0; sm:// works too)

Prints ``listening on <uri>`` first, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys

from petasus import na

GREETING = b"petasus moves bytes one-sided " * 1000


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:0"
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with na.initialize(uri, listen=True) as plugin:
        memory = plugin.mem_register(GREETING, na.Access.READ_ONLY)
        handle = plugin.mem_handle_serialize(memory)

        def on_message(op: na.Op) -> None:
            if op.error is not None:
                return
            request = bytes(op.buffer[: op.size])
            reply = handle if request == b"handle?" else request
            plugin.msg_send_expected(op.source, reply, op.tag)
            plugin.msg_recv_unexpected(op.buffer, on_message)

        for _ in range(8):
            plugin.msg_recv_unexpected(bytearray(plugin.msg_get_max_unexpected_size()),
                                       on_message)
        print(f"listening on {plugin.addr_self().uri}", flush=True)
        while not stop:
            plugin.progress(0.1)
            plugin.trigger()


if __name__ == "__main__":
    main()
