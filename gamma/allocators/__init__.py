"""Bit allocators behind one interface (``Allocator``): GAMMA and the alternatives users ask about.

Each lives in its own file: ``learned`` (GAMMA, per module and per column block), ``uniform``,
``sensitivity`` (HAWQ-style), ``linearity`` (HIGGS-style), ``blockwise`` (ScaleBITS-style),
``rl_controller`` (WINDQuant-style), ``evolution`` (EvoPress-style).
"""

from __future__ import annotations

from gamma.allocators.base import (
    Allocated,
    AllocationProblem,
    Allocator,
    AllocatorError,
    BlockAssignment,
)
from gamma.allocators.blockwise import BlockwiseAllocator
from gamma.allocators.evolution import EvolutionAllocator
from gamma.allocators.learned import BlockGammaAllocator, GammaAllocator
from gamma.allocators.linearity import LinearityAllocator
from gamma.allocators.rl_controller import RLControllerAllocator
from gamma.allocators.sensitivity import SensitivityAllocator
from gamma.allocators.uniform import UniformAllocator

ALLOCATORS: dict[str, type[Allocator]] = {
    cls.name: cls for cls in (GammaAllocator, BlockGammaAllocator, UniformAllocator, SensitivityAllocator,
                              LinearityAllocator, BlockwiseAllocator, RLControllerAllocator, EvolutionAllocator)
}


def get_allocator(name: str, **settings) -> Allocator:
    """The allocator registered under ``name`` with its settings (see each class)."""
    if name not in ALLOCATORS:
        raise AllocatorError(f"unknown allocator {name!r}; choose one of {sorted(ALLOCATORS)}")
    return ALLOCATORS[name](**settings)


def allocator_from_config(cfg, name: str, tables=None) -> Allocator:
    """The allocator ``name`` with its settings from a ``GammaConfig`` (``tables``: GAMMA's score
    tables learned before, per module for ``gamma``, per block for ``gamma-blocks``, so that they
    are not relearned here)."""
    a = cfg.allocation
    settings = {
        "gamma": lambda: {"stage1": cfg.stage1, "window": cfg.stage2.window, "tables": tables},
        "gamma-blocks": lambda: {"stage1": cfg.stage1, "window": cfg.stage2.window, "solver": cfg.stage2.solver,
                                 "tables": tables, **a.gamma_blocks.model_dump()},
        "uniform": dict,
        "hawq": lambda: {"window": cfg.stage2.window},
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
