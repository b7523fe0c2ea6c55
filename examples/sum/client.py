"""Prints ``42 + 23 = 65``, computed by the server.

    python examples/sum/client.py URI
"""

import sys

import api

from petasus import hg


def main() -> None:
    with hg.Engine(sys.argv[1]) as engine:
        engine.declare(api)
        server = engine.lookup(sys.argv[1])
        x, y = 42, 23
        print(f"{x} + {y} = {server.sum(x, y)}")


if __name__ == "__main__":
    main()
