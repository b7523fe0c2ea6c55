"""Serves rpc_api over any plugin: a process (``python tests/rpc_peer.py URI [json-options]``,
first line ``listening on <uri>``) or a thread (``start_in_thread``)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import rpc_api as api

from petasus import hg

ERRORS = {"KeyError": KeyError, "ValueError": ValueError, "RuntimeError": RuntimeError}


def build(uri: str, **options: Any) -> hg.Engine:
    engine = hg.Engine(uri, listen=True, allow_remote_shutdown=True, **options)
    received: list[str] = []
    engine.register(api.sum, lambda x, y: x + y)
    engine.register(api.describe, lambda p, tags, scores, maybe: (
        f"{p.label}@({p.x},{p.y}) {','.join(tags)} {sorted(scores.items())} {maybe}", len(tags)))
    engine.register(api.echo_any, lambda v: v)
    engine.register(api.echo_bytes, lambda d: d)
    engine.register(api.flip, lambda f: api.Fixed(-f.a, f.b + 1, f.c * 2, not f.ok))
    engine.register(api.fail, _fail)
    engine.register(api.sleep, _sleep, blocking=True)
    engine.register(api.note, received.append)
    engine.register(api.notes, lambda: list(received))
    # The same name served twice: provider 0 and provider 7 answer differently.
    engine.register(api.whoami, lambda: "provider 0")
    engine.register(api.whoami, lambda: "provider 7", provider_id=7)
    engine.register(api.async_double, _async_double)
    engine.register(api.pooled_double, lambda x: 2 * x, blocking=True)
    engine.register(api.bad_result, lambda: -1)  # not bytes: the server must answer, not die
    engine.register(api.relay, lambda x, y: engine.lookup(engine.uri).sum(x, y))
    return engine


def _fail(kind: str, message: str) -> None:
    raise ERRORS[kind](message)


def _sleep(seconds: float) -> float:
    time.sleep(seconds)  # a blocking handler: runs in the engine's pool
    return seconds


async def _async_double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


def start_in_thread(uri: str, **options: Any) -> tuple[hg.Engine, threading.Thread]:
    engine = build(uri, **options)
    thread = threading.Thread(target=engine.serve, kwargs={"handle_signals": False},
                              daemon=True, name=f"rpc peer {engine.uri}")
    thread.start()
    return engine, thread


def main() -> None:
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    engine = build(sys.argv[1], **options)
    print(f"listening on {engine.uri}", flush=True)
    engine.serve()
    engine.close()


if __name__ == "__main__":
    main()
