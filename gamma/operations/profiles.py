"""Serving profiles: what an engine's loader and kernels take, as data.

A profile fixes the candidate widths, the symmetry, the group sizes and the allocation units of a
run, so that every variant it registers loads in the engine it is made for; ``check_profile``
refuses a configuration outside it, naming every value and the setting that fits. Sources: vLLM's
compressed-tensors WNA16 path (Marlin: 4/8-bit symmetric ``uint4b8``/``uint8b128``, with
zero-points 4-bit only ``uint4``, group sizes -1/32/64/128; every shard of a fused layer one
scheme, every expert of a fused MoE layer one scheme), its Humming kernels (2 to 8 bits), and
transformers' compressed-tensors loader (reads symmetric pack-quantized checkpoints, and
asymmetric ones with zero-points padded to one int32 row per output row: it allocates them
unpacked and refuses compressed-tensors' own packed layout, which vLLM's loader requires;
``gamma.model.export.ZERO_POINT_LAYOUTS``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    engine: str  # what serves the variants
    bits: tuple[int, ...]  # candidate widths it serves (16: the module left at float16, in ``ignore``)
    symmetric: tuple[bool, ...]
    group_sizes: tuple[int, ...] | None  # None: any that divides the widths
    ties: str | None  # allocation.ties it needs (None: any)
    experts: str | None  # allocation.experts it needs (None: any)
    loads_in: tuple[str, ...]  # the loaders its variants are made for
    zero_points: str = "packed"  # the layout of asymmetric zero-points its loader reads
    tries: tuple[str, ...] = ()  # loaders tried on every variant and recorded when they read it (never required)
    asymmetric_bits: tuple[int, ...] | None = None  # the widths it serves with zero-points (None: all of ``bits``)


PROFILES = {
    "vllm-marlin": Profile("vLLM, Marlin kernels (GPU)", (4, 8, 16), (True, False), (-1, 32, 64, 128), "fused",
                           "per_layer", ("gamma", "vllm"), asymmetric_bits=(4, 16)),
    "vllm-humming": Profile("vLLM, Humming kernels (GPU, experimental)", (2, 3, 4, 8, 16), (True, False),
                            (-1, 32, 64, 128), "fused", "per_layer", ("gamma", "vllm")),
    "transformers": Profile("transformers (compressed-tensors loader)", (2, 3, 4, 8, 16), (True, False), None,
                            None, None, ("gamma", "transformers"), "padded"),
    # vLLM cannot serve its variants anyway (2/3 bits, q/k/v untied): zero-points in the layout
    # transformers reads, and transformers' loader tried on every variant
    "research": Profile("gamma's own loader (every representation gamma has)", (2, 3, 4, 8, 16), (True, False),
                        None, None, None, ("gamma",), "padded", ("transformers",)),
}


def profile_problems(name: str, candidates: list[int], symmetric: bool, group_size: int, ties: str,
                     experts: str) -> list[str]:
    """What in a configuration lies outside profile ``name``, each as ``setting=value`` and what fits."""
    p = PROFILES[name]
    problems = []
    if not set(candidates) <= set(p.bits):
        problems.append(f"candidates={candidates} (it serves {list(p.bits)})")
    if symmetric not in p.symmetric:
        problems.append(f"quantizer.symmetric={str(symmetric).lower()} (it needs {str(p.symmetric[0]).lower()})")
    elif not symmetric and p.asymmetric_bits is not None and not set(candidates) <= set(p.asymmetric_bits):
        problems.append(f"candidates={candidates} with quantizer.symmetric=false (with zero-points it serves "
                        f"{list(p.asymmetric_bits)}; the others need quantizer.symmetric=true)")
    if p.group_sizes is not None and group_size not in p.group_sizes:
        problems.append(f"quantizer.group_size={group_size} (it takes {list(p.group_sizes)})")
    if p.ties is not None and ties != p.ties:
        problems.append(f"allocation.ties={ties} (it needs {p.ties}: the engine fuses q/k/v and gate/up)")
    if p.experts is not None and experts != p.experts:
        problems.append(f"allocation.experts={experts} (it needs {p.experts}: one scheme per fused MoE layer)")
    return problems
