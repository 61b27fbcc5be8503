"""Data-parallel Stage I, as the training loop sees it: which calibration sequences this process
holds, and how a tensor is summed over the processes. One process (the default) holds them all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # sums a tensor over the processes
    sequences: int = 0  # calibration sequences over all processes (0: those this process holds)

    def over(self, sequences: int) -> Shard:
        """This shard of ``sequences`` calibration sequences; refuses a process that would hold none."""
        if sequences < self.world:
            raise ValueError(f"{self.world} processes but only {sequences} calibration sequences: "
                             "raise text.calibration_sequences or lower stage1.processes")
        return replace(self, sequences=sequences)

    def held(self) -> torch.Tensor:
        """The calibration indices this process holds, in the order of its teacher rows."""
        return torch.arange(self.sequences)[self.rank::self.world]

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """The teacher rows of this process that hold sequences of ``batch`` (calibration indices)."""
        row_of = {int(g): r for r, g in enumerate(self.held().tolist())}
        return torch.tensor([row_of[int(g)] for g in batch if int(g) in row_of], dtype=torch.long)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.all_reduce is None else self.all_reduce(t)
