"""Sends one hello (one-way: returns once the request has left).

    python examples/hello/client.py URI [COUNT]
"""

import sys

import api

from petasus import hg


def main() -> None:
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    with hg.Engine(sys.argv[1]) as engine:
        engine.declare(api)
        server = engine.lookup(sys.argv[1])
        for _ in range(count):
            server.hello()
        print(f"sent {count} hello")


if __name__ == "__main__":
    main()
