"""The layers' type hints (README, "How it is built"). lint-imports checks what runs; it leaves
out imports made only for type checking, so this test reads those: below runtime.py, only the
data path may name a module above its own layer (the compiled `Proxy` it reads per request);
control/ and admin/ name what they need as Protocols."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import proxy

PACKAGE = Path(proxy.__file__).parent
PYPROJECT = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
# From the top down: the layers contract lint-imports checks.
LAYERS = PYPROJECT["tool"]["importlinter"]["contracts"][0]["layers"]
ALLOWED = {("proxy.http.server", "proxy.runtime"), ("proxy.http.h2front", "proxy.runtime")}


def layer(module: str) -> int | None:
    """Its layer's rank from the top; None outside the layers (exits.py, native.py...)."""
    for rank, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            return rank
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("proxy.")}


def test_no_type_hint_reaches_up_a_layer_but_the_data_paths() -> None:
    upward = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        rank = layer(module)
        if rank is None:
            continue
        for target in imported(ast.parse(path.read_text())):
            above = layer(target)
            if above is not None and above < rank:
                upward.add((module, target))
    assert upward == ALLOWED
