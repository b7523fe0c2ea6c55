"""The examples are a contract: server prints ``listening on <uri>`` first and serves until
SIGTERM or a shutdown RPC; the client takes the server's URI. Run them as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from petasus import hg

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CASES = [("sum", [], "42 + 23 = 65", None), ("int_list", [], "sum = 55", None),
         ("hello", ["2"], "sent 2 hello", "Hello World\nHello World"),
         ("na_echo", [], "get: 30000 bytes", None),
         ("pipeline", ["16"], "pipelined, 4 x 4 MiB chunks in flight: 16 MiB", None)]


@pytest.mark.parametrize("uri", ["tcp://127.0.0.1:0", "sm://"])
@pytest.mark.parametrize(("name", "args", "expected", "server_expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_example(name: str, args: list[str], expected: str, server_expected: str | None,
                 uri: str, server_args: tuple[str, ...] = ()) -> None:
    server = subprocess.Popen([sys.executable, str(EXAMPLES / name / "server.py"), uri,
                               *server_args], stdout=subprocess.PIPE, text=True)
    try:
        first = server.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("listening on "), first
        address = first.split()[-1]
        client = subprocess.run([sys.executable, str(EXAMPLES / name / "client.py"), address,
                                 *args], check=False, capture_output=True, text=True,
                                timeout=60)
        assert client.returncode == 0, client.stderr
        assert expected in client.stdout
        assert "MISMATCH" not in client.stdout
        if name == "na_echo":
            server.send_signal(signal.SIGTERM)
        else:
            with hg.Engine(uri) as engine:
                engine.lookup(address).shutdown()
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0
        if server_expected:
            assert server_expected in out
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


@pytest.mark.parametrize("size", [0, 1, 5 << 20])
@pytest.mark.parametrize("uri", ["tcp://127.0.0.1:0", "sm://"])
def test_save_writes_a_byte_identical_file(tmp_path: Path, uri: str, size: int) -> None:
    source = tmp_path / "in" / "data.bin"
    source.parent.mkdir()
    source.write_bytes(os.urandom(size))
    test_example("save", [str(source)], f"saved data.bin: {size} bytes", "saved data.bin", uri,
                 (str(tmp_path / "out"),))
    assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("uri", ["tcp://127.0.0.1:0", "sm://"])
def test_save_refuses_a_file_over_its_cap_and_keeps_serving(tmp_path: Path, uri: str) -> None:
    """The server takes at most MAX_BYTES (here 1 MiB): a larger file is refused before the
    server allocates or pulls anything, the client is told why, nothing is written, and the
    next file is saved."""
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(os.urandom((1 << 20) + 1))
    small.write_bytes(os.urandom(1 << 20))
    out = tmp_path / "out"
    server = subprocess.Popen([sys.executable, str(EXAMPLES / "save" / "server.py"), uri,
                               str(out), str(1 << 20)], stdout=subprocess.PIPE, text=True)
    try:
        first = server.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("listening on "), first
        address = first.split()[-1]

        def send(path: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(EXAMPLES / "save" / "client.py"),
                                   address, str(path)], check=False, capture_output=True,
                                  text=True, timeout=60)

        refused = send(big)
        assert refused.returncode == 1
        assert "1048577 B is more than this server takes (1048576 B)" in refused.stderr
        assert not (out / "big.bin").exists() and not list(out.glob(".big.bin.*"))
        saved = send(small)
        assert saved.returncode == 0, saved.stderr
        assert (out / "small.bin").read_bytes() == small.read_bytes()
        with hg.Engine(uri) as engine:
            engine.lookup(address).shutdown()
        server.communicate(timeout=30)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
