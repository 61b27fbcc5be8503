"""GAMMA per column block: the same two stages as ``gamma`` with one row of logits per block of
input channels (the blocks ScaleBITS chooses among: channels reordered by Fisher sensitivity, cut
into group-aligned blocks), so that a module's sensitive channels can take more bits than the
rest of it. Stage I starts from each block's Fisher cost; Stage II is the LP-hull solver unless
``stage2.solver`` names another (CBC proves small block tables optimal but may hit its time limit
without a proof on a short run's flat table)."""

from __future__ import annotations

import warnings

import numpy as np

from gamma.allocators.base import AllocationProblem
from gamma.allocators.column_blocks import BlockAllocator, build_column_blocks, fisher_channel_order
from gamma.allocators.gamma import learn_band
from gamma.config import Stage1Config
from gamma.stage2.projection import project
from gamma.stage2.scores import ScoreTable, nearest_table


class BlockGammaAllocator(BlockAllocator):
    name = "gamma-blocks"

    def __init__(self, stage1: Stage1Config | None = None, width: int = 0, reorder: bool = True,
                 tables: list[ScoreTable] | None = None):
        """``width``: columns per block (0: the quantization group size); ``reorder``: Fisher
        channel reordering before the blocks are cut; ``tables``: block tables learned before
        (same model, candidates and blocks), so ``prepare`` only rebuilds the blocks."""
        super().__init__()
        self.stage1 = stage1 or Stage1Config()
        self.width, self.reorder = width, reorder
        self.tables = tables or []

    def _prepare(self, problem: AllocationProblem) -> None:
        # one teacher pass with gradients serves the Fisher ordering, the block costs and Stage I
        teacher = None if self.tables else problem.capture(keep_fisher=True)
        fisher = problem.fisher()
        self.blocks = build_column_blocks(problem, self.width, fisher_channel_order(problem, self.reorder), fisher,
                                          "GAMMA blocks")
        if self.tables:
            for table in self.tables:
                table.check_matches(self.blocks.row_names, self.blocks.row_sizes)
            return
        if self.stage1.processes > 1:
            warnings.warn(f"gamma-blocks learns its block table in this one process; stage1.processes="
                          f"{self.stage1.processes} applies to module-level GAMMA only", stacklevel=2)
        self.tables = learn_band(problem, self.stage1, self.blocks, teacher)

    def _allocate(self, problem: AllocationProblem, budget: float):
        table = nearest_table(self.tables, budget)
        stage2 = problem.stage2
        if stage2.solver == "auto":
            stage2 = stage2.model_copy(update={"solver": "hull"})
        result = project(table, budget, stage2, group_size=problem.group_size, symmetric=problem.symmetric)
        levels = np.array([problem.bits.index(result.assignment[n]) for n in table.modules])
        return self.blocks.to_assignment(levels, problem.bits), {
            "solve_status": result.status, "solver": result.solver, "gap": result.gap,
            "training_budget": table.training_budget, "blocks": self.blocks.n_blocks, "width": self.blocks.width}
