"""The verbs plugin where it cannot run, and its driver's pyverbs calls that need no device.

Opening ``verbs://`` without pyverbs or without a device must say what is missing and how to
get it; ``import petasus.na.verbs`` must work anywhere. The driver's work requests and QP
attributes are plain pyverbs structs, built here against the real pyverbs (rdma-core 44 on
Debian 12) when it is importable: nothing stands in for it. Everything that needs a device
runs in the conformance, RPC and bulk suites when PETASUS_VERBS_DEVICE names one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from petasus import na
from petasus.na import verbs
from petasus.na.verbs import _wire as w

URI = "verbs://mlx5_0:1/127.0.0.1:0"


def _has_device() -> bool:
    return verbs.SYSFS.is_dir() and any(verbs.SYSFS.iterdir())


def _has_pyverbs() -> bool:
    try:
        import pyverbs.device  # noqa: F401
    except ImportError:
        return False
    return True


def test_import_needs_neither_pyverbs_nor_a_device() -> None:
    code = ("import sys; sys.modules['pyverbs'] = None\n"
            "from petasus import na\nimport petasus.na.verbs as v\n"
            "assert 'verbs' in na.available_plugins()\n"
            "try:\n    na.initialize('verbs://mlx5_0/127.0.0.1:0')\n"
            "except v.VerbsUnavailableError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert "pyverbs cannot be imported" in out.stdout, out.stderr


def test_without_pyverbs_the_error_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("pyverbs", "pyverbs.device", "pyverbs.pyverbs_error"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now fails
    with pytest.raises(verbs.VerbsUnavailableError) as info:
        na.initialize(URI, listen=True)
    text = str(info.value)
    assert URI in text and "pyverbs cannot be imported" in text
    assert "apt-get install python3-pyverbs" in text and "bash scripts/setup.sh" in text
    with na.initialize("tcp://127.0.0.1:0"):  # everything else keeps working
        pass


@pytest.mark.skipif(not _has_pyverbs(), reason="pyverbs is not importable here "
                    "(bash scripts/setup.sh links Debian's python3-pyverbs into .venv)")
@pytest.mark.skipif(_has_device(), reason="this host has an RDMA device")
def test_without_a_device_the_error_says_how_to_get_one() -> None:
    with pytest.raises(verbs.VerbsUnavailableError) as info:
        na.initialize(URI)
    text = str(info.value)
    assert URI in text and "/sys/class/infiniband" in text
    assert "rdma link add rxe0 type rxe netdev" in text and "rdma_rxe" in text


def test_unavailable_is_not_a_peer_failure() -> None:
    assert issubclass(verbs.VerbsUnavailableError, RuntimeError)
    assert not issubclass(verbs.VerbsUnavailableError, na.NAError)


def test_a_malformed_uri_is_a_value_error_before_anything_is_probed() -> None:
    with pytest.raises(ValueError, match="verbs://DEVICE:PORT/HOST:TCPPORT"):
        na.initialize("verbs://mlx5_0:1/no-port")


# -- with the real pyverbs, no device ------------------------------------------------------------
needs_pyverbs = pytest.mark.skipif(not _has_pyverbs(), reason="pyverbs is not importable here "
                                   "(bash scripts/setup.sh links Debian's python3-pyverbs)")


@needs_pyverbs
def test_the_venv_sees_pyverbs_and_nothing_else_of_debian() -> None:
    import pyverbs

    assert not any(Path(p).name == "dist-packages" for p in sys.path), sys.path
    holder = Path(pyverbs.__file__).parent.parent
    assert sorted(p.name for p in holder.iterdir()) == ["pyverbs"]


@needs_pyverbs
def test_the_core_constants_are_pyverbs_own() -> None:
    import pyverbs.enums as e

    from petasus.na.verbs import _driver
    from petasus.na.verbs import _protocol as p

    assert (p.IBV_ACCESS_LOCAL_WRITE, p.IBV_ACCESS_REMOTE_WRITE, p.IBV_ACCESS_REMOTE_READ) == (
        e.IBV_ACCESS_LOCAL_WRITE, e.IBV_ACCESS_REMOTE_WRITE, e.IBV_ACCESS_REMOTE_READ)
    for code, name in p.WC_NAMES.items():
        assert getattr(e, name) == code, name
    _driver._check_abi()


@needs_pyverbs
def test_work_requests_are_what_the_driver_posts() -> None:
    import pyverbs.enums as e

    from petasus.na.verbs import _driver as d

    send = d.send_wr(7, e.IBV_WR_SEND, 0x1000, 64, 3)
    assert (send.wr_id, send.opcode, send.num_sge, send.send_flags) == (
        7, e.IBV_WR_SEND, 1, e.IBV_SEND_SIGNALED)
    read = d.send_wr(8, e.IBV_WR_RDMA_READ, 0x1000, 1 << 20, 3, 0x7F00_0000_0000, 99)
    assert (read.opcode, read.num_sge) == (e.IBV_WR_RDMA_READ, 1)
    recv = d.recv_wr(d.RECV_BIT | 5, 0x2000, 100, 4)
    assert (recv.wr_id, recv.num_sge) == (d.RECV_BIT | 5, 1)


@needs_pyverbs
def test_rts_attributes_follow_the_peers_hello() -> None:
    from petasus.na.verbs import _driver as d

    roce = w.Hello(w.ACCEPT, 5, 0, 0x1234, 777, 1, bytes(range(16)), 32, 2, 65536,
                   "verbs://mlx5_0:1/10.0.0.2:7000")
    attr = d.rts_attr(port=1, gid_index=3, mtu=3, max_rd_atom=16, psn=42, peer=roce)
    assert (attr.path_mtu, attr.dest_qp_num, attr.rq_psn, attr.sq_psn) == (3, 0x1234, 777, 42)
    assert (attr.max_rd_atomic, attr.max_dest_rd_atomic, attr.rnr_retry) == (16, 16, d.RNR_RETRY)
    assert attr.ah_attr.is_global == 1 and attr.ah_attr.sgid_index == 3
    assert attr.qp_access_flags == d.QP_ACCESS
    assert str(attr.ah_attr.dgid) == w.gid_from_bytes(bytes(range(16)))
    ib = w.Hello(w.ACCEPT, 4, 17, 0x99, 1, 1, bytes(16), 32, 2, 65536, "verbs://mlx5_0:1/h:1")
    local = d.rts_attr(port=1, gid_index=0, mtu=5, max_rd_atom=4, psn=1, peer=ib)
    assert local.ah_attr.is_global == 0 and local.ah_attr.dlid == 17 and local.path_mtu == 4
