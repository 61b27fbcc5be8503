"""Sensitivity proxy (HAWQ-style): ``cost_mb = sum(F_m * (W_m - Q_b(W_m))^2)`` with ``F_m`` the
empirical Fisher diagonal, minimised by the same exact knapsack GAMMA's Stage II solves. It is
also Stage I's warm start, so it is the baseline GAMMA's learning has to beat."""

from __future__ import annotations

from gamma.allocators.base import AllocationProblem, Allocator
from gamma.projection import allocate_bits
from gamma.proxy import fisher_costs


class SensitivityAllocator(Allocator):
    name = "hawq"

    def __init__(self, window: float = 0.005):
        super().__init__()
        self.window = window
        self.costs = None

    def _prepare(self, problem: AllocationProblem) -> None:
        self.costs = fisher_costs(problem.model, problem.candidates, problem.fisher())

    def _allocate(self, problem: AllocationProblem, budget: float):
        result = allocate_bits(problem.modules, problem.sizes, -self.costs, problem.bits, budget, window=self.window,
                               group_size=problem.group_size, symmetric=problem.symmetric)
        return result.assignment, {"solve_status": result.status, "objective": -result.objective}
