"""Block-wise greedy at sub-module granularity (ScaleBITS-style).

Input channels of each module are reordered by Fisher sensitivity (``sum_i F_ij W_ij^2``, most
sensitive first) so that the channels worth more bits share blocks; the module is cut into
hardware-aligned blocks of ``width`` columns; every block starts at the lowest candidate and the
block whose next candidate removes the most Fisher-weighted error per added bit is raised, until
the budget is spent (a heap makes this greedy O(J log J) over J blocks: the scalable form).
"""

from __future__ import annotations

import numpy as np

from gamma.allocators.base import AllocationProblem
from gamma.allocators.column_blocks import BlockAllocator, build_column_blocks, fisher_channel_order, greedy_upgrade


class ScalebitsAllocator(BlockAllocator):
    name = "scalebits"

    def __init__(self, width: int = 0, reorder: bool = True):
        """``width``: columns per block (0: the quantization group size)."""
        super().__init__()
        self.width, self.reorder = width, reorder

    def _prepare(self, problem: AllocationProblem) -> None:
        order = fisher_channel_order(problem, self.reorder)
        self.blocks = build_column_blocks(problem, self.width, order, problem.fisher(), "ScaleBITS")

    def _allocate(self, problem: AllocationProblem, budget: float):
        b = self.blocks
        start = np.zeros(b.n_blocks, dtype=np.int64)
        levels = greedy_upgrade(b.errors, b.sizes, problem.bits, start, budget * float(b.sizes.sum()))
        return b.to_assignment(levels, problem.bits), {"blocks": b.n_blocks, "width": b.width,
                                                       "fisher_error": float(b.errors[np.arange(b.n_blocks),
                                                                                      levels].sum())}
