"""Fixtures of the conformance suite: every plugin, against a second process and within one."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from petasus import hg, na

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import rpc_api as api  # noqa: E402
from na_peer import Peer  # noqa: E402
from rpc_peer import start_in_thread  # noqa: E402

TIMEOUT = 20.0


def pump(until: Callable[[], bool], *parties: Any, timeout: float = TIMEOUT) -> None:
    """Drive ``parties`` (contexts or plugins: progress(0), then trigger) from this thread until
    ``until()``; fail after ``timeout`` s. For tests that hold every end in one thread."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the condition never came true"
        for party in parties:
            party.progress(0)
            party.trigger()


def receive(plugin: na.Plugin, count: int, size: int) -> list[tuple[int, bytes]]:
    """(tag, bytes) of the next ``count`` unexpected messages of ``plugin``, in order."""
    got = []
    for _ in range(count):
        buf = bytearray(size)
        op = plugin.msg_recv_unexpected(buf)
        na.wait(plugin, op, timeout=TIMEOUT)
        got.append((op.tag, bytes(buf[: op.size])))
    return got


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Spec:
    """One plugin configuration of the suite."""

    id: str
    uri: str
    options: dict[str, Any] = field(default_factory=dict)


def _ofi_missing() -> str | None:
    """Why the ofi plugin cannot run here, or None."""
    try:
        from petasus.na.ofi import _fabric  # noqa: F401
    except ImportError as exc:
        return f"ofi extension not built ({exc}); bash scripts/setup.sh installs libfabric-dev"
    return None


def _verbs_missing() -> str | None:
    if _ofi_missing():
        return _ofi_missing()
    devices = Path("/sys/class/infiniband")
    if not devices.is_dir() or not any(devices.iterdir()):
        return "no RDMA (verbs) device on this host (/sys/class/infiniband is empty)"
    return None


def _verbs_spec_missing() -> str | None:
    """Why the verbs plugin's specs do not run here, or None."""
    from petasus.na.verbs import why_unavailable

    device = os.environ.get("PETASUS_VERBS_DEVICE")
    if not device:
        here = why_unavailable()
        return ("PETASUS_VERBS_DEVICE is not set (it names the RDMA device and port to test "
                "on, e.g. mlx5_0:1 or rxe0)" + (f"; and on this host: {here}" if here else ""))
    return why_unavailable(device.partition(":")[0])


_VERBS_URI = f"verbs://{os.environ.get('PETASUS_VERBS_DEVICE') or 'none'}/127.0.0.1:0"
# RoCE needs the GID of the right RoCE version and address (``show_gids`` lists them).
_VERBS_GID = ({"gid_index": int(os.environ["PETASUS_VERBS_GID_INDEX"])}
              if os.environ.get("PETASUS_VERBS_GID_INDEX") else {})
_VERBS_SKIP = pytest.mark.skipif(bool(_verbs_spec_missing()), reason=str(_verbs_spec_missing()))

SPECS = [
    Spec("tcp", "tcp://127.0.0.1:0"),
    pytest.param(Spec("tcp6", "tcp://[::1]:0"), id="tcp6",
                 marks=pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback on this host")),
    Spec("sm", "sm://", {"rma": "process_vm"}),
    Spec("sm-copy", "sm://", {"rma": "copy"}),
    Spec("ofi-tcp", "ofi+tcp://127.0.0.1:0"),
    Spec("ofi-shm", "ofi+shm://"),
    pytest.param(Spec("ofi-verbs", "ofi+verbs://"), id="ofi-verbs",
                 marks=pytest.mark.skipif(bool(_verbs_missing()),
                                          reason=str(_verbs_missing()))),
    # The native verbs plugin: RMA up to 32 KiB two-sided (checked by the target's table),
    # and "verbs-rdma" with every transfer one-sided (checked by the NIC).
    pytest.param(Spec("verbs", _VERBS_URI, _VERBS_GID), id="verbs", marks=_VERBS_SKIP),
    pytest.param(Spec("verbs-rdma", _VERBS_URI, {"two_sided_max": 0, **_VERBS_GID}),
                 id="verbs-rdma", marks=_VERBS_SKIP),
]


# The plugins whose wire format is petasus' own frames over a socket: the tests that inject raw
# frames or look inside a connection's reader run over these only (on ofi the bytes on the wire
# and the connections are libfabric's).
SOCKET_SPECS = SPECS[:4]


def _spec_id(spec: Any) -> str:
    return spec.id if isinstance(spec, Spec) else str(spec)


@pytest.fixture(params=SPECS, ids=_spec_id, scope="module")
def spec(request: pytest.FixtureRequest) -> Spec:
    return request.param  # type: ignore[no-any-return]


def spawn(script: str, spec: Spec) -> tuple[subprocess.Popen[str], str]:
    """Start ``tests/<script> URI OPTIONS``; return it and the address of its first line."""
    proc = subprocess.Popen([sys.executable, str(HERE / script), spec.uri,
                             json.dumps(spec.options)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait(TIMEOUT)
        raise RuntimeError(f"{script} did not start: {line!r}")
    return proc, line.split()[-1]


class RemotePeer:
    """A peer in another process or a thread, and a client plugin talking to it."""

    def __init__(self, spec: Spec, placement: str) -> None:
        self.spec = spec
        self.placement = placement
        self.proc: subprocess.Popen[str] | None = None
        self.thread_peer: Peer | None = None
        if placement == "process":
            self.proc, self.uri = spawn("na_peer.py", spec)
        else:
            self.thread_peer = Peer(spec.uri, **spec.options)
            self.thread_peer.serve_in_thread()
            self.uri = self.thread_peer.uri
        self.na = na.initialize(spec.uri, **spec.options)
        self.addr = self.na.addr_lookup(self.uri)
        self._tags = itertools.count(1)
        self.n_regs = 0

    def call(self, cmd: str, body: bytes = b"", timeout: float = TIMEOUT, **args: Any) -> bytes:
        tag = next(self._tags)
        buf = bytearray(self.na.msg_get_max_expected_size())
        recv = self.na.msg_recv_expected(self.addr, buf, tag)
        send = self.na.msg_send_unexpected(
            self.addr, json.dumps({"cmd": cmd, **args}).encode() + b"\n" + body, tag)
        na.wait(self.na, send, recv, timeout=timeout)
        send.result()
        recv.result()
        status, _, reply = bytes(buf[: recv.size]).partition(b"\n")
        if status != b"ok":
            raise RuntimeError(f"peer failed {cmd}: {reply.decode()}")
        return reply

    def send_only(self, cmd: str, **args: Any) -> None:
        op = self.na.msg_send_unexpected(self.addr, json.dumps({"cmd": cmd, **args}).encode()
                                         + b"\n", next(self._tags))
        na.wait(self.na, op, timeout=TIMEOUT)
        op.result()

    def register(self, size: int, access: na.Access, seed: int = 1) -> tuple[int, na.MemHandle]:
        data = self.call("reg", size=size, access=int(access), seed=seed)
        self.n_regs += 1
        return self.n_regs - 1, self.na.mem_handle_deserialize(data)

    def kill(self) -> None:
        """Kill the peer abruptly (process) or close it under the client's feet (thread)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(TIMEOUT)
        else:
            self.thread_peer.shutdown()  # type: ignore[union-attr]

    def close(self) -> None:
        self.na.close()
        self.na.trigger()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(TIMEOUT)
            self.proc.stdout.close()  # type: ignore[union-attr]
        elif self.thread_peer is not None:
            self.thread_peer.shutdown()


@pytest.fixture(params=["process", "thread"], scope="module")
def peer(spec: Spec, request: pytest.FixtureRequest) -> Iterator[RemotePeer]:
    """A long-lived peer shared by the tests of a module (they must leave it working)."""
    remote = RemotePeer(spec, request.param)
    yield remote
    remote.close()


@pytest.fixture(params=SOCKET_SPECS, ids=_spec_id, scope="module")
def socket_spec(request: pytest.FixtureRequest) -> Spec:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=["process", "thread"], scope="module")
def socket_peer(socket_spec: Spec, request: pytest.FixtureRequest) -> Iterator[RemotePeer]:
    """Like ``peer``, over the socket plugins only (tests of petasus' own stream frames)."""
    remote = RemotePeer(socket_spec, request.param)
    yield remote
    remote.close()


@pytest.fixture
def fresh_peer(spec: Spec) -> Iterator[RemotePeer]:
    """A peer in its own process, for tests that kill it."""
    remote = RemotePeer(spec, "process")
    yield remote
    remote.close()


class RpcPeer:
    def __init__(self, spec: Spec, placement: str) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.thread_engine: hg.Engine | None = None
        self.thread: threading.Thread | None = None
        if placement == "process":
            self.proc, self.uri = spawn("rpc_peer.py", spec)
        else:
            self.thread_engine, self.thread = start_in_thread(spec.uri, **spec.options)
            self.uri = self.thread_engine.uri
        self.engine = hg.Engine(spec.uri, timeout=TIMEOUT, **spec.options)
        self.engine.declare(api)
        self.remote = self.engine.lookup(self.uri)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(TIMEOUT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.remote.shutdown()
                self.proc.wait(TIMEOUT)
            except (hg.RPCError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        if self.proc is not None:
            self.proc.stdout.close()  # type: ignore[union-attr]
        if self.thread_engine is not None:
            # The server first, with its handler threads, so that none is still answering (a
            # released hold) into the closed client. (On ofi-shm that crashed the process
            # until na/ofi/_local.py; test_ofi_plugin.py has the case.)
            self.thread_engine.shutdown()
            self.thread.join(TIMEOUT)  # type: ignore[union-attr]
            self.thread_engine.close()
        self.engine.close()


@pytest.fixture(params=["process", "thread"], scope="module")
def rpc(spec: Spec, request: pytest.FixtureRequest) -> Iterator[RpcPeer]:
    peer = RpcPeer(spec, request.param)
    yield peer
    peer.close()


@pytest.fixture
def fresh_rpc(spec: Spec) -> Iterator[RpcPeer]:
    """An RPC server process of its own, for tests that kill it."""
    peer = RpcPeer(spec, "process")
    yield peer
    peer.close()
