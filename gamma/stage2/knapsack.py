"""Multiple-choice knapsack solvers: one option per row, maximise the summed scores, spend
between ``lower`` and ``capacity`` (integer costs). ``solve_mckp``: exact MIP (OR-Tools CBC, zero
relative gap); ``solve_mckp_hull``: the LP relaxation's greedy with a proven bound, for tables of
10^5 rows; ``solve_mckp_hull_window``: the same, priced so that it spends at least ``lower``.
Pure functions over arrays: ``projection.py`` turns a score table and a budget into their inputs.
"""

from __future__ import annotations

import numpy as np

MAX_SUM_STATES = 1 << 26  # reachable-sum bitsets beyond this many states are not worth building


def window_reachable(costs: np.ndarray, allowed: np.ndarray, lower: int, capacity: int) -> bool | None:
    """Whether some choice of one allowed option per row spends between ``lower`` and ``capacity``:
    exactly, from the set of reachable sums (a bitset in units of the costs' common divisor), when
    that set has at most ``MAX_SUM_STATES`` states; None when it would be larger. A MIP solver may
    need its whole time limit to prove a narrow window empty; this takes milliseconds."""
    options = [np.unique(costs[m][allowed[m]]).astype(object) for m in range(len(costs))]
    step = int(np.gcd.reduce(np.concatenate(options).astype(np.int64)))
    base = sum(int(o[0]) for o in options)
    lo, hi = -(-(lower - base) // step), (capacity - base) // step
    lo = max(lo, 0)
    if lo > hi:
        return False
    if sum(int(o[-1] - o[0]) for o in options) // step > MAX_SUM_STATES:
        return None
    sums = 1  # bit s set: base + s * step is reachable
    for o in options:
        shifted = 0
        for c in o:
            shifted |= sums << int((c - o[0]) // step)
        sums = shifted
    return (sums >> lo) & ((1 << (hi - lo + 1)) - 1) != 0


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
