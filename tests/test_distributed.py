"""Stage I data-parallel: 2 real CPU processes (accelerate launch, gloo) against 1."""

import json

import numpy as np
import yaml
from conftest import DATA

from gamma.config import load_config
from gamma.run.tables import learn_table, project_budget
from gamma.run.workspace import Workspace
from gamma.stage1.data_parallel import launch_command, launch_stage1
from gamma.stage2.scores import ScoreTable


def _params(tmp_path, model_dir, **model):
    params = {
        "model": {"path": str(model_dir), "data_dir": str(DATA), **model},
        "text": {"calibration_sequences": 4, "sequence_length": 64},
        "stage1": {"steps": 4, "sequences_per_step": 4, "tokens_per_sequence": 32, "processes": 2, "extra_budgets": []},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_two_processes_learn_the_same_table_as_one(tmp_path, model_dir, monkeypatch):
    monkeypatch.delenv("GAMMA_QUIET", raising=False)  # let the workers report progress
    params = _params(tmp_path, model_dir)
    lines = []
    path = launch_stage1(params, tmp_path / "two.json", 2, on_line=lines.append)
    two = ScoreTable.load(path)
    ranks = [json.loads((tmp_path / f"two.json.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and "MULTI_CPU" in ranks[0]["distributed_type"]
    assert any("Stage I" in line for line in lines)  # the main process's progress reached us

    cfg = load_config(params)
    one = learn_table(Workspace(cfg))
    assert two.settings == one.settings and two.modules == one.modules
    # float summation order differs (2 x 2 sequences vs 4); Adam's normalisation amplifies it a little
    np.testing.assert_allclose(np.asarray(two.scores), np.asarray(one.scores), rtol=1e-3, atol=1e-3)
    a1, a2 = (project_budget([t], 2.5, cfg) for t in (one, two))
    assert a1.assignment == a2.assignment


def test_launch_command_runs_real_processes_not_one():
    cmd = launch_command("p.yaml", "s.json", 4)
    assert cmd[1:3] == ["launch", "--multi_gpu"] and "--cpu" not in cmd  # --cpu silently runs one process
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-6:] == ["gamma.cli", "learn", "--params", "p.yaml", "--out", "s.json"]
