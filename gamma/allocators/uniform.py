"""Uniform precision; a budget between two candidates by the best two-level split.

Every module gets the candidate just below the budget, then modules are raised to the candidate
just above, one by one in a fixed order, while the budget allows. Four orders are tried (deepest
first, shallowest first, MLP first, attention first) and the one with the lowest calibration loss
wins: the strongest allocation that uses no per-module sensitivity at all.
"""

from __future__ import annotations

from gamma.allocators.base import AllocationProblem, Allocator, AllocatorError, CalibrationLoss
from gamma.model.loading import block_index

SPLIT_ORDERS = {
    "deepest first": lambda n: -block_index(n),
    "shallowest first": lambda n: block_index(n),
    "mlp first": lambda n: (0 if ".mlp." in n else 1, block_index(n)),
    "attention first": lambda n: (0 if ".self_attn." in n else 1, block_index(n)),
}


def two_level_split(modules: list[str], params: list[int], bits: list[int], budget: float, order,
                    lowest: dict[str, int] | None = None, units: list[list[int]] | None = None) -> dict[str, int]:
    """The lower candidate everywhere (or a module's ``lowest`` allowed, if higher), then the upper
    one unit (a module, or modules that share one width) at a time in ``order`` while it fits."""
    lower = max(b for b in bits if b <= budget)
    upper = min((b for b in bits if b > budget), default=None)
    groups = [[modules[i] for i in u] for u in (units or [[i] for i in range(len(modules))])]
    n = dict(zip(modules, params))
    assignment = {}
    for group in groups:
        assignment.update(dict.fromkeys(group, max(lower, *((lowest or {}).get(m, lower) for m in group))))
    room = budget * sum(n.values()) - sum(n[m] * b for m, b in assignment.items())
    if room < 0:
        raise AllocatorError(f"budget {budget:g}: the modules held up by stage2.min_bits alone spend more")
    if upper is None:
        return assignment
    for group in sorted(groups, key=lambda g: order(g[0])):
        extra = sum(n[m] * (upper - assignment[m]) for m in group)
        if all(assignment[m] < upper for m in group) and extra <= room:
            assignment.update(dict.fromkeys(group, upper))
            room -= extra
    return assignment


class UniformAllocator(Allocator):
    name = "uniform"

    def __init__(self, calibration_sequences: int = 4):
        super().__init__()
        self.calibration_sequences = calibration_sequences

    def _allocate(self, problem: AllocationProblem, budget: float):
        modules, params = problem.modules, [int(p) for p in problem.params]
        lowest = problem.lowest_bits()
        if budget in problem.bits and max(lowest.values()) <= budget:
            return dict.fromkeys(modules, int(budget)), {"split_order": None}
        loss = CalibrationLoss(problem)
        sequences = problem.calibration[: self.calibration_sequences]
        try:
            tried = {name: two_level_split(modules, params, problem.bits, budget, order, lowest, problem.units)
                     for name, order in SPLIT_ORDERS.items()}
            scored = {name: loss(a, sequences) for name, a in tried.items()}
        finally:
            loss.restore()
        best = min(scored, key=scored.get)
        return tried[best], {"split_order": best, "calibration_loss": scored}
