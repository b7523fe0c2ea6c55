"""Writes files that clients expose to it (Mercury tutorial: the save RPC).

    python examples/save/server.py URI OUTDIR       URI: tcp://127.0.0.1:0, sm://, ...

The client sends a file's name and a bulk handle over its bytes; the server pulls them into its
own memory and writes the file. The handler is ``blocking=True``: it runs on a pool thread, so
disk writes never stall the progress loop that serves other clients.
"""

import sys
from pathlib import Path

import api

from petasus import bulk, hg

MAX_FILE = 4 << 30  # the client chooses the size: bound what it can make us allocate


def main() -> None:
    uri, outdir = sys.argv[1], Path(sys.argv[2])
    outdir.mkdir(parents=True, exist_ok=True)
    with hg.Engine(uri, listen=True, allow_remote_shutdown=True, timeout=300) as engine:

        def save(name: str, data: bulk.RemoteBulk) -> int:
            if not name or Path(name).name != name or name in (".", ".."):
                raise ValueError(f"{name!r} is not a plain file name")
            if data.size > MAX_FILE:
                raise ValueError(f"{data.size} B is more than this server takes ({MAX_FILE} B)")
            buffer = bytearray(data.size)
            with engine.bulk(buffer, bulk.WRITE_ONLY) as local:
                local.pull_from(data).wait()
            (outdir / name).write_bytes(buffer)
            print(f"saved {name}: {data.size} bytes", flush=True)
            return data.size

        engine.register(api.save, save, blocking=True)
        print(f"listening on {engine.uri}", flush=True)
        engine.serve()


if __name__ == "__main__":
    main()
