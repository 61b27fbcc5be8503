import json

import numpy as np
import pytest
from conftest import defaults

from gamma import cli
from gamma.stage2.scores import ScoreTable


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("prepare", "uniform", "learn", "allocate", "quantize", "run", "promote"):
        assert command in out


def test_bad_config_value_fails_before_work(tmp_path, capsys):
    assert cli.main(["allocate", "--params", str(defaults(tmp_path)), "--set", "stage2.window=-1"]) == 2
    captured = capsys.readouterr()
    assert "stage2.window" in captured.out + captured.err


def test_allocate_reuses_scores_and_never_runs_stage1(tmp_path, monkeypatch, capsys, model_and_tokenizer):
    import gamma.run.tables
    import gamma.stage1.learn
    import gamma.stage1.loop

    def forbidden(*a, **k):
        raise AssertionError("Stage I must not run during allocation")

    monkeypatch.setattr(gamma.stage1.loop, "learn_preferences", forbidden)
    monkeypatch.setattr(gamma.stage1.learn, "learn_preferences", forbidden)
    monkeypatch.setattr(gamma.run.tables, "learn_score_table", forbidden)
    from gamma.config import load_config
    from gamma.run.workspace import Workspace

    ws = Workspace(load_config(tmp_path / "none.yaml"))
    modules, sizes = ws.module_sizes(model_and_tokenizer[0])
    rng = np.random.default_rng(0)
    scores = np.log(rng.dirichlet([1, 1, 1], len(modules))).tolist()
    foreign = ScoreTable(modules[:-1], sizes[:-1], [2, 3, 4], scores[:-1], ws.model_hash, "t", {"name": "rtn"}, 3.0,
                         {}, 0, 0.0, 10.0, 0.0)
    foreign.save(tmp_path / "foreign.json")
    code = cli.main(["allocate", "--params", str(defaults(tmp_path)), "--scores", str(tmp_path / "foreign.json"),
                     "--set", f"output_dir={tmp_path}", "--budgets", "2.5"])
    captured = capsys.readouterr()
    assert code == 2 and "different module set" in captured.out + captured.err  # refused, clearly
    table = ScoreTable(modules, sizes, [2, 3, 4], scores, ws.model_hash, "t", {"name": "rtn"}, 3.0, {}, 0, 0.0,
                       10.0, 0.0)
    table.save(tmp_path / "scores.json")
    code = cli.main(["allocate", "--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}",
                     "--budgets", "2.25,2.5,3,1.5"])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "FAILED" in out and "1.5" in out  # the infeasible budget fails alone
    for b in ("2.25", "2.5", "3"):
        data = json.loads((tmp_path / "assignments" / f"{b}.json").read_text())
        assert data["status"] == "OPTIMAL" and data["bits_used"] <= float(b) + 1e-9
        assert (tmp_path / "assignments" / f"{b}.png").exists()
    # A second table, learned at 3.5 bits (stage1.extra_budgets): budgets nearer 3.5 come from it, transparently.
    rng2 = np.random.default_rng(1)
    other = ScoreTable(modules, sizes, [2, 3, 4], np.log(rng2.dirichlet([1, 1, 1], len(modules))).tolist(),
                       ws.model_hash, "t", {"name": "rtn"}, 3.5, {}, 0, 0.0, 10.0, 0.0)
    other.save(tmp_path / "stage1-3.5" / "scores.json")
    code = cli.main(["allocate", "--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}",
                     "--set", "stage1.extra_budgets=[3.5]", "--budgets", "3,3.25,3.5"])
    assert code == 0
    learned_at = {b: json.loads((tmp_path / "assignments" / f"{b}.json").read_text())["training_budget"]
                  for b in ("3", "3.25", "3.5")}
    assert learned_at == {"3": 3.0, "3.25": 3.5, "3.5": 3.5}  # nearest; a tie goes to the higher table
    from gamma.config import Stage2Config
    from gamma.stage2.projection import project
    from gamma.stage2.scores import Scores

    direct = project(Scores(modules, sizes, [2, 3, 4], np.asarray(other.scores)), 3.5, Stage2Config())
    assert json.loads((tmp_path / "assignments" / "3.5.json").read_text())["assignment"] == direct.assignment


def test_allocate_with_another_allocator_quantizes_and_evaluates(tmp_path, capsys):
    base = ["allocate", "--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}",
            "--set", "text.calibration_sequences=2", "--set", "text.sequence_length=64",
            "--set", "evaluation.max_tokens=512", "--set", "evaluation.context_length=256",
            "--set", "evaluation.zero_shot_items=0"]
    assert cli.main([*base, "--allocator", "hawk", "--budgets", "3"]) == 2
    captured = capsys.readouterr()
    assert "unknown allocator 'hawk'" in captured.out + captured.err
    assert cli.main([*base, "--allocator", "hawq", "--budgets", "3,1.5"]) == 0
    captured = capsys.readouterr()
    assert "1.5 bits is outside" in captured.out + captured.err  # fails alone
    data = json.loads((tmp_path / "assignments" / "hawq-3.json").read_text())
    assert data["allocator"] == "hawq" and data["avg_bits"] <= 3.0
    from gamma.model.export import load_checkpoint
    from gamma.model.loading import quantizable_modules

    model, _ = load_checkpoint(tmp_path / "models" / "hawq-3")  # a real compressed-tensors checkpoint
    widths = {m: len(w.weight.unique()) for m, w in quantizable_modules(model).items()}
    assert max(widths.values()) > 8  # dequantized groups at 2-4 bits: a few levels per group, many groups


def test_learn_gives_the_band_its_tables_from_one_teacher_capture(tmp_path, monkeypatch):
    """``stage1.extra_budgets``: one table per training budget, every one learned on the same
    problem and teacher capture (an 8B model's capture is the expensive part of Stage I)."""
    import gamma.problem

    captures = []
    capture = gamma.problem.capture_teacher
    monkeypatch.setattr(gamma.problem, "capture_teacher", lambda *a, **k: captures.append(1) or capture(*a, **k))
    code = cli.main(["learn", "--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}",
                     "--set", "text.calibration_sequences=2", "--set", "text.sequence_length=64",
                     "--set", "stage1.steps=1", "--set", "stage1.extra_budgets=[2.75]"])
    assert code == 0 and len(captures) == 1
    budgets = {ScoreTable.load(p).training_budget for p in (tmp_path / "scores.json",
                                                            tmp_path / "stage1-2.75" / "scores.json")}
    assert budgets == {3.0, 2.75}


@pytest.mark.parametrize("budgets", [",", "nan", "inf", "x"])
def test_a_budget_list_that_is_no_list_of_numbers_is_refused_by_value(tmp_path, capsys, budgets):
    code = cli.main(["allocate", "--params", str(defaults(tmp_path)), "--budgets", budgets])
    assert code == 2 and repr(budgets) in "".join(capsys.readouterr())


def test_an_empty_budget_list_is_a_configuration_error(tmp_path, capsys):
    code = cli.main(["allocate", "--params", str(defaults(tmp_path)), "--set", "stage2.budgets=[]"])
    assert code == 2 and "stage2.budgets" in "".join(capsys.readouterr())


def test_allocate_exits_non_zero_when_every_budget_failed(tmp_path, capsys, model_and_tokenizer):
    from gamma.config import load_config
    from gamma.run.workspace import Workspace

    ws = Workspace(load_config(tmp_path / "none.yaml"))
    modules, sizes = ws.module_sizes(model_and_tokenizer[0])
    scores = np.log(np.random.default_rng(0).dirichlet([1, 1, 1], len(modules))).tolist()
    ScoreTable(modules, sizes, [2, 3, 4], scores, ws.model_hash, "t", {"name": "rtn"}, 3.0, {}, 0, 0.0, 10.0,
               0.0).save(tmp_path / "scores.json")
    code = cli.main(["allocate", "--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}",
                     "--budgets", "1.5,9"])
    out = "".join(capsys.readouterr())
    assert code == 1 and "no budget could be allocated (1.5, 9)" in out and out.count("FAILED") == 2
    assert not list((tmp_path / "assignments").glob("*.json"))


BAD_JSON = {"garbage": "not json at all", "truncated": '{"modules": ["a"], "sizes"', "list": "[1, 2, 3]",
            "missing": '{"modules": ["a"]}', "empty": ""}


@pytest.mark.parametrize("kind", sorted(BAD_JSON))
def test_a_broken_score_table_or_assignment_is_one_clear_line(tmp_path, capsys, kind):
    bad = tmp_path / f"{kind}.json"
    bad.write_text(BAD_JSON[kind])
    for argv in (["allocate", "--scores", str(bad)], ["quantize", "--assignment", str(bad)]):
        code = cli.main([*argv, "--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}"])
        out = "".join(capsys.readouterr())
        assert code == 2 and str(bad) in out.replace("\n", "") and "Traceback" not in out, (argv, out)


def test_a_params_file_that_is_not_there_is_refused_not_replaced_by_defaults(tmp_path, capsys):
    code = cli.main(["allocate", "--params", str(tmp_path / "no_such_params.yaml")])
    assert code == 2 and "no_such_params.yaml: no such file" in "".join(capsys.readouterr())


def test_a_killed_learn_process_resumes_to_the_uninterrupted_table(tmp_path):
    """SIGKILL a real `gamma learn` after its first checkpoint: the rerun says where it resumed and
    ends with the table an uninterrupted run learns (scores, multiplier and history)."""
    import os
    import signal
    import subprocess
    import time

    from gamma.config import command_line

    sets = {"text.calibration_sequences": 2, "text.sequence_length": 64, "stage1.steps": 12,
            "stage1.tokens_per_sequence": 32, "stage1.checkpoint_every": 1, "stage1.extra_budgets": []}
    params = str(defaults(tmp_path))
    subprocess.run(command_line("learn", {**sets, "output_dir": str(tmp_path / "full")}, "--params", params),
                   check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command_line("learn", {**sets, "output_dir": str(killed)}, "--params", params),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "stage1.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "scores.json").exists()  # killed mid-run
    rerun = subprocess.run(command_line("learn", {**sets, "output_dir": str(killed)}, "--params", params),
                           check=True, capture_output=True, text=True)
    assert "resumed from step" in rerun.stdout + rerun.stderr
    full, resumed = (ScoreTable.load(tmp_path / d / "scores.json") for d in ("full", "killed"))
    np.testing.assert_allclose(resumed.array(), full.array(), rtol=0, atol=1e-6)
    assert resumed.multiplier == pytest.approx(full.multiplier) and resumed.history["loss"] == pytest.approx(
        full.history["loss"])


@pytest.mark.parametrize("command", [["learn"], ["allocate", "--allocator", "hawq", "--budgets", "3"]])
def test_a_group_size_that_divides_no_width_is_refused_before_the_model_loads(command, tmp_path, monkeypatch,
                                                                              capsys):
    import gamma.run.workspace

    loads = []
    monkeypatch.setattr(gamma.run.workspace, "load_model", lambda *a, **k: loads.append(1))
    code = cli.main([*command, "--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}",
                     "--set", "quantizer.group_size=100"])
    out = " ".join("".join(capsys.readouterr()).split())
    assert code == 2 and not loads
    assert "quantizer.group_size=100 does not divide" in out and "down_proj (intermediate size): 1536" in out
    assert "(32, 64)" in out
