"""The maths modules stay plain torch/numpy: none of them imports Ray or LanceDB (directly, anywhere
in the module, function-level imports included), so they run and are tested without a cluster and
each Ray stage stays a thin adapter around them."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO

MATHS = ["gradients", "sketching", "distill", "codes", "metrics", "sampling", "ranking"]
OPTIONAL = ["cascade", "neardup"]  # maths modules that exist once their features land
FORBIDDEN = ("ray", "lancedb", "lance")


def imported_modules(source: str) -> set[str]:
    """Every module an `import` or `from ... import` statement names, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def forbidden(source: str) -> list[str]:
    return sorted(m for m in imported_modules(source) if m.split(".")[0] in FORBIDDEN)


def test_the_check_sees_every_import_form():
    src = (
        "import numpy as np\nimport ray.data\nfrom lancedb import connect\n"
        "def f():\n    import lance\n    from ray import train\n    from . import codes\n"
    )
    assert forbidden(src) == ["lance", "lancedb", "ray", "ray.data"]
    assert forbidden("import raylib\nfrom pipeline import ranking\n") == []


@pytest.mark.parametrize("name", MATHS + [m for m in OPTIONAL if (REPO / "pipeline" / f"{m}.py").exists()])
def test_maths_module_imports_no_ray_or_lancedb(name):
    path = REPO / "pipeline" / f"{name}.py"
    assert path.exists(), f"{path} is gone: update MATHS"
    assert forbidden(path.read_text()) == [], f"pipeline/{name}.py imports Ray/LanceDB"
