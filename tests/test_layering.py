"""The layering the design promises, read off the source: the library (shared/) never imports Ray, the operator
(operators/) imports neither Ray nor torch (nor anything of ray_jobs/), and shared/ imports nothing of ray_jobs/ or
operators/. Every import counts, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

RULES = {
    "shared": ("ray", "ray_jobs", "operators"),
    "operators": ("ray", "torch", "ray_jobs", "transformers", "diffusers"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(RULES))
def test_a_package_never_imports_what_it_must_not(package):
    forbidden = RULES[package]
    offenders = []
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        for module in imported_modules(path):
            if module.split(".")[0] in forbidden:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offenders == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import ray.data\n    from torch import nn\n")
    assert imported_modules(source) == {"ray.data", "torch"}


def test_the_operator_loads_without_ray_or_torch():
    """What the operator's process actually loads (through shared/ too): nothing heavy."""
    import subprocess
    import sys

    code = ("import sys, operators.main, operators.handlers; "
            "print(sorted(m for m in ('ray', 'torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
