"""Benchmark results: a rerun replaces only the rows it recomputed, every row says the commit it was
measured at, and no two rows of a file share a key."""

import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_a_rerun_replaces_only_the_rows_it_recomputed(tmp_path, monkeypatch):
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "commit", lambda: "aaaaaaa")
    common.write_results("x", {}, [{"m": "a", "b": 1, "ppl": 10.0}, {"m": "a", "b": 2, "ppl": 8.0}], ("m", "b"))
    monkeypatch.setattr(common, "commit", lambda: "bbbbbbb")
    common.write_results("x", {"s": 1}, [{"m": "a", "b": 2, "ppl": 7.5}, {"m": "c", "b": 2, "ppl": 9.0}], ("m", "b"))
    rows = {(r["m"], r["b"]): r for r in json.loads((tmp_path / "x.json").read_text())["rows"]}
    assert {k: (r["ppl"], r["commit"]) for k, r in rows.items()} == {
        ("a", 1): (10.0, "aaaaaaa"), ("a", 2): (7.5, "bbbbbbb"), ("c", 2): (9.0, "bbbbbbb")}
    for ppl in (5.0, 4.0):  # a list in the key: read back as a list, still the same row
        common.write_results("y", {}, [{"m": "a", "b": [3.0, 3.5], "ppl": ppl}], ("m", "b"))
    assert [r["ppl"] for r in json.loads((tmp_path / "y.json").read_text())["rows"]] == [4.0]


def _keys() -> dict[str, tuple]:
    """Each benchmark's results name -> the key it writes with (read from its source)."""
    keys = {}
    for script in (ROOT / "benchmarks").glob("*.py"):
        tree = ast.parse(script.read_text())
        consts = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name)}
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "write_results":
                key = call.args[3] if len(call.args) > 3 else next(k.value for k in call.keywords if k.arg == "key")
                first = call.args[0]
                name = (first.value if isinstance(first, ast.Constant) else
                        ast.literal_eval(consts[first.id]) if isinstance(first, ast.Name) and first.id in consts
                        else script.stem)
                keys[name] = ast.literal_eval(consts[key.id] if isinstance(key, ast.Name) else key)
    return keys


@pytest.mark.parametrize("name", sorted(p.stem for p in RESULTS.glob("*.json")))
def test_every_row_has_its_commit_and_a_key_of_its_own(name):
    keys = _keys()
    assert name in keys, f"no benchmark writes {name}.json with a key"
    rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
    assert all(r.get("commit") for r in rows), f"{name}.json: rows without the commit they were measured at"
    seen = [tuple(json.dumps(r.get(k)) for k in keys[name]) for r in rows]
    assert len(seen) == len(set(seen)), f"{name}.json: rows share a key {keys[name]}"


def test_a_benchmark_reads_back_the_score_tables_it_saved_and_only_those(tmp_path, model_dir):
    import common
    import torch
    from conftest import defaults
    from test_model_sizes import tiny_llama

    from gamma.config import load_config
    from gamma.run.workspace import Workspace

    folder = tiny_llama(tmp_path / "tiny", torch.float32, model_dir)
    sets = {"model.path": str(folder), "model.data_dir": str(model_dir.parents[1]), "text.calibration_sequences": 2,
            "text.sequence_length": 64, "evaluation.context_length": 64, "stage1.steps": 2,
            "stage1.extra_budgets": [3.5],
            "output_dir": str(tmp_path / "out")}
    ws = Workspace(load_config(defaults(tmp_path), sets))
    problem, tables = ws.problem(), tmp_path / "tables"
    learned, cached = common.prepared_allocator(ws, "gamma", problem, tables)
    assert not cached and len(list(tables.glob("gamma-*.json"))) == 2  # one per training budget
    again, cached = common.prepared_allocator(ws, "gamma", problem, tables)
    assert cached and [t.scores for t in again.tables] == [t.scores for t in learned.tables]
    assert again.allocate(problem, 3.0).assignment == learned.allocate(problem, 3.0).assignment
    other = Workspace(load_config(defaults(tmp_path), {**sets, "stage1.lr": 0.01}))
    _, cached = common.prepared_allocator(other, "gamma", problem, tables)
    assert not cached and len(list(tables.glob("gamma-*.json"))) == 4  # other settings: learned, kept apart
    more = Workspace(load_config(defaults(tmp_path), {**sets, "stage1.extra_budgets": [3.5, 3.75]}))
    grown, cached = common.prepared_allocator(more, "gamma", problem, tables)
    assert cached and len(list(tables.glob("gamma-*.json"))) == 5  # only the missing table is learned
    assert [t.scores for t in grown.tables[:2]] == [t.scores for t in learned.tables]
    assert [t.training_budget for t in grown.tables] == [3.0, 3.5, 3.75]
    uniform, cached = common.prepared_allocator(ws, "uniform", problem, tables)  # nothing to learn or keep
    assert not cached and uniform.allocate(problem, 3.0).avg_bits == 3.0
