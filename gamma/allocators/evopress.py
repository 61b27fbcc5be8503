"""Evolutionary search over assignments (EvoPress-style), fitness from calibration loss.

A (1 + lambda) search: each generation mutates the parent into ``offspring`` children by level
switches (one module goes up one candidate, then randomly chosen modules go down one candidate
until the child fits the budget again), scores every child on a few calibration tokens, rescores
the best ``survivors`` on more tokens, and keeps the winner if it beats the parent there
(EvoPress's multi-step selection: cheap fitness to prune, precise fitness to decide). The search
starts from the best two-level split and is seeded, so a run is reproducible.
"""

from __future__ import annotations

import numpy as np

from gamma.allocators.base import AllocationProblem, Allocator, CalibrationLoss
from gamma.allocators.uniform import UniformAllocator
from gamma.progress import track


def level_switch(assignment: dict[str, int], params: dict[str, int], bits: list[int], budget_bits: float,
                 rng: np.random.Generator, switches: int = 1, lowest: dict[str, int] | None = None) -> dict[str, int]:
    """A neighbour of ``assignment`` that spends at most ``budget_bits`` (sum of params x bits) and
    keeps every module at or above its ``lowest`` bits."""
    child = dict(assignment)
    names = list(child)
    for _ in range(switches):
        up = [m for m in names if child[m] != bits[-1]]
        if not up:
            break
        m = up[rng.integers(len(up))]
        child[m] = bits[bits.index(child[m]) + 1]
    spent = sum(params[m] * b for m, b in child.items())
    order = rng.permutation(len(names))
    for i in order:
        if spent <= budget_bits:
            break
        m = names[i]
        if child[m] <= (lowest or {}).get(m, bits[0]) or child[m] > assignment[m]:
            continue  # never undo this child's own upgrade
        lower = bits[bits.index(child[m]) - 1]
        spent -= params[m] * (child[m] - lower)
        child[m] = lower
    return child if spent <= budget_bits else dict(assignment)


class EvopressAllocator(Allocator):
    name = "evopress"

    def __init__(self, generations: int = 40, offspring: int = 8, survivors: int = 2, switches: int = 2,
                 screen_tokens: int = 256, select_sequences: int = 4):
        super().__init__()
        self.generations, self.offspring, self.survivors = generations, offspring, survivors
        self.switches, self.screen_tokens, self.select_sequences = switches, screen_tokens, select_sequences

    def _allocate(self, problem: AllocationProblem, budget: float):
        rng = np.random.default_rng(problem.seed)
        params = dict(zip(problem.modules, (int(p) for p in problem.params)))
        budget_bits = budget * sum(params.values())
        lowest = problem.lowest_bits()
        parent, _ = UniformAllocator(self.select_sequences)._allocate(problem, budget)
        screen = problem.calibration[:1, : self.screen_tokens]
        select = problem.calibration[: self.select_sequences]
        fitness = CalibrationLoss(problem)
        history = []
        try:
            parent_loss = fitness(parent, select)
            start = parent_loss
            for _ in track(range(self.generations), f"EvoPress search at {budget:g} bits"):
                children = [level_switch(parent, params, problem.bits, budget_bits, rng, self.switches, lowest)
                            for _ in range(self.offspring)]
                screened = sorted(children, key=lambda c: fitness(c, screen))[: self.survivors]
                scored = [(fitness(c, select), i) for i, c in enumerate(screened)]
                loss, i = min(scored)
                if loss < parent_loss:
                    parent, parent_loss = screened[i], loss
                history.append(parent_loss)
        finally:
            fitness.restore()
        return parent, {"start_loss": start, "final_loss": parent_loss, "loss_history": history}
