"""The compiled modules and their pure-Python twins (na/accel.py): which one an import loads."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from petasus.na import accel

ROOT = Path(__file__).resolve().parent.parent
COMPILED = {layer: accel.read_manifest(str(ROOT / layer)) for layer in accel.LAYERS}
# scripts/test.sh sets PETASUS_EXPECT_COMPILED for its compiled run: there a tree with nothing
# compiled is a failed build, not a reason to skip (the run would be a second pure one).
if os.environ.get("PETASUS_EXPECT_COMPILED") and not any(COMPILED.values()):
    raise RuntimeError("PETASUS_EXPECT_COMPILED is set, but nothing in this tree is compiled")
needs_build = pytest.mark.skipif(
    not any(COMPILED.values()),
    reason="nothing is compiled in this tree (installed without Cython, or with "
           "PETASUS_PUREPYTHON set at install time)")

PROBE = ("import json, petasus.hg, petasus.bulk, petasus.na, petasus.na.tcp, petasus.na.sm; "
         "print(json.dumps(petasus.na.accel.loaded()))")


def test_choose_loads_a_compiled_module_only_from_the_source_it_was_built_from() -> None:
    src = b"x = 1\n"
    built = accel.source_hash(src)
    assert accel.choose(src, built, pure=False) == "compiled"
    assert accel.choose(src, built, pure=True) == "source"
    assert accel.choose(b"x = 2\n", built, pure=False) == "source"  # edited since
    assert accel.choose(src, None, pure=False) == "source"  # never compiled
    assert accel.choose(None, built, pure=False) == "gone"  # left over from a deleted source


def test_a_manifest_maps_modules_to_source_hashes(tmp_path: Path) -> None:
    assert accel.read_manifest(str(tmp_path)) == {}
    (tmp_path / accel.MANIFEST).write_text("core abc\nframing def\n\nbroken\n")
    assert accel.read_manifest(str(tmp_path)) == {"core": "abc", "framing": "def"}


def _loaded(env: dict[str, str], path: Path | None = None) -> tuple[dict[str, str], str]:
    env = {**os.environ, **env}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    done = subprocess.run([sys.executable, "-W", "always", "-c", PROBE], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout), done.stderr


@needs_build
def test_every_compiled_module_is_loaded_compiled_unless_pure_python_is_asked() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PETASUS_PUREPYTHON"}
    compiled, _ = _loaded({**env, "PETASUS_PUREPYTHON": "0"})
    expected = {f"petasus.{layer}.{name}" for layer, names in COMPILED.items()
                for name in names}
    hot = {"petasus.na.core", "petasus.na.framing", "petasus.hg.origin", "petasus.hg.target"}
    assert hot <= set(compiled) <= expected
    assert set(compiled.values()) == {"compiled"}
    pure, _ = _loaded({"PETASUS_PUREPYTHON": "1"})
    assert set(pure) == set(compiled)
    assert set(pure.values()) == {"source"}


@needs_build
def test_an_edited_source_runs_as_source_with_a_warning(tmp_path: Path) -> None:
    # A copy of the layers, compiled modules included, where one source has changed.
    for layer in accel.LAYERS:
        shutil.copytree(ROOT / layer, tmp_path / "petasus" / layer,
                        ignore=shutil.ignore_patterns("__pycache__"))
    core = tmp_path / "petasus" / "na" / "core.py"
    core.write_text(core.read_text() + "\n# edited after the build\n")
    loaded, stderr = _loaded({"PETASUS_PUREPYTHON": "0"}, tmp_path)
    assert loaded["petasus.na.core"] == "source"
    assert loaded["petasus.na.framing"] == "compiled"
    assert "core.py changed since it was compiled" in stderr
    # A source deleted since (a checkout): its compiled module, left behind, is not imported.
    (tmp_path / "petasus" / "na" / "_pinning.py").unlink()
    probe = "import petasus.na._pinning"
    gone = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          timeout=60)
    assert gone.returncode != 0
    assert "ModuleNotFoundError" in gone.stderr and "its source is gone" in gone.stderr


def _pxd_classes(path: Path) -> dict[str, set[str]]:
    """class -> the fields a .pxd declares for it (``cdef ... a, b`` lines under
    ``cdef class X:``)."""
    classes: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0].rstrip()
        if code.startswith("cdef class "):
            current = classes.setdefault(code[len("cdef class "):].rstrip(":").strip(), set())
        elif code.startswith("    cdef ") and current is not None:
            words = code.split(None, 1)[1].replace(",", " ").split()
            current.update(w for w in words if w not in ("public", "readonly", "object", "dict"))
    return classes


def _py_class(path: Path, name: str) -> tuple[set[str] | None, set[str]]:
    """(its __slots__, or None; every ``self.x`` it assigns) for class ``name`` in ``path``."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            slots = None
            assigned = set()
            for sub in ast.walk(node):
                if isinstance(sub, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "__slots__" for t in sub.targets):
                    slots = set(ast.literal_eval(sub.value))
                targets = sub.targets if isinstance(sub, ast.Assign) else \
                    [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else []
                for target in targets:
                    for e in ast.walk(target):
                        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) \
                                and e.value.id == "self":
                            assigned.add(e.attr)
            return slots, assigned
    raise AssertionError(f"{path.name} defines no class {name}")


PXDS = sorted(p for layer in accel.LAYERS for p in (ROOT / layer).glob("*.pxd"))


@pytest.mark.parametrize("pxd", PXDS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_pxd_declares_exactly_the_fields_its_class_has(pxd: Path) -> None:
    """A field the source gains but its .pxd lacks would fail only where compiled; a class
    declared with a __dict__ (one without __slots__ in its source) still takes any field, but
    its .pxd lists every one its methods set, so that they are the struct's."""
    source = pxd.with_suffix(".py")
    for name, fields in _pxd_classes(pxd).items():
        slots, assigned = _py_class(source, name)
        if slots is not None:
            assert fields == slots, f"{pxd.name} {name}: {sorted(fields ^ slots)}"
        else:
            assert {"__dict__", "__weakref__"} <= fields, f"{pxd.name} {name}"
            missing = assigned - fields
            assert not missing, f"{pxd.name} {name} does not declare {sorted(missing)}"


C_TYPES = ("import json, importlib, sys, petasus.na.tcp, petasus.na.sm, petasus.hg, petasus.bulk\n"
           "out = {}\n"
           "for module, name in json.loads(sys.argv[1]):\n"
           "    cls = getattr(importlib.import_module(module), name)\n"
           "    out[name] = [not cls.__flags__ & (1 << 9),\n"
           "                 sorted(k for k, v in vars(cls).items()\n"
           "                        if type(v).__name__ == 'getset_descriptor')]\n"
           "print(json.dumps(out))")


@needs_build
def test_each_pxd_class_is_a_c_type_when_compiled() -> None:
    """A .pxd Cython did not see (a broken include path) compiles its class as a plain one:
    everything passes, slower. Compiled, each declared class is a static type whose fields
    are its own descriptors."""
    wanted = {}
    for pxd in PXDS:
        for name, fields in _pxd_classes(pxd).items():
            wanted[name] = (f"petasus.{pxd.parent.name}.{pxd.stem}", fields)
    env = {**os.environ, "PETASUS_PUREPYTHON": "0"}
    done = subprocess.run(
        [sys.executable, "-c", C_TYPES, json.dumps([[m, n] for n, (m, _) in wanted.items()])],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    for name, (static, descriptors) in json.loads(done.stdout).items():
        assert static, f"{name} is not a C type"
        fields = wanted[name][1] - {"__dict__", "__weakref__"}
        assert fields <= set(descriptors), f"{name}: {sorted(fields - set(descriptors))}"
