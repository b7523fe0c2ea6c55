"""Writes files that clients expose to it (Mercury tutorial: the save RPC).

    python examples/save/server.py URI OUTDIR [MAX_BYTES]     URI: tcp://127.0.0.1:0, sm://, ...

The client sends a file's name and a bulk handle over its bytes; the server pulls them and
writes the file. The client chooses the name, the size and how fast it serves the pull, so the
handler checks everything before it spends anything:

- the name is a plain file name, the size at most MAX_BYTES (default 1 GiB), the handle one
  we may read: a refusal reaches the client as a RemoteError naming the reason;
- nothing of the file's size is allocated: the bytes come in 4 MiB chunks (``bulk.pipeline``)
  straight into the file, so memory stays at five chunks whatever the size;
- each chunk must land within STALL_S seconds, so a client that stops serving its pull holds a
  pool thread for that long, not for the whole call's timeout.

The handler is ``blocking=True``: it runs on a pool thread, so disk writes never stall the
progress loop that serves other clients.
"""

import os
import sys
import tempfile
from pathlib import Path

import api

from petasus import bulk, hg

MAX_BYTES = 1 << 30  # the client chooses the size: bound the disk it can make us fill
STALL_S = 10.0  # a chunk (4 MiB) that takes longer has stalled, not slowed: at 1 MB/s it takes 4 s
CHUNK = 4 << 20


def main() -> None:
    uri, outdir = sys.argv[1], Path(sys.argv[2])
    max_bytes = int(sys.argv[3]) if len(sys.argv) > 3 else MAX_BYTES
    outdir.mkdir(parents=True, exist_ok=True)
    with hg.Engine(uri, listen=True, allow_remote_shutdown=True) as engine:

        def save(name: str, data: bulk.RemoteBulk) -> int:
            if not name or Path(name).name != name or name in (".", ".."):
                raise ValueError(f"{name!r} is not a plain file name")
            if data.size > max_bytes:
                raise ValueError(f"{data.size} B is more than this server takes "
                                 f"({max_bytes} B)")
            if not data.access & bulk.READ_ONLY:
                raise PermissionError(f"the handle is {data.access.name}: it cannot be read")
            fd, tmp = tempfile.mkstemp(dir=outdir, prefix=f".{name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    if data.size:
                        bulk.pipeline(engine, data, lambda _off, view: f.write(view),
                                      chunk_size=CHUNK, timeout=STALL_S)
                os.replace(tmp, outdir / name)
            except BaseException:
                os.unlink(tmp)
                raise
            print(f"saved {name}: {data.size} bytes", flush=True)
            return data.size

        engine.register(api.save, save, blocking=True)
        print(f"listening on {engine.uri}", flush=True)
        engine.serve()


if __name__ == "__main__":
    main()
