"""Column blocks: the sub-module granularity that block-wise allocators choose bits for.

A module's input channels are (optionally) reordered, then cut into blocks of ``width`` columns,
a multiple of the quantization group so that each block's groups (and their scales) belong to it
alone; each block can take any candidate bit width. Candidates are quantized once in the reordered
layout and measure each block's error at every width; with RTN a block at ``b`` bits holds exactly
what a ``b``-bit quantization of that layout stores, with GPTQ ``apply`` quantizes a mixed module
again in one pass at its per-block widths (GPTQ's compensation crosses block boundaries).
A block assignment is exported as a fake-quantized model (dequantized weights in the original
channel order) together with the per-block bits and permutations; ``account`` counts what such a
model stores, the per-block bit-width indices and the permutations explicitly included.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from gamma.allocators.base import AllocationProblem, Allocator, AllocatorError, BlockAssignment
from gamma.model.assignment import module_cost_bits
from gamma.model.loading import quantizable_modules
from gamma.progress import track
from gamma.quant.interface import QuantizedWeight, QuantSpec
from gamma.stage1.rows import ColumnLayout, block_rows


@dataclass
class ColumnBlocks:
    width: int
    modules: list[str]
    order: dict[str, torch.Tensor | None]  # input-channel permutation per module
    candidates: dict[str, list[QuantizedWeight]]  # in the permuted layout
    owner: np.ndarray  # [J] module index of each block
    sizes: np.ndarray  # [J] weights per block
    errors: np.ndarray  # [J, K] the allocator's error measure of each block at each candidate

    @property
    def n_blocks(self) -> int:
        return len(self.owner)

    @property
    def row_names(self) -> list[str]:
        """``module#j`` for block ``j`` of each module, in block order (the blocks of a module are
        consecutive, module by module)."""
        counts = np.bincount(self.owner, minlength=len(self.modules))
        return [row for m, n in zip(self.modules, counts) for row in block_rows(m, int(n))]

    @property
    def row_sizes(self) -> list[tuple[int, int]]:
        """(out, width) of every block: its weights, as Stage II's knapsack counts them."""
        return [(int(n) // self.width, self.width) for n in self.sizes]

    def layouts(self) -> dict[str, ColumnLayout]:
        """Each module's candidate layout and the block of each of its input channels."""
        out = {}
        for name in self.modules:
            n_in = self.candidates[name][0].shape[1]
            block = torch.arange(n_in) // self.width
            order = self.order.get(name)
            columns = block if order is None else torch.empty_like(block).scatter_(0, order, block)
            out[name] = ColumnLayout(order, columns)
        return out

    def to_assignment(self, levels: np.ndarray, bits: list[int]) -> BlockAssignment:
        out: dict[str, list[int]] = {m: [] for m in self.modules}
        for j, k in enumerate(levels):
            out[self.modules[self.owner[j]]].append(bits[int(k)])
        order = {m: (None if o is None else o.tolist()) for m, o in self.order.items()}
        return BlockAssignment(self.width, out, order)

    @torch.no_grad()
    def apply(self, problem: AllocationProblem, assignment: BlockAssignment) -> None:
        """Set every module's weight to its fake-quantized blocks, in the original channel order.

        With GPTQ (the problem carries Hessians) a module whose blocks differ in width is quantized
        again in one pass at its per-block widths: splicing columns of candidates quantized
        separately would drop, at every block boundary, the error compensation GPTQ gave each
        candidate (spliced, ScaleBITS lost to uniform allocation at 2.25, 2.5 and 3.0 bits). With
        RTN every group is quantized on its own, so the splice is exactly that pass."""
        problem.keep_originals()
        modules = quantizable_modules(problem.model)
        bits = problem.bits
        for name, block_bits in assignment.bits.items():
            order = self.order[name]
            cands = self.candidates[name]
            if len(set(block_bits)) == 1:
                permuted = cands[bits.index(block_bits[0])].dequantize()
            elif problem.uses_hessians:
                permuted = self._requantize(problem, name, block_bits)
            else:
                dense = {b: cands[bits.index(b)].dequantize() for b in set(block_bits)}
                permuted = torch.empty_like(dense[block_bits[0]])
                for j, b in enumerate(block_bits):
                    cols = slice(j * self.width, (j + 1) * self.width)
                    permuted[:, cols] = dense[b][:, cols]
            weight = permuted if order is None else permuted[:, torch.argsort(order)]
            modules[name].weight.copy_(weight.to(modules[name].weight.dtype))

    def _requantize(self, problem: AllocationProblem, name: str, block_bits: list[int]) -> torch.Tensor:
        order = self.order[name]
        w = problem.full_precision(name).float()
        h = problem.full_hessians()[name]
        if order is not None:
            w, h = w[:, order], h[order][:, order]
        per_block = self.width // problem.group_size
        group_bits = [b for b in block_bits for _ in range(per_block)]
        spec = QuantSpec(max(block_bits), problem.group_size, problem.symmetric)
        return problem.quantizer.quantize(w, spec, h, group_bits=group_bits).dequantize()


class BlockAllocator(Allocator):
    """An allocator over column blocks: ``prepare`` builds ``self.blocks``; ``apply`` fake-quantizes."""

    granularity = "block"
    blocks: ColumnBlocks

    def apply(self, problem: AllocationProblem, assignment: BlockAssignment) -> None:
        self.blocks.apply(problem, assignment)


def fisher_channel_order(problem: AllocationProblem, reorder: bool = True) -> dict[str, torch.Tensor | None]:
    """Input channels of each module, most Fisher-sensitive first (``sum_i F_ij W_ij^2``), so that
    the channels worth more bits share blocks (None everywhere when ``reorder`` is off)."""
    if not reorder:
        return {name: None for name in problem.modules}
    fisher = problem.fisher()
    weights = quantizable_modules(problem.model)
    return {name: torch.argsort((fisher[name] * weights[name].weight.detach().float() ** 2).sum(dim=0),
                                descending=True) for name in problem.modules}


def block_width(problem: AllocationProblem, width: int) -> int:
    g = problem.group_size
    if g == -1:
        raise AllocatorError("block-wise allocation needs quantization groups (quantizer.group_size > 0); "
                             "got -1, one group per row, which spans every block")
    width = width or g
    if width % g:
        raise AllocatorError(f"block width {width} is not a multiple of quantizer.group_size {g}")
    bad = sorted({c for _, c in problem.sizes if c % width})
    if bad:
        raise AllocatorError(f"block width {width} does not divide the input width(s) {bad}")
    return width


def build_column_blocks(problem: AllocationProblem, width: int, order: dict[str, torch.Tensor | None],
                        column_weight: dict[str, torch.Tensor], label: str) -> ColumnBlocks:
    """Quantize each module in its channel ``order`` at every candidate and measure each block's
    error ``sum(column_weight * (W - Q)^2)`` over its columns (``column_weight``: [out, in] or [in])."""
    width = block_width(problem, width)
    weights = quantizable_modules(problem.model)
    candidates, owner, sizes, errors = {}, [], [], []
    for i, name in enumerate(track(problem.modules, f"{label}: blocks of {width} columns")):
        perm = order.get(name)
        w = weights[name].weight.detach().float()
        cw = column_weight[name].float()
        if perm is not None:
            w, cw = w[:, perm], cw[..., perm]
        if perm is None:
            candidates[name] = problem.candidates[name]
        else:
            h = problem.full_hessians()[name] if problem.uses_hessians else None
            h = h[perm][:, perm] if h is not None else None
            candidates[name] = [problem.quantizer.quantize(w, QuantSpec(b, problem.group_size, problem.symmetric), h)
                                for b in problem.bits]
        per_col = torch.stack([(cw * (w - q.dequantize(w.device)) ** 2).reshape(-1, w.shape[1]).sum(dim=0)
                               for q in candidates[name]])  # [K, in]
        blocks = per_col.reshape(len(problem.bits), -1, width).sum(dim=2).T  # [in / width, K]
        owner += [i] * blocks.shape[0]
        sizes += [w.shape[0] * width] * blocks.shape[0]
        errors.append(blocks.double().numpy())
    return ColumnBlocks(width, problem.modules, order, candidates, np.array(owner), np.array(sizes, dtype=np.int64),
                        np.concatenate(errors))


def greedy_upgrade(errors: np.ndarray, sizes: np.ndarray, bits: list[int], levels: np.ndarray,
                   budget_bits: float) -> np.ndarray:
    """From ``levels``, repeatedly raise the block whose next candidate removes the most error
    per added bit, while the budget allows (the marginal-gain greedy)."""
    levels = levels.copy()
    spent = float((sizes * np.array(bits)[levels]).sum())
    heap = []

    def push(j: int) -> None:
        k = levels[j]
        if k + 1 < len(bits):
            cost = sizes[j] * (bits[k + 1] - bits[k])
            heapq.heappush(heap, (-(errors[j, k] - errors[j, k + 1]) / cost, j, k))

    for j in range(len(levels)):
        push(j)
    while heap:
        _, j, k = heapq.heappop(heap)
        if levels[j] != k:
            continue
        cost = sizes[j] * (bits[k + 1] - bits[k])
        if spent + cost > budget_bits:
            continue  # this upgrade no longer fits; a smaller one still might
        levels[j], spent = k + 1, spent + cost
        push(j)
    return levels


def repair_down(errors: np.ndarray, sizes: np.ndarray, bits: list[int], levels: np.ndarray,
                budget_bits: float) -> np.ndarray:
    """Lower blocks, least error added per saved bit first, until the assignment fits the budget."""
    levels = levels.copy()
    spent = float((sizes * np.array(bits)[levels]).sum())
    heap = []

    def push(j: int) -> None:
        k = levels[j]
        if k > 0:
            saved = sizes[j] * (bits[k] - bits[k - 1])
            heapq.heappush(heap, ((errors[j, k - 1] - errors[j, k]) / saved, j, k))

    for j in range(len(levels)):
        push(j)
    while spent > budget_bits and heap:
        _, j, k = heapq.heappop(heap)
        if levels[j] != k:
            continue
        levels[j] = k - 1
        spent -= sizes[j] * (bits[k] - bits[k - 1])
        push(j)
    if spent > budget_bits:
        raise AllocatorError("no block assignment fits the budget")
    return levels


def block_account(problem: AllocationProblem, assignment: BlockAssignment) -> dict:
    """Nominal bits, and effective bits with scales, zero-points and block metadata counted."""
    n_total = codes = stored = 0
    for name, (rows, _cols) in zip(problem.modules, problem.sizes):
        for b in assignment.bits[name]:
            n = rows * assignment.width
            n_total += n
            codes += n * b
            spec = QuantSpec(b, problem.group_size, problem.symmetric)
            stored += module_cost_bits(rows, assignment.width, spec, problem.zero_points)
    meta = assignment.metadata_bits(len(problem.bits))
    return {"nominal_bits": codes / n_total, "effective_bits": (stored + meta) / n_total,
            "metadata_bits": meta, "metadata_bits_per_weight": meta / n_total,
            "quantized_bytes": (stored + meta) / 8}
