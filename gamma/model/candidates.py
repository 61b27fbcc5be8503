"""Candidate quantized weights: every module quantized at every candidate bit width, either once
and held packed on the host (``build_candidates``) or again on the device whenever a block needs
them (``RebuiltCandidates``: RTN, where quantizing one block costs less than holding them all)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

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
        out[name] = [q.pack() for q in _quantized(name, w, quantizer, bits, group_size, symmetric, h)]
    return out


def _quantized(name: str, w: torch.Tensor, quantizer, bits: list[int], group_size: int, symmetric: bool,
               hessian: torch.Tensor | None = None) -> list:
    try:
        return [Unquantized(w.to(torch.float16, copy=True)) if b == UNQUANTIZED else
                quantizer.quantize(w, QuantSpec(b, group_size, symmetric), hessian) for b in bits]
    except QuantizationError as err:
        raise QuantizationError(f"{name} {tuple(w.shape)}: {err}") from None


class RebuiltCandidates(Mapping):
    """``{module: [Q_b(W) for b in bits]}`` that holds nothing: each lookup quantizes the module's
    full-precision weight again on ``device`` (deterministic, so every lookup gives the very same
    weights ``build_candidates`` would hold). For quantizers without Hessians only. ``source``
    gives a module's full-precision weight (``AllocationProblem.full_precision`` binds it, so that
    allocators that change the model's weights still get candidates of the original ones)."""

    def __init__(self, model: nn.Module, quantizer, bits: list[int], group_size: int = 64, symmetric: bool = False,
                 device: str | torch.device = "cpu"):
        if quantizer.needs_hessians:
            raise ValueError(f"{quantizer.name}'s candidates need the calibration Hessians: they cannot be rebuilt "
                             "on demand (quantizer.candidate_store: held)")
        self.modules = quantizable_modules(model)
        self.quantizer, self.bits, self.group_size, self.symmetric = quantizer, list(bits), group_size, symmetric
        self.device = torch.device(device)
        self.source: Callable[[str], torch.Tensor] = self.model_weight

    def model_weight(self, name: str) -> torch.Tensor:
        return self.modules[name].weight.detach()

    def __getitem__(self, name: str) -> list:
        computed_on(self.device)
        w = self.source(name).to(self.device, torch.float32)
        return _quantized(name, w, self.quantizer, self.bits, self.group_size, self.symmetric)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


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
