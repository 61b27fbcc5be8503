"""Stage II: project learned scores onto one budget, exactly.

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

from gamma.quantizer import QuantSpec

BudgetUnit = Literal["nominal", "effective", "bytes"]


class BudgetError(ValueError):
    """The budget cannot be met with the candidates and restrictions; the message names it."""


@dataclass
class Allocation:
    assignment: dict[str, int]
    budget: float
    unit: str
    objective: float
    best_bound: float
    gap: float
    status: str
    solve_seconds: float
    bits_used: float  # average nominal bits of the assignment
    used: float  # in the budget's unit
    slack: float  # budget - used, in the budget's unit
    lower_bound_relaxed: bool = False
    notes: list[str] = field(default_factory=list)

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
    sizes: list[tuple[int, int]], candidates: list[int], unit: BudgetUnit, group_size: int, symmetric: bool
) -> tuple[np.ndarray, float]:
    """Integer-valued cost of every (module, candidate) and the scale that turns a budget into a capacity.

    nominal: weights x bits, capacity = B x total weights; effective: storage bits incl. scales and
    zero-points, capacity = B x total weights; bytes: storage bits, capacity = 8 x B.
    """
    from gamma.assignment import module_cost_bits

    n = np.array([r * c for r, c in sizes], dtype=np.int64)
    if unit == "nominal":
        costs = n[:, None] * np.array(candidates, dtype=np.int64)[None, :]
        return costs, float(n.sum())
    costs = np.array(
        [[module_cost_bits(r, c, QuantSpec(b, group_size, symmetric)) for b in candidates] for r, c in sizes],
        dtype=np.int64,
    )
    return costs, float(n.sum()) if unit == "effective" else 8.0


def solve_mckp(
    scores: np.ndarray, costs: np.ndarray, capacity: int, lower: int, allowed: np.ndarray, time_limit: float = 60.0
) -> tuple[np.ndarray, str, float, float]:
    """Exact multiple-choice knapsack: returns (choice per row, status, objective, best bound)."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("CBC")
    if solver is None:
        raise RuntimeError("OR-Tools has no CBC backend in this build")
    M, K = scores.shape
    scale = float(costs.max())  # keep the capacity row O(1) for the solver's tolerances
    x = {}
    for m in range(M):
        row = []
        for k in range(K):
            if allowed[m, k]:
                x[m, k] = solver.BoolVar(f"x_{m}_{k}")
                row.append(x[m, k])
        solver.Add(solver.Sum(row) == 1)
    used = solver.Sum(float(costs[m, k]) / scale * v for (m, k), v in x.items())
    solver.Add(used <= capacity / scale)
    if lower > 0:
        solver.Add(used >= lower / scale)
    solver.Maximize(solver.Sum(float(scores[m, k]) * v for (m, k), v in x.items()))
    solver.SetTimeLimit(int(time_limit * 1000))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, 0.0)
    code = solver.Solve(params)
    names = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE",
             pywraplp.Solver.INFEASIBLE: "INFEASIBLE"}
    status = names.get(code, f"STATUS_{code}")
    if status not in ("OPTIMAL", "FEASIBLE"):
        return np.zeros(0, dtype=int), status, float("nan"), float("nan")
    choice = np.array([max((k for k in range(K) if allowed[m, k]), key=lambda k: x[m, k].solution_value())
                       for m in range(M)])
    return choice, status, solver.Objective().Value(), solver.Objective().BestBound()


def allocate_bits(
    modules: list[str],
    sizes: list[tuple[int, int]],
    scores: np.ndarray,
    candidates: list[int],
    budget: float,
    *,
    window: float = 0.02,
    unit: BudgetUnit = "nominal",
    min_bits: dict[str, int] | None = None,
    group_size: int = 64,
    symmetric: bool = False,
    time_limit: float = 60.0,
) -> Allocation:
    """Pick one bit width per module maximising ``scores`` [M, K] within ``budget`` (Stage II)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(modules), len(candidates)):
        raise BudgetError(f"scores have shape {scores.shape}, expected {(len(modules), len(candidates))}")
    if not np.isfinite(scores).all():
        raise BudgetError("scores contain NaN or infinite values")
    allowed = allowed_mask(modules, candidates, min_bits)
    costs, per_unit = unit_costs(sizes, candidates, unit, group_size, symmetric)
    lo_cost = int(np.where(allowed, costs, np.iinfo(np.int64).max).min(axis=1).sum())
    hi_cost = int(np.where(allowed, costs, -1).max(axis=1).sum())
    lo, hi = lo_cost / per_unit, hi_cost / per_unit
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise BudgetError(
            f"budget {budget} ({unit}) is outside the reachable range [{lo:.4f}, {hi:.4f}] "
            f"for candidates {candidates}" + (f" with min_bits {min_bits}" if min_bits else "")
        )
    capacity = int(np.floor(budget * per_unit + 1e-6))
    lower = max(0, int(np.ceil((budget - window) * per_unit))) if window > 0 else 0
    notes: list[str] = []
    relaxed = False
    t0 = time.perf_counter()
    for _attempt in range(5):
        choice, status, objective, bound = solve_mckp(scores, costs, capacity, lower, allowed, time_limit)
        if status == "INFEASIBLE" and lower > 0:
            warnings.warn(f"no assignment spends at least {budget - window} at budget {budget}: lower bound dropped",
                          stacklevel=2)
            notes.append("lower bound relaxed: no assignment in the window")
            lower, relaxed = 0, True
            continue
        if status not in ("OPTIMAL", "FEASIBLE"):
            raise BudgetError(f"the solver found no assignment for budget {budget} ({status})")
        used_cost = int(costs[np.arange(len(modules)), choice].sum())
        if used_cost <= int(np.floor(budget * per_unit + 1e-6)):
            break
        capacity -= used_cost - capacity  # solver tolerance let it slip over: tighten and re-solve
        notes.append("capacity tightened after a tolerance overshoot")
    else:
        raise BudgetError(f"could not find an assignment within budget {budget} after 5 attempts")
    seconds = time.perf_counter() - t0
    objective = float(scores[np.arange(len(modules)), choice].sum())  # exact float objective
    gap = abs(bound - objective) / max(1e-12, abs(objective)) if status == "OPTIMAL" else float("nan")
    n = np.array([r * c for r, c in sizes], dtype=np.float64)
    bits = np.array(candidates)[choice]
    return Allocation(
        assignment={m: int(b) for m, b in zip(modules, bits)},
        budget=budget,
        unit=unit,
        objective=objective,
        best_bound=float(bound),
        gap=float(gap),
        status=status,
        solve_seconds=seconds,
        bits_used=float((n * bits).sum() / n.sum()),
        used=used_cost / per_unit,
        slack=budget - used_cost / per_unit,
        lower_bound_relaxed=relaxed,
        notes=notes,
    )
