"""petasus: a Mercury-style RPC framework for Python.

The top-level folders are the architecture (na/, hg/, bulk/, store/); they install as
subpackages of the ``petasus`` namespace because ``na``, ``hg``, ``bulk`` and ``store`` are
all taken on PyPI and a library must not claim them.
"""

from setuptools import setup

LAYERS = ("na", "hg", "bulk", "store")

setup(
    name="petasus",
    version="0.1.0",
    description="Mercury-style RPC and bulk transfers for Python",
    python_requires=">=3.10",
    packages=[f"petasus.{layer}" for layer in LAYERS],
    package_dir={f"petasus.{layer}": layer for layer in LAYERS},
    install_requires=["cffi>=1.15", "msgpack>=1.0"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "ruff", "numpy"],
        "bench": ["grpcio", "pyzmq", "msgpack", "Pyro5"],
    },
)
