"""Stage I's loss: the teacher-forced reconstruction error of one block (method.md, Stage I step 5)
and the per-channel Fisher weight that the ``fisher`` loss may use instead of per-token weights."""

from __future__ import annotations

import torch


def block_error(kind: str, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, g2: torch.Tensor | None,
                full_length: int) -> torch.Tensor:
    """The teacher-forced reconstruction error of one block.
    ``g2``: the squared gradient of the final loss at the block's output, per token ([n, t, h]) or
    per channel ([h], averaged over all calibration tokens); only the ``fisher`` loss uses it."""
    diff = (out - y).float()
    if kind == "output":
        return diff.pow(2).sum() / y.float().pow(2).sum()
    if kind == "update":
        return diff.pow(2).sum() / (y - x).float().pow(2).sum()
    # fisher: second-order estimate of the rise of the mean next-token loss, per sequence
    return 0.5 * (full_length - 1) * (g2 * diff.pow(2)).sum() / out.shape[0]


def channel_fisher(grads: list[torch.Tensor], total_sequences: int, shard=None) -> list[torch.Tensor]:
    """Per block, ``G^2`` averaged over every calibration token (all sequences, all positions): a
    weight per channel that no minibatch's noise moves. With data parallelism each process holds
    some sequences; ``shard.sum`` adds their parts."""
    out = []
    for g in grads:
        s = g.float().pow(2).sum(dim=(0, 1))
        if shard is not None:
            s = shard.sum(s)
        out.append(s / (total_sequences * g.shape[1]))
    return out
