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
