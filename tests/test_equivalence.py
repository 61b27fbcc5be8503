"""Issue 23's data path (block-streamed teacher, packed candidates, per-block GPTQ, weights in the
model's dtype) against the commit before it, dd5a73c: on the embedded model in float32 the same
score table (within 1e-4), the same Stage II assignments and the same exported tensors, bit for
bit, for RTN and GPTQ (``tests/reference_run.py``: learn, allocate, quantize on the command line,
on the embedded model's first blocks).

Floating-point results differ a little between CPUs (AVX-512 or not): the test compares first with
``tests/data/reference_dd5a73c.json`` (written by that commit's code on an AVX-512 Xeon) and, where
that differs, with that commit's own code taken from git history and run on this machine; a clone
without the history has only the committed reference."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import ROOT
from reference_run import produce

COMMIT = "dd5a73c"
COMMITTED = ROOT / "tests" / "data" / f"reference_{COMMIT}.json"


_RERUN: dict = {}


def rerun_reference(tmp_path_factory) -> dict | None:
    """dd5a73c's own figures on this machine (its code from git history), once per session."""
    if "figures" not in _RERUN:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", COMMIT, "gamma"], capture_output=True)
        if archive.returncode != 0:  # a shallow clone
            _RERUN["figures"] = None
            return None
        code, out = tmp_path_factory.mktemp("code"), tmp_path_factory.mktemp("ref") / "reference.json"
        tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(code, filter="data")
        env = {**os.environ, "PYTHONPATH": str(code)}  # that commit's gamma before this checkout's
        subprocess.run([sys.executable, str(ROOT / "tests" / "reference_run.py"), str(out)], env=env, check=True,
                       cwd=ROOT, capture_output=True)
        _RERUN["figures"] = json.loads(out.read_text())
    return _RERUN["figures"]


def differences(ours: dict, theirs: dict) -> list[str]:
    """What differs between two runs' figures, in words (empty: the same)."""
    if ours["modules"] != theirs["modules"]:
        return ["module lists"]
    found = []
    if not np.allclose(np.array(ours["scores"]), np.array(theirs["scores"]), rtol=1e-4, atol=1e-4):
        gap = np.abs(np.array(ours["scores"]) - np.array(theirs["scores"])).max()
        found.append(f"scores (largest difference {gap:.2e})")
    if ours["assignments"] != theirs["assignments"]:
        found.append("assignments")
    if set(ours["tensors"]) != set(theirs["tensors"]):
        found.append("the set of exported tensors")
    else:
        differ = sorted(n for n in theirs["tensors"] if ours["tensors"][n] != theirs["tensors"][n])
        if differ:
            found.append(f"{len(differ)} of {len(theirs['tensors'])} exported tensors, e.g. {differ[:3]}")
    return found


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_streamed_data_path_gives_what_the_commit_before_it_gave(method, model_dir, tmp_path, tmp_path_factory):
    ours = produce(method, tmp_path)
    found = differences(ours, json.loads(COMMITTED.read_text())[method])
    if found:
        print(f"differs from {COMMITTED.name} ({'; '.join(found)}): rerunning {COMMIT}'s code on this machine")
        rerun = rerun_reference(tmp_path_factory)
        if rerun is None:
            pytest.fail(f"{COMMIT} is not in this clone's history and {COMMITTED.name} differs: {found}")
        found = differences(ours, rerun[method])
    assert not found, f"differs from {COMMIT}'s own result on this machine: {'; '.join(found)}"
