"""Load a script of the repo (a benchmark, a deploy generator) as a module, for the tests that call its functions.

The scripts are files, not packages on the path: ``benchmarks/brownout.py`` is run as a program and has no
importable name. Each load is a fresh module (its globals are its own), registered in ``sys.modules`` under
``name`` because dataclasses look their module up there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path | str, name: str | None = None) -> ModuleType:
    """The script at ``path`` (relative to the repo unless absolute), executed as a module named ``name``
    (the file's stem by default)."""
    path = REPO / path
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
