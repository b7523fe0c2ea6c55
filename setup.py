"""petasus: a Mercury-style RPC framework for Python.

The top-level folders are the architecture (na/, hg/, bulk/, store/); they install as
subpackages of the ``petasus`` namespace because ``na``, ``hg``, ``bulk`` and ``store`` are
all taken on PyPI and a library must not claim them.

The ofi plugin's cffi extension is built only where libfabric's headers are installed
(Debian: libfabric-dev), so installing never fails without them; the plugin then reports
what is missing when an ``ofi+`` URI is opened.
"""

import os
import shutil
import subprocess

from setuptools import setup

LAYERS = ("na", "hg", "bulk", "store")
# atheris: coverage-guided fuzzing (docs/fuzzing.md); it ships wheels for CPython on Linux only,
# and fuzz/run.py falls back to plain mutation where it is missing. fuzz/ itself is not a
# package of petasus (``packages`` below lists what installs).
FUZZ = ["atheris>=2.3; platform_system == 'Linux'"]


def _have_libfabric() -> bool:
    if os.path.exists("/usr/include/rdma/fabric.h"):
        return True
    if shutil.which("pkg-config") is None:
        return False
    return subprocess.run(["pkg-config", "--exists", "libfabric"], check=False).returncode == 0


setup(
    name="petasus",
    version="0.1.0",
    description="Mercury-style RPC and bulk transfers for Python",
    python_requires=">=3.10",
    packages=[*(f"petasus.{layer}" for layer in LAYERS), "petasus.na.ofi", "petasus.na.verbs"],
    package_dir={f"petasus.{layer}": layer for layer in LAYERS},
    package_data={"petasus.na.ofi": ["_cdefs.h", "_glue.c"]},
    setup_requires=["cffi>=1.15"],
    # xxhash: the disk tier's checksums; rich: the store CLI; prometheus-client: metrics.
    install_requires=["cffi>=1.15", "msgpack>=1.0", "xxhash>=3", "rich>=13",
                      "prometheus-client>=0.17"],
    entry_points={"console_scripts": ["petasus-store=petasus.store.cli:main"]},
    cffi_modules=["na/ofi/_build.py:ffibuilder"] if _have_libfabric() else [],
    extras_require={
        # The tests run fuzz/'s harnesses for a bounded time (tests/test_fuzz.py), so the test
        # tools include the fuzzer; "fuzz" alone is for a machine that only fuzzes.
        "test": ["pytest>=7", "hypothesis>=6", "ruff", "numpy", *FUZZ],
        "fuzz": FUZZ,
        "bench": ["grpcio", "pyzmq", "msgpack", "Pyro5", "redis", "hiredis", "aio-msgpack-rpc",
                  "matplotlib", "uvloop", "py-spy"],
    },
)
