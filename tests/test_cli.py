import json

import numpy as np
import pytest

from gamma import cli
from gamma.scores import ScoreTable


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("prepare", "uniform", "learn", "allocate", "quantize", "run"):
        assert command in out


def test_bad_config_value_fails_before_work(tmp_path, capsys):
    assert cli.main(["allocate", "--params", str(tmp_path / "none.yaml"), "--set", "stage2.window=-1"]) == 2
    captured = capsys.readouterr()
    assert "stage2.window" in captured.out + captured.err


def test_allocate_reuses_scores_and_never_runs_stage1(tmp_path, monkeypatch, capsys):
    import gamma.stage1
    import gamma.steps

    def forbidden(*a, **k):
        raise AssertionError("Stage I must not run during allocation")

    monkeypatch.setattr(gamma.stage1, "learn_preferences", forbidden)
    monkeypatch.setattr(gamma.steps, "learn_preferences", forbidden)
    monkeypatch.setattr(gamma.steps, "learn_score_table", forbidden)
    rng = np.random.default_rng(0)
    modules = [f"model.layers.{i}.mlp.up_proj" for i in range(70)]
    table = ScoreTable(modules, [(1536, 576)] * 70, [2, 3, 4], np.log(rng.dirichlet([1, 1, 1], 70)).tolist(),
                       "m", "t", {"name": "rtn"}, 3.0, {}, 0, 0.0, 10.0, 0.0)
    table.save(tmp_path / "scores.json")
    code = cli.main(["allocate", "--params", str(tmp_path / "none.yaml"), "--set", f"output_dir={tmp_path}",
                     "--budgets", "2.25,2.5,3,1.5"])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "FAILED" in out and "1.5" in out  # the infeasible budget fails alone
    for b in ("2.25", "2.5", "3"):
        data = json.loads((tmp_path / "assignments" / f"{b}.json").read_text())
        assert data["status"] == "OPTIMAL" and data["bits_used"] <= float(b) + 1e-9
        assert (tmp_path / "assignments" / f"{b}.png").exists()
