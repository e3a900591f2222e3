"""Dependencies point down: cli -> demo, study -> stages -> library modules, never back up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ds2d2_cli"
LAYERS = [("cli",), ("demo", "study"), ("stages",)]  # top to bottom; everything else is the library below them


def _layer(module: str) -> int:
    """Index in LAYERS (0 = top), or len(LAYERS) for library modules."""
    parts = module.split(".")
    if parts[0] == "ds2d2_cli" and len(parts) > 1:
        for index, names in enumerate(LAYERS):
            if parts[1] in names:
                return index
    return len(LAYERS)


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("ds2d2_cli.")]


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_imports_a_layer_above_it(path):
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    own = _layer(".".join(relative.parts))
    upward = [name for name in _imports(path) if _layer(name) < own]
    assert not upward, f"{relative} (layer {own}) imports {upward} from above it"


def test_the_check_sees_the_layers():
    assert _layer("ds2d2_cli.stages.distill") == 2 and _layer("ds2d2_cli.demo") == 1 == _layer("ds2d2_cli.study")
    assert _layer("ds2d2_cli.cli.app") == 0 and _layer("ds2d2_cli.predict") == 3
    assert "ds2d2_cli.stages.common" in _imports(PACKAGE / "stages" / "distill.py")
