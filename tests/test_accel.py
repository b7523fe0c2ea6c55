"""The compiled modules and their pure-Python twins (na/accel.py): which one an import loads."""

from __future__ import annotations

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
    assert accel.choose(None, built, pure=False) == "compiled"  # shipped without its source


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
