"""Round-to-nearest, group-wise min/max: the simplest quantizer and every method's baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gamma.quant.interface import QuantizedWeight, QuantSpec, group_params, quantize_with


@dataclass
class RTN:
    name: str = "rtn"
    needs_hessians: bool = False
    sequential: bool = False

    def settings(self) -> dict:
        return {}

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        rows, cols = weight.shape
        n_groups = spec.groups(cols)
        grouped = weight.detach().to(torch.float32).reshape(rows * n_groups, cols // n_groups)
        scale, zero = group_params(grouped, spec)
        codes = quantize_with(grouped, scale, zero, spec.max_code)
        return QuantizedWeight(
            codes=codes.reshape(rows, cols).to(torch.uint8),
            scales=scale.reshape(rows, n_groups),
            zeros=zero.reshape(rows, n_groups),
            spec=spec,
        )
