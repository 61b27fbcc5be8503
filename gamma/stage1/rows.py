"""The logit-row layout of Stage I: which rows of the preference logits each module owns (one
row per module, or one per column block of its input channels), the rows' names and sizes, and
each block's candidate weights made dense on the compute device when its turn comes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gamma.model import memory
from gamma.model.loading import block_index
from gamma.quant.interface import QuantizedWeight


def block_rows(module: str, n_blocks: int) -> list[str]:
    """The logit-row names of a module's column blocks, ``module#j``."""
    return [f"{module}#{j}" for j in range(n_blocks)]


@dataclass
class ColumnLayout:
    """A module cut into column blocks: its candidates hold input channel ``order[p]`` in column
    ``p`` (None: the natural order), and input channel ``c`` belongs to block ``columns[c]``."""

    order: torch.Tensor | None
    columns: torch.Tensor  # [in], long

    @property
    def n_blocks(self) -> int:
        return int(self.columns.max()) + 1

    def block_sizes(self, rows: int) -> list[int]:
        return (torch.bincount(self.columns, minlength=self.n_blocks) * rows).tolist()

    def to_model_order(self, dense: torch.Tensor) -> torch.Tensor:
        """Candidate weights [..., out, in] in the model's own channel order."""
        return dense if self.order is None else dense[..., torch.argsort(self.order)]


class LogitRows:
    """Rows of logits for ``candidates`` (module -> [Q_b(W) for b in bits]): one per allocation
    unit (``units``: modules sharing one width, by index; default one per module, named after
    it), or with ``layouts`` one per column block of each module (named ``module#j``)."""

    def __init__(self, model: nn.Module, candidates: Mapping[str, list[QuantizedWeight]], bits: list[int],
                 layouts: dict[str, ColumnLayout] | None = None, cache_limit_bytes: float | None = None,
                 units: list[list[int]] | None = None):
        self.candidates, self.bits, self.layouts = candidates, list(bits), layouts
        self.modules = list(candidates)
        self.of_module: list[int | slice] = [0] * len(self.modules)  # the row (or slice of rows) of each module
        self.names: list[str] = []
        self.sizes: list[int] = []
        weights = dict(model.named_modules())
        self.units = units or [[i] for i in range(len(self.modules))]
        for members in self.units if layouts is None else []:
            for i in members:
                self.of_module[i] = len(self.names)
            self.names.append(" + ".join(self.modules[i] for i in members))
            self.sizes.append(sum(weights[self.modules[i]].weight.numel() for i in members))
        for i, name in enumerate(self.modules if layouts is not None else []):
            n = layouts[name].n_blocks
            self.of_module[i] = slice(len(self.names), len(self.names) + n)
            self.names += block_rows(name, n)
            self.sizes += layouts[name].block_sizes(weights[name].weight.shape[0])
        self.by_block: dict[int, list[int]] = {}
        for i, name in enumerate(self.modules):
            self.by_block.setdefault(block_index(name), []).append(i)
        total = sum(weights[m].weight.numel() for m in self.modules) * len(self.bits) * 4  # without building any
        limit = memory.DENSE_CACHE_BYTES if cache_limit_bytes is None else cache_limit_bytes
        self.cache: dict[str, torch.Tensor] | None = {} if total <= limit else None

    def dense(self, name: str, device: torch.device) -> torch.Tensor:
        """Module ``name``'s candidates [K, out, in], dequantized, in the model's channel order
        (cached while all of them fit in ``cache_limit_bytes``, default ``memory.DENSE_CACHE_BYTES``)."""
        if self.cache is not None and name in self.cache:
            return self.cache[name]
        t = torch.stack([q.dequantize(device) for q in self.candidates[name]])
        if self.layouts is not None and name in self.layouts:
            t = self.layouts[name].to_model_order(t)
        if self.cache is not None:
            self.cache[name] = t
        return t

    def per_unit(self, module_rows: np.ndarray) -> np.ndarray:
        """[M, K] module rows summed into [U, K] unit rows (module layout only)."""
        return np.stack([module_rows[u].sum(axis=0) for u in self.units])

    def per_module(self, unit_rows: np.ndarray) -> np.ndarray:
        """[U, K] unit rows as [M, K] module rows, each unit's split evenly among its members, so
        that a unit's members sum back to its row (Stage II sums them: ``projection.collapse``)."""
        counts = np.array([len(u) for u in self.units], dtype=np.float64)
        return np.stack([unit_rows[r] / counts[r] for r in self.of_module])

    def columns(self, name: str, device: torch.device) -> torch.Tensor | None:
        return None if self.layouts is None else self.layouts[name].columns.to(device)
