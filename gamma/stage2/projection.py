"""Stage II: project learned scores onto one budget, exactly (``project``, the one Stage II call).

A multiple-choice knapsack: one candidate per module, maximise the summed scores, spend between
``B - delta`` and ``B`` average bits. Solved to proven optimality by a MIP solver from OR-Tools
(CBC, zero relative gap). The budget is never exceeded: the returned assignment is re-checked in
exact integer arithmetic and, if the solver's feasibility tolerance let it slip over, re-solved
with the capacity tightened by the excess.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from gamma.config import Stage2Config
from gamma.model.assignment import module_cost_bits
from gamma.quant.interface import QuantSpec
from gamma.stage2.budgets import budget_text
from gamma.stage2.knapsack import solve_mckp, solve_mckp_hull_window, window_reachable
from gamma.stage2.scores import nearest_table

BudgetUnit = Literal["nominal", "effective", "bytes"]
MIP_MAX_ITEMS = 5000  # above this CBC's model building and branching take minutes; the hull greedy seconds


class BudgetError(ValueError):
    """The budget cannot be met with the candidates and restrictions; the message names it."""


@dataclass
class Projection:
    assignment: dict[str, int]
    budget: float
    unit: str
    objective: float
    best_bound: float
    gap: float
    status: str
    solver: str
    solve_seconds: float
    bits_used: float  # average nominal bits of the assignment
    used: float  # in the budget's unit
    slack: float  # budget - used, in the budget's unit
    lower_bound_relaxed: bool = False
    notes: list[str] = field(default_factory=list)
    training_budget: float | None = None  # of the score table projected

    def as_dict(self) -> dict:
        return asdict(self)


def allowed_mask(modules: list[str], candidates: list[int], min_bits: dict[str, int] | None) -> np.ndarray:
    """[M, K] True where module m may use candidate k (``min_bits``: name substring -> lowest bits)."""
    mask = np.ones((len(modules), len(candidates)), dtype=bool)
    for pattern, lowest in (min_bits or {}).items():
        hits = [i for i, name in enumerate(modules) if pattern in name]
        if not hits:
            raise BudgetError(f"min_bits pattern {pattern!r} matches no module")
        for i in hits:
            mask[i] &= np.array([b >= lowest for b in candidates])
    return mask


def unit_costs(
    sizes: list[tuple[int, int]], candidates: list[int], unit: BudgetUnit, group_size: int, symmetric: bool,
    zero_points: str = "packed",
) -> tuple[np.ndarray, float]:
    """Integer-valued cost of every (module, candidate) and the scale that turns a budget into a capacity.

    nominal: weights x bits, capacity = B x total weights; effective: storage bits incl. scales and
    zero-points, capacity = B x total weights; bytes: storage bits, capacity = 8 x B.
    """
    n = np.array([r * c for r, c in sizes], dtype=np.int64)
    if unit == "nominal":
        costs = n[:, None] * np.array(candidates, dtype=np.int64)[None, :]
        return costs, float(n.sum())
    costs = np.array(
        [[module_cost_bits(r, c, QuantSpec(b, group_size, symmetric), zero_points) for b in candidates]
         for r, c in sizes],
        dtype=np.int64,
    )
    return costs, float(n.sum()) if unit == "effective" else 8.0


def _solve_exact(scores, costs, capacity, lower, allowed, s2: Stage2Config, budget, notes):
    """CBC with the window's lower end dropped if nothing reaches it, and the capacity tightened
    if the solver's feasibility tolerance let the answer slip over the budget."""
    relaxed = False
    limit = capacity
    if lower > 0 and window_reachable(costs, allowed, lower, capacity) is False:
        lower = 0  # known empty: the solver would spend its whole time limit proving it
        relaxed = _relax_window(budget, s2, notes)
    for _attempt in range(5):
        choice, status, _, bound = solve_mckp(scores, costs, capacity, lower, allowed, s2.time_limit)
        # CBC's presolve sometimes reports an infeasible narrow window as NOT_SOLVED rather than INFEASIBLE
        if status not in ("OPTIMAL", "FEASIBLE") and lower > 0:
            lower, relaxed = 0, _relax_window(budget, s2, notes)
            continue
        if status not in ("OPTIMAL", "FEASIBLE"):
            raise BudgetError(f"the solver found no assignment for budget {budget} ({status})")
        used_cost = int(costs[np.arange(len(choice)), choice].sum())
        if used_cost <= limit:
            return choice, status, bound, used_cost, relaxed
        capacity -= used_cost - limit
        notes.append("capacity tightened after a tolerance overshoot")
    raise BudgetError(f"could not find an assignment within budget {budget} after 5 attempts")


def _relax_window(budget, s2: Stage2Config, notes: list[str]) -> bool:
    warnings.warn(f"no assignment spends at least {budget - s2.window} at budget {budget}: lower bound dropped",
                  stacklevel=4)
    notes.append("lower bound relaxed: no assignment in the window")
    return True


def collapse(units: list[list[int]], scores: np.ndarray, costs: np.ndarray, allowed: np.ndarray):
    """One knapsack item per unit: its members' scores and costs summed (summed log-probabilities:
    the joint log-probability that every member takes that width), allowed where every member is."""
    return (np.stack([scores[u].sum(axis=0) for u in units]), np.stack([costs[u].sum(axis=0) for u in units]),
            np.stack([allowed[u].all(axis=0) for u in units]))


def project(table, budget: float, stage2: Stage2Config | None = None, *, group_size: int = 64,
            symmetric: bool = False, units: list[list[int]] | None = None, fixed_bytes: int | None = None,
            zero_points: str = "packed") -> Projection:
    """Stage II: pick one candidate per row of ``table`` (anything with ``modules``, ``sizes``,
    ``bits`` and ``scores`` [M, K], a ``ScoreTable`` or costs turned into scores) maximising the
    summed scores within ``budget``, under the ``stage2`` settings taken whole: window,
    ``min_bits`` restrictions, solver (``cbc``: exact MIP, proven optimal; ``hull``: LP greedy with
    a proven bound, for block tables of 10^5 rows; ``auto``: cbc up to ``MIP_MAX_ITEMS`` rows) and
    time limit; the budget is in ``stage2.unit``. ``group_size``/``symmetric``/``zero_points``
    (their layout) price the effective and byte units; a bytes budget also pays ``fixed_bytes``,
    every tensor the checkpoint stores besides the rows' (embeddings, norms, head). ``units``: rows
    that must share one width (``gamma.model.units``), one knapsack item each."""
    s2 = stage2 or Stage2Config()
    unit = s2.unit
    if unit == "bytes" and fixed_bytes is None:
        raise BudgetError("a bytes budget needs the bytes of the checkpoint's other tensors (fixed_bytes); "
                          "this score table predates bytes budgets: learn it again")
    fixed = fixed_bytes if unit == "bytes" else 0
    modules, sizes, bits = list(table.modules), [tuple(s) for s in table.sizes], list(table.bits)
    scores = np.asarray(table.scores, dtype=np.float64)
    if scores.shape != (len(modules), len(bits)):
        raise BudgetError(f"scores have shape {scores.shape}, expected {(len(modules), len(bits))}")
    if not np.isfinite(scores).all():
        raise BudgetError("scores contain NaN or infinite values")
    allowed = allowed_mask(modules, bits, s2.min_bits)
    costs, per_unit = unit_costs(sizes, bits, unit, group_size, symmetric, zero_points)
    units = units or [[i] for i in range(len(modules))]
    if sorted(i for u in units for i in u) != list(range(len(modules))):
        raise BudgetError(f"allocation units must cover each of the {len(modules)} rows exactly once")
    scores, costs, allowed = collapse(units, scores, costs, allowed)
    if not allowed.any(axis=1).all():
        raise BudgetError("min_bits leaves a unit no width its members all allow")
    check_reachable(costs, per_unit, allowed, budget, (unit, bits, s2.min_bits), fixed)
    n = np.array([r * c for r, c in sizes], dtype=np.float64)
    window = s2.window * n.sum() / 8 if unit == "bytes" else s2.window  # the window is in bits per weight
    capacity = int(np.floor((budget - fixed) * per_unit + 1e-6))
    lower = max(0, int(np.ceil((budget - fixed - window) * per_unit))) if window > 0 else 0
    solver = s2.solver if s2.solver != "auto" else "cbc" if len(units) <= MIP_MAX_ITEMS else "hull"
    notes: list[str] = []
    relaxed = False
    t0 = time.perf_counter()
    if solver == "hull":
        choice, status, bound = solve_mckp_hull_window(scores, costs, capacity, lower, allowed)
        if status == "INFEASIBLE":
            raise BudgetError(f"no assignment fits budget {budget} ({unit})")
        used_cost = int(costs[np.arange(len(units)), choice].sum())
        if used_cost < lower:
            notes.append(f"spends {fixed + used_cost / per_unit:.4f}, below the window's lower end {budget - window}")
    else:
        choice, status, bound, used_cost, relaxed = _solve_exact(scores, costs, capacity, lower, allowed, s2,
                                                                 budget, notes)
    seconds = time.perf_counter() - t0
    objective = float(scores[np.arange(len(units)), choice].sum())  # exact float objective
    gap = abs(bound - objective) / max(1e-12, abs(objective)) if np.isfinite(bound) else float("nan")
    chosen = np.zeros(len(modules), dtype=np.int64)
    for members, k in zip(units, choice):
        chosen[members] = bits[k]
    return Projection(
        assignment={m: int(b) for m, b in zip(modules, chosen)}, budget=budget, unit=unit, objective=objective,
        best_bound=float(bound), gap=float(gap), status=status, solver=solver, solve_seconds=seconds,
        bits_used=float((n * chosen).sum() / n.sum()), used=fixed + used_cost / per_unit,
        slack=budget - fixed - used_cost / per_unit,
        lower_bound_relaxed=relaxed, notes=notes,
    )


def project_nearest(tables: list, budget: float, stage2: Stage2Config | None = None, **kwargs) -> Projection:
    """Stage II from the table learned nearest the budget (score reuse; ``kwargs`` go to
    ``project``). A budget in effective bits or bytes has no training budget to compare with: it is
    solved from the middle table, then again from the table nearest the bits that spent, if another."""
    s2 = stage2 or Stage2Config()
    ordered = sorted(tables, key=lambda t: t.training_budget)
    table = nearest_table(tables, budget) if s2.unit == "nominal" else ordered[len(ordered) // 2]
    result = _project_table(table, budget, s2, kwargs)
    if s2.unit != "nominal" and nearest_table(tables, result.bits_used) is not table:
        table = nearest_table(tables, result.bits_used)
        result = _project_table(table, budget, s2, kwargs)
    result.notes.append(f"table learned at {table.training_budget:g} bits "
                        f"(distance {result.bits_used - table.training_budget:+.2f} bits)")
    result.training_budget = table.training_budget
    return result


def _project_table(table, budget: float, s2: Stage2Config, kwargs: dict) -> Projection:
    fixed = kwargs.get("fixed_bytes", getattr(table, "fixed_bytes", None))
    return project(table, budget, s2, **{**kwargs, "fixed_bytes": fixed})


def check_reachable(costs: np.ndarray, per_unit: float, allowed: np.ndarray, budget: float, named: tuple,
                    fixed: float = 0) -> None:
    """Refuse a budget outside what the allowed candidates can spend, naming the range (``named``:
    the unit, the candidates and the restrictions, for the message; ``fixed``: spent whatever the
    assignment)."""
    unit, bits, min_bits = named
    lo = fixed + int(np.where(allowed, costs, np.iinfo(np.int64).max).min(axis=1).sum()) / per_unit
    hi = fixed + int(np.where(allowed, costs, -1).max(axis=1).sum()) / per_unit
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        shown = (lambda x: f"{x:,.0f} bytes") if unit == "bytes" else (lambda x: f"{x:.4f}")
        raise BudgetError(f"budget {budget_text(budget, unit)} is outside the reachable range "
                          f"[{shown(lo)}, {shown(hi)}] "
                          f"for candidates {bits}" + (f" with min_bits {min_bits}" if min_bits else ""))
