"""petasus's side of the RPC benchmark: serves sum(x, y) until stdin closes.
First stdout line: the URI."""

from __future__ import annotations

import sys
import threading

from _common import pin_from_env

from petasus import hg


@hg.declare
def sum(x: hg.int32, y: hg.int32) -> hg.int32: ...


def main() -> None:
    pin_from_env()
    engine = hg.Engine(sys.argv[1], listen=True, spin_us=int(sys.argv[2]))
    engine.register(sum, lambda x, y: x + y)
    print(engine.uri, flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), engine.shutdown()), daemon=True).start()
    engine.serve(handle_signals=False)
    engine.close()


if __name__ == "__main__":
    main()
