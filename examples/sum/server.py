"""Serves sum(x, y) (Mercury tutorial: the sum RPC).

    python examples/sum/server.py [URI]         default tcp://127.0.0.1:0; sm:// works too
"""

import sys

import api

from petasus import hg


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:0"
    with hg.Engine(uri, listen=True, allow_remote_shutdown=True) as engine:
        engine.register(api.sum, lambda x, y: x + y)
        print(f"listening on {engine.uri}", flush=True)
        engine.serve()


if __name__ == "__main__":
    main()
