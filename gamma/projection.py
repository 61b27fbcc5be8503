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
Solver = Literal["auto", "cbc", "hull"]
MIP_MAX_ITEMS = 5000  # above this CBC's model building and branching take minutes; the hull greedy seconds


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


def solve_mckp_hull(
    scores: np.ndarray, costs: np.ndarray, capacity: int, allowed: np.ndarray
) -> tuple[np.ndarray, str, float, float]:
    """Multiple-choice knapsack by its LP relaxation (Dyer-Zemel): each row's options on their
    upper convex hull, upgrades taken globally by score gained per bit until the capacity binds.

    The LP optimum has at most one fractional row, so the integer answer (greedy without that
    upgrade, then any later upgrade that still fits) is within one upgrade of the LP bound, which
    is returned as the proven bound. O(N K log NK): the route for block-wise tables too large for
    a MIP solver."""
    M, K = scores.shape
    base = np.zeros(M, dtype=int)
    steps = []  # (gain per cost unit, row, from option, to option)
    for m in range(M):
        opts = sorted((int(costs[m, k]), float(scores[m, k]), k) for k in range(K) if allowed[m, k])
        hull: list[tuple[int, float, int]] = []
        for c, s, k in opts:
            if hull and s <= hull[-1][1]:
                continue  # costs more, scores no better: never worth it
            if hull and c == hull[-1][0]:
                hull.pop()
            while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (c - hull[-1][0]) <= (s - hull[-1][1]) * (
                hull[-1][0] - hull[-2][0]
            ):
                hull.pop()  # under the chord from hull[-2] to this option: LP-dominated
            hull.append((c, s, k))
        base[m] = hull[0][2]
        steps += [((b[1] - a[1]) / (b[0] - a[0]), m, a[2], b[2]) for a, b in zip(hull, hull[1:])]
    order = sorted(steps, key=lambda t: -t[0])
    choice = base.copy()
    room = capacity - int(costs[np.arange(M), base].sum())
    if room < 0:
        return np.zeros(0, dtype=int), "INFEASIBLE", float("nan"), float("nan")
    bound = float(scores[np.arange(M), base].sum())
    lp_room, lp_open = room, True
    for slope, m, a, b in order:
        dc = int(costs[m, b] - costs[m, a])
        if lp_open:  # the LP relaxation: whole upgrades while they fit, then a fraction of the next
            bound += slope * min(dc, lp_room)
            lp_open = dc <= lp_room
            lp_room -= dc
        if choice[m] == a and dc <= room:  # the integer answer skips rows whose upgrade did not fit
            choice[m], room = b, room - dc
    objective = float(scores[np.arange(M), choice].sum())
    status = "OPTIMAL" if bound - objective <= 1e-9 * max(1.0, abs(objective)) else "FEASIBLE"
    return choice, status, objective, max(bound, objective)


def solve_mckp_hull_window(
    scores: np.ndarray, costs: np.ndarray, capacity: int, lower: int, allowed: np.ndarray
) -> tuple[np.ndarray, str, float]:
    """The hull solver, made to spend at least ``lower``: learned scores carry a price per bit, so
    their plain LP optimum can stop far below the budget (a block table learned at 3.0 bits spent
    3.15 of a 3.5-bit budget). The window's lower end is priced in Lagrangian fashion: the
    smallest reward ``mu`` per cost unit (bisection) whose shifted scores ``s + mu c`` reach it.
    For every assignment in the window ``s.x <= (s + mu c).x - mu lower``, so for every ``mu >= 0``
    the shifted LP bound minus ``mu lower`` bounds the original objective: the tightest of those
    the bisection evaluated is returned. Returns (choice, status, bound)."""
    choice, status, _, bound = solve_mckp_hull(scores, costs, capacity, allowed)
    if status == "INFEASIBLE" or lower <= 0:
        return choice, status, bound
    rows = np.arange(len(scores))
    if int(costs[rows, choice].sum()) >= lower:
        return choice, status, bound
    unit = float(costs.max())
    spread = float(np.ptp(scores[allowed])) if allowed.any() else 1.0

    best_bound = bound  # every mu >= 0 gives a valid bound; keep the tightest one seen

    def solve(mu: float):
        nonlocal best_bound
        out = solve_mckp_hull(scores + mu * costs / unit, costs, capacity, allowed)
        best_bound = min(best_bound, out[3] - mu * lower / unit)
        return out

    lo, hi = 0.0, max(spread, 1.0)
    while int(costs[rows, solve(hi)[0]].sum()) < lower and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if int(costs[rows, solve(mid)[0]].sum()) >= lower else (mid, hi)
    choice = solve(hi)[0]
    bound = best_bound
    objective = float(scores[rows, choice].sum())
    status = "OPTIMAL" if bound - objective <= 1e-9 * max(1.0, abs(objective)) else "FEASIBLE"
    return choice, status, max(bound, objective)


def _solve_exact(scores, costs, capacity, lower, allowed, time_limit, budget, window, notes):
    """CBC with the window's lower end dropped if nothing reaches it, and the capacity tightened
    if the solver's feasibility tolerance let the answer slip over the budget."""
    relaxed = False
    limit = capacity
    for _attempt in range(5):
        choice, status, _, bound = solve_mckp(scores, costs, capacity, lower, allowed, time_limit)
        # CBC's presolve sometimes reports an infeasible narrow window as NOT_SOLVED rather than INFEASIBLE
        if status not in ("OPTIMAL", "FEASIBLE") and lower > 0:
            warnings.warn(f"no assignment spends at least {budget - window} at budget {budget}: lower bound dropped",
                          stacklevel=3)
            notes.append("lower bound relaxed: no assignment in the window")
            lower, relaxed = 0, True
            continue
        if status not in ("OPTIMAL", "FEASIBLE"):
            raise BudgetError(f"the solver found no assignment for budget {budget} ({status})")
        used_cost = int(costs[np.arange(len(choice)), choice].sum())
        if used_cost <= limit:
            return choice, status, bound, used_cost, relaxed
        capacity -= used_cost - limit
        notes.append("capacity tightened after a tolerance overshoot")
    raise BudgetError(f"could not find an assignment within budget {budget} after 5 attempts")


def allocate_bits(
    modules: list[str],
    sizes: list[tuple[int, int]],
    scores: np.ndarray,
    candidates: list[int],
    budget: float,
    *,
    window: float = 0.005,
    unit: BudgetUnit = "nominal",
    min_bits: dict[str, int] | None = None,
    group_size: int = 64,
    symmetric: bool = False,
    time_limit: float = 60.0,
    solver: Solver = "auto",
) -> Allocation:
    """Pick one bit width per module maximising ``scores`` [M, K] within ``budget`` (Stage II).

    ``solver``: ``cbc`` (exact MIP, proven optimal), ``hull`` (LP-relaxation greedy with a proven
    bound, for block-wise tables of 10^5 items), ``auto`` (cbc up to ``MIP_MAX_ITEMS`` rows)."""
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
    if solver == "auto":
        solver = "cbc" if len(modules) <= MIP_MAX_ITEMS else "hull"
    if solver == "hull":
        choice, status, bound = solve_mckp_hull_window(scores, costs, capacity, lower, allowed)
        if status == "INFEASIBLE":
            raise BudgetError(f"no assignment fits budget {budget} ({unit})")
        used_cost = int(costs[np.arange(len(modules)), choice].sum())
        if used_cost < lower:
            notes.append(f"spends {used_cost / per_unit:.4f}, below the window's lower end {budget - window}")
    else:
        choice, status, bound, used_cost, relaxed = _solve_exact(scores, costs, capacity, lower, allowed,
                                                                 time_limit, budget, window, notes)
    seconds = time.perf_counter() - t0
    objective = float(scores[np.arange(len(modules)), choice].sum())  # exact float objective
    gap = abs(bound - objective) / max(1e-12, abs(objective)) if np.isfinite(bound) else float("nan")
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
        solver=solver,
        solve_seconds=seconds,
        bits_used=float((n * bits).sum() / n.sum()),
        used=used_cost / per_unit,
        slack=budget - used_cost / per_unit,
        lower_bound_relaxed=relaxed,
        notes=notes,
    )
