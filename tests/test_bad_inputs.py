"""A battery of bad inputs, each one command of the real command line in a fresh process on the
embedded setup with tiny settings: every one exits non-zero with one clear line that names the bad
value, never a Python traceback, and leaves nothing registered and no partial file behind."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT

TINY = {"text.calibration_sequences": 2, "text.sequence_length": 32, "stage1.steps": 1,
        "stage1.extra_budgets": "[]", "evaluation.max_tokens": 128, "evaluation.context_length": 32,
        "evaluation.zero_shot_items": 0}


def gamma(where, *argv, sets=None):
    settings = {**TINY, "output_dir": str(where / "out"), "tracking.uri": f"sqlite:///{where}/mlflow.db",
                **(sets or {})}
    params = [] if "--params" in argv else ["--params", str(where / "empty.yaml")]
    command = [sys.executable, "-m", "gamma.cli", *argv, *params,
               *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "COLUMNS": "400", "GAMMA_QUIET": "1"}
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    return run.returncode, run.stdout + run.stderr


@pytest.fixture(scope="module")
def where(tmp_path_factory, model_dir):
    """A learned score table on a short text (the too-short text is warned about), and bad files."""
    where = tmp_path_factory.mktemp("bad")
    (where / "empty.yaml").write_text("{}\n")
    text = where / "short.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(6)))
    sets = {"model.path": str(model_dir), "model.data_dir": str(where / "data"), "text.source": str(text)}
    code, out = gamma(where, "learn", sets=sets)
    assert code == 0, out
    assert "fewer than 2 sequences x 32" in " ".join(out.split())
    table = json.loads((where / "out" / "scores.json").read_text())
    assert any("the sequences overlap" in n for n in table["notes"])  # warned, and recorded with the table
    bad = {"garbage": "not json {", "list": "[1, 2]", "empty": "", "missing_keys": '{"modules": ["a"]}',
           "truncated": (where / "out" / "scores.json").read_text()[:200]}
    for name, content in bad.items():
        (where / f"{name}.json").write_text(content)
    (where / "fleet.yaml").write_text("classes:\n  - {name: a, memory_mb: 128}\n  - {name: a, memory_mb: 96}\n")
    truncated = where / "truncated-model"
    truncated.mkdir()
    for f in model_dir.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2] if f.suffix == ".safetensors"
                                         else f.read_bytes())
    (where / "empty-model").mkdir()
    return where, sets


CASES = {  # id: (arguments, settings, what the message names)
    "unparsable --set": (["learn"], {"stage1.steps": "[1"}, "stage1.steps"),
    "--set into a number": (["learn"], {"stage1.steps.x": 1}, "stage1.steps"),
    "--set into a list": (["learn"], {"candidates.x": 1}, "candidates"),
    "missing --params": (["learn", "--params", "no_such_params.yaml"], {}, "no_such_params.yaml"),
    "budget below the lowest width": (["allocate", "--budgets", "1.5"], {}, "1.5"),
    "budget above the highest width": (["allocate", "--budgets", "9"], {}, "9"),
    "nan budget": (["allocate", "--budgets", "nan"], {}, "'nan'"),
    "inf budget": (["allocate", "--budgets", "inf"], {}, "'inf'"),
    "empty budget list": (["allocate", "--budgets", ","], {}, "','"),
    "no budgets configured": (["allocate"], {"stage2.budgets": "[]"}, "stage2.budgets"),
    "group size dividing no width": (["allocate", "--budgets", "3"], {"quantizer.group_size": 100},
                                     "quantizer.group_size=100"),
    "promote with nothing registered": (["promote", "--alias", "production"], {}, "'production'"),
    "truncated safetensors": (["learn"], {"model.path": "{where}/truncated-model"}, "truncated-model"),
    "hub id": (["learn"], {"model.path": "HuggingFaceTB/SmolLM2-135M"}, "HuggingFaceTB/SmolLM2-135M"),
    "missing model path": (["learn"], {"model.path": "{where}/no-such-model"}, "no-such-model"),
    "empty model directory": (["learn"], {"model.path": "{where}/empty-model"}, "empty-model"),
    "binary text": (["prepare"], {"text.source": sys.executable, "model.data_dir": "{where}/data2"},
                    sys.executable),
    "sequences beyond the positions": (["learn"], {"text.sequence_length": 9000}, "text.sequence_length=9000"),
    "context beyond the positions": (["learn"], {"evaluation.context_length": 9000, "evaluation.max_tokens": 9000},
                                     "evaluation.context_length=9000"),
    "uniform width gamma has no kernel for": (["uniform", "--bits", "5"], {}, "--bits 5"),
    "unreachable tracking server": (["run", "--no-dvc"], {"tracking.uri": "http://127.0.0.1:9"}, "127.0.0.1:9"),
    "unknown tracking store": (["run", "--no-dvc"], {"tracking.uri": "foo://bar"}, "'foo'"),
    "repeated fleet class": (["rollout", "--fleet", "{where}/fleet.yaml"], {}, "'a'"),
    **{f"{kind} score table": (["allocate", "--budgets", "3", "--scores", f"{{where}}/{kind}.json"], {},
                               f"{kind}.json") for kind in ("garbage", "list", "empty", "missing_keys", "truncated")},
    **{f"{kind} assignment": (["quantize", "--assignment", f"{{where}}/{kind}.json"], {}, f"{kind}.json")
       for kind in ("garbage", "list", "empty", "missing_keys", "truncated")},
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_clear_line_and_changes_nothing(case, where):
    where, base = where
    argv, sets, named = CASES[case]
    fill = {"where": str(where)}
    argv = [a.format(**fill) for a in argv]
    sets = {**base, **{k: str(v).format(**fill) for k, v in sets.items()}}
    code, out = gamma(where, *argv, sets=sets)
    said = " ".join(out.split())
    assert code != 0, said[-600:]
    assert "Traceback" not in out, out[-3000:]
    assert named in said, said[-600:]
    registered = 0
    if (where / "mlflow.db").exists():
        with sqlite3.connect(where / "mlflow.db") as db:
            registered = db.execute("select count(*) from model_versions").fetchone()[0]
    assert registered == 0
    assert not list((where / "out").rglob("*.partial"))
