"""Candidate quantized weights: every module quantized at every candidate bit width, once."""

from __future__ import annotations

import torch
from torch import nn

from gamma.model.device import computed_on
from gamma.model.loading import quantizable_modules
from gamma.progress import track
from gamma.quant.interface import UNQUANTIZED, PackedWeight, QuantizationError, QuantizedWeight, QuantSpec, Unquantized


def build_candidates(
    model: nn.Module,
    quantizer,
    bits: list[int],
    group_size: int = 64,
    symmetric: bool = False,
    hessians: dict[str, torch.Tensor] | None = None,
    modules: list[str] | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, list[PackedWeight]]:
    """``{module: [Q_b(W) for b in bits]}``, quantized on ``device`` and held packed on the host:
    b/8 bytes per weight per candidate width b (16: the weight at float16, ``Unquantized``)."""
    found = quantizable_modules(model)
    names = modules or list(found)
    computed_on(device)
    out = {}
    for name in track(names, f"candidates ({quantizer.name}, bits {bits})") if progress else names:
        h = hessians.get(name) if hessians else None
        w = found[name].weight.detach().to(device, torch.float32)
        try:
            out[name] = [Unquantized.of(w) if b == UNQUANTIZED else
                         quantizer.quantize(w, QuantSpec(b, group_size, symmetric), h).pack() for b in bits]
        except QuantizationError as err:
            raise QuantizationError(f"{name} {tuple(w.shape)}: {err}") from None
    return out


@torch.no_grad()
def apply_candidates(
    model: nn.Module, candidates: dict[str, list[QuantizedWeight]], bits: list[int], assignment: dict[str, int]
) -> None:
    """Set each assigned module's weight to its precomputed candidate at the assigned width: any
    assignment in milliseconds, the same quantized weights Stage I chose among."""
    modules = quantizable_modules(model)
    for name, b in assignment.items():
        if b not in bits:
            raise ValueError(f"{name}: {b} bits is not among the candidates {bits}")
        modules[name].weight.copy_(candidates[name][bits.index(b)].dequantize().to(modules[name].weight.dtype))
