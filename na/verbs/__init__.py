"""verbs plugin: NA over InfiniBand/RoCE RC queue pairs, through pyverbs (rdma-core's binding).

URI ``verbs://DEVICE:PORT/HOST:TCPPORT``: the RDMA device and its port (``mlx5_0:1``; the port
defaults to 1), then the address of the out-of-band TCP listener through which peers set up
their queue pairs (port 0 picks one). ``addr_self()`` gives the concrete URI to hand to peers.

``import petasus.na.verbs`` needs nothing; pyverbs is imported when a ``verbs://`` URI is
opened. Without pyverbs or without an RDMA device that raises ``VerbsUnavailableError``
saying what is missing and how to get it. The design and its evidence are in ``plugin.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._wire import parse_uri

SCHEME = "verbs"
SYSFS = Path("/sys/class/infiniband")

_GET_PYVERBS = (
    "install it (Debian 12: apt-get install python3-pyverbs, rdma-core 44) and make it "
    "importable: bash scripts/setup.sh links Debian's pyverbs, and only it, into the project's "
    ".venv; PyPI's pyverbs is no substitute on Debian 12, as it builds only with Cython < 3.1 "
    "and loads only against rdma-core >= 59")
_GET_DEVICE = (
    "on RDMA hardware load its driver (e.g. modprobe mlx5_ib); without hardware create a "
    "soft-RoCE device over an Ethernet interface: rdma link add rxe0 type rxe netdev eth0 "
    "(needs the rdma_rxe kernel module and iproute2's rdma tool), then name it in the URI "
    "(verbs://rxe0:1/HOST:PORT) or in PETASUS_VERBS_DEVICE for the test suite")


class VerbsUnavailableError(RuntimeError):
    """The verbs plugin cannot run here: pyverbs or an RDMA device is missing.

    A RuntimeError, like the ofi plugin's ``OfiUnavailableError``: a missing dependency of
    the installation, not a failure involving a peer (so not an ``NAError``).
    """


def diagnose(import_error: BaseException | None, sysfs: list[str],
             listed: list[str] | BaseException | None, device: str | None) -> str | None:
    """Why the plugin cannot open ``device`` (None: it can), from what was found: the error of
    ``import pyverbs.device`` (or None), the entries of /sys/class/infiniband, and what
    pyverbs' get_device_list() returned or raised (None when not asked)."""
    if import_error is not None:
        return f"pyverbs cannot be imported ({import_error}); {_GET_PYVERBS}"
    if not sysfs:
        return f"no RDMA device: {SYSFS} is empty or missing; {_GET_DEVICE}"
    if isinstance(listed, BaseException):
        return (f"{SYSFS} lists {', '.join(sysfs)} but libibverbs cannot open the device list "
                f"({listed}); install the userspace provider drivers (Debian: "
                "apt-get install ibverbs-providers)")
    if not listed:
        return (f"{SYSFS} lists {', '.join(sysfs)} but libibverbs finds no device; install "
                "the userspace provider drivers (Debian: apt-get install ibverbs-providers)")
    if device is not None and device not in listed:
        return f"no RDMA device named {device!r}; this host has {', '.join(listed)}"
    return None


def why_unavailable(device: str | None = None) -> str | None:
    """Why ``verbs://DEVICE...`` cannot be opened on this host, or None if it can."""
    try:
        import pyverbs.device as dev
        from pyverbs.pyverbs_error import PyverbsError
    except ImportError as exc:
        return diagnose(exc, [], None, device)
    sysfs = sorted(p.name for p in SYSFS.iterdir()) if SYSFS.is_dir() else []
    if not sysfs:
        return diagnose(None, sysfs, None, device)
    listed: list[str] | BaseException
    try:
        listed = [d.name.decode() for d in dev.get_device_list()]
    except PyverbsError as exc:
        listed = exc
    return diagnose(None, sysfs, listed, device)


def open_plugin(uri: str, listen: bool = False, **options: Any) -> Any:
    """The registry's factory for ``verbs://``; imports pyverbs only now."""
    parts = parse_uri(uri)
    reason = why_unavailable(parts.device)
    if reason is not None:
        raise VerbsUnavailableError(f"cannot open {uri!r}: the verbs plugin is unavailable: "
                                    f"{reason}")
    from .plugin import VerbsPlugin

    return VerbsPlugin(uri, listen, **options)
