"""A bit assignment (module name -> bits) applied to a model in one call, and its account.

``apply_assignment(model, assignment, quantizer)`` is the torchao-style one call: it replaces
each assigned module's weight by its dequantized quantized weight and returns the
``QuantizedWeight`` records (for export) together with the size account.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from gamma.config import SUPPORTED_BITS
from gamma.model.device import computed_on
from gamma.model.loading import block_index, quantizable_modules
from gamma.progress import track
from gamma.quant.hessians import collect_hessians
from gamma.quant.interface import SCALE_BITS, UNQUANTIZED, QuantizationError, QuantizedWeight, QuantSpec

UNQUANTIZED_BITS = UNQUANTIZED  # embeddings, norms and head are counted as a float16 checkpoint stores them


@dataclass(frozen=True)
class SizeAccount:
    nominal_bits: float  # sum n_m b_m / sum n_m over quantized modules
    effective_bits: float  # the same with scales and zero-points counted
    quantized_params: int
    quantized_bytes: float  # codes + scales + zero-points of the quantized modules
    other_bytes: float  # everything else at 16 bits
    total_bytes: float

    def as_dict(self) -> dict:
        return asdict(self)


def module_cost_bits(n_rows: int, n_cols: int, spec: QuantSpec) -> float:
    """Exact storage of one quantized module in bits: codes + per-group scales (+ zero-points);
    a module left at 16 bits is its float16 weight."""
    if spec.bits == UNQUANTIZED:
        return n_rows * n_cols * UNQUANTIZED
    groups = n_rows * spec.groups(n_cols)
    zero_bits = 0 if spec.symmetric else spec.bits
    return n_rows * n_cols * spec.bits + groups * (SCALE_BITS + zero_bits)


def account(model: nn.Module, assignment: dict[str, int], group_size: int, symmetric: bool) -> SizeAccount:
    modules = quantizable_modules(model)
    n_total = bits_nominal = bits_effective = 0.0
    for name, bits in assignment.items():
        rows, cols = modules[name].weight.shape
        n_total += rows * cols
        bits_nominal += rows * cols * bits
        bits_effective += module_cost_bits(rows, cols, QuantSpec(bits, group_size, symmetric))
    other = sum(p.numel() for p in unquantized_parameters(model, assignment))
    other_bytes = other * UNQUANTIZED_BITS / 8
    return SizeAccount(
        nominal_bits=bits_nominal / n_total,
        effective_bits=bits_effective / n_total,
        quantized_params=int(n_total),
        quantized_bytes=bits_effective / 8,
        other_bytes=other_bytes,
        total_bytes=bits_effective / 8 + other_bytes,
    )


def unquantized_parameters(model: nn.Module, quantized: Iterable[str]) -> list[nn.Parameter]:
    """Every parameter a checkpoint stores at 16 bits: all but the quantized weights, tied ones once."""
    modules = quantizable_modules(model)
    skip = {id(modules[n].weight) for n in quantized}
    unique = {id(p): p for p in model.parameters()}
    return [p for key, p in unique.items() if key not in skip]


def validate_assignment(model: nn.Module, assignment: dict[str, int]) -> None:
    if not isinstance(assignment, dict) or not assignment:
        raise QuantizationError(f"an assignment maps module names to bit widths; got {str(assignment)[:80]!r}")
    modules = quantizable_modules(model)
    unknown = sorted(set(assignment) - set(modules))
    if unknown:
        raise QuantizationError(f"assignment names modules the model does not have: {unknown[:5]}")
    bad = {n: b for n, b in assignment.items() if b not in (*SUPPORTED_BITS, UNQUANTIZED)}
    if bad:
        raise QuantizationError(f"assignment has unsupported bit widths: {dict(list(bad.items())[:5])}")


def uniform_assignment(model: nn.Module, bits: int) -> dict[str, int]:
    return {name: bits for name in quantizable_modules(model)}


@torch.no_grad()
def apply_assignment(
    model: nn.Module,
    assignment: dict[str, int],
    quantizer,
    group_size: int = 64,
    symmetric: bool = False,
    hessians: dict[str, torch.Tensor] | None = None,
    calibration: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, QuantizedWeight], SizeAccount]:
    """Quantize every assigned module of ``model`` in place (weights become their dequantized
    values), one module at a time on ``device`` in float32, the records kept on the host. GPTQ
    needs ``hessians`` (from ``collect_hessians``) or, when it is ``sequential``, the
    ``calibration`` sequences to take them block by block from the quantized prefix.
    Returns the records and the size account."""
    validate_assignment(model, assignment)
    modules = quantizable_modules(model)
    records: dict[str, QuantizedWeight] = {}
    computed_on(device)

    def quantize(names, block_hessians=None) -> None:
        for name in names:
            if assignment[name] == UNQUANTIZED:
                continue  # left as it is: stored at float16, listed in the export's ignore
            module = modules[name]
            spec = QuantSpec(assignment[name], group_size, symmetric)
            weight = module.weight.detach().to(device, torch.float32)
            record = quantizer.quantize(weight, spec, block_hessians.get(name) if block_hessians else None)
            module.weight.copy_(record.dequantize().to(module.weight.dtype))
            records[name] = record.to("cpu")

    if quantizer.sequential:
        if calibration is None:
            raise QuantizationError("sequential GPTQ needs calibration=<token sequences>")
        by_block: dict[int, list[str]] = {}
        for name in assignment:
            by_block.setdefault(block_index(name), []).append(name)
        collect_hessians(model, calibration, modules=set(assignment), token_clip=quantizer.token_clip,
                         sink_weight=quantizer.sink_weight, device=device,
                         on_block=lambda index, h: quantize(sorted(by_block.get(index, [])), h))
        # progress: collect_hessians shows the block walk, which now includes the quantization
    else:
        if quantizer.needs_hessians and hessians is None:
            raise QuantizationError(f"{quantizer.name} needs hessians=collect_hessians(model, calibration)")
        names = sorted(assignment, key=lambda n: (block_index(n), n))
        quantize(track(names, f"quantizing ({quantizer.name})"), hessians)
    return records, account(model, assignment, group_size, symmetric)
