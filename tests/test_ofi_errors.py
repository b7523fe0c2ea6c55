"""The ofi plugin's error translator (one check_rc for every fi_* call), code by code, and the
error a user gets where the extension is not built."""

from __future__ import annotations

import sys

import pytest

from petasus import na

_fabric = pytest.importorskip(
    "petasus.na.ofi._fabric",
    reason="the ofi extension is not built (bash scripts/setup.sh installs libfabric-dev)")
from petasus.na.ofi import errors as fe  # noqa: E402

lib = _fabric.lib

EXPECTED = {
    "FI_ECONNREFUSED": (fe.FabricPeerError, "could not connect"),
    "FI_EHOSTUNREACH": (fe.FabricPeerError, "could not connect"),
    "FI_ENETUNREACH": (fe.FabricPeerError, "could not connect"),
    "FI_EHOSTDOWN": (fe.FabricPeerError, "could not connect"),
    "FI_EADDRNOTAVAIL": (fe.FabricPeerError, "could not connect"),
    "FI_ENOENT": (fe.FabricPeerError, "could not connect"),
    "FI_ECONNRESET": (fe.FabricPeerError, "closed or reset"),
    "FI_ECONNABORTED": (fe.FabricPeerError, "closed or reset"),
    "FI_ENOTCONN": (fe.FabricPeerError, "closed or reset"),
    "FI_ESHUTDOWN": (fe.FabricPeerError, "closed or reset"),
    "FI_ENETDOWN": (fe.FabricPeerError, "closed or reset"),
    "FI_ETIMEDOUT": (fe.FabricPeerError, "closed or reset"),
    "FI_EIO": (fe.FabricPeerError, "closed or reset"),
    "FI_EREMOTEIO": (fe.FabricPeerError, "closed or reset"),
    "FI_ECRC": (fe.FabricPeerError, "closed or reset"),
    "FI_EACCES": (fe.FabricAccessError, "refused by the target"),
    "FI_EPERM": (fe.FabricAccessError, "refused by the target"),
    "FI_EKEYREJECTED": (fe.FabricAccessError, "refused by the target"),
    "FI_ENOKEY": (fe.FabricAccessError, "refused by the target"),
    "FI_ECANCELED": (fe.FabricCanceled, "canceled"),
    **{name: (fe.FabricUsageError, "") for name in (
        "FI_EINVAL", "FI_EBADFLAGS", "FI_EMSGSIZE", "FI_E2BIG", "FI_ETOOSMALL", "FI_ETRUNC",
        "FI_EOVERFLOW", "FI_EFAULT", "FI_EBADF", "FI_ENOPROTOOPT", "FI_EISCONN", "FI_EALREADY",
        "FI_EOPBADSTATE", "FI_ENOEQ", "FI_ENOCQ", "FI_ENOAV", "FI_EDOMAIN")},
    **{name: (fe.FabricError, "") for name in (
        "FI_EAGAIN", "FI_ENOMEM", "FI_ENOSPC", "FI_ENOBUFS", "FI_EMFILE", "FI_EBUSY",
        "FI_ENODEV", "FI_ENOSYS", "FI_EOPNOTSUPP", "FI_ENODATA", "FI_ENOMSG", "FI_EADDRINUSE",
        "FI_EINTR", "FI_EINPROGRESS", "FI_EAVAIL", "FI_EOTHER", "FI_EOVERRUN")},
}


def test_every_mapped_code_is_tested() -> None:
    assert {name for name, _cls in fe.KINDS.values()} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_rc_translates(name: str) -> None:
    code = getattr(lib, name)
    cls, words = EXPECTED[name]
    with pytest.raises(cls) as info:
        fe.check_rc(-code, "fi_tsend", op="send_unexpected", peer="ofi+tcp://10.0.0.1:7",
                    length=12, tag=5)
    exc = info.value
    assert type(exc) is cls and isinstance(exc, na.NAError)
    text = str(exc)
    assert "send_unexpected with ofi+tcp://10.0.0.1:7" in text
    assert f"({name}) in fi_tsend(length=12, tag=5)" in text
    assert fe.strerror(code) in text and words in text
    assert (exc.code, exc.call, exc.arguments) == (code, "fi_tsend", {"length": 12, "tag": 5})


def test_kinds_are_the_na_kinds() -> None:
    assert issubclass(fe.FabricPeerError, na.PeerError)
    assert issubclass(fe.FabricAccessError, na.AccessError)
    assert issubclass(fe.FabricCanceled, na.Canceled)
    assert issubclass(fe.FabricUsageError, ValueError)


def test_success_and_unknown_codes() -> None:
    assert fe.check_rc(0, "fi_enable") == 0
    assert fe.check_rc(3, "fi_cq_read") == 3
    with pytest.raises(fe.FabricError, match=r"\(fi_errno 99999\) in fi_close\(\)"):
        fe.check_rc(-99999, "fi_close")


def test_provider_detail_is_kept() -> None:
    exc = fe.error_for(lib.FI_ECONNRESET, "fi_read", op="get", peer="p", detail="socket gone")
    assert "provider says: socket gone" in str(exc)


def test_missing_extension_says_what_and_how(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where libfabric-dev was absent at install time, _fabric does not exist."""
    monkeypatch.setitem(sys.modules, "petasus.na.ofi._fabric", None)  # import now fails
    with pytest.raises(RuntimeError) as info:
        na.initialize("ofi+tcp://127.0.0.1:0")
    text = str(info.value)
    assert "ofi+tcp://127.0.0.1:0" in text and "petasus.na.ofi._fabric" in text
    assert "apt-get install libfabric-dev" in text and "reinstall" in text
    # Everything else keeps working.
    with na.initialize("tcp://127.0.0.1:0"):
        pass


def test_no_verbs_device_is_a_clear_error() -> None:
    from pathlib import Path

    if Path("/sys/class/infiniband").is_dir() and any(Path("/sys/class/infiniband").iterdir()):
        pytest.skip("this host has an RDMA device")
    with pytest.raises(na.NAError, match="no RDMA device"):
        na.initialize("ofi+verbs://")
