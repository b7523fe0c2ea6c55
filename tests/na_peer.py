"""The far end of the NA conformance suite: a small command server written against the NA API.

Run as a process (``python tests/na_peer.py URI [json-options]``, first stdout line
``listening on <uri>``) or in a thread (``Peer(...).serve_in_thread()``). Commands arrive as
unexpected messages: one JSON line, then a binary body; the reply is an expected message on the
request's tag: ``ok\\n`` or ``err\\n`` followed by the body.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
from typing import Any

from petasus import na

POSTED = 16


def pattern(seed: int, size: int) -> bytearray:
    """Deterministic bytes; both ends compute them to check transfers without sending them."""
    block = random.Random(seed).randbytes(min(size, 1 << 20) or 1)
    reps = -(-size // len(block))
    return bytearray((block * reps)[:size])


def digest(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


class Peer:
    def __init__(self, uri: str, **options: Any) -> None:
        self.na = na.initialize(uri, listen=True, **options)
        self.uri = self.na.addr_self().uri
        self.regs: list[tuple[bytearray, na.MemHandle]] = []
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        size = self.na.msg_get_max_unexpected_size()
        for _ in range(POSTED):
            self.na.msg_recv_unexpected(bytearray(size), self._on_request)

    def _on_request(self, op: na.Op) -> None:
        if op.error is not None:
            return
        data = bytes(op.buffer[: op.size])
        self.na.msg_recv_unexpected(op.buffer, self._on_request)
        line, _, body = data.partition(b"\n")
        try:
            request = json.loads(line)
            request["tag"] = op.tag
            status, reply = b"ok", self._run(request, body, op.source)
        except Exception as exc:  # the peer reports every failure to its client
            status, reply = b"err", f"{type(exc).__name__}: {exc}".encode()
        if reply is None:
            return
        self.na.msg_send_expected(op.source, status + b"\n" + reply, op.tag)

    def _run(self, req: dict[str, Any], body: bytes, source: na.Addr) -> bytes | None:
        cmd = req["cmd"]
        if cmd == "echo":
            return body
        if cmd == "noreply":
            return None
        if cmd == "reg":
            buf = pattern(req["seed"], req["size"])
            handle = self.na.mem_register(buf, na.Access(req["access"]))
            self.regs.append((buf, handle))
            return self.na.mem_handle_serialize(handle)
        if cmd == "dereg":
            self.na.mem_deregister(self.regs[req["index"]][1])
            return b""
        if cmd == "digest":
            buf = self.regs[req["index"]][0]
            return digest(buf[req["off"]: req["off"] + req["len"]]).encode()
        if cmd == "get_from":
            # RMA initiated by the peer against the client's memory.
            remote = self.na.mem_handle_deserialize(body)
            local_buf = bytearray(req["len"])
            local = self.na.mem_register(local_buf, na.Access.READ_WRITE)
            op = self.na.get(local, 0, remote, 0, req["len"], source)
            na.wait(self.na, op, timeout=20)
            self.na.mem_deregister(local)
            op.result()
            return digest(local_buf).encode()
        if cmd == "stall":
            # Acknowledge first (so the client knows nothing more will be served), then stop
            # progressing until the process is killed, the thread is stopped, or time is up.
            ack = self.na.msg_send_expected(source, b"ok\n", req["tag"])
            na.wait(self.na, ack, timeout=20)
            self.stop.wait(req.get("seconds", 60))
            return None
        if cmd == "exit":
            self.stop.set()
            return b""
        raise ValueError(f"unknown command {cmd!r}")

    def serve(self) -> None:
        try:
            while not self.stop.is_set():
                self.na.progress(0.05)
                self.na.trigger()
        finally:
            self.na.close()
            self.na.trigger()

    def serve_in_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve, name=f"peer {self.uri}", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self, timeout: float = 10) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"peer thread {self.uri} did not stop in {timeout} s")


def main() -> None:
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    peer = Peer(sys.argv[1], **options)
    print(f"listening on {peer.uri}", flush=True)
    peer.serve()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
