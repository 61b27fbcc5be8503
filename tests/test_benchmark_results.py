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
