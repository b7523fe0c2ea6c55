"""ofi plugin: libfabric (FI_EP_RDM) through a cffi extension built in out-of-line API mode.

URIs: ``ofi+tcp://HOST:PORT`` (tcp;ofi_rxm, port 0 picks a free one), ``ofi+shm://`` (a fresh
address; peers look up ``ofi+shm://PID_N``), ``ofi+sockets://HOST:PORT``, ``ofi+verbs://``
(verbs;ofi_rxm, only where an RDMA device exists). The extension ``_fabric`` is compiled by
setup.py when libfabric's headers are installed; without it, opening an ``ofi+`` URI raises
``OfiUnavailableError`` saying what is missing and how to get it, and every other plugin works.
"""

from __future__ import annotations

import importlib
from typing import Any

SCHEMES = ("ofi+tcp", "ofi+shm", "ofi+sockets", "ofi+verbs")


class OfiUnavailableError(RuntimeError):
    """The ofi plugin cannot be used on this installation (extension or library missing)."""


def _missing(uri: str, exc: ImportError) -> OfiUnavailableError:
    if "libfabric" in str(exc):
        what = (f"the libfabric shared library cannot be loaded ({exc}); install it "
                "(Debian/Ubuntu: apt-get install libfabric1)")
    else:
        what = (f"the compiled extension petasus.na.ofi._fabric is not built ({exc}); install "
                "libfabric's headers (Debian/Ubuntu: apt-get install libfabric-dev) and "
                "reinstall petasus (pip install -e . or bash scripts/setup.sh), which compiles "
                "it when /usr/include/rdma/fabric.h exists")
    return OfiUnavailableError(f"cannot open {uri!r}: the ofi plugin is unavailable: {what}")


def open_plugin(uri: str, listen: bool = False, **options: Any) -> Any:
    """The registry's factory for every ``ofi+`` scheme; imports libfabric only when called."""
    try:
        importlib.import_module(f"{__name__}._fabric")
    except ImportError as exc:
        raise _missing(uri, exc) from exc
    from .plugin import OfiPlugin

    return OfiPlugin(uri, listen, **options)
