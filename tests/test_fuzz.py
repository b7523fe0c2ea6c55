"""Fuzzing every decoder a peer reaches (fuzz/, docs/fuzzing.md), and live peers fed mutated
bytes that must go on serving a good client.

The bounded run: each harness under atheris for ``PETASUS_FUZZ_SECONDS`` (default 10) with a
fixed libFuzzer seed (``PETASUS_FUZZ_SEED``, default 1), so a CI failure replays; a finding
fails with the input printed. Nine harnesses: about two minutes in all.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SOCKET_SPECS, SPECS, TIMEOUT, Spec

from petasus import hg, na
from petasus.hg import header as hd
from petasus.hg.errors import DecodeError
from petasus.hg.procs import ANY, mapping, proc_for
from petasus.na import framing as fr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz import run  # noqa: E402

SECONDS = float(os.environ.get("PETASUS_FUZZ_SECONDS", "10"))
SEED = int(os.environ.get("PETASUS_FUZZ_SEED", "1"))


def _ofi_missing() -> str | None:
    try:
        from petasus.na.ofi import _fabric  # noqa: F401
    except ImportError as exc:
        return f"ofi extension not built ({exc})"
    return None


def _harness_params() -> list[Any]:
    marks = {"ofi": pytest.mark.skipif(_ofi_missing() is not None,
                                       reason=_ofi_missing() or "")}
    return [pytest.param(name, marks=marks.get(name, ()), id=name) for name in run.NAMES]


# -- the harnesses themselves ---------------------------------------------------------------------
@pytest.mark.parametrize("name", _harness_params())
def test_every_seed_decodes_and_the_corpus_replays(name: str) -> None:
    """Seeds are valid encodings (the fuzzer starts past the magic checks), and every kept
    input, the regressions among them, still meets the harness's invariants."""
    harness = run.load(name)
    seeds = harness.seeds()
    assert seeds
    try:
        refused = [s.hex() for s in seeds if not harness.one_input(s)]
        assert not refused, f"{name}: seeds refused by their own decoder: {refused}"
        for path in run.corpus_files(name):
            harness.one_input(path.read_bytes())
    finally:
        harness.close()


@pytest.mark.parametrize("name", _harness_params())
def test_bounded_fuzz_run(name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "fuzz.run", "--seconds", str(SECONDS),
                           "--random-seed", str(SEED), name], cwd=ROOT, capture_output=True,
                          text=True, errors="replace", check=False,
                          timeout=SECONDS * 3 + 120)
    assert proc.returncode == 0, f"fuzz harness {name} found a failure:\n{proc.stdout}" \
                                 f"\n{proc.stderr[-4000:]}"
    assert f"{name}: ok" in proc.stdout


# -- regressions of what the harnesses found ------------------------------------------------------
def test_a_repeated_dict_key_is_a_decode_error() -> None:
    proc = proc_for(dict[str, int])
    one = proc.dumps({"a": 1})[4:]
    with pytest.raises(DecodeError, match="repeated"):
        proc.loads(struct.pack("!I", 2) + one + one)


def test_an_unhashable_any_key_is_a_decode_error() -> None:
    proc = mapping(ANY, ANY)
    key = ANY.dumps([1, 2])
    with pytest.raises(DecodeError, match="unhashable"):
        proc.loads(struct.pack("!I", 1) + key + ANY.dumps(3))


@pytest.mark.skipif(_ofi_missing() is not None, reason=_ofi_missing() or "")
@pytest.mark.parametrize("name", [bytes(16), b"abcd"], ids=["family-0", "4-bytes"])
def test_an_ofi_rma_request_under_a_forged_sender_name_leaves_the_server_serving(
        name: bytes) -> None:
    """A message's sender name is the peer's bytes. One the provider cannot take (a short
    name, or a sockaddr of no family) made the server answer with no fi_addr, and the cffi
    TypeError escaped progress(); now the request is dropped and the server goes on."""
    from petasus.na.ofi import _common
    from petasus.na.ofi._fabric import lib

    server = na.initialize("ofi+tcp://127.0.0.1:0", listen=True)
    client = na.initialize("ofi+tcp://127.0.0.1:0", listen=False)
    try:
        addr = client.addr_lookup(server.addr_self().uri)

        def exchange(payload: bytes) -> None:
            buf = bytearray(64)
            recv = server.msg_recv_unexpected(buf)
            send = client.msg_send_unexpected(addr, payload, tag=5)
            for _ in range(100_000):
                if recv.done and send.done:
                    break
                for p in (client, server):
                    p.progress(0.001)
                    p.trigger()
            assert recv.done and send.done
            assert bytes(buf[:recv.size]) == payload

        exchange(b"connected")  # rxm connects on the first send; the raw inject needs it
        message = (bytes((len(name),)) + name + b"\x01\x00"
                   + _common._RMA_DESC.pack(0x1234, 0, 16))
        with client._lock:  # type: ignore[attr-defined]
            rc = lib.fi_tinject(client._ep, message, len(message),  # type: ignore[attr-defined]
                                addr.fabric_addr, _common._GET_REQ | 1)
        assert rc == 0
        exchange(b"still here")  # progress() read the forged request first, and went on
        # Since the handshake, a message is known by the session token that heads it: a name
        # in its place is no token, and the request is dropped before anything answers it.
        stats = server.statistics()
        assert (stats["unverified_dropped"], stats["rma_refused"]) == (1, 0)
    finally:
        client.close()
        server.close()


# -- live peers fed mutated bytes -----------------------------------------------------------------
@hg.declare
def add(x: hg.int32, y: hg.int32) -> hg.int32: ...


@hg.declare
def mixed(name: str, items: list[tuple[int, bytes]], extra: dict[str, Any]) -> int: ...


RPCS = (add, mixed)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randint(0, len(out))
        op = rng.randrange(4)
        if op == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at:at] = rng.randbytes(rng.randint(1, 6))
        elif op == 2:
            del out[at:at + rng.randint(1, 6)]
        else:
            out[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                         b"\x7f\xff\xff\xff", b"\x00\x00\x01\x00"])
    return bytes(out)


def _start(spec: Spec) -> tuple[hg.Engine, threading.Thread]:
    engine = hg.Engine(spec.uri, listen=True, **spec.options)
    engine.register(add, lambda x, y: x + y)
    engine.register(mixed, lambda name, items, extra: len(name) + len(items) + len(extra))
    thread = threading.Thread(target=engine.serve, kwargs={"handle_signals": False},
                              daemon=True)
    thread.start()
    return engine, thread


def _stop(engine: hg.Engine, thread: threading.Thread) -> None:
    engine.shutdown()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "serve() did not return after shutdown"


@pytest.fixture(params=SPECS[:4] + SPECS[4:6],
                ids=lambda s: s.id if isinstance(s, Spec) else None)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[hg.Engine, threading.Thread]]:
    engine, thread = _start(request.param)
    yield engine, thread
    _stop(engine, thread)


def _served(engine: hg.Engine, thread: threading.Thread) -> None:
    assert thread.is_alive(), "the server stopped"
    with hg.Engine(engine.uri) as good:
        good.declare(*RPCS)
        remote = good.lookup(engine.uri)
        assert remote.add.call(40, 2, timeout=TIMEOUT) == 42
        assert remote.mixed.call("ab", [(1, b"x")], {"k": [1]}, timeout=TIMEOUT) == 4


def test_mutated_rpc_requests_are_each_answered_and_the_server_goes_on(
        server: tuple[hg.Engine, threading.Thread]) -> None:
    """Requests with a valid NA message around mutated header and arguments: every one that
    asks for an answer gets a reply with a known return code (never a hang), then a good
    client is served."""
    engine, thread = server
    rng = random.Random(11)
    valid = [hd.encode_request(hd.rpc_id(add.name)) + add.in_proc.dumps((1, 2)),
             hd.encode_request(hd.rpc_id(mixed.name))
             + mixed.in_proc.dumps(("name", [(1, b"a"), (2, b"")], {"x": {"y": [1.5]}}))]
    with hg.Engine(engine.uri) as client:
        plugin = client.na
        addr = plugin.addr_lookup(engine.uri)
        for i in range(150):
            body = _mutate(rng, rng.choice(valid))
            try:
                _rid, flags, _cookie = hd.decode_request(body)
            except hd.HeaderError:
                flags = 0
            if flags & (hd.NO_RESPONSE | hd.MORE_DATA):
                continue  # no reply is owed, or the target would wait to pull an input
            tag = 1_000_000 + i
            reply = bytearray(plugin.msg_get_max_expected_size())
            recv = plugin.msg_recv_expected(addr, reply, tag)
            send = plugin.msg_send_unexpected(addr, body, tag)
            na.wait(plugin, send, recv, timeout=TIMEOUT)
            ret, _flags = hd.decode_response(reply[:recv.size])
            assert ret in hd.RETURN_NAMES, f"request {body.hex()}: return code {ret}"
    _served(engine, thread)


def _raw_connect(engine: hg.Engine) -> socket.socket:
    uri = engine.uri
    if uri.startswith("tcp://"):
        from petasus.na.tcp import parse_tcp_uri

        host, port, _family = parse_tcp_uri(uri)
        return socket.create_connection((host, port), timeout=TIMEOUT)
    from petasus.na.sm import runtime_dir

    pid, inst = uri[len("sm://"):].split("/")
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(TIMEOUT)
    sock.connect(str(runtime_dir() / f"{pid}-{inst}.sock"))
    return sock


@pytest.mark.parametrize("spec", SOCKET_SPECS, ids=lambda s: s.id if isinstance(s, Spec) else None)
def test_mutated_streams_cost_one_connection_each_and_the_server_goes_on(spec: Spec) -> None:
    """Mutations of a valid connection (hello, requests, RMA frames) written raw to a live
    server, one connection each: the server drops what it must and serves a good client."""
    engine, thread = _start(spec)
    try:
        me = (b"tcp://anonymous-00000000000000ff" if spec.uri.startswith("tcp")
              else f"sm://{os.getpid()}/999".encode())
        request = hd.encode_request(hd.rpc_id(add.name)) + add.in_proc.dumps((1, 2))
        stream = (fr.encode_header(fr.HELLO, len(me)) + me
                  + fr.encode_header(fr.UNEXPECTED, len(request), 7) + request
                  + fr.encode_header(fr.GET_REQ, 24, 3) + fr.RMA_DESC.pack(1, 0, 16)
                  + fr.encode_header(fr.PUT_REQ, 24, 4) + fr.RMA_DESC.pack(1, 0, 4)
                  + fr.encode_header(fr.PUT_DATA, 4, 4) + b"data")
        rng = random.Random(12)
        for _ in range(40):
            with _raw_connect(engine) as raw:
                raw.sendall(_mutate(rng, stream))
                raw.shutdown(socket.SHUT_WR)  # the rest of a frame never comes
                while True:
                    try:
                        if not raw.recv(65536):
                            break
                    except (ConnectionResetError, TimeoutError):
                        break
        _served(engine, thread)
    finally:
        _stop(engine, thread)
