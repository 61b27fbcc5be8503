"""Budgets in nominal bits, effective bits and bytes: read as written, solved exactly in their own
unit, never exceeded by the real checkpoint."""

import itertools
import json

import numpy as np
import pytest
from conftest import defaults

from gamma import cli
from gamma.config import ConfigError, Stage2Config, load_config
from gamma.model.assignment import module_stored_bytes, stored_bytes, unquantized_tensors
from gamma.quant.interface import QuantSpec
from gamma.stage2.budgets import BudgetSyntaxError, budget_label, label_budget, parse_budget
from gamma.stage2.projection import BudgetError, project
from gamma.stage2.scores import Scores, ScoreTable

FAST = ["evaluation.max_tokens=256", "evaluation.context_length=64", "evaluation.zero_shot_items=0"]


@pytest.mark.parametrize("text, expected", [
    ("95MB", (95e6, "bytes")), ("1.5GiB", (1.5 * 2**30, "bytes")), ("512 kB", (512e3, "bytes")),
    ("120000000B", (1.2e8, "bytes")), ("3bit", (3.0, "nominal")), ("2.5", (2.5, "nominal")), (3, (3.0, "nominal")),
])
def test_budgets_are_read_with_their_units(text, expected):
    assert parse_budget(text, "nominal") == expected
    value, unit = expected
    assert label_budget(budget_label(value, unit), unit) == value  # registry names read back exactly


@pytest.mark.parametrize("text", ["95XB", "-3", "0MB", "nan", "MB", "3..5"])
def test_a_budget_that_cannot_be_read_is_named(text):
    with pytest.raises(BudgetSyntaxError, match=repr(text).replace(".", r"\.")):
        parse_budget(text, "nominal")


def test_budget_units_in_the_configuration(tmp_path):
    cfg = load_config(tmp_path / "none.yaml", {"stage2.budgets": ["95MB", "120MB"]})
    assert (cfg.stage2.budgets, cfg.stage2.unit) == ([95e6, 120e6], "bytes")
    for bad, named in [({"stage2.budgets": ["95MB", 3]}, "mix units"),
                       ({"stage2.budgets": ["95MB"], "stage2.unit": "effective"}, "stage2.unit=effective"),
                       ({"stage2.budgets": ["95MB"], "allocation.methods": ["gamma", "uniform"]}, "'uniform'")]:
        with pytest.raises(ConfigError, match=named):
            load_config(tmp_path / "none.yaml", bad)


def _brute_force(scores, costs, capacity):
    best = None
    for choice in itertools.product(range(scores.shape[1]), repeat=scores.shape[0]):
        rows = np.arange(len(choice))
        if costs[rows, choice].sum() <= capacity:
            value = scores[rows, choice].sum()
            best = value if best is None or value > best else best
    return best


@pytest.mark.parametrize("unit", ["effective", "bytes"])
def test_the_knapsack_is_optimal_in_effective_bits_and_in_bytes(unit):
    """Exhaustive check on small problems: the optimum in the budget's own unit, never over it."""
    rng = np.random.default_rng(3)
    bits, sizes = [2, 3, 4, 16], [(64, 128), (32, 64), (128, 64), (16, 256), (64, 64), (8, 128)]
    fixed = 5000
    costs = np.array([[module_stored_bytes(r, c, QuantSpec(b, 64, False)) for b in bits] for r, c in sizes])
    n = sum(r * c for r, c in sizes)
    for _ in range(8):
        scores = rng.normal(size=(len(sizes), len(bits)))
        room = costs.min(axis=1).sum() + rng.uniform(0.1, 0.9) * (costs.max(axis=1).sum() - costs.min(axis=1).sum())
        budget = room + fixed if unit == "bytes" else room * 8 / n
        s2 = Stage2Config(unit=unit, window=0.0)
        res = project(Scores([f"m{i}" for i in range(len(sizes))], sizes, bits, scores), budget, s2, group_size=64,
                      symmetric=False, fixed_bytes=fixed)
        spent = sum(costs[i, bits.index(res.assignment[f"m{i}"])] for i in range(len(sizes)))
        assert spent <= room + 1e-9 and res.used == pytest.approx(spent + fixed if unit == "bytes" else spent * 8 / n)
        assert res.objective == pytest.approx(_brute_force(scores, costs, int(np.floor(room + 1e-6))), abs=1e-9)


def test_a_bytes_budget_outside_the_reachable_range_names_it():
    with pytest.raises(BudgetError, match=r"budget 0\.001 MB is outside the reachable range"):
        project(Scores(["a"], [(64, 64)], [2, 4], np.zeros((1, 2))), 1000, Stage2Config(unit="bytes"), fixed_bytes=0)


def test_a_bytes_budget_is_never_exceeded_by_the_real_checkpoint(tmp_path, capsys, model_and_tokenizer):
    """allocate --budgets in MB, then quantize: the exported tensors fit the budget to the byte."""
    from safetensors import safe_open

    from gamma.run.workspace import Workspace

    model = model_and_tokenizer[0]
    ws = Workspace(load_config(tmp_path / "none.yaml"))
    modules, sizes = ws.module_sizes(model)
    scores = np.log(np.random.default_rng(0).dirichlet([1, 1, 1], len(modules))).tolist()
    table = ScoreTable(modules, sizes, [2, 3, 4], scores, ws.model_hash, "t", ws.quantizer_record(), 3.0, {}, 0,
                       0.0, 10.0, 0.0, fixed_bytes=stored_bytes(unquantized_tensors(model, modules).values()))
    table.save(tmp_path / "scores.json")
    common = ["--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}"]
    assert cli.main(["allocate", *common, "--budgets", "100MB,110MB,10MB"]) == 0
    out = "".join(capsys.readouterr())
    assert "10MB" in out and "outside the reachable range" in out  # the infeasible one fails alone, named
    for mb in (100, 110):
        solved = json.loads((tmp_path / "assignments" / f"{mb}MB.json").read_text())
        assert solved["unit"] == "bytes" and solved["used"] <= mb * 1e6
    assert cli.main(["quantize", *common, *(x for s in FAST for x in ("--set", s)), "--budget", "100MB"]) == 0
    ckpt = next((tmp_path / "models" / "100MB").glob("*.safetensors"))
    with safe_open(str(ckpt), "pt") as f:
        weight_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    window = Stage2Config().window * sum(r * c for r, c in sizes) / 8
    assert 100e6 - window <= weight_bytes <= 100e6
