"""Compiled modules and their pure-Python twins: which one an import loads.

setup.py compiles the modules of na/, hg/ and bulk/ (all but ``NOT_COMPILED``) with Cython from
their own, unchanged sources, and writes beside them a manifest, ``_compiled.txt``, of each
source's hash as it was compiled. The ``.py`` file stays the twin: the same code, run by the
interpreter. A ``.pxd`` beside a few of them (``na/core.pxd``) declares their per-message classes
as C types, whose fields are a struct's; the ``.py`` stays plain Python all the same.

Where both exist Python would load the compiled module; the finder installed here chooses:

- ``PETASUS_PUREPYTHON=1``: every module from its source (profilers see every line; CI runs the
  suite both ways, as msgpack's ``MSGPACK_PUREPYTHON`` does).
- a source that changed since it was compiled (an edit, a checkout): that module from its
  source, with a warning, never stale compiled code.
- otherwise the compiled module.

Why compile at all: the per-message path is pure Python spread evenly over ~50 calls a message
on each side, with no hot spot left to rewrite. Compiled, with its C types, the same code runs
16 sum() calls in flight over tcp at 147-163K/s against 115-128K/s from source, and the asyncio
window at 105-113K/s against 80-84K/s (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

LAYERS = ("na", "hg", "bulk")
MANIFEST = "_compiled.txt"
# Modules left to the interpreter: this one (it must run before any compiled module is chosen),
# the package inits, the plugin interface (typing Protocols only) and the conformance kit.
NOT_COMPILED = frozenset(("__init__", "accel", "interface", "testing"))


def pure_python() -> bool:
    """True when ``PETASUS_PUREPYTHON`` asks for every module from its source."""
    return os.environ.get("PETASUS_PUREPYTHON", "") not in ("", "0")


def source_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: str) -> dict[str, str]:
    """module name -> hash of the source it was compiled from; empty where nothing was."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    entries = {}
    for line in lines:
        name, _, digest = line.partition(" ")
        if name and digest:
            entries[name] = digest
    return entries


def choose(source: bytes | None, compiled_from: str | None, pure: bool) -> str:
    """``"compiled"``, ``"source"`` or ``"gone"``: what to load for a module, given its current
    source (None if missing), the hash its compiled twin was built from (None if none was) and
    whether pure Python was asked for. Every install ships the sources beside the compiled
    modules, so a compiled module without one is left over from a source since deleted."""
    if compiled_from is None:
        return "source"
    if source is None:
        return "gone"
    if pure or source_hash(source) != compiled_from:
        return "source"
    return "compiled"


class _Finder:
    """A meta-path finder for ``petasus.<layer>.<module>`` where a compiled twin exists."""

    def __init__(self) -> None:
        self.manifests: dict[str, dict[str, str]] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> Any:
        parts = fullname.split(".")
        if len(parts) != 3 or parts[0] != "petasus" or parts[1] not in LAYERS or not path:
            return None
        folder = path[0]
        manifest = self.manifests.get(folder)
        if manifest is None:
            manifest = self.manifests[folder] = read_manifest(folder)
        compiled_from = manifest.get(parts[2])
        if compiled_from is None:
            return None  # nothing compiled: the ordinary finders load the source
        filename = os.path.join(folder, parts[2] + ".py")
        try:
            with open(filename, "rb") as f:
                source: bytes | None = f.read()
        except OSError:
            source = None
        pure = pure_python()
        kind = choose(source, compiled_from, pure)
        if kind == "compiled":
            return None  # the ordinary finders prefer the extension module beside the source
        if kind == "gone":
            raise ModuleNotFoundError(f"No module named {fullname!r} (its source is gone; "
                                      "only a compiled module left over from it remains)",
                                      name=fullname)
        if not pure:
            warnings.warn(f"petasus: {filename} changed since it was compiled; running its "
                          "Python source (bash scripts/setup.sh compiles it again)",
                          RuntimeWarning, stacklevel=2)
        return importlib.util.spec_from_file_location(
            fullname, filename, loader=importlib.machinery.SourceFileLoader(fullname, filename))


_finder = _Finder()


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once), just ahead of the path-based finder whose
    choice it refines, and behind any hook installed before it (atheris wraps what the finders
    after its own return: the fuzzer instruments the sources this one hands out). Importing
    this module does it: ``petasus.na`` imports it first, and hg and bulk import ``petasus.na``
    before any module of their own."""
    if _finder in sys.meta_path:
        return
    for i, finder in enumerate(sys.meta_path):
        if finder is importlib.machinery.PathFinder:
            sys.meta_path.insert(i, _finder)
            return
    sys.meta_path.insert(0, _finder)


def loaded() -> dict[str, str]:
    """Each module that has a compiled twin, and which of the two this process loaded:
    ``{"petasus.na.core": "compiled", ...}``; empty where nothing was compiled."""
    out = {}
    for name, module in list(sys.modules.items()):
        parts = name.split(".")
        if module is not None and len(parts) == 3 and parts[0] == "petasus" and \
                parts[1] in LAYERS and \
                parts[2] in _finder.manifests.get(os.path.dirname(module.__file__ or ""), {}):
            suffix = os.path.splitext(module.__file__ or "")[1]
            out[name] = "source" if suffix == ".py" else "compiled"
    return out


install()
