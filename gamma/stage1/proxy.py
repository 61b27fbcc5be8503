"""Sensitivity proxies: cheap per-(module, candidate) costs that Stage II can minimise directly.

- ``FisherCosts`` (HAWQ-style, and Stage I's warm start): ``sum(F_m * (W_m - Q_b(W_m))^2)`` with
  ``F_m`` the empirical Fisher diagonal, consumed block by block from ``capture_teacher``.
- ``relative_error_costs``: the module's relative quantization error weighted by its size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gamma.model.loading import quantizable_modules
from gamma.quant.interface import QuantizedWeight
from gamma.stage1.lagrangian import price_shift


class FisherCosts:
    """``on_fisher`` consumer of ``capture_teacher``: each block's Fisher diagonals turned at once
    into its modules' rows of ``sum(F_m * (W_m - Q_b(W_m))^2)``, on the device the Fisher is on."""

    def __init__(self, model: nn.Module, candidates: dict[str, list[QuantizedWeight]]):
        self.weights = quantizable_modules(model)
        self.candidates = candidates
        self.rows: dict[str, list[float]] = {}

    @torch.no_grad()
    def __call__(self, _block: int, fisher: dict[str, torch.Tensor]) -> None:
        for name, f in fisher.items():
            if name not in self.candidates:
                continue
            w = self.weights[name].weight.to(f.device, torch.float32)
            self.rows[name] = [float((f * (w - q.dequantize(f.device)) ** 2).sum())
                               for q in self.candidates[name]]

    @property
    def table(self) -> np.ndarray:
        """[M, K] in the candidates' module order."""
        return np.array([self.rows[name] for name in self.candidates])


class KeepFisher:
    """``on_fisher`` consumer that keeps every module's Fisher diagonal on the host (float32): as
    large as the model, for the sub-module allocators that order and cut columns by it."""

    def __init__(self):
        self.fisher: dict[str, torch.Tensor] = {}

    def __call__(self, _block: int, fisher: dict[str, torch.Tensor]) -> None:
        self.fisher.update({name: f.cpu() for name, f in fisher.items()})


def relative_error_costs(model: nn.Module, candidates: dict[str, list[QuantizedWeight]]) -> np.ndarray:
    modules = quantizable_modules(model)
    rows = []
    for name, cands in candidates.items():
        w = modules[name].weight.detach()
        norm = float(w.pow(2).sum())
        rows.append([w.numel() * float((w - q.dequantize(w.device)).pow(2).sum()) / norm for q in cands])
    return np.array(rows)


def costs_to_logits(
    costs: np.ndarray, sizes: list[int], bits: list[int], budget: float, scale: float = 0.0, clip: float = 0.0
) -> np.ndarray:
    """Proxy initialisation ``alpha_mb = -cost_mb / s``, clipped per module to ``clip`` units below
    its best (``clip=0``: not clipped), then shifted by a price per bit (``price_shift``).

    ``s`` (``scale=0``: automatic) makes the median module's cost spread span 3 logit units. The
    price ``mu`` is the Lagrangian price at which the initial probabilities already meet the
    budget (found by bisection), so learning starts feasible instead of 0.5 bits over.
    """
    if scale <= 0:
        spread = np.median(costs.max(axis=1) - costs.min(axis=1))
        scale = float(spread / 3.0) if spread > 0 else 1.0
    alpha = -costs / scale
    if clip > 0:
        alpha = np.maximum(alpha, alpha.max(axis=1, keepdims=True) - clip)
    return price_shift(alpha, sizes, bits, budget)[0]
