"""Sensitivity proxy (HAWQ-style): ``cost_mb = sum(F_m * (W_m - Q_b(W_m))^2)`` with ``F_m`` the
empirical Fisher diagonal, minimised by the same exact knapsack GAMMA's Stage II solves. It is
also Stage I's warm start, so it is the baseline GAMMA's learning has to beat."""

from __future__ import annotations

from gamma.allocators.base import AllocationProblem, Allocator
from gamma.stage2.projection import project
from gamma.stage2.scores import Scores


class HawqAllocator(Allocator):
    name = "hawq"

    def __init__(self):
        super().__init__()
        self.costs = None

    def _prepare(self, problem: AllocationProblem) -> None:
        self.costs = problem.proxy_costs()

    def _allocate(self, problem: AllocationProblem, budget: float):
        rows = Scores(problem.modules, problem.sizes, problem.bits, -self.costs)
        result = project(rows, budget, problem.stage2, group_size=problem.group_size, symmetric=problem.symmetric,
                         units=problem.units, fixed_bytes=problem.fixed_bytes,
                         zero_points=problem.zero_points)
        return result.assignment, {"solve_status": result.status, "objective": -result.objective}
