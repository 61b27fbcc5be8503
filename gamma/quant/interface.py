"""The quantizer interface: settings in, integer codes + scales + zero-points out.

Every quantizer (RTN, GPTQ, ...) returns a ``QuantizedWeight``; dequantizing it gives the weight
the model computes with. Codes are stored unsigned in ``[0, 2**bits - 1]``; a symmetric
quantizer fixes the zero-point at ``2**(bits-1)``. Scales are kept at float16 precision because
that is what a checkpoint stores, so the in-memory model equals the exported one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from gamma.config import UNQUANTIZED

SCALE_BITS = 16


class QuantizationError(ValueError):
    """Settings that cannot quantize the given weight; the message names the value."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int = 64  # -1: one group per output row
    symmetric: bool = False

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups per row; the group size must divide the input width."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise QuantizationError(
                f"group_size={self.group_size} does not divide the input width {in_features}; "
                "pick a divisor (e.g. 64 for SmolLM2's 576 and 1536) or -1 for one group per row"
            )
        return in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def metadata_bits_per_weight(self) -> float:
        """Scale (+ zero-point when asymmetric) bits amortised over a group."""
        if self.group_size == -1:
            return 0.0  # per-row overhead; counted exactly in `accounting`
        zero_bits = 0 if self.symmetric else self.bits
        return (SCALE_BITS + zero_bits) / self.group_size


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 (float16-exact) [out, groups]
    zeros: torch.Tensor  # int32 [out, groups]
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The float32 weight, on ``device`` (default: where the codes are; the codes travel, not floats)."""
        q = self if device is None else self.to(device)
        return dequantize_codes(q.codes, q.scales, q.zeros, q.spec)

    def to(self, device: str | torch.device) -> QuantizedWeight:
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.spec)

    def pack(self) -> PackedWeight:
        """The same weight on the host with its codes in ``bits`` bit planes: bits/8 bytes per weight, not 1."""
        codes = self.codes.reshape(-1).cpu().numpy()
        planes = np.stack([np.packbits((codes >> k) & 1) for k in range(self.spec.bits)])
        return PackedWeight(torch.from_numpy(planes), self.shape, _narrowest(self.scales.cpu(), torch.float16),
                            _narrowest(self.zeros.cpu(), torch.uint8), self.spec)


def _narrowest(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when that holds it exactly (scales are float16-exact, zero-points fit a
    byte: 3 bytes per group instead of 8), else as it is."""
    narrow = t.to(dtype)
    return narrow if torch.equal(narrow.to(t.dtype), t) else t


@dataclass
class PackedWeight:
    """A ``QuantizedWeight`` held packed (candidates of a large model kept on the host); reads
    like one: ``codes`` and ``dequantize()`` unpack on the fly."""

    planes: torch.Tensor  # uint8 [bits, ceil(out * in / 8)]
    shape: tuple[int, int]
    scales: torch.Tensor  # float16 where that is exact (always, for gamma's quantizers), else float32
    zeros: torch.Tensor  # uint8 where that is exact, else int32
    spec: QuantSpec

    def unpacked_codes(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The codes [out, in], unpacked on ``device`` (only b/8 bytes per weight travel there)."""
        n = self.shape[0] * self.shape[1]
        planes = self.planes.to(device)
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=planes.device)  # np.packbits: first bit highest
        codes = torch.zeros(n, dtype=torch.uint8, device=planes.device)
        for k in range(planes.shape[0]):
            codes |= ((planes[k, :, None] >> shifts) & 1).reshape(-1)[:n] << k
        return codes.reshape(self.shape)

    @property
    def codes(self) -> torch.Tensor:
        return self.unpacked_codes()

    def unpack(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales.to(torch.float32), self.zeros.to(torch.int32), self.spec)

    def dequantize(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The float32 weight, unpacked and dequantized on ``device``."""
        return dequantize_codes(self.unpacked_codes(device), self.scales.to(device), self.zeros.to(device), self.spec)


@dataclass
class Unquantized:
    """The 16-bit candidate: the module's weight as a float16 checkpoint stores it, kept out of
    quantization (the export lists the module in ``ignore``). Reads like a ``QuantizedWeight``."""

    weight: torch.Tensor  # float16 [out, in], its own copy: the model's weight changes under allocators
    spec: QuantSpec = QuantSpec(UNQUANTIZED, -1, True)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self, device: str | torch.device | None = None) -> torch.Tensor:
        return self.weight.to(device or self.weight.device, torch.float32)

    def pack(self) -> Unquantized:
        """Held on the host, like a packed candidate."""
        return Unquantized(self.weight.cpu())

    def to(self, device: str | torch.device) -> Unquantized:
        return Unquantized(self.weight.to(device), self.spec)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(code - zero) * scale`` per group, in float32, where ``codes`` are."""
    rows, cols = codes.shape
    width = spec.group_width(cols)
    grouped = codes.to(torch.float32).view(rows, cols // width, width)
    zeros, scales = zeros.to(codes.device, torch.float32)[..., None], scales.to(codes.device, torch.float32)[..., None]
    return ((grouped - zeros) * scales).view(rows, cols)


class Quantizer(Protocol):
    name: str
    needs_hessians: bool  # quantize() reads the Hessian of the module's inputs (collect_hessians)
    sequential: bool  # those Hessians come from the already-quantized prefix, block by block

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        ...


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero-point for each row of ``w`` (one group): shapes [rows]."""
    w = w.to(torch.float32)
    if spec.symmetric:
        absmax = w.abs().amax(dim=1).clamp_min(1e-8)
        scale = (2 * absmax / spec.max_code).to(torch.float16).to(torch.float32).clamp_min(6e-8)
        zero = torch.full_like(scale, 2 ** (spec.bits - 1), dtype=torch.int32)
        return scale, zero
    lo = w.amin(dim=1).clamp_max(0)
    hi = w.amax(dim=1).clamp_min(0)
    scale = ((hi - lo).clamp_min(1e-8) / spec.max_code).to(torch.float16).to(torch.float32).clamp_min(6e-8)
    zero = torch.round(-lo / scale).clamp(0, spec.max_code).to(torch.int32)
    return scale, zero


def search_group_params(
    w: torch.Tensor, spec: QuantSpec, grid: int = 40, max_shrink: float = 0.75, norm: float = 2.4,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``group_params`` but shrinks each row's range (``max_shrink`` of it at most, in
    ``grid`` steps) to the clip that minimises ``sum weights * |w - q(w)|^norm``. At 2-3 bits the
    min/max range wastes most levels on a few outliers; clipping them trades a large error on
    those few weights for a smaller one on all others (GPTQ's ``mse`` grid, optionally weighted
    by the Hessian diagonal)."""
    w = w.to(torch.float32)
    best_scale, best_zero = group_params(w, spec)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    weights = torch.ones(w.shape[1], device=w.device) if weights is None else weights.to(w.device, torch.float32)
    for step in range(int(max_shrink * grid) + 1):
        shrink = 1 - step / grid
        scale, zero = group_params(w * shrink, spec)
        q = quantize_with(w, scale, zero, spec.max_code)
        err = (((q - zero[:, None]) * scale[:, None] - w).abs().pow(norm) * weights).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int) -> torch.Tensor:
    """Codes of ``w`` [rows, k] under per-row ``scale``/``zero`` [rows]."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, max_code)
