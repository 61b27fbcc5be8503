"""DVC: the prepared model and text are stage outputs of ``dvc.yaml``; a run reproduces that stage,
pushes to the default remote and records the md5 DVC gives each input (``gamma.hashing`` computes
the identical value where the project is not a DVC repository)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

PREPARE_STAGE = "prepare"


def dvc_root(start: str | Path = ".") -> Path | None:
    """The enclosing DVC repository whose dvc.yaml has a ``prepare`` stage, if any."""
    p = Path(start).resolve()
    for candidate in (p, *p.parents):
        if (candidate / ".dvc").is_dir() and (candidate / "dvc.yaml").is_file():
            stages = (yaml.safe_load((candidate / "dvc.yaml").read_text()) or {}).get("stages", {})
            return candidate if PREPARE_STAGE in stages else None
    return None


@contextmanager
def _venv_on_path():
    # dvc runs stage commands through the shell: make this interpreter's `gamma` the one it finds
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old


def reproduce_and_push(root: Path) -> dict:
    """``dvc repro prepare`` then ``dvc push``; returns the md5 of each stage output from dvc.lock."""
    from dvc.repo import Repo

    with _venv_on_path():
        repo = Repo(str(root))
        try:
            repo.reproduce(PREPARE_STAGE)
            pushed = repo.push()
        finally:
            repo.close()
    return {"outs": locked_outputs(root), "pushed": pushed}


def locked_outputs(root: Path, stage: str = PREPARE_STAGE) -> dict[str, str]:
    """``{path: md5}`` of a stage's outputs as recorded in dvc.lock."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = lock.get("stages", {}).get(stage, {}).get("outs", [])
    return {o["path"]: o["md5"] for o in outs}
