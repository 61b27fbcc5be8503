"""GAMMA behind the allocator interface: Stage I (preference learning) once in ``prepare``, one
table per training budget of ``stage1`` on one teacher capture, then Stage II (the exact knapsack
over the learned scores, under the problem's ``stage2`` settings) per budget, from the table
learned nearest to it (score reuse)."""

from __future__ import annotations

from gamma.allocators.base import AllocationProblem, Allocator
from gamma.config import Stage1Config
from gamma.stage1.learn import learn_score_table
from gamma.stage2.projection import project_nearest
from gamma.stage2.scores import ScoreTable


def one_table_per_budget(stage1: Stage1Config) -> list[Stage1Config]:
    """The Stage I settings of each table of the band: ``stage1.budget`` and ``stage1.extra_budgets``."""
    return [stage1.model_copy(update={"budget": b, "extra_budgets": []}) for b in stage1.training_budgets]


def learn_band(problem: AllocationProblem, stage1: Stage1Config, blocks=None, teacher=None) -> list[ScoreTable]:
    """One table per training budget, all learned on one teacher capture."""
    if teacher is None:
        teacher = problem.capture(stage1.loss == "fisher", proxy=stage1.init == "proxy" and blocks is None)
    return [learn_score_table(problem, cfg, teacher=teacher, blocks=blocks) for cfg in one_table_per_budget(stage1)]


class GammaAllocator(Allocator):
    name = "gamma"

    def __init__(self, stage1: Stage1Config | None = None, tables: list[ScoreTable] | None = None):
        """``tables``: registered score tables to project from (no Stage I); otherwise ``prepare``
        learns one per training budget of ``stage1``."""
        super().__init__()
        self.stage1 = stage1 or Stage1Config()
        self.tables = tables or []

    def _prepare(self, problem: AllocationProblem) -> None:
        if not self.tables:
            self.tables = learn_band(problem, self.stage1)

    def _allocate(self, problem: AllocationProblem, budget: float):
        result = project_nearest(self.tables, budget, problem.stage2, group_size=problem.group_size,
                                 symmetric=problem.symmetric, units=problem.units, fixed_bytes=problem.fixed_bytes,
                                 zero_points=problem.zero_points)
        return result.assignment, {"solve_status": result.status, "training_budget": result.training_budget}
