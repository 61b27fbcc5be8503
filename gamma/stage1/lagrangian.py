"""The augmented Lagrangian that holds Stage I's expected bits to the training budget.

Penalty term ``lambda * c + (rho / 2) * c^2`` with ``c = E - B_train``. Every ``interval`` steps the
multiplier moves by ``rho`` times the *mean* violation of those steps (one step's ``c`` swings with
Adam and sampling noise), and ``rho`` grows by ``growth`` (up to ``max_penalty``) only when the mean
|c| has not shrunk by at least a quarter since the last update: blind growth oscillates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class AugmentedLagrangian:
    budget: float
    multiplier: float = 0.0
    penalty: float = 10.0
    growth: float = 2.0
    max_penalty: float = 1000.0
    interval: int = 5
    _window: list[float] = field(default_factory=list)
    _last_abs: float | None = None

    def term(self, expected_bits: torch.Tensor) -> torch.Tensor:
        c = expected_bits - self.budget
        return self.multiplier * c + 0.5 * self.penalty * c * c

    def observe(self, violation: float) -> None:
        """Record one step's ``c``; update the multiplier and penalty every ``interval`` steps."""
        self._window.append(violation)
        if len(self._window) < self.interval:
            return
        mean_c = sum(self._window) / len(self._window)
        self._window.clear()
        self.multiplier += self.penalty * mean_c
        if self._last_abs is not None and abs(mean_c) > 0.75 * self._last_abs:
            self.penalty = min(self.max_penalty, self.penalty * self.growth)
        self._last_abs = abs(mean_c)

    @staticmethod
    def feasible_multiplier(loss_grad: torch.Tensor, constraint_grad: torch.Tensor) -> float:
        """The price at which a gradient step leaves ``c`` unchanged to first order:
        ``lambda = -<g_c, g_L> / |g_c|^2`` (``g`` are gradients with respect to the logits)."""
        denom = float((constraint_grad * constraint_grad).sum())
        return -float((constraint_grad * loss_grad).sum()) / denom if denom > 0 else 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def price_shift(alpha: np.ndarray, sizes: list[int], bits: list[int], budget: float,
                temperature: float = 1.0) -> tuple[np.ndarray, float]:
    """Shift logits by a price per bit, ``alpha_mb - mu * M * n_m / N * b``, with ``mu`` found by
    bisection so that the expected average bits equal ``budget``. This is the Lagrangian price at
    which the table meets the budget: it moves every module the same way per bit of its share, so
    it changes which modules are cheap to upgrade only through their sizes."""
    n = np.asarray(sizes, dtype=np.float64)
    w = n / n.sum()
    b = np.asarray(bits, dtype=np.float64)
    step = w[:, None] * b[None, :] * alpha.shape[0]

    def expected(mu: float) -> float:
        a = (alpha - mu * step) / temperature
        p = np.exp(a - a.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return float((w[:, None] * p * b[None, :]).sum())

    lo, hi = -1.0, 1.0
    while expected(lo) < budget and lo > -1e12:
        lo *= 4
    while expected(hi) > budget and hi < 1e12:
        hi *= 4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) > budget else (lo, mid)
    mu = (lo + hi) / 2
    return alpha - mu * step, mu
