"""Who a socket plugin's peer is (tcp, sm): a claimed URI is not an identity, sm claims are
checked with the kernel, and with ``auth_key`` only holders of the key get past the handshake
(issue 11). Each attack ends by showing that a good client is still served."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable

import pytest
from conftest import SOCKET_SPECS, TIMEOUT, Spec
from served import Served, add, take

from petasus import hg, na
from petasus.hg import header as hd
from petasus.na import auth
from petasus.na import framing as fr
from petasus.na import sm as sm_plugin

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
SPECS = [s for s in SOCKET_SPECS if isinstance(s, Spec)]


def _client_uri(spec: Spec) -> str:
    return spec.uri.split("://", 1)[0] + "://" + ("127.0.0.1:0" if "127." in spec.uri
                                                  else "[::1]:0" if "::1" in spec.uri else "")


def _call(spec: Spec, uri: str, key: bytes | None, *, big: bool = False,
          listen: bool = False) -> int:
    with hg.Engine(_client_uri(spec), listen=listen, auth_key=key, **spec.options) as client:
        client.declare(add, take)
        remote = client.lookup(uri)
        if big:
            return int(remote.take.call(bytes(300_000), timeout=TIMEOUT))
        return int(remote.add.call(40, 2, timeout=TIMEOUT))


def _raw_connect(uri: str) -> socket.socket:
    if uri.startswith("sm://"):
        pid, inst = uri[5:].split("/")
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(sm_plugin.runtime_dir() / f"{pid}-{inst}.sock"))
    else:
        host, port = uri[6:].rsplit(":", 1)
        raw = socket.create_connection((host.strip("[]"), int(port)))
    raw.settimeout(TIMEOUT)
    return raw


def _closed_by_peer(raw: socket.socket) -> bool:
    """Read until the server closes the connection (True), or fail on the timeout."""
    while True:
        try:
            if not raw.recv(65536):
                return True
        except ConnectionResetError:
            return True


def _hello(uri: str, flags: int = 1, nonce: bytes = b"") -> bytes:
    payload = nonce + uri.encode()
    return fr.encode_header(fr.HELLO, len(payload), 0, flags) + payload


@pytest.fixture(params=SPECS, ids=lambda s: s.id)
def sock_spec(request: pytest.FixtureRequest) -> Spec:
    return request.param  # type: ignore[no-any-return]


# -- claims -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [s for s in SPECS if s.uri.startswith("tcp")], ids=lambda s: s.id)
def test_a_pre_claimed_listener_uri_does_not_receive_its_owners_replies(spec: Spec) -> None:
    """A peer that says HELLO with a real client's listener URI before that client connects
    used to own the URI: the server sent the client's replies down the impostor's connection
    and the client waited for them in vain."""
    served = Served(spec.uri, **spec.options)
    try:
        with hg.Engine(spec.uri, listen=True, **spec.options) as honest:
            honest.declare(add, take)
            before = served.stats()["unproven_claims"]
            with _raw_connect(served.uri) as raw:
                raw.sendall(_hello(honest.uri))
                # The claim is in before the honest client connects (the race the old code
                # lost: first come owned the URI).
                served.wait_for(lambda: served.stats()["unproven_claims"] > before, "the claim")
                remote = honest.lookup(served.uri)
                assert remote.add.call(40, 2, timeout=TIMEOUT) == 42
                assert remote.take.call(bytes(300_000), timeout=TIMEOUT) == 300_000
                raw.setblocking(False)
                with pytest.raises(BlockingIOError):  # nothing meant for honest came here
                    raw.recv(1)
            # The server's own lookup of the URI dials it; it is not the impostor's connection.
            assert served.engine.na.addr_lookup(honest.uri).conn is None
    finally:
        served.close()


def test_an_sm_claim_of_another_process_is_refused() -> None:
    """The kernel says which process is on a Unix socket; an sm URI names its process."""
    spec = next(s for s in SPECS if s.id == "sm")
    served = Served(spec.uri, **spec.options)
    try:
        victim = f"sm://{os.getppid()}/0"  # a live process of the same user, not this one
        with _raw_connect(served.uri) as raw:
            raw.sendall(_hello(victim))
            assert _closed_by_peer(raw)
        assert served.stats()["protocol_errors"] >= 1
        assert _call(spec, served.uri, None) == 42
    finally:
        served.close()


def test_sm_process_vm_reads_only_the_peers_own_memory() -> None:
    """A handle naming a third process is refused even where that process's table would
    allow the read (the handle's key and base are right)."""
    opts = {"rma": "process_vm"}
    with na.initialize("sm://", listen=True, **opts) as server, \
            na.initialize("sm://", listen=True, **opts) as peer, \
            na.initialize("sm://", listen=True, **opts) as third:
        secret = bytearray(b"s" * 64)
        handle = third.mem_register(secret, na.Access.READ_ONLY)
        remote = server.mem_handle_deserialize(third.mem_handle_serialize(handle))
        local = server.mem_register(bytearray(64), na.Access.READ_WRITE)
        op = server.get(local, 0, remote, 0, 64, server.addr_lookup(peer.addr_self().uri))
        na.wait(server, op, timeout=TIMEOUT)
        assert isinstance(op.error, na.AccessError)
        assert "not to this peer" in str(op.error)
        # The same handle with its owner as the peer is read.
        ok = server.get(local, 0, remote, 0, 64, server.addr_lookup(third.addr_self().uri))
        for _ in range(1000):
            if ok.done:
                break
            server.progress(0.01)
            server.trigger()
        assert ok.done and ok.error is None and bytes(local.view) == bytes(secret)


def test_sm_connect_fails_at_once_when_the_listener_backlog_is_full() -> None:
    """It blocked for up to 5 s under the plugin's lock (every other peer waited too)."""
    inst = 900_000 + os.getpid() % 1000
    path = sm_plugin.runtime_dir() / f"{os.getpid()}-{inst}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers = []
    try:
        while True:  # fill the backlog of a listener that never accepts
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            if filler.connect_ex(str(path)) == errno.EAGAIN:
                break
            assert len(fillers) < 100, "the backlog never filled"
        with na.initialize("sm://") as client:
            op = client.msg_send_unexpected(client.addr_lookup(f"sm://{os.getpid()}/{inst}"),
                                            b"hi", tag=1)
            na.wait(client, op, timeout=TIMEOUT)
            assert isinstance(op.error, na.PeerError)
            assert "backlog is full" in str(op.error)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
        path.unlink()


# -- auth_key -----------------------------------------------------------------------------------
def test_the_same_key_works_end_to_end_including_the_overflow_path(sock_spec: Spec) -> None:
    served = Served(sock_spec.uri, KEY, **sock_spec.options)
    try:
        assert _call(sock_spec, served.uri, KEY) == 42
        assert _call(sock_spec, served.uri, KEY.decode(), big=True) == 300_000  # type: ignore[arg-type]
        assert served.calls == 2
        assert served.stats()["auth_failures"] == 0
    finally:
        served.close()


@pytest.mark.parametrize(("key", "why"), [
    (OTHER_KEY, "could not prove it holds the auth_key"),
    (None, "requires an auth_key and this instance has none")], ids=["wrong key", "no key"])
def test_a_peer_without_the_key_reaches_no_handler(sock_spec: Spec, key: bytes | None,
                                                   why: str) -> None:
    served = Served(sock_spec.uri, KEY, **sock_spec.options)
    try:
        with pytest.raises(hg.PeerError, match=f"authentication failed: the peer {why}"):
            _call(sock_spec, served.uri, key)
        assert served.calls == 0
        with pytest.raises(hg.PeerError, match="authentication failed"):
            _call(sock_spec, served.uri, key, big=True, listen=True)
        assert served.calls == 0
        served.wait_for(lambda: served.stats()["auth_failures"] == 2, "the server to count both")
        assert _call(sock_spec, served.uri, KEY) == 42  # good clients are still served
        assert served.calls == 1
    finally:
        served.close()


def test_a_keyed_client_refuses_a_server_without_the_key(sock_spec: Spec) -> None:
    served = Served(sock_spec.uri, None, **sock_spec.options)
    try:
        with pytest.raises(hg.PeerError, match="authentication failed: the peer has no auth_key"):
            _call(sock_spec, served.uri, KEY)
        assert served.calls == 0
        served.wait_for(lambda: served.stats()["auth_failures"] == 1, "the server to count it")
    finally:
        served.close()


def test_frames_before_the_proof_close_the_connection_unread(sock_spec: Spec) -> None:
    """A message sent after a keyed HELLO but before the proof reaches no handler: the
    connection closes (the challenge may or may not have left before)."""
    served = Served(sock_spec.uri, KEY, **sock_spec.options)
    try:
        with _raw_connect(served.uri) as raw:
            raw.sendall(_hello(_client_uri(sock_spec) if sock_spec.uri.startswith("tcp")
                               else f"sm://{os.getpid()}/777", 2, auth.new_nonce()))
            request = b"x" * 40
            raw.sendall(fr.encode_header(fr.UNEXPECTED, len(request), 5) + request)
            assert _closed_by_peer(raw)
        assert served.stats()["protocol_errors"] >= 1
        assert served.calls == 0
        assert _call(sock_spec, served.uri, KEY) == 42
    finally:
        served.close()


@pytest.mark.parametrize("key", [None, KEY], ids=["no key", "key"])
def test_a_listener_is_called_back_over_its_own_connection_once_proven(
        sock_spec: Spec, key: bytes | None) -> None:
    """B calls A, then A calls B back. With the key, or on sm (the kernel's word on the pid),
    B's claim is believed and A answers over the connection B opened; an unproven tcp claim
    is not, and A dials B's URI itself (a second connection)."""
    a = Served(sock_spec.uri, key, **sock_spec.options)
    b = Served(sock_spec.uri, key, **sock_spec.options)
    try:
        b.engine.declare(add)
        a.engine.declare(add)
        assert b.engine.lookup(a.uri).add.call(1, 2, timeout=TIMEOUT) == 3
        opened = b.stats()["connections"]
        assert a.engine.lookup(b.uri).add.call(3, 4, timeout=TIMEOUT) == 7
        proven = key is not None or sock_spec.uri.startswith("sm")
        assert b.stats()["connections"] == opened + (0 if proven else 1)
        assert a.calls == 1 and b.calls == 1
    finally:
        b.close()
        a.close()


def test_auth_keys_are_checked_at_initialize() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        na.initialize("tcp://127.0.0.1:0", auth_key=b"short")
    with pytest.raises(TypeError, match="bytes or str"):
        na.initialize("sm://", auth_key=1234)



def _pump(plugin: na.Plugin, until: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        plugin.progress(0.002)
        plugin.trigger()


def test_a_challenge_sent_back_on_another_connection_is_refused() -> None:
    """A dials B's address, where an attacker listens. The attacker opens a second connection
    to A whose keyed HELLO carries A's own nonce and claims A's URI: A's answer as listener
    would be exactly the proof A's dialler waits for, and A's proof would then get the
    attacker past A's listener (found in review). A refuses its own nonce from anywhere but
    the far end of that very connection."""
    with na.initialize("tcp://127.0.0.1:0", listen=True, auth_key=KEY) as a, \
            socket.create_server(("127.0.0.1", 0)) as attacker:
        attacker.setblocking(False)
        b_uri = f"tcp://127.0.0.1:{attacker.getsockname()[1]}"
        send = a.msg_send_unexpected(a.addr_lookup(b_uri), b"for B only", tag=1)
        accepted: list[socket.socket] = []

        def accept() -> bool:
            try:
                accepted.append(attacker.accept()[0])
            except BlockingIOError:
                return False
            return True

        _pump(a, accept, "A to dial B")
        first = accepted[0]
        first.setblocking(False)
        data = bytearray()

        def hello_in() -> bool:
            try:
                data.extend(first.recv(4096))
            except BlockingIOError:
                pass
            return len(data) >= fr.HEADER_SIZE and \
                len(data) >= fr.HEADER_SIZE + fr.HEADER.unpack_from(data)[3]

        _pump(a, hello_in, "A's HELLO")
        _magic, kind, flags, length, _tag = fr.HEADER.unpack_from(data)
        hello = bytes(data[fr.HEADER_SIZE:fr.HEADER_SIZE + length])
        assert kind == fr.HELLO and flags & 2
        nonce = hello[:auth.NONCE_SIZE]
        with _raw_connect(a.addr_self().uri) as second:
            second.sendall(_hello(a.addr_self().uri, 1 | 2, nonce))
            second.setblocking(False)
            buf = bytearray()

            def answered() -> bool:
                try:
                    chunk = second.recv(65536)
                except BlockingIOError:
                    return False
                except ConnectionResetError:
                    return True
                buf.extend(chunk)
                return not chunk  # until A closes it

            _pump(a, answered, "A to answer the reflected HELLO and close")
        got = []
        while len(buf) >= fr.HEADER_SIZE:
            length = fr.HEADER.unpack_from(buf)[3]
            got.append((buf[1], bytes(buf[fr.HEADER_SIZE:fr.HEADER_SIZE + length])))
            del buf[:fr.HEADER_SIZE + length]
        assert got == [(fr.AUTH_CHALLENGE, bytes((3,)))]  # a refusal, not a proof
        assert a.statistics()["auth_failures"] >= 1
        first.close()
        _pump(a, lambda: send.done, "the held send to fail")
        assert isinstance(send.error, na.PeerError)


def test_a_peer_that_stops_reading_fails_its_connection_instead_of_piling_up() -> None:
    """sm: a peer that shuts down only its reading side makes our sends fail (EPIPE) with no
    hang-up to read; the connection must fail at once, not keep queueing unsent replies
    outside every limit (found in review)."""
    spec = next(s for s in SPECS if s.id == "sm")
    served = Served(spec.uri, **spec.options)
    try:
        with _raw_connect(served.uri) as raw:
            raw.sendall(_hello(f"sm://{os.getpid()}/778", 0))
            raw.shutdown(socket.SHUT_RD)
            before = served.stats()["peer_failures"]
            request = (hd.encode_request(hd.rpc_id(take.name))
                       + take.in_proc.dumps((bytes(3000),)))
            try:
                for tag in range(1, 50):
                    raw.sendall(fr.encode_header(fr.UNEXPECTED, len(request), tag) + request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server already closed it: what the test waits for
            served.wait_for(lambda: served.stats()["peer_failures"] > before,
                     "the server to fail the connection")
            assert served.stats()["open_connections"] == 0
        assert _call(spec, served.uri, None) == 42
    finally:
        served.close()
