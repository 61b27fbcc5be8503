"""GPTQ: quantize one column at a time and push each column's error onto the columns not yet
quantized, weighted by the inverse Hessian of the module's inputs (Frantar et al., 2022).

The Hessian ``H = 2 X^T X / n`` comes from the module's real calibration inputs
(``HessianAccumulator``). Group scales are found on the already-updated weights as the walk
reaches each group; with ``act_order`` columns go by decreasing ``diag(H)`` and the group
scales are fixed up front from the original weights (static groups) so that the stored groups
stay contiguous in the original column order.

Two choices decide whether GPTQ beats RTN at 2-3 bits on a small model (docs/results.md, "GPTQ on this model"):
``clip_search`` picks each
group's range by minimising its ``diag(H)``-weighted error instead of taking min/max, and
``sequential`` takes each block's Hessians from the inputs the already-quantized blocks produce,
so later blocks correct for the error of earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gamma.quant.interface import (
    QuantizationError,
    QuantizedWeight,
    QuantSpec,
    group_params,
    quantize_with,
    search_group_params,
)


@dataclass
class GPTQ:
    damping: float = 0.01
    act_order: bool = False
    block_size: int = 128
    sink_weight: float = 1.0  # used when collecting Hessians (HessianAccumulator)
    token_clip: float = 0.0
    clip_search: bool = True  # search each group's clipping range (diag(H)-weighted) instead of min/max
    sequential: bool = True  # Hessians from the already-quantized prefix (apply_assignment)
    name: str = "gptq"
    needs_hessians: bool = True

    def settings(self) -> dict:
        return {"damping": self.damping, "act_order": self.act_order, "block_size": self.block_size,
                "sink_weight": self.sink_weight, "token_clip": self.token_clip,
                "clip_search": self.clip_search, "sequential": self.sequential}

    def _group_params(self, w: torch.Tensor, spec: QuantSpec, h_diag: torch.Tensor):
        if self.clip_search:
            return search_group_params(w, spec, weights=h_diag)
        return group_params(w, spec)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None,
                 group_bits: list[int] | None = None) -> QuantizedWeight:
        """``group_bits``: a bit width per group (sub-module allocations), overriding ``spec.bits``
        group by group in one pass, so that every group's error is still compensated by the columns
        after it whatever their width; the result's ``spec`` then carries the widest of them."""
        if hessian is None:
            raise QuantizationError("GPTQ needs the Hessian of the module's calibration inputs")
        rows, cols = weight.shape
        n_groups, width = spec.groups(cols), spec.group_width(cols)
        spec, specs = _group_specs(spec, group_bits, n_groups, width)
        W = weight.detach().to(torch.float32).clone()
        H = hessian.to(W.device, torch.float32).clone()

        if not H.any():
            # no calibration token reached the module (an expert the router never chose): nothing
            # to weight errors by, so every column counts alike (round-to-nearest, clip search)
            H = torch.eye(cols, device=W.device)
        dead = torch.diag(H) == 0
        diag = torch.diag(H).clone()
        H[dead, dead] = 1
        W[:, dead] = 0

        scales = torch.zeros(rows, n_groups, device=W.device)
        zeros = torch.zeros(rows, n_groups, dtype=torch.int32, device=W.device)
        if self.act_order:
            for g in range(n_groups):
                scales[:, g], zeros[:, g] = self._group_params(W[:, g * width : (g + 1) * width], specs[g],
                                                               diag[g * width : (g + 1) * width])
            perm = torch.argsort(torch.diag(H), descending=True)
        else:
            perm = torch.arange(cols, device=W.device)
        W = W[:, perm]
        H = H[perm][:, perm]

        H += self.damping * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        codes = torch.zeros(rows, cols, device=W.device)
        # Blocks are whole groups, so a group's scale is always found on updated weights.
        block = max(1, self.block_size // width) * width if not self.act_order else self.block_size
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = int(perm[i1 + i])
                g = col // width
                if not self.act_order and col % width == 0:
                    scales[:, g], zeros[:, g] = self._group_params(W1[:, i : i + width], specs[g],
                                                                   diag[col : col + width])
                w = W1[:, i]
                q = quantize_with(w[:, None], scales[:, g], zeros[:, g], specs[g].max_code)[:, 0]
                codes[:, col] = q
                deq = (q - zeros[:, g]) * scales[:, g]
                err = (w - deq) / Hinv1[i, i]
                W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        return QuantizedWeight(codes=codes.to(torch.uint8), scales=scales, zeros=zeros, spec=spec)


def _group_specs(spec: QuantSpec, group_bits: list[int] | None, n_groups: int,
                 width: int) -> tuple[QuantSpec, list[QuantSpec]]:
    """The result's spec (the widest group) and one spec per group."""
    if group_bits is None:
        return spec, [spec] * n_groups
    if len(group_bits) != n_groups:
        raise QuantizationError(f"group_bits has {len(group_bits)} widths for {n_groups} groups of {width} columns")
    specs = [QuantSpec(int(b), spec.group_size, spec.symmetric) for b in group_bits]
    return QuantSpec(max(int(b) for b in group_bits), spec.group_size, spec.symmetric), specs
