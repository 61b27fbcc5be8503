"""Data files that ship inside installed packages (the embedded model, text and zero-shot tasks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(module: str, install: str, error: type[Exception]) -> Path:
    """The folder of an installed package; ``error`` naming the pip command when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise error(f"'{module}' is not installed: pip install --no-deps {install}")
    return Path(list(spec.submodule_search_locations)[0])
