"""Allocation units: modules a serving engine fuses (q/k/v, gate/up, a layer's experts) share one
width in Stage I (one row of logits), in Stage II (one knapsack item) and in every allocator."""

import itertools
import json

import numpy as np
import pytest
from conftest import DATA, defaults

from gamma import cli
from gamma.config import Stage2Config
from gamma.model.units import allocation_units, broken_ties
from gamma.stage2.projection import project
from gamma.stage2.scores import Scores

LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]
MODULES = [f"model.layers.{b}.{m}" for b in range(2) for m in LAYER]


def names(modules, units):
    return [[modules[i].split(".", 3)[-1] for i in u] for u in units]


def test_units_tie_what_engines_fuse_and_nothing_else():
    assert len(allocation_units(MODULES)) == len(MODULES)  # none: every module its own
    fused = allocation_units(MODULES, "fused")
    assert names(MODULES, fused)[:4] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                         ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    phi = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]
    assert len(allocation_units(phi, "fused")) == 3  # already fused: one module each
    experts = [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(3) for p in ("w1", "w3", "w2")]
    assert len(allocation_units(experts, "fused")) == 6  # per expert: w1+w3, w2
    assert allocation_units(experts, "none", "per_layer") == [list(range(9))]  # the layer's experts: one unit


@pytest.mark.parametrize("seed", range(6))
def test_projection_gives_a_unit_one_width_and_is_the_exact_optimum(seed):
    rng = np.random.default_rng(seed)
    modules = MODULES[:7]
    sizes = [(int(r), 64) for r in rng.choice([64, 128, 256], size=len(modules))]
    bits = [2, 3, 4]
    scores = rng.normal(size=(len(modules), len(bits)))
    units = allocation_units(modules, "fused")
    budget = float(rng.uniform(2.2, 3.8))
    result = project(Scores(modules, sizes, bits, scores), budget, Stage2Config(window=0), units=units)
    assert not broken_ties(result.assignment, modules, units)
    n = np.array([r * c for r, c in sizes])
    assert result.bits_used <= budget + 1e-12
    best = -np.inf  # brute force over one width per unit
    for choice in itertools.product(range(len(bits)), repeat=len(units)):
        k = np.empty(len(modules), dtype=int)
        for u, c in zip(units, choice):
            k[u] = c
        if (n * np.array(bits)[k]).sum() <= budget * n.sum():
            best = max(best, scores[np.arange(len(modules)), k].sum())
    chosen = np.array([bits.index(result.assignment[m]) for m in modules])
    assert scores[np.arange(len(modules)), chosen].sum() == pytest.approx(best, abs=1e-9)


def test_stage1_and_every_tie_keeping_allocator_give_fused_modules_one_width(tmp_path, model_dir):
    """A tiny Mixtral through `gamma learn` and `gamma allocate` with q/k/v and gate/up fused and a
    layer's experts tied; an allocator that cannot keep units whole is refused by name."""
    from test_architectures import SETTINGS, build

    folder = build("Mixtral", tmp_path / "mixtral", model_dir)
    sets = [f"model.path={folder}", f"model.data_dir={DATA}", f"output_dir={tmp_path / 'out'}", *SETTINGS,
            "allocation.ties=fused", "allocation.experts=per_layer", "stage2.window=0.05"]
    base = ["--params", str(defaults(tmp_path)), *(a for s in sets for a in ("--set", s))]
    assert cli.main(["learn", *base]) == 0
    table = json.loads((tmp_path / "out" / "scores.json").read_text())
    modules, scores = table["modules"], np.array(table["scores"])
    units = allocation_units(modules, "fused", "per_layer")
    assert table["settings"]["units"] == {"ties": "fused", "experts": "per_layer"}
    assert any(len(u) == 12 for u in units)  # 4 experts x (w1, w3, w2) of one layer
    for u in units:  # one row of logits per unit: its members carry equal shares of it
        np.testing.assert_allclose(scores[u], np.repeat(scores[u][:1], len(u), axis=0))
    assert cli.main(["allocate", *base, "--budgets", "2.5,3.25"]) == 0
    for budget in ("2.5", "3.25"):
        assignment = json.loads((tmp_path / "out" / "assignments" / f"{budget}.json").read_text())["assignment"]
        assert not broken_ties(assignment, modules, units) and len(set(assignment.values())) > 1
    for allocator in ("hawq", "uniform"):
        assert cli.main(["allocate", *base, "--allocator", allocator, "--budgets", "3.25"]) == 0
        saved = json.loads((tmp_path / "out" / "assignments" / f"{allocator}-3.25.json").read_text())["assignment"]
        assert not broken_ties(saved, modules, units)
    assert cli.main(["allocate", *base, "--allocator", "higgs", "--budgets", "3"]) == 2
