"""Far end of the RPC baselines: ``sum(x, y) -> x + y`` served by plain gRPC (sync or asyncio),
a ZeroMQ ROUTER, Pyro5 or aio-msgpack-rpc, with no protobuf and no framework of ours in the
way, so petasus's RPC numbers can be set against what the common off-the-shelf stacks reach on
the same machine. Each server runs in the configuration its documentation offers as the fast
one (see each function).

    python _rpc_peer_baselines.py grpc-sync|grpc-aio|grpc-bytes|zmq|pyro5|aio-msgpack-rpc

First stdout line: ``127.0.0.1:PORT``. Serves until stdin reaches EOF, then exits.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import msgpack
import zmq
from _common import pin_from_env

REQ = struct.Struct("!ii")  # (x, y)
RES = struct.Struct("!i")   # x + y
SERVICE, METHOD = "bench.Sum", "Sum"  # path "/bench.Sum/Sum"
GRPC_LARGE = [("grpc.max_send_message_length", 256 << 20),
              ("grpc.max_receive_message_length", 256 << 20)]


def stdin_closed() -> threading.Event:
    """An event set once stdin reaches EOF (the parent's way of saying "stop")."""
    done = threading.Event()

    def wait() -> None:
        sys.stdin.read()
        done.set()
    threading.Thread(target=wait, daemon=True).start()
    return done


def sum_handler(add: Any) -> grpc.GenericRpcHandler:
    """No protobuf codegen: a generic handler whose (de)serializers are plain struct packing."""
    method = grpc.unary_unary_rpc_method_handler(
        add, request_deserializer=REQ.unpack, response_serializer=RES.pack)
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})


def grpc_bytes() -> None:
    """Bulk's yardstick: ``Get`` answers an 8-byte size with that many bytes, ``Put`` answers a
    payload with its length; messages up to 256 MiB (gRPC's default cap is 4 MiB)."""
    cache: dict[int, bytes] = {}

    def get(request: bytes, _context: Any) -> bytes:
        size = struct.unpack("!Q", request)[0]
        if size not in cache:
            cache[size] = bytes(size)
        return cache[size]

    def put(request: bytes, _context: Any) -> bytes:
        return struct.pack("!Q", len(request))

    handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in
                (("Get", get), ("Put", put))}
    server = grpc.server(ThreadPoolExecutor(max_workers=32), options=GRPC_LARGE)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bytes",
                                                                          handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"127.0.0.1:{port}", flush=True)
    stdin_closed().wait()
    server.stop(None).wait(5)


def grpc_sync() -> None:
    def add(request: tuple[int, int], _context: Any) -> int:
        return request[0] + request[1]

    # More workers than the 32 calls the client keeps in flight at most, so none of them queues.
    server = grpc.server(ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((sum_handler(add),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"127.0.0.1:{port}", flush=True)
    stdin_closed().wait()
    server.stop(None).wait(5)


async def grpc_aio() -> None:
    async def add(request: tuple[int, int], _context: Any) -> int:
        return request[0] + request[1]

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((sum_handler(add),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"127.0.0.1:{port}", flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # until EOF
    await server.stop(None)


def zmq_router(transport: str) -> None:
    """``transport``: "tcp" (loopback), or "ipc" (a Unix socket: ZeroMQ's fastest between
    processes of one host, the peer the sm plugin is measured against)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # A bounded blocking receive rather than a poller: no extra syscall per message, and the
    # loop still notices the stop event within 100 ms when idle.
    sock.setsockopt(zmq.RCVTIMEO, 100)
    if transport == "ipc":
        where = tempfile.mkdtemp(prefix="bench-zmq-")
        endpoint = f"ipc://{where}/router"
        sock.bind(endpoint)
    else:
        endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
    print(endpoint, flush=True)
    stop = stdin_closed()
    pack, unpack = msgpack.packb, msgpack.unpackb
    while not stop.is_set():
        try:
            # Copying receives: pyzmq's zero-copy frames only pay off above ~10 KB.
            frames = sock.recv_multipart()
        except zmq.Again:
            continue
        # frames: [identity, payload] (or [identity, b"", payload] from a REQ): the reply
        # goes back on the same envelope.
        x, y = unpack(frames[-1])
        frames[-1] = pack(x + y)
        sock.send_multipart(frames)
    sock.close()
    ctx.term()
    if transport == "ipc":
        shutil.rmtree(where, ignore_errors=True)


PYRO_OBJECT = "bench.sum"


def pyro_configure() -> None:
    """Pyro5's fast settings, for both ends: marshal (its fastest serializer, and enough for
    two ints) and TCP_NODELAY (off by default: Nagle would hold every small reply back)."""
    import Pyro5.api

    Pyro5.api.config.SERIALIZER = "marshal"
    Pyro5.api.config.SOCK_NODELAY = True


def pyro5() -> None:
    """A thread-pool daemon (Pyro5's default server type: one thread per connection, which
    the client's 1 to 32 proxies need to be served side by side). The "multiplex" type (one
    thread, select) measured the same within noise on this VM: the client's threads are what
    limits Pyro5 here."""
    import Pyro5.api

    pyro_configure()

    @Pyro5.api.expose
    class Sum:
        def sum(self, x: int, y: int) -> int:
            return x + y

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    daemon.register(Sum(), PYRO_OBJECT)
    host, port = daemon.locationStr.rsplit(":", 1)
    print(f"{host}:{port}", flush=True)
    stop = stdin_closed()
    threading.Thread(target=lambda: (stop.wait(), daemon.shutdown()), daemon=True).start()
    daemon.requestLoop()
    daemon.close()


async def aio_msgpack_rpc() -> None:
    """The package's documented server: asyncio.start_server over its Server; a plain
    (not async) handler, which it calls without awaiting anything."""
    import aio_msgpack_rpc as amr

    class Sum:
        def sum(self, x: int, y: int) -> int:
            return x + y

    server = await asyncio.start_server(amr.Server(Sum()), host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    print(f"127.0.0.1:{port}", flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # until EOF
    server.close()


if __name__ == "__main__":
    pin_from_env()
    kind = sys.argv[1]
    if kind == "grpc-sync":
        grpc_sync()
    elif kind == "grpc-aio":
        asyncio.run(grpc_aio())
    elif kind in ("zmq", "zmq-ipc"):
        zmq_router("ipc" if kind == "zmq-ipc" else "tcp")
    elif kind == "grpc-bytes":
        grpc_bytes()
    elif kind == "pyro5":
        pyro5()
    elif kind == "aio-msgpack-rpc":
        asyncio.run(aio_msgpack_rpc())
    else:
        raise SystemExit(f"unknown kind {kind!r}: grpc-sync, grpc-aio, grpc-bytes, zmq, "
                         "pyro5 or aio-msgpack-rpc")
