"""Linearity model with dynamic programming (HIGGS-style).

The loss increase of a quantized model is modelled as a weighted sum of per-module relative
quantization errors, ``dL ~ sum_m a_m t_m(b_m)`` with ``t_m(b) = ||W_m - Q_b(W_m)||^2 / ||W_m||^2``.
The weights ``a_m`` are measured once: Gaussian noise of a known relative size ``t0`` is added to
module ``m`` alone, in mirrored pairs ``+e, -e`` (the pair's mean cancels the first-order term
that otherwise drowns the curvature in one draw), and the calibration loss increase is divided
by ``t0``. The allocation that
minimises the modelled loss within the budget is then found exactly by dynamic programming over
the module sizes in units of their greatest common divisor.
"""

from __future__ import annotations

from math import gcd

import numpy as np
import torch
import torch.nn.functional as F

from gamma.allocators.base import AllocationProblem, Allocator, AllocatorError
from gamma.model.blocks import BlockRunner
from gamma.model.loading import block_index, quantizable_modules
from gamma.progress import track
from gamma.stage1.proxy import relative_error_costs

MAX_DP_UNITS = 200_000  # above this, module sizes are rounded up to a coarser unit (never over budget)


def relative_errors(problem: AllocationProblem) -> np.ndarray:
    """``t[m, k] = ||W_m - Q_k(W_m)||^2 / ||W_m||^2``: the proxy's relative error without its size weight."""
    return relative_error_costs(problem.model, problem.candidates) / problem.params[:, None]


@torch.no_grad()
def noise_coefficients(problem: AllocationProblem, level: float, sequences: int, draws: int = 1) -> np.ndarray:
    """``a_m``: calibration loss increase per unit of relative noise ``level`` in module ``m`` alone.

    Noise in block ``l`` leaves blocks ``0..l-1`` unchanged, so each measurement starts from the
    cached full-precision input of its block and runs only the rest of the model."""
    model = problem.model
    modules = quantizable_modules(model)
    data = problem.calibration[:sequences]
    runner = BlockRunner(model)
    inputs = [runner.embed_all(data)]
    for index in range(len(runner.blocks)):
        inputs.append(runner.run_block_all(index, inputs[-1]))

    def loss_from(index: int) -> float:
        hidden = inputs[index]
        for i in range(index, len(runner.blocks)):
            hidden = runner.run_block_all(i, hidden)
        logits = runner.head(runner.to_device(hidden))[:, :-1]
        labels = data[:, 1:].to(runner.device)
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))

    base = loss_from(len(runner.blocks))
    gen = torch.Generator().manual_seed(problem.seed)
    out = []
    for name in track(problem.modules, "HIGGS coefficients (noise per module)"):
        weight = modules[name].weight
        original = weight.detach().clone()
        sigma = (level * float(original.float().pow(2).mean())) ** 0.5
        rise = 0.0
        for _ in range(draws):
            noise = sigma * torch.randn(original.shape, generator=gen).to(original.dtype)
            for sign in (1, -1):  # a mirrored pair cancels the gradient term, which one draw's noise is
                weight.copy_(original + sign * noise)
                rise += (loss_from(block_index(name)) - base) / 2
        weight.copy_(original)
        out.append(rise / draws / level)
    return np.array(out)


def knapsack_dp(costs: np.ndarray, params: np.ndarray, bits: list[int], budget: float) -> list[int]:
    """Exact minimum of ``sum costs[m, k_m]`` subject to ``sum params_m bits_{k_m} <= budget * sum params``;
    returns the chosen candidate index per module."""
    lowest = min(bits)
    unit = 0
    for p in params:
        unit = gcd(unit, int(p))
    total_units = int(params.sum()) // unit
    if total_units * (max(bits) - lowest) > MAX_DP_UNITS:
        unit = int(np.ceil(params.sum() * (max(bits) - lowest) / MAX_DP_UNITS))
    units = np.ceil(params / unit).astype(np.int64)
    capacity = int(np.floor((budget - lowest) * params.sum() / unit + 1e-9))
    if capacity < 0:
        raise AllocatorError(f"budget {budget:g} is below the lowest candidate ({lowest} bits)")
    extra = [[int(u * (b - lowest)) for b in bits] for u in units]
    inf = np.inf
    best = np.zeros(capacity + 1)  # best[c]: least cost of the modules so far spending <= c extra units
    choice = np.zeros((len(params), capacity + 1), dtype=np.int8)
    for m in range(len(params)):
        nxt = np.full(capacity + 1, inf)
        for k, w in enumerate(extra[m]):
            if w > capacity:
                continue
            cand = np.full(capacity + 1, inf)
            cand[w:] = best[: capacity + 1 - w] + costs[m, k]
            better = cand < nxt
            nxt[better], choice[m, better] = cand[better], k
        best = nxt
    c = int(np.argmin(best))
    if not np.isfinite(best[c]):
        raise AllocatorError(f"budget {budget:g}: no assignment fits")
    picks = []
    for m in range(len(params) - 1, -1, -1):
        k = int(choice[m, c])
        picks.append(k)
        c -= extra[m][k]
    return picks[::-1]


class HiggsAllocator(Allocator):
    name = "higgs"

    def __init__(self, calibration_sequences: int = 4, noise_bits: int = 3, draws: int = 1):
        super().__init__()
        self.calibration_sequences = calibration_sequences
        self.noise_bits = noise_bits
        self.draws = draws

    def _prepare(self, problem: AllocationProblem) -> None:
        self.errors = relative_errors(problem)
        k = problem.bits.index(self.noise_bits) if self.noise_bits in problem.bits else len(problem.bits) // 2
        self.level = float(np.median(self.errors[:, k]))  # noise as large as a typical real error
        self.coefficients = noise_coefficients(problem, self.level, self.calibration_sequences, self.draws)

    def _allocate(self, problem: AllocationProblem, budget: float):
        # a negative coefficient is measurement noise (noise cannot help on average): floor at zero
        costs = np.maximum(self.coefficients, 0.0)[:, None] * self.errors
        costs = np.where(problem.allowed, costs, np.inf)  # stage2.min_bits
        picks = knapsack_dp(costs, problem.params, problem.bits, budget)
        assignment = {m: problem.bits[k] for m, k in zip(problem.modules, picks)}
        return assignment, {"modelled_loss_increase": float(sum(costs[m, k] for m, k in enumerate(picks))),
                            "noise_level": self.level}
