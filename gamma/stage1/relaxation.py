"""The relaxed mixed linear module of Stage I, and the learnable preference logits.

``PreferenceLogits`` holds one row of logits ``alpha_m`` over the candidate bit widths for every
module. ``MixedLinear`` stands in for a module's ``nn.Linear`` while its block is being trained:
its weight is ``sum_b mix_b Q_b(W)`` where ``mix`` is either the softmax probabilities
(``soft``) or a straight-through Gumbel sample (``hard``). The mixed weight is built as a
detached leaf and ``dL/dmix_b = <dL/dW, Q_b(W)>`` is applied afterwards: autograd through the
sum would keep |C| weight-sized temporaries alive per module.

At column-block granularity (``columns`` given) a module has one row of logits per block of input
channels: ``mix`` is [J, K] and column ``i`` of the weight mixes its candidates with
``mix[columns[i]]``; the gradient of a block's row sums over its columns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class PreferenceLogits(nn.Module):
    def __init__(self, modules: list[str], bits: list[int], sizes: list[int], init: torch.Tensor | None = None):
        super().__init__()
        self.modules_ = list(modules)
        self.bits = list(bits)
        self.register_buffer("bits_t", torch.tensor(bits, dtype=torch.float64))
        self.register_buffer("weights", torch.tensor(sizes, dtype=torch.float64) / float(sum(sizes)))
        alpha = torch.zeros(len(modules), len(bits)) if init is None else torch.as_tensor(init, dtype=torch.float32)
        self.alpha = nn.Parameter(alpha.clone())

    def probabilities(self, temperature: float = 1.0) -> torch.Tensor:
        return torch.softmax(self.alpha / temperature, dim=-1)

    def expected_bits(self, temperature: float = 1.0) -> torch.Tensor:
        """``E = sum_m n_m sum_b p_mb b / sum_m n_m``, differentiable in the logits."""
        p = self.probabilities(temperature).double()
        return (self.weights[:, None] * p * self.bits_t[None, :]).sum()

    def straight_through_samples(self, temperature: float, generator: torch.Generator, samples: int = 1,
                                 antithetic: bool = False) -> list[torch.Tensor]:
        """``samples`` one-hot Gumbel-softmax draws [M, K]; gradients flow through the soft
        probabilities. ``antithetic``: draws come in pairs from uniforms ``u`` and ``1 - u``, whose
        Gumbel noises are negatively correlated, so a pair's mean gradient varies less than two
        independent draws'."""
        draws = []
        for s in range(samples):
            if not antithetic or s % 2 == 0:
                u = torch.rand(self.alpha.shape, generator=generator).clamp(1e-10, 1 - 1e-10)
            else:
                u = 1 - u
            soft = torch.softmax((self.alpha - torch.log(-torch.log(u))) / temperature, dim=-1)
            hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
            draws.append(hard - soft.detach() + soft)
        return draws

    def scores(self, temperature: float = 1.0) -> torch.Tensor:
        """The score table ``s_mb = log p_mb``."""
        return torch.log_softmax(self.alpha.detach() / temperature, dim=-1)


class MixedLinear(nn.Module):
    def __init__(self, candidates: torch.Tensor, bias: torch.Tensor | None, columns: torch.Tensor | None = None):
        """``candidates``: [K, out, in], dequantized; ``columns``: [in], the block of each input
        column (None: one mix for the whole module)."""
        super().__init__()
        self.candidates = candidates
        self.bias = bias
        self.columns = columns
        self.n_blocks = 0 if columns is None else int(columns.max()) + 1
        self.weight: torch.Tensor | None = None

    def set_mix(self, mix: torch.Tensor) -> None:
        """``mix``: [K] for the module, or [J, K], one row per column block."""
        mix = mix.detach().to(self.candidates.dtype)
        if self.columns is not None:
            mix = mix[self.columns].T[:, None, :]  # [K, 1, in]: each column's mix, broadcast over rows
        # one fused multiply-add per candidate: much faster on CPU than einsum, which copies the
        # candidates into a batched-matmul layout for these shapes
        weight = self.candidates[0] * mix[0]
        for k in range(1, len(self.candidates)):
            weight.addcmul_(self.candidates[k], mix[k])
        self.weight = weight.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def mix_grad(self) -> torch.Tensor:
        """``dL/dmix_b = <dL/dW, Q_b(W)>`` after a backward through this module ([K], or [J, K] per block)."""
        g = self.weight.grad
        if g is None:  # no token reached the module (an expert the router did not choose): no gradient
            k = len(self.candidates)
            return self.weight.new_zeros(k) if self.columns is None else self.weight.new_zeros(self.n_blocks, k)
        if self.columns is None:
            return torch.stack([torch.dot(g.reshape(-1), q.reshape(-1)) for q in self.candidates])
        per_column = torch.stack([(g * q).sum(dim=0) for q in self.candidates], dim=1)  # [in, K]
        return per_column.new_zeros(self.n_blocks, per_column.shape[1]).index_add_(0, self.columns, per_column)


@contextlib.contextmanager
def swapped(block: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily replace submodules of ``block`` (names relative to the block)."""
    originals = {}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        originals[name] = (parent, child, getattr(parent, child))
        setattr(parent, child, new)
    try:
        yield
    finally:
        for parent, child, old in originals.values():
            setattr(parent, child, old)
