"""DVC: every input a run reads is versioned. The project's ``prepare`` stage (the embedded model
and text in this repository, a user's corpus split in theirs) is reproduced and pushed when the run
reads everything it produces; every other input the run reads (a user's model directory, a user's
text and its prepared split) is a dependency of the stage ``inputs``, which DVC hashes into
dvc.lock. The md5 DVC gives each input is recorded with the run (``gamma.hashing`` computes the
identical value where the project is not a DVC repository)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

PREPARE_STAGE = "prepare"
INPUTS_STAGE = "inputs"
INPUTS_CMD = "echo 'the inputs of the last gamma run: DVC hashes them, gamma records the md5'"


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


def produced_by_prepare(root: Path, reads: list[Path]) -> set[Path]:
    """The outputs of the ``prepare`` stage, if the run reads every one of them (resolved paths);
    otherwise nothing: that stage is not the one this run's inputs come from."""
    declared = _declared_outputs(root)
    return declared if declared and declared <= {p.resolve() for p in reads} else set()


def hash_inputs(root: Path, paths: list[Path]) -> dict[str, str]:
    """``paths`` as the deps of stage ``inputs`` (relative inside the repository, absolute outside);
    DVC hashes them into dvc.lock without running anything. Returns ``{path: md5}``."""
    from dvc.repo import Repo

    deps = [_relative(root, p) for p in paths]
    repo = Repo(str(root))
    try:
        repo.stage.add(name=INPUTS_STAGE, deps=deps, cmd=INPUTS_CMD, force=True)
        repo.commit(INPUTS_STAGE, force=True)
    finally:
        repo.close()
    return _locked(root, INPUTS_STAGE, "deps")


def _relative(root: Path, path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(root.resolve())) if path.is_relative_to(root.resolve()) else str(path)


def _declared_outputs(root: Path) -> set[Path]:
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    outs = stages.get(PREPARE_STAGE, {}).get("outs", [])
    return {(root / (next(iter(o)) if isinstance(o, dict) else o)).resolve() for o in outs}


def locked_outputs(root: Path, stage: str = PREPARE_STAGE) -> dict[str, str]:
    """``{path: md5}`` of a stage's outputs as recorded in dvc.lock."""
    return _locked(root, stage, "outs")


def _locked(root: Path, stage: str, kind: str) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock.get("stages", {}).get(stage, {}).get(kind, [])}
