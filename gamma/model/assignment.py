"""A bit assignment (module name -> bits) applied to a model in one call, and its account.

``apply_assignment(model, assignment, quantizer)`` is the torchao-style one call: it replaces
each assigned module's weight by its dequantized quantized weight and returns the
``QuantizedWeight`` records (for export) together with the size account.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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


SHAPE_BYTES = 16  # ``weight_shape``: two int64


def module_stored_bytes(n_rows: int, n_cols: int, spec: QuantSpec, zero_points: str = "packed") -> int:
    """Bytes of one module's tensors in the checkpoint, exactly as compressed-tensors' pack-quantized
    format writes them: codes packed densely into int32 along each row, one float16 scale per
    group, zero-points (asymmetric) in int32 along the output dimension, packed (``packed``) or
    one per row (``padded``, for transformers' loader: ``gamma.model.export.ZERO_POINT_LAYOUTS``),
    the int64 shape. A module left at 16 bits is its float16 weight."""
    if spec.bits == UNQUANTIZED:
        return n_rows * n_cols * UNQUANTIZED // 8
    groups = spec.groups(n_cols)
    codes = 4 * n_rows * math.ceil(n_cols * spec.bits / 32)
    zero_rows = n_rows if zero_points == "padded" else math.ceil(n_rows * spec.bits / 32)
    zeros = 0 if spec.symmetric else 4 * zero_rows * groups
    return codes + n_rows * groups * SCALE_BITS // 8 + zeros + SHAPE_BYTES


def module_cost_bits(n_rows: int, n_cols: int, spec: QuantSpec, zero_points: str = "packed") -> int:
    """Storage of one module in bits (what the effective-bits and bytes budgets count)."""
    return 8 * module_stored_bytes(n_rows, n_cols, spec, zero_points)


def account(model: nn.Module, assignment: dict[str, int], group_size: int, symmetric: bool,
            zero_points: str = "packed") -> SizeAccount:
    """Sizes of ``model`` under ``assignment``; ``total_bytes`` is exactly the bytes of the tensors
    its checkpoint stores with zero-points in layout ``zero_points`` (file headers and config aside)."""
    modules = quantizable_modules(model)
    n_total = bits_nominal = bits_effective = 0.0
    for name, bits in assignment.items():
        rows, cols = modules[name].weight.shape
        n_total += rows * cols
        bits_nominal += rows * cols * bits
        bits_effective += module_cost_bits(rows, cols, QuantSpec(bits, group_size, symmetric), zero_points)
    other_bytes = stored_bytes(unquantized_tensors(model, assignment).values())
    return SizeAccount(
        nominal_bits=bits_nominal / n_total,
        effective_bits=bits_effective / n_total,
        quantized_params=int(n_total),
        quantized_bytes=bits_effective / 8,
        other_bytes=other_bytes,
        total_bytes=bits_effective / 8 + other_bytes,
    )


def unquantized_tensors(model: nn.Module, quantized: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint stores as it is (at 16 bits if floating): the state dict but the
    quantized modules' weights, tied tensors once."""
    skip = {f"{name}.weight" for name in quantized}
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if key in skip or tensor.data_ptr() in seen:  # tied embeddings: stored once, tied again on load
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor
    return out


def stored_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes ``tensors`` take in a checkpoint: floating ones at 16 bits, the rest in their own dtype."""
    return sum(t.numel() * (UNQUANTIZED_BITS // 8 if t.is_floating_point() else t.element_size()) for t in tensors)


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
    zero_points: str = "packed",
    held: Callable[[str, int], QuantizedWeight] | None = None,
) -> tuple[dict[str, QuantizedWeight], SizeAccount]:
    """Quantize every assigned module of ``model`` in place (weights become their dequantized
    values), one module at a time on ``device`` in float32, the records kept on the host. GPTQ
    needs ``hessians`` (from ``collect_hessians``) or, when it is ``sequential``, the
    ``calibration`` sequences to take them block by block from the quantized prefix.
    ``held(module, bits)``: the module already quantized at that width from the same full-precision
    weights and Hessians (an allocation problem's candidates), taken instead of quantizing again.
    Returns the records and the size account."""
    validate_assignment(model, assignment)
    if held is not None and quantizer.sequential:
        raise QuantizationError("sequential GPTQ quantizes each module from the quantized prefix's Hessians: "
                                "candidates from the full-precision ones are not its records")
    modules = quantizable_modules(model)
    records: dict[str, QuantizedWeight] = {}
    computed_on(device)

    def quantize(names, block_hessians=None) -> None:
        for name in names:
            if assignment[name] == UNQUANTIZED:
                continue  # left as it is: stored at float16, listed in the export's ignore
            module = modules[name]
            spec = QuantSpec(assignment[name], group_size, symmetric)
            if held is not None:
                record = held(name, assignment[name])
                if record.spec != spec:
                    raise QuantizationError(f"{name}: the held candidate is {record.spec}, the assignment asks {spec}")
            else:
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
        if quantizer.needs_hessians and hessians is None and held is None:
            raise QuantizationError(f"{quantizer.name} needs hessians=collect_hessians(model, calibration)")
        names = sorted(assignment, key=lambda n: (block_index(n), n))
        quantize(track(names, f"quantizing ({quantizer.name})"), hessians)
    return records, account(model, assignment, group_size, symmetric, zero_points)
