"""The allocation problem: what every allocator, GAMMA's Stage I included, looks at.

The full-precision model, the calibration sequences, each module quantized at every candidate
width (every allocator chooses among the very same quantized weights), the knapsack's settings
(``stage2``: window, ``min_bits`` restrictions, solver, time limit) and where it all came from
(``provenance``: model and text content hashes, quantizer settings), which a score table records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import nn

from gamma.config import Stage2Config
from gamma.model.assignment import module_cost_bits, stored_bytes, unquantized_tensors
from gamma.model.candidates import RebuiltCandidates
from gamma.model.loading import quantizable_modules
from gamma.quant.hessians import collect_hessians
from gamma.quant.interface import PackedWeight, QuantizedWeight, QuantSpec
from gamma.stage1.proxy import FisherCosts, KeepFisher
from gamma.stage1.teacher import TeacherData, capture_teacher
from gamma.stage2.projection import allowed_mask


class AllocatorError(ValueError):
    """An allocator cannot serve this budget or these settings; the message names the value."""


@dataclass(frozen=True)
class Provenance:
    """What a score table learned on this problem records, so that it can be checked and reproduced."""

    model_hash: str = ""
    text_hash: str = ""
    quantizer: dict = field(default_factory=dict)  # name, group size, symmetry and the quantizer's settings
    text: dict = field(default_factory=dict)  # the text settings that drew the calibration sequences
    dtype: str = "float32"  # the dtype the weights were held in (``model.dtype`` resolved)
    units: dict = field(default_factory=dict)  # allocation.ties / experts, when not the defaults


@dataclass
class AllocationProblem:
    """Everything an allocator may look at. ``candidates[m][k]`` is module ``m`` quantized at
    ``bits[k]``: every allocator chooses among the very same quantized weights."""

    model: nn.Module  # full precision; allocators that apply candidates restore it
    calibration: torch.Tensor  # [N, T] token ids, never the evaluation text
    candidates: Mapping[str, list[QuantizedWeight]]  # held (a dict) or ``RebuiltCandidates``
    bits: list[int]
    group_size: int = 64
    symmetric: bool = False
    seed: int = 0
    quantizer: object = None  # re-quantizes permuted weights (sub-module allocators)
    hessians: dict[str, torch.Tensor] | None = None  # GPTQ's full-precision ones, when taken (``full_hessians``)
    stage2: Stage2Config = field(default_factory=Stage2Config)  # the knapsack's window, restrictions, solver
    provenance: Provenance = field(default_factory=lambda: Provenance())
    device: str = "cpu"  # where each phase computes, one block at a time
    units: list[list[int]] | None = None  # modules sharing one width (indices; None: each its own)
    zero_points: str = "packed"  # their layout in the checkpoint (what effective bits and bytes count)
    _fisher: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _proxy_costs: np.ndarray | None = field(default=None, repr=False)
    _original: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        layers = quantizable_modules(self.model)
        missing = sorted(set(self.candidates) - set(layers))[:3]
        if missing:
            raise AllocatorError(f"candidates name modules the model does not have: {missing}")
        if isinstance(self.candidates, RebuiltCandidates):  # quantize the originals, whatever the model holds
            self.candidates.source = self.full_precision

    def keep_originals(self) -> None:
        """Copy the full-precision weights aside, once, before anything changes the model (a copy as
        large as the quantized weights: Stage I and the proxies never change it, so never pay it)."""
        if not self._original:
            layers = quantizable_modules(self.model)
            self._original = {n: layers[n].weight.detach().clone() for n in self.candidates}

    @torch.no_grad()
    def restore(self) -> None:
        """Full-precision weights back into the model (after an allocator or ``apply`` changed them)."""
        layers = quantizable_modules(self.model)
        for name, w in self._original.items():
            layers[name].weight.copy_(w)

    def full_precision(self, name: str) -> torch.Tensor:
        """Module ``name``'s original weight (whatever the model holds now)."""
        return self._original[name] if self._original else quantizable_modules(self.model)[name].weight.detach()

    def candidate(self, name: str, bits: int) -> QuantizedWeight:
        """Module ``name`` at ``bits``, unpacked: the very weights Stage I chose among (a variant
        quantized from the same full-precision weights and Hessians takes them, ``apply_assignment(held=)``)."""
        if bits not in self.bits:
            raise AllocatorError(f"{name}: {bits} bits is not among the candidates {self.bits}")
        c = self.candidates[name][self.bits.index(bits)]
        return c.unpack() if isinstance(c, PackedWeight) else c

    @property
    def modules(self) -> list[str]:
        return list(self.candidates)

    @cached_property
    def sizes(self) -> list[tuple[int, int]]:
        """Each module's weight shape, from the model (no candidate is built for it); walked once."""
        layers = quantizable_modules(self.model)
        return [tuple(layers[m].weight.shape) for m in self.modules]

    @cached_property
    def fixed_bytes(self) -> int:
        """Bytes of every tensor the checkpoint stores besides the modules' (a bytes budget pays them);
        their shapes and dtypes never change for a problem, so the state dict is walked once."""
        return stored_bytes(unquantized_tensors(self.model, self.modules).values())

    @property
    def params(self) -> np.ndarray:
        return np.array([r * c for r, c in self.sizes], dtype=np.int64)

    def capture(self, with_grads: bool = True, *, proxy: bool = False, keep_fisher: bool = False,
                sequences: torch.Tensor | None = None, device: str | None = None,
                spill_dir=None) -> TeacherData:
        """One teacher capture of the calibration sequences (or ``sequences``, a shard of them), block
        by block on ``device``. ``proxy``: with the Fisher proxy's [M, K] cost table
        (``proxy_costs``); ``keep_fisher``: every module's Fisher diagonal kept for ``fisher()``;
        ``spill_dir``: the hidden states and gradients memory-mapped there, not in host memory."""
        costs = FisherCosts(self.model, self.candidates) if proxy else None
        kept = KeepFisher() if keep_fisher else None
        consumers = [c for c in (costs, kept) if c is not None]

        def consume(index: int, fisher: dict[str, torch.Tensor]) -> None:
            for consumer in consumers:
                consumer(index, fisher)

        teacher = capture_teacher(self.model, self.calibration if sequences is None else sequences,
                                  with_grads or bool(consumers), device=device or self.device,
                                  on_fisher=consume if consumers else None, spill_dir=spill_dir)
        whole = sequences is None  # a shard's Fisher is not the problem's
        if costs is not None:
            teacher.proxy_costs = costs.table
            self._proxy_costs = teacher.proxy_costs if whole else self._proxy_costs
        if kept is not None and whole:
            self._fisher = kept.fisher
        return teacher

    def fisher(self) -> dict[str, torch.Tensor]:
        """Empirical Fisher diagonal of every module, as large as the model (for the sub-module
        allocators), from one capture with gradients; taken once."""
        if self._fisher is None:
            self.capture(keep_fisher=True)
        return self._fisher

    def proxy_costs(self) -> np.ndarray:
        """The Fisher proxy's [M, K] costs of the candidates, from one streamed capture; taken once."""
        if self._proxy_costs is None:
            self._proxy_costs = self.capture(proxy=True).proxy_costs
        return self._proxy_costs

    @property
    def uses_hessians(self) -> bool:
        return self.quantizer is not None and self.quantizer.needs_hessians

    def full_hessians(self) -> dict[str, torch.Tensor] | None:
        """Every module's full-precision Hessian when the quantizer reads them (None for RTN): as large
        as ``layers x hidden^2`` floats, so taken only for the sub-module allocators that re-quantize
        permuted weights, once."""
        if self.hessians is None and self.uses_hessians:
            q = self.quantizer
            self.hessians = collect_hessians(self.model, self.calibration, token_clip=q.token_clip,
                                             sink_weight=q.sink_weight, device=self.device)
        return self.hessians

    def spent(self, assignment: dict[str, int]) -> float:
        """What ``assignment`` spends in ``stage2.unit`` (effective bits, or bytes of the checkpoint)."""
        stored = sum(module_cost_bits(r, c, QuantSpec(assignment[m], self.group_size, self.symmetric),
                                      self.zero_points)
                     for m, (r, c) in zip(self.modules, self.sizes))
        if self.stage2.unit == "bytes":
            return stored / 8 + self.fixed_bytes
        return stored / float(self.params.sum())

    def check_budget(self, budget: float) -> None:
        if self.stage2.unit != "nominal":  # the knapsack names the reachable range in the budget's unit
            return
        lo, hi = min(self.bits), max(self.bits)
        if not lo <= budget <= hi:
            raise AllocatorError(f"budget {budget:g} bits is outside the candidates' range [{lo}, {hi}]")

    @property
    def allowed(self) -> np.ndarray:
        """[M, K] True where module m may take candidate k (``stage2.min_bits``)."""
        return allowed_mask(self.modules, self.bits, self.stage2.min_bits)

    def lowest_bits(self) -> dict[str, int]:
        """The lowest candidate each module may take."""
        allowed = self.allowed
        return {m: self.bits[int(np.argmax(allowed[i]))] for i, m in enumerate(self.modules)}

    def check_restrictions(self, bits: dict[str, int | list[int]]) -> None:
        """Refuse an assignment (bits per module, or per column block of each module) that puts a
        module below its ``stage2.min_bits``: an allocator never ignores a restriction silently."""
        lowest = self.lowest_bits()
        low = {m: b for m, b in bits.items() if min(b if isinstance(b, list) else [b]) < lowest[m]}
        if low:
            first = next(iter(low))
            raise AllocatorError(f"{len(low)} module(s) below stage2.min_bits {self.stage2.min_bits}, e.g. {first} "
                                 f"at {low[first]} bits (lowest allowed {lowest[first]})")
