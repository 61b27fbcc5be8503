"""Candidate quantized weights: every module quantized at every candidate bit width, once."""

from __future__ import annotations

import torch
from torch import nn

from gamma.model import quantizable_modules
from gamma.progress import track
from gamma.quantizer import QuantizedWeight, QuantSpec


def build_candidates(
    model: nn.Module,
    quantizer,
    bits: list[int],
    group_size: int = 64,
    symmetric: bool = False,
    hessians: dict[str, torch.Tensor] | None = None,
    modules: list[str] | None = None,
) -> dict[str, list[QuantizedWeight]]:
    """``{module: [Q_b(W) for b in bits]}`` (codes, not dense weights: 1 byte per weight per bit width)."""
    found = quantizable_modules(model)
    names = modules or list(found)
    out = {}
    for name in track(names, f"candidates ({quantizer.name}, bits {bits})"):
        h = hessians.get(name) if hessians else None
        out[name] = [quantizer.quantize(found[name].weight, QuantSpec(b, group_size, symmetric), h) for b in bits]
    return out
