"""Sends the list 1 -> 2 -> ... -> 10 and prints the sum the server returns.

    python examples/int_list/client.py URI
"""

import sys

import api

from petasus import hg


def main() -> None:
    values = list(range(1, 11))
    with hg.Engine(sys.argv[1]) as engine:
        engine.declare(api)
        server = engine.lookup(sys.argv[1])
        total = server.sum_list(api.IntList.of(values))
        print(f"{' -> '.join(map(str, values))}: sum = {total}")


if __name__ == "__main__":
    main()
