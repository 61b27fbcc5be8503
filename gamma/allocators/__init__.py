"""Bit allocators behind one interface (``base.Allocator``): GAMMA and the alternatives users ask
about, one file each, named as its configuration value: ``gamma``, ``gamma_blocks``, ``uniform``,
``hawq`` (sensitivity proxy), ``higgs`` (linearity model + DP), ``scalebits`` (block-wise greedy),
``windquant`` (RL controller), ``evopress`` (evolutionary search); ``column_blocks`` holds what
the block-level ones share.
"""

from __future__ import annotations

from gamma.allocators.base import Allocated, Allocator, BlockAssignment
from gamma.allocators.evopress import EvopressAllocator
from gamma.allocators.gamma import GammaAllocator
from gamma.allocators.gamma_blocks import BlockGammaAllocator
from gamma.allocators.hawq import HawqAllocator
from gamma.allocators.higgs import HiggsAllocator
from gamma.allocators.scalebits import ScalebitsAllocator
from gamma.allocators.uniform import UniformAllocator
from gamma.allocators.windquant import WindquantAllocator
from gamma.problem import AllocationProblem, AllocatorError

ALLOCATORS: dict[str, type[Allocator]] = {
    cls.name: cls for cls in (GammaAllocator, BlockGammaAllocator, UniformAllocator, HawqAllocator,
                              HiggsAllocator, ScalebitsAllocator, WindquantAllocator, EvopressAllocator)
}


def get_allocator(name: str, **settings) -> Allocator:
    """The allocator registered under ``name`` with its settings (see each class)."""
    if name not in ALLOCATORS:
        raise AllocatorError(f"unknown allocator {name!r}; choose one of {sorted(ALLOCATORS)}")
    return ALLOCATORS[name](**settings)


def allocator_from_config(cfg, name: str, tables=None) -> Allocator:
    """The allocator ``name`` with its settings from a ``GammaConfig`` (``tables``: GAMMA's score
    tables learned before, per module for ``gamma``, per block for ``gamma-blocks``, so that they
    are not relearned here). The knapsack's settings travel with the problem (``stage2``)."""
    a = cfg.allocation
    settings = {
        "gamma": lambda: {"stage1": cfg.stage1, "tables": tables},
        "gamma-blocks": lambda: {"stage1": cfg.stage1, "tables": tables, **a.gamma_blocks.model_dump()},
        "uniform": dict,
        "hawq": dict,
        "higgs": lambda: a.higgs.model_dump(),
        "scalebits": lambda: a.scalebits.model_dump(),
        "windquant": lambda: a.windquant.model_dump(),
        "evopress": lambda: a.evopress.model_dump(),
    }
    if name not in settings:
        raise AllocatorError(f"unknown allocator {name!r}; choose one of {sorted(ALLOCATORS)}")
    return get_allocator(name, **settings[name]())


__all__ = ["ALLOCATORS", "Allocated", "AllocationProblem", "Allocator", "AllocatorError", "BlockAssignment",
           "allocator_from_config", "get_allocator"]
