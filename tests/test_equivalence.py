"""Issue 23's data path (block-streamed teacher, packed candidates, per-block GPTQ, weights in the
model's dtype) against the commit before it, dd5a73c: on the embedded model in float32 the same
score table (within 1e-4), the same Stage II assignments and the same exported tensors, bit for
bit, for RTN and GPTQ (``tests/reference_run.py``: learn, allocate, quantize on the command line).

The reference is produced on the machine that runs the test, by that commit's own code taken
from git history (floating-point results differ a little between CPUs, AVX-512 or not); a clone
without that history compares with ``tests/data/reference_dd5a73c.json``, produced the same way
on an AVX-512 Xeon."""

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", COMMIT, "gamma"], capture_output=True)
    if archive.returncode != 0:  # a shallow clone
        print(f"{COMMIT} is not in this clone's history: comparing with {COMMITTED.name}")
        return json.loads(COMMITTED.read_text())
    code, out = tmp_path_factory.mktemp("code"), tmp_path_factory.mktemp("ref") / "reference.json"
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(code, filter="data")
    env = {**os.environ, "PYTHONPATH": str(code)}  # that commit's gamma before this checkout's
    subprocess.run([sys.executable, str(ROOT / "tests" / "reference_run.py"), str(out)], env=env, check=True,
                   cwd=ROOT, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_streamed_data_path_gives_what_the_commit_before_it_gave(method, reference, tmp_path):
    ours, theirs = produce(method, tmp_path), reference[method]
    assert ours["modules"] == theirs["modules"]
    np.testing.assert_allclose(np.array(ours["scores"]), np.array(theirs["scores"]), rtol=1e-4, atol=1e-4)
    assert ours["assignments"] == theirs["assignments"]
    assert set(ours["tensors"]) == set(theirs["tensors"])
    differ = sorted(n for n in theirs["tensors"] if ours["tensors"][n] != theirs["tensors"][n])
    assert not differ, f"{len(differ)} of {len(theirs['tensors'])} exported tensors differ, e.g. {differ[:3]}"
