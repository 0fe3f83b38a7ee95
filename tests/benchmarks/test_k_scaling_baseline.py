"""``benchmarks/k_scaling.py --baseline REV``: the engine it adds really runs REV's code.

The before/after ratio is only worth something if the "before" engine imports
``phds_serve`` from REV's tree and not from this checkout (the editable install
would win silently if the path order changed), and if the tree goes away after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
k_scaling = load_script("benchmarks/k_scaling.py")


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout


def test_baseline_tree_holds_the_revision_python_imports_from_it_and_it_is_removed(tmp_path):
    tree = k_scaling.baseline_tree("HEAD", tmp_path)
    try:
        assert (tree / "phds_serve" / "declared_k.py").read_text() == git("show", "HEAD:phds_serve/declared_k.py")
        imported = subprocess.run(
            [sys.executable, "-c", "import phds_serve; print(phds_serve.__file__)"],
            env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tmp_path,
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        assert Path(imported).resolve().is_relative_to(tree.resolve()), imported
    finally:
        k_scaling.remove_baseline_tree(tree)
    assert not tree.exists()
    assert str(tree) not in git("worktree", "list")


def test_an_entry_point_module_that_moved_since_the_revision_is_re_exported(tmp_path):
    rev = "a485ad4"  # the entry-point logits processor lived in step_k.py then
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}^{{commit}}"]).returncode:
        pytest.skip(f"{rev} not in this clone's history")
    tree = k_scaling.baseline_tree(rev, tmp_path)
    try:
        for moved, old_home in k_scaling.MOVED_ENTRY_POINTS:
            shim = (tree / moved).read_text()
            assert f"from {old_home} import DeclaredKLogitsProcessor" in shim
            old_file = tree / (old_home.replace(".", "/") + ".py")
            assert "class DeclaredKLogitsProcessor" in old_file.read_text()
    finally:
        k_scaling.remove_baseline_tree(tree)
