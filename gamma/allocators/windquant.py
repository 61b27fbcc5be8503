"""A PPO controller over column chunks under a global storage budget (WINDQuant-style).

Each module is cut into chunks of ``width`` input columns. A small policy network reads each
chunk's features (its reconstruction error at every candidate, its depth, its module type, its
place in the module) and proposes a bit width per chunk; the environment lowers chunks (least
error added per saved bit first) until the proposal fits the budget, and pays back the negative
calibration reconstruction error of what remains: per chunk ``sum_c H_cc ||W_c - Q_b(W_c)||^2``
with ``H = X^T X`` of the module's calibration inputs, relative to the module's output energy, so
every module's output error counts alike. Trained with PPO's clipped objective on batches of
sampled episodes; the answer is the best assignment seen, topped up greedily to spend the budget.
Seeded: the same problem and settings give the same assignment.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gamma.allocators.base import AllocationProblem
from gamma.allocators.column_blocks import BlockAllocator, build_column_blocks, greedy_upgrade, repair_down
from gamma.model.loading import block_index, quantizable_modules
from gamma.progress import track
from gamma.quant.hessians import collect_hessians


def chunk_features(blocks, modules: list[str]) -> torch.Tensor:
    """[J, F]: standardised log errors per candidate, depth, module type (one-hot), place in module."""
    log_err = np.log(blocks.errors + 1e-12)
    log_err = (log_err - log_err.mean()) / (log_err.std() + 1e-9)
    kinds = sorted({m.rsplit(".", 1)[-1] for m in modules})
    depth = np.array([block_index(modules[i]) for i in blocks.owner], dtype=np.float64)
    kind = np.zeros((blocks.n_blocks, len(kinds)))
    kind[np.arange(blocks.n_blocks), [kinds.index(modules[i].rsplit(".", 1)[-1]) for i in blocks.owner]] = 1
    place = np.zeros(blocks.n_blocks)
    for i in range(len(modules)):
        idx = np.flatnonzero(blocks.owner == i)
        place[idx] = np.arange(len(idx)) / max(len(idx) - 1, 1)
    feats = np.column_stack([log_err, depth / max(depth.max(), 1), kind, place])
    return torch.tensor(feats, dtype=torch.float32)


class WindquantAllocator(BlockAllocator):
    name = "windquant"

    def __init__(self, width: int = 0, iterations: int = 60, episodes: int = 16, epochs: int = 4,
                 lr: float = 3e-3, clip: float = 0.2, entropy: float = 0.01, hidden: int = 64):
        super().__init__()
        self.width, self.iterations, self.episodes, self.epochs = width, iterations, episodes, epochs
        self.lr, self.clip, self.entropy, self.hidden = lr, clip, entropy, hidden

    def _prepare(self, problem: AllocationProblem) -> None:
        hessians = problem.full_hessians() or collect_hessians(problem.model, problem.calibration,
                                                               device=problem.device)
        weights = quantizable_modules(problem.model)
        column_weight = {}
        for name in problem.modules:
            diag = torch.diagonal(hessians[name]).float()
            energy = float((diag * weights[name].weight.detach().float() ** 2).sum())
            column_weight[name] = diag / max(energy, 1e-12)
        self.blocks = build_column_blocks(problem, self.width, {m: None for m in problem.modules}, column_weight,
                                          "WINDQuant")
        self.features = chunk_features(self.blocks, problem.modules)

    def _allocate(self, problem: AllocationProblem, budget: float):
        b, bits = self.blocks, problem.bits
        budget_bits = budget * float(b.sizes.sum())
        rows = np.arange(b.n_blocks)

        def reward(levels: np.ndarray) -> tuple[float, np.ndarray]:
            fitted = repair_down(b.errors, b.sizes, bits, levels, budget_bits)
            return -float(b.errors[rows, fitted].sum()), fitted

        with torch.random.fork_rng():
            torch.manual_seed(problem.seed)
            policy = nn.Sequential(nn.Linear(self.features.shape[1], self.hidden), nn.Tanh(),
                                   nn.Linear(self.hidden, len(bits)))
            opt = torch.optim.Adam(policy.parameters(), lr=self.lr)
            best_reward, best, curve = -np.inf, None, []
            for _ in track(range(self.iterations), f"WINDQuant PPO at {budget:g} bits"):
                with torch.no_grad():
                    dist = torch.distributions.Categorical(logits=policy(self.features))
                    actions = dist.sample((self.episodes,))  # [E, J]
                    old_logp = dist.log_prob(actions).sum(dim=1)
                results = [reward(a.numpy()) for a in actions]
                rewards = torch.tensor([r for r, _ in results])
                for r, fitted in results:
                    if r > best_reward:
                        best_reward, best = r, fitted
                curve.append(float(rewards.mean()))
                advantage = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
                for _ in range(self.epochs):
                    dist = torch.distributions.Categorical(logits=policy(self.features))
                    ratio = torch.exp(dist.log_prob(actions).sum(dim=1) - old_logp)
                    surrogate = torch.min(ratio * advantage, ratio.clamp(1 - self.clip, 1 + self.clip) * advantage)
                    loss = -surrogate.mean() - self.entropy * dist.entropy().mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                greedy = policy(self.features).argmax(dim=1).numpy()
        r, fitted = reward(greedy)
        if r > best_reward:
            best_reward, best = r, fitted
        levels = greedy_upgrade(b.errors, b.sizes, bits, best, budget_bits)
        return b.to_assignment(levels, bits), {"blocks": b.n_blocks, "width": b.width, "reward_curve": curve,
                                               "best_sampled_reward": best_reward,
                                               "final_reward": -float(b.errors[rows, levels].sum())}
