"""Each layer imports only the public API of the layers below it (DESIGN.md, Layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# hg sits on bulk: bulk handles are an RPC argument type, and overflowing inputs and outputs
# travel through bulk transfers (DESIGN.md: hg "uses na, bulk handles as a proc type").
BELOW = {"na": set(), "hg": {"na", "bulk"}, "bulk": {"na"}, "store": {"hg", "bulk"}}


def imported_layers(path: Path, root: Path = ROOT) -> set[tuple[str, str]]:
    """(layer, full module) for every petasus import in a file, relative ones resolved."""
    found = set()
    package = path.parent.relative_to(root).parts
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join(("petasus", *base, node.module or ""))]
                if base and base[0] != package[0]:
                    names = [f"petasus.{base[0]}"]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "petasus" and len(parts) > 1:
                found.add((parts[1], name))
    return found


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_layer_imports_only_what_is_below(layer: str) -> None:
    for path in sorted((ROOT / layer).rglob("*.py")):
        for other, module in imported_layers(path):
            if other == layer:
                continue
            assert other in BELOW[layer], f"{path.relative_to(ROOT)} imports {module}"
            private = [p for p in module.split(".")[2:] if p.startswith("_")]
            assert not private, f"{path.relative_to(ROOT)} uses private {module}"


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    (tmp_path / "na").mkdir()
    sample = tmp_path / "na" / "probe.py"
    sample.write_text("from petasus.hg import Engine\nfrom ..bulk import Bulk\nfrom . import tcp\n")
    assert {layer for layer, _ in imported_layers(sample, tmp_path)} == {"hg", "bulk", "na"}


def module_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every petasus module a file imports, type-only imports included, relative ones
    resolved (``from . import x`` counts as importing ``x``)."""
    parts = path.relative_to(root).with_suffix("").parts
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(["petasus", *base, *([node.module] if node.module else [])]) \
                if node.level else (node.module or "")
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("petasus.")}


def test_no_import_cycles() -> None:
    # Type-only imports count: a cycle through TYPE_CHECKING is two modules that cannot be
    # read apart (as na/_sockets.py and na/_rma.py once were).
    modules = {}
    for layer in BELOW:
        for path in (ROOT / layer).rglob("*.py"):
            if path.name != "__init__.py":
                rel = path.relative_to(ROOT).with_suffix("").parts
                modules["petasus." + ".".join(rel)] = path
    graph = {name: module_imports(path, ROOT) & modules.keys() for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            cycle = [*stack[stack.index(name):], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_cycle_check_sees_a_type_only_cycle(tmp_path: Path) -> None:
    (tmp_path / "na").mkdir()
    (tmp_path / "na" / "a.py").write_text("from typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from .b import B\n")
    assert "petasus.na.b.B" in module_imports(tmp_path / "na" / "a.py", tmp_path)
