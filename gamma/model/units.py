"""Allocation units: the modules that must share one bit width because a serving engine fuses them.

vLLM loads q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj`` (Mixtral's w1/w3
too), and all shards of a fused layer must carry one quantization scheme; its fused MoE layer
holds every expert of a layer under one scheme. A unit is one row of Stage I's logits, one item of
Stage II's knapsack and one width in every allocator's assignment. ``allocation.ties``:

- ``none``: every module is its own unit (an already fused module, Phi-3's ``qkv_proj``, is one);
- ``fused``: q/k/v of an attention, gate/up of an MLP or of one expert, one unit each.

``allocation.experts``: ``per_expert`` keeps each expert's projections apart (as ``ties`` says);
``per_layer`` makes all experts of a layer one unit (gate, up and down of every expert).
"""

from __future__ import annotations

import re

FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
         "w1": "gate_up", "w3": "gate_up"}
EXPERT = re.compile(r"^(.*\.experts)\.\d+\.")


def unit_key(module: str, ties: str, experts: str) -> str:
    if experts == "per_layer":
        match = EXPERT.match(module)
        if match:
            return f"{match.group(1)}.*"
    parent, _, leaf = module.rpartition(".")
    if ties == "fused" and leaf in FUSED:
        return f"{parent}.{FUSED[leaf]}"
    return module


def allocation_units(modules: list[str], ties: str = "none", experts: str = "per_expert") -> list[list[int]]:
    """The units over ``modules`` as lists of their indices, in the order of each unit's first
    member; every module in exactly one unit."""
    units: dict[str, list[int]] = {}
    for i, name in enumerate(modules):
        units.setdefault(unit_key(name, ties, experts), []).append(i)
    return list(units.values())


def is_trivial(units: list[list[int]] | None) -> bool:
    return units is None or all(len(u) == 1 for u in units)


def broken_ties(assignment: dict[str, int], modules: list[str], units: list[list[int]]) -> list[str]:
    """The units whose members an assignment gives different widths, named by their members."""
    return [" + ".join(modules[i] for i in unit) for unit in units
            if len({assignment.get(modules[i]) for i in unit}) > 1]
