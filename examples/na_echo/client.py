"""NA echo client: a message round trip, then a one-sided get of the server's buffer.

    python examples/na_echo/client.py URI
"""

from __future__ import annotations

import sys

from petasus import na

TIMEOUT = 10.0


def ask(plugin: na.Plugin, server: na.Addr, message: bytes, tag: int) -> bytes:
    reply = bytearray(plugin.msg_get_max_expected_size())
    recv = plugin.msg_recv_expected(server, reply, tag)
    send = plugin.msg_send_unexpected(server, message, tag)
    na.wait(plugin, send, recv, timeout=TIMEOUT)
    send.result()
    return bytes(reply[: recv.result().size])


def main() -> None:
    uri = sys.argv[1]
    with na.initialize(uri) as plugin:
        server = plugin.addr_lookup(uri)
        print(f"echo: {ask(plugin, server, b'hello over ' + uri.encode(), 1).decode()}")
        remote = plugin.mem_handle_deserialize(ask(plugin, server, b"handle?", 2))
        local_buf = bytearray(remote.length)
        local = plugin.mem_register(local_buf, na.Access.WRITE_ONLY)
        op = plugin.get(local, 0, remote, 0, remote.length, server)
        na.wait(plugin, op, timeout=TIMEOUT)
        op.result()
        print(f"get: {remote.length} bytes, starting {bytes(local_buf[:30]).decode()!r}")


if __name__ == "__main__":
    main()
