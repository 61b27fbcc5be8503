"""GAMMA behind the allocator interface: Stage I (preference learning) once in ``prepare``, then
Stage II (the exact knapsack over the learned scores) per budget, from the table learned nearest."""

from __future__ import annotations

import numpy as np

from gamma.allocators.base import AllocationProblem, Allocator
from gamma.config import Stage1Config
from gamma.projection import allocate_bits
from gamma.proxy import costs_to_logits, fisher_costs
from gamma.scores import ScoreTable, nearest_table
from gamma.stage1 import learn_preferences
from gamma.teacher import capture_teacher


def learn_table(problem: AllocationProblem, stage1: Stage1Config) -> ScoreTable:
    """Stage I on the problem's candidates: teacher capture, proxy warm start, preference learning."""
    teacher = capture_teacher(problem.model, problem.calibration,
                              with_grads=stage1.loss == "fisher" or stage1.init == "proxy")
    init = None
    if stage1.init == "proxy":
        costs = fisher_costs(problem.model, problem.candidates, teacher.fisher)
        init = costs_to_logits(costs, [int(p) for p in problem.params], problem.bits, stage1.budget,
                               stage1.proxy_scale, stage1.proxy_clip)
    result = learn_preferences(problem.model, teacher, problem.candidates, problem.bits, stage1, init)
    return ScoreTable(modules=problem.modules, sizes=problem.sizes, bits=problem.bits, scores=result.scores.tolist(),
                      model_hash="", text_hash="", quantizer={}, training_budget=stage1.budget,
                      settings=stage1.model_dump(), seed=stage1.seed, multiplier=result.multiplier,
                      penalty=result.penalty, violation=result.violation, wall_seconds=result.wall_seconds,
                      peak_memory_mb=result.peak_memory_mb)


class GammaAllocator(Allocator):
    name = "gamma"

    def __init__(self, stage1: Stage1Config | None = None, window: float = 0.005,
                 tables: list[ScoreTable] | None = None):
        """``tables``: registered score tables to project from (no Stage I); otherwise ``prepare``
        learns one per training budget of ``stage1``."""
        super().__init__()
        self.stage1 = stage1 or Stage1Config()
        self.window = window
        self.tables = tables or []

    def _prepare(self, problem: AllocationProblem) -> None:
        if self.tables:
            return
        for b in self.stage1.training_budgets:
            self.tables.append(learn_table(problem, self.stage1.model_copy(update={"budget": b, "extra_budgets": []})))

    def _allocate(self, problem: AllocationProblem, budget: float):
        table = nearest_table(self.tables, budget)
        result = allocate_bits(problem.modules, problem.sizes, np.asarray(table.scores), problem.bits, budget,
                               window=self.window, group_size=problem.group_size, symmetric=problem.symmetric)
        return result.assignment, {"solve_status": result.status, "training_budget": table.training_budget}
