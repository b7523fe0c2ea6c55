"""The hello RPC, declared once for server and client: one-way, no response."""

from petasus import hg


@hg.declare(one_way=True)
def hello() -> None:
    """Ask the server to print Hello World."""
