"""GAMMA behind the allocator interface: Stage I (preference learning) once in ``prepare``, then
Stage II (the exact knapsack over the learned scores) per budget, from the table learned nearest.

``gamma`` learns one preference row per module; ``gamma-blocks`` one per column block (the blocks
ScaleBITS chooses among: input channels reordered by Fisher sensitivity, cut into group-aligned
blocks), so that a module's sensitive channels can take more bits than the rest of it. Both run
the same Stage I (teacher-forced, Fisher-weighted, proxy-initialised from the same Fisher costs,
per block for blocks) and the same knapsack; only the rows differ.
"""

from __future__ import annotations

import warnings

import numpy as np

from gamma.allocators.base import AllocationProblem, Allocator
from gamma.allocators.column_blocks import BlockAllocator, ColumnBlocks, build_column_blocks, fisher_channel_order
from gamma.config import Stage1Config
from gamma.projection import Solver, allocate_bits
from gamma.proxy import costs_to_logits, fisher_costs
from gamma.scores import ScoreTable, nearest_table
from gamma.stage1 import learn_preferences
from gamma.teacher import TeacherData, capture_teacher


def learn_table(problem: AllocationProblem, stage1: Stage1Config, teacher: TeacherData | None = None,
                blocks: ColumnBlocks | None = None) -> ScoreTable:
    """Stage I on the problem's candidates: teacher capture, proxy warm start, preference learning.
    With ``blocks`` the table has one row per column block (named ``module#j``)."""
    if teacher is None:
        teacher = capture_teacher(problem.model, problem.calibration,
                                  with_grads=stage1.loss == "fisher" or stage1.init == "proxy")
    if blocks is None:
        names, sizes, candidates, layouts = problem.modules, problem.sizes, problem.candidates, None
    else:
        names, sizes, candidates, layouts = blocks.row_names, blocks.row_sizes, blocks.candidates, blocks.layouts()
    init = None
    if stage1.init == "proxy":
        costs = fisher_costs(problem.model, problem.candidates, teacher.fisher) if blocks is None else blocks.errors
        init = costs_to_logits(costs, [r * c for r, c in sizes], problem.bits, stage1.budget, stage1.proxy_scale,
                               stage1.proxy_clip)
    result = learn_preferences(problem.model, teacher, candidates, problem.bits, stage1, init, layouts=layouts)
    return ScoreTable(modules=names, sizes=sizes, bits=problem.bits, scores=result.scores.tolist(),
                      model_hash="", text_hash="", quantizer={}, training_budget=stage1.budget,
                      settings=stage1.model_dump(), seed=stage1.seed, multiplier=result.multiplier,
                      penalty=result.penalty, violation=result.violation, history=result.history,
                      wall_seconds=result.wall_seconds, peak_memory_mb=result.peak_memory_mb)


def one_table_per_budget(stage1: Stage1Config) -> list[Stage1Config]:
    return [stage1.model_copy(update={"budget": b, "extra_budgets": []}) for b in stage1.training_budgets]


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
        teacher = None
        for cfg in one_table_per_budget(self.stage1):
            teacher = teacher or capture_teacher(problem.model, problem.calibration,
                                                 with_grads=cfg.loss == "fisher" or cfg.init == "proxy")
            self.tables.append(learn_table(problem, cfg, teacher))

    def _allocate(self, problem: AllocationProblem, budget: float):
        table = nearest_table(self.tables, budget)
        result = allocate_bits(problem.modules, problem.sizes, np.asarray(table.scores), problem.bits, budget,
                               window=self.window, group_size=problem.group_size, symmetric=problem.symmetric)
        return result.assignment, {"solve_status": result.status, "training_budget": table.training_budget}


class BlockGammaAllocator(BlockAllocator):
    name = "gamma-blocks"

    def __init__(self, stage1: Stage1Config | None = None, window: float = 0.005, width: int = 0,
                 reorder: bool = True, solver: Solver = "auto", tables: list[ScoreTable] | None = None):
        """``width``: columns per block (0: the quantization group size); ``reorder``: Fisher
        channel reordering before the blocks are cut; ``solver``: Stage II's, where ``auto`` is the
        LP-hull solver (a feasible answer and a proven bound in about a second; CBC proved the
        100-step tables of the embedded model's 2,340 blocks optimal in 0.3-5 s, but hit its 60 s
        limit without a proof on a 4-step table); ``tables``:
        block tables learned before (same model, candidates and blocks), so ``prepare`` only
        rebuilds the blocks."""
        super().__init__()
        self.stage1 = stage1 or Stage1Config()
        self.window, self.width, self.reorder = window, width, reorder
        self.solver: Solver = "hull" if solver == "auto" else solver
        self.tables = tables or []

    def _prepare(self, problem: AllocationProblem) -> None:
        # one teacher pass with gradients serves the Fisher ordering, the block costs and Stage I
        teacher = None if self.tables else capture_teacher(problem.model, problem.calibration, with_grads=True)
        fisher = problem.fisher(teacher)
        self.blocks = build_column_blocks(problem, self.width, fisher_channel_order(problem, self.reorder), fisher,
                                          "GAMMA blocks")
        if self.tables:
            for table in self.tables:
                table.check_matches(self.blocks.row_names, self.blocks.row_sizes)
            return
        if self.stage1.processes > 1:
            warnings.warn(f"gamma-blocks learns its block table in this one process; stage1.processes="
                          f"{self.stage1.processes} applies to module-level GAMMA only", stacklevel=2)
        for cfg in one_table_per_budget(self.stage1):
            self.tables.append(learn_table(problem, cfg, teacher, self.blocks))

    def _allocate(self, problem: AllocationProblem, budget: float):
        table = nearest_table(self.tables, budget)
        result = allocate_bits(table.modules, table.sizes, np.asarray(table.scores), problem.bits, budget,
                               window=self.window, group_size=problem.group_size, symmetric=problem.symmetric,
                               solver=self.solver)
        levels = np.array([problem.bits.index(result.assignment[n]) for n in table.modules])
        return self.blocks.to_assignment(levels, problem.bits), {
            "solve_status": result.status, "solver": result.solver, "gap": result.gap,
            "training_budget": table.training_budget, "blocks": self.blocks.n_blocks, "width": self.blocks.width}
