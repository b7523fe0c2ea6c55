"""petasus: a Mercury-style RPC framework for Python.

The top-level folders are the architecture (na/, hg/, bulk/, store/); they install as
subpackages of the ``petasus`` namespace because ``na``, ``hg``, ``bulk`` and ``store`` are
all taken on PyPI and a library must not claim them.

The ofi plugin's cffi extension is built only where libfabric's headers are installed
(Debian: libfabric-dev), so installing never fails without them; the plugin then reports
what is missing when an ``ofi+`` URI is opened.
"""

import glob
import importlib.util
import os
import shutil
import subprocess
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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




def _load_accel() -> ModuleType:
    """na/accel.py, read from the tree: which modules are compiled, and their manifest, are
    said once there (it imports nothing but the standard library)."""
    spec = importlib.util.spec_from_file_location("_petasus_accel", "na/accel.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


accel = _load_accel()


def _compiled_modules() -> list[tuple[str, str]]:
    """(layer, module) pairs that Cython compiles from their unchanged sources, unless
    PETASUS_PUREPYTHON is set or Cython is missing (the build system requires it; a plain
    ``setup.py`` run without it installs the sources only)."""
    if accel.pure_python():
        return []
    try:
        import Cython  # noqa: F401
    except ImportError:
        return []
    found = []
    for layer in accel.LAYERS:
        for path in sorted(glob.glob(f"{layer}/*.py")):
            name = os.path.basename(path)[:-3]
            if name not in accel.NOT_COMPILED:
                found.append((layer, name))
    return found


# The sources' hashes as they were when cythonize read them: BuildExt writes these, so that an
# edit made while the build runs is not vouched for as compiled.
_DIGESTS: dict[str, str] = {}
DIRECTIVES = {
    # annotation_typing off: the sources are plain Python, and their annotations are for readers
    # and type checkers, not C types (Cython would otherwise check ``int`` arguments).
    "language_level": 3, "binding": True, "annotation_typing": False,
}


def _extensions() -> list[Extension]:
    modules = _compiled_modules()
    if not modules:
        return []
    from Cython.Build import cythonize

    # -g0: without debug info the modules take a quarter of the space (41 MB with it); perf
    # still names their functions.
    exts = [Extension(f"petasus.{layer}.{name}", [f"{layer}/{name}.py"],
                      extra_compile_args=["-g0"])
            for layer, name in modules]
    # Cython finds the .pxd that declares a module's C types (na/core.pxd beside na/core.py)
    # by the module's full name, petasus/na/core.pxd; the tree maps petasus.na to na/, so a
    # folder of links under build/ gives it that layout.
    include = os.path.join("build", "cython-include")
    os.makedirs(os.path.join(include, "petasus"), exist_ok=True)
    for layer in accel.LAYERS:
        link = os.path.join(include, "petasus", layer)
        if os.path.islink(link) and os.readlink(link) != os.path.abspath(layer):
            os.unlink(link)  # a link into another checkout (this one was moved or copied)
        if not os.path.islink(link):
            os.symlink(os.path.abspath(layer), link)
    for layer, name in modules:
        with open(f"{layer}/{name}.py", "rb") as f:
            _DIGESTS[f"petasus.{layer}.{name}"] = accel.source_hash(f.read())
    # Cython regenerates a module's C file when its source or a .pxd it sees is newer, but not
    # when a .pxd is deleted or the directives change: then every module is generated again.
    pxds = sorted(p for layer in accel.LAYERS for p in glob.glob(f"{layer}/*.pxd"))
    signature = repr((pxds, sorted(DIRECTIVES.items())))
    stamp = os.path.join("build", "cython", "signature")
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    try:
        with open(stamp, encoding="utf-8") as f:
            force = f.read() != signature
    except OSError:
        force = True
    built = cythonize(exts, build_dir="build/cython", include_path=[include], quiet=True,
                      nthreads=os.cpu_count() or 1, force=force,
                      compiler_directives=DIRECTIVES)
    with open(stamp, "w", encoding="utf-8") as f:
        f.write(signature)
    return built


class BuildExt(build_ext):
    """Builds in parallel, then writes each layer's manifest of the sources it compiled."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        super().run()
        manifests: dict[str, list[str]] = {}
        for name, digest in _DIGESTS.items():  # the modules _extensions() gave Cython
            folder = os.path.dirname(self.get_ext_fullpath(name))
            manifests.setdefault(folder, []).append(f"{name.rsplit('.', 1)[1]} {digest}")
        for folder, lines in manifests.items():
            with open(os.path.join(folder, accel.MANIFEST), "w", encoding="ascii") as f:
                f.write("\n".join(sorted(lines)) + "\n")


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
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    extras_require={
        # The tests run fuzz/'s harnesses for a bounded time (tests/test_fuzz.py), so the test
        # tools include the fuzzer; "fuzz" alone is for a machine that only fuzzes.
        # Cython: scripts/setup.sh compiles the edited modules again in place (na/accel.py).
        "test": ["pytest>=7", "hypothesis>=6", "ruff", "numpy", "Cython>=3.0", *FUZZ],
        "fuzz": FUZZ,
        "bench": ["Cython>=3.0", "grpcio", "pyzmq", "msgpack", "Pyro5", "redis", "hiredis",
                  "aio-msgpack-rpc",
                  "matplotlib", "uvloop", "py-spy"],
    },
)
