"""One interface for every bit allocator: a problem (model, calibration data, candidate weights,
candidate bits) and a budget in, an assignment and what it cost out.

``Allocator.prepare`` does the one-off work every budget shares (GAMMA's Stage I, a Fisher pass,
HIGGS's coefficients); ``Allocator.allocate`` serves one budget. Their times are kept apart so a
comparison can show what one more budget costs. Module-level allocators return
``{module: bits}``; sub-module ones (column blocks, chunks) return a ``BlockAssignment``.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gamma.config import UNIT_KEEPING_ALLOCATORS, check_budget_unit
from gamma.model.candidates import apply_candidates
from gamma.model.units import broken_ties, is_trivial
from gamma.problem import AllocationProblem, AllocatorError
from gamma.stage2.budgets import budget_text


@dataclass
class BlockAssignment:
    """Bits per column block inside each module. ``order[m]`` is the input-channel order the
    blocks are cut from (channel reordering; None: natural order); block ``j`` of module ``m``
    holds channels ``order[m][j*width:(j+1)*width]`` at ``bits[m][j]``."""

    width: int
    bits: dict[str, list[int]]
    order: dict[str, list[int] | None]

    def module_bits(self, name: str) -> float:
        return float(np.mean(self.bits[name]))

    def metadata_bits(self, n_candidates: int) -> int:
        """Storage beyond codes and scales: a bit-width index per block and, for a reordered
        module, its permutation (``ceil(log2(in))`` bits per input channel)."""
        per_block = math.ceil(math.log2(max(n_candidates, 2)))
        total = 0
        for name, blocks in self.bits.items():
            total += per_block * len(blocks)
            order = self.order.get(name)
            if order is not None:
                total += len(order) * math.ceil(math.log2(len(order)))
        return total

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Allocated:
    """One budget's answer. ``avg_bits`` counts weight codes only (the budget's unit);
    ``metadata_bits`` is what a sub-module assignment stores besides (per weight: ``/ params``)."""

    allocator: str
    budget: float
    assignment: dict[str, int] | BlockAssignment
    avg_bits: float
    seconds: float  # this budget alone
    prepare_seconds: float  # shared one-off work (Stage I, Fisher, coefficients), paid once
    metadata_bits: int = 0
    notes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.assignment, BlockAssignment):
            d["assignment"] = {"blocks": self.assignment.as_dict()}
        return d


class Allocator(ABC):
    name: str = ""
    granularity: str = "module"  # or "block"

    def __init__(self) -> None:
        self.prepare_seconds = 0.0
        self._prepared = False

    def prepare(self, problem: AllocationProblem) -> None:
        """The one-off work every budget shares; timed, and run at most once."""
        if self._prepared:
            return
        t0 = time.perf_counter()
        self._prepare(problem)
        self.prepare_seconds = time.perf_counter() - t0
        self._prepared = True

    def _prepare(self, problem: AllocationProblem) -> None:  # noqa: B027 - most allocators have no one-off work
        """Override for one-off work; by default there is none."""

    def allocate(self, problem: AllocationProblem, budget: float) -> Allocated:
        """One assignment within ``budget`` (in ``problem.stage2.unit``), checked: units whole,
        restrictions held, the budget not exceeded in its own unit."""
        try:
            check_budget_unit(self.name, problem.stage2.unit)
        except ValueError as err:
            raise AllocatorError(str(err)) from None
        problem.check_budget(budget)
        if self.name not in UNIT_KEEPING_ALLOCATORS and not is_trivial(problem.units):
            raise AllocatorError(f"{self.name} does not keep allocation units whole: use one of "
                                 f"{list(UNIT_KEEPING_ALLOCATORS)}, or every module its own unit")
        self.prepare(problem)
        t0 = time.perf_counter()
        assignment, notes = self._allocate(problem, budget)
        seconds = time.perf_counter() - t0
        broken = [] if isinstance(assignment, BlockAssignment) or problem.units is None else \
            broken_ties(assignment, problem.modules, problem.units)
        if broken:  # a guard on every allocator: never an assignment vLLM's fused layers refuse
            raise AllocatorError(f"{self.name}: members of a unit got different widths: {broken[:2]}")
        problem.check_restrictions(assignment.bits if isinstance(assignment, BlockAssignment) else assignment)
        used = average_bits(problem, assignment)
        spent = used if problem.stage2.unit == "nominal" else problem.spent(assignment)
        if spent > budget + 1e-9:
            raise AllocatorError(f"{self.name}: assignment spends {spent:.6g}, over the budget "
                                 f"{budget_text(budget, problem.stage2.unit)}")
        meta = assignment.metadata_bits(len(problem.bits)) if isinstance(assignment, BlockAssignment) else 0
        return Allocated(self.name, budget, assignment, used, seconds, self.prepare_seconds, meta, notes)

    def apply(self, problem: AllocationProblem, assignment: dict[str, int] | BlockAssignment) -> None:
        """Put the assignment's quantized weights into ``problem.model`` (block allocators: fake-quantized)."""
        problem.keep_originals()
        apply_candidates(problem.model, problem.candidates, problem.bits, assignment)

    @abstractmethod
    def _allocate(self, problem: AllocationProblem, budget: float) -> tuple[dict | BlockAssignment, dict]:
        ...


def average_bits(problem: AllocationProblem, assignment: dict[str, int] | BlockAssignment) -> float:
    params = dict(zip(problem.modules, problem.params))
    if isinstance(assignment, BlockAssignment):
        spent = sum(params[m] * assignment.module_bits(m) for m in assignment.bits)
    else:
        spent = sum(params[m] * b for m, b in assignment.items())
    return float(spent / sum(params.values()))


class CalibrationLoss:
    """Mean next-token loss of the model with candidate weights applied, on calibration tokens.

    Tracks which candidate each module holds so that trying a neighbouring assignment copies only
    the modules that changed; ``restore`` puts the full-precision weights back."""

    def __init__(self, problem: AllocationProblem):
        self.problem = problem
        self.applied: dict[str, int] = {}

    @torch.no_grad()
    def __call__(self, assignment: dict[str, int], sequences: torch.Tensor) -> float:
        changed = {m: b for m, b in assignment.items() if self.applied.get(m) != b}
        self.problem.keep_originals()
        apply_candidates(self.problem.model, self.problem.candidates, self.problem.bits, changed)
        self.applied.update(changed)
        return next_token_loss(self.problem.model, sequences)

    def restore(self) -> None:
        self.problem.restore()
        self.applied = {}


@torch.no_grad()
def next_token_loss(model: nn.Module, sequences: torch.Tensor, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for batch in sequences.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count
