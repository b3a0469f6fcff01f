"""The layering holds: the conductor runs without torch, and the import contracts can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pantry", "kvstore", "engine", "prefill", "decode", "conductor", "connectors")

IMPORT_ALL_CONDUCTOR = """
import importlib, pkgutil, sys
import conductor
names = sorted(m.name for m in pkgutil.walk_packages(conductor.__path__, "conductor."))
for name in names:
    importlib.import_module(name)
runtime = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "safetensors", "triton"))
print(len(names), runtime)
"""


def test_conductor_imports_no_torch() -> None:
    res = subprocess.run([sys.executable, "-c", IMPORT_ALL_CONDUCTOR], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    count, runtime = res.stdout.split(" ", 1)
    assert int(count) == len(list((ROOT / "conductor").glob("*.py"))) - 1  # all but __init__
    assert runtime.strip() == "[]"


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "repo"
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_contracts_are_kept_and_an_upward_import_breaks_them(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    kept = _lint_imports(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "Contracts: 4 kept, 0 broken." in kept.stdout
    # The pool reaching up into an engine, and the conductor into torch: both must be refused.
    errors = tree / "kvstore" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport engine.sampling  # noqa\n")
    broken = _lint_imports(tree)
    assert broken.returncode == 1
    assert "Contracts: 2 kept, 2 broken." in broken.stdout
    assert "kvstore.errors -> engine.sampling" in broken.stdout
