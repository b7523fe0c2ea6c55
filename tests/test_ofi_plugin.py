"""ofi-only behavior beyond the conformance suite: opt-in native RMA, registration safety.

Checked emulation is the default because the providers here do not enforce rights, bounds and
keys cleanly (see the evidence in ``petasus.na.ofi.plugin``); the conformance suite covers it.
The native tests keep that path honest for the trusted deployments that opt in: data lands
where it should, at offsets, in both directions, and the handle carries the provider's key.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import TIMEOUT
from na_peer import pattern

from petasus import na

pytest.importorskip(
    "petasus.na.ofi._fabric",
    reason="the ofi extension is not built (bash scripts/setup.sh installs libfabric-dev)")

MiB = 1 << 20


def _drive(plugins: tuple[na.Plugin, ...], *ops: na.Op) -> None:
    """Progress every plugin: native RMA over rxm or shm moves in the target's progress too."""
    deadline = time.monotonic() + TIMEOUT
    while not all(op.done for op in ops):
        assert time.monotonic() < deadline, f"still pending after {TIMEOUT} s: {ops}"
        for plugin in plugins:
            plugin.progress(0.005)
            plugin.trigger()


@pytest.mark.parametrize("uri", ["ofi+tcp://127.0.0.1:0", "ofi+shm://"], ids=["tcp", "shm"])
def test_native_get_and_put_at_offsets(uri: str) -> None:
    size = MiB + 1
    with na.initialize(uri, listen=True, rma="native") as target, \
            na.initialize(uri, rma="native") as origin:
        addr = origin.addr_lookup(target.addr_self().uri)
        exposed = pattern(31, size + 64)
        handle = target.mem_register(exposed, na.Access.READ_WRITE)
        remote = origin.mem_handle_deserialize(target.mem_handle_serialize(handle))
        assert remote.key == handle.key  # the provider's key, not a petasus table entry
        local_buf = bytearray(size + 8)
        local = origin.mem_register(local_buf, na.Access.READ_WRITE)

        get = origin.get(local, 8, remote, 64, size, addr)
        _drive((origin, target), get)
        get.result()
        assert local_buf[8:] == exposed[64:]

        local_buf[8:] = pattern(32, size)
        put = origin.put(local, 8, remote, 17, size, addr)
        _drive((origin, target), put)
        put.result()
        assert exposed[17:17 + size] == pattern(32, size)
        assert exposed[:17] == pattern(31, size + 64)[:17]
        origin.mem_deregister(local)
        target.mem_deregister(handle)


def test_rma_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="rma="):
        na.initialize("ofi+shm://", rma="trusting")


_CYCLE_SCRIPT = """
import gc
from petasus import na
plugin = na.initialize(URI)
for _ in range(300):
    view = memoryview(bytearray(64))
    handle = plugin.mem_register(view, na.Access.READ_WRITE)
    plugin.mem_deregister(handle)
    garbage = {"handle": handle, "view": view}
    garbage["self"] = garbage  # a cycle, as a plugin, its handles and callbacks make
    del view, handle, garbage
    gc.collect()
plugin.close()
print("survived")
"""


@pytest.mark.parametrize("uri", ["ofi+tcp://127.0.0.1:0", "ofi+shm://"], ids=["tcp", "shm"])
def test_registered_memoryviews_in_garbage_cycles_are_collected_safely(uri: str) -> None:
    """A registration never leaves a memoryview exported to cffi: CPython 3.11's GC clears such
    a view in a cycle and then crashes (SIGSEGV) deallocating it. Run apart, so a crash fails
    this test instead of killing the suite."""
    proc = subprocess.run([sys.executable, "-c", _CYCLE_SCRIPT.replace("URI", repr(uri))],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]


_SENDER_SCRIPT = """
import sys, time
from petasus import na
client = na.initialize("ofi+shm://")
addr = client.addr_lookup(sys.argv[1])
ops = [client.msg_send_unexpected(addr, b"%s:%d" % (sys.argv[2].encode(), i), i)
       for i in range(int(sys.argv[3]))]
na.wait(client, *ops, timeout=20)
for op in ops:
    op.result()
sys.stdout.write("sent\\n")
sys.stdout.flush()
sys.stdin.readline()  # stay until told: larger messages are read from the sender's memory
client.close()
"""


def test_shm_loses_nothing_when_several_processes_burst_at_once() -> None:
    """libfabric 1.17's shm silently dropped hundreds of messages of 4 concurrent bursts when
    the plugin posted 512 receives; every message must arrive, each exactly once."""
    senders, n = 4, 2000
    with na.initialize("ofi+shm://", listen=True) as server:
        got: list[bytes] = []

        def on_message(op: na.Op) -> None:
            got.append(bytes(op.buffer[: op.size]))
            server.msg_recv_unexpected(op.buffer, on_message)

        for _ in range(8):
            server.msg_recv_unexpected(bytearray(32), on_message)
        procs = [subprocess.Popen([sys.executable, "-c", _SENDER_SCRIPT,
                                   server.addr_self().uri, str(k), str(n)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for k in range(senders)]
        try:
            deadline = time.monotonic() + TIMEOUT
            while len(got) < senders * n:
                assert time.monotonic() < deadline, f"{len(got)} of {senders * n} arrived"
                server.progress(0.01)
                server.trigger()
            for proc in procs:
                assert proc.stdout.readline() == "sent\n"  # type: ignore[union-attr]
        finally:
            for proc in procs:
                proc.communicate("done\n", timeout=TIMEOUT)
        expected = {b"%d:%d" % (k, i) for k in range(senders) for i in range(n)}
        assert sorted(got) == sorted(expected)
