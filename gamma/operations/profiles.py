"""Serving profiles: what an engine's loader and kernels take, as data.

A profile fixes the candidate widths, the symmetry, the group sizes and the allocation units of a
run, so that every variant it registers loads in the engine it is made for; ``check_profile``
refuses a configuration outside it, naming every value and the setting that fits. A profile also
brings a run's settings (``Profile.settings``: its widths, tie groups, Stage I recipe and budgets),
which ``load_config`` takes for every key of ``PROFILE_SETTINGS`` that params.yaml and --set leave
out, so that ``--set serving.profile=vllm-marlin`` alone is a run for Marlin. Sources: vLLM's
compressed-tensors WNA16 path (Marlin: 4/8-bit symmetric ``uint4b8``/``uint8b128``, with
zero-points 4-bit only ``uint4``, group sizes -1/32/64/128; every shard of a fused layer one
scheme, every expert of a fused MoE layer one scheme), its Humming kernels (2 to 8 bits), and
transformers' compressed-tensors loader (reads symmetric pack-quantized checkpoints, and
asymmetric ones with zero-points padded to one int32 row per output row: it allocates them
unpacked and refuses compressed-tensors' own packed layout, which vLLM's loader requires;
``gamma.model.export.ZERO_POINT_LAYOUTS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# what a run takes from its profile when params.yaml and --set leave it out (``load_config``)
PROFILE_SETTINGS = ("candidates", "uniform_bits", "quantizer.symmetric", "allocation.ties", "allocation.experts",
                    "stage1.budget", "stage1.extra_budgets", "stage1.relaxation", "stage1.loss", "stage2.budgets")


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
    settings: dict = field(default_factory=dict)  # every key of PROFILE_SETTINGS: its widths, units, Stage I recipe


# The Stage I recipes are the ones docs/serving_profiles.md measured best for each profile: straight-through
# draws and the end-to-end KL (a table learned against each block's own target underrates how errors compound
# downstream), and a table at (or just below) every budget, because a table projected upward to a budget
# lost there. research keeps the method's own teacher-forced recipe.
_TIED = {"allocation.ties": "fused", "allocation.experts": "per_layer"}
_UNTIED = {"allocation.ties": "none", "allocation.experts": "per_expert"}
_END_TO_END = {"stage1.relaxation": "hard", "stage1.loss": "end_to_end"}
_TEACHER_FORCED = {"stage1.relaxation": "soft", "stage1.loss": "fisher"}


PROFILES = {
    "vllm-marlin": Profile("vLLM, Marlin kernels (GPU)", (4, 8, 16), (True, False), (-1, 32, 64, 128), "fused",
                           "per_layer", ("gamma", "vllm"), asymmetric_bits=(4, 16), settings={
                               "candidates": [4, 8, 16], "uniform_bits": [4, 8], "quantizer.symmetric": True, **_TIED,
                               "stage1.budget": 6.0, "stage1.extra_budgets": [4.5, 5.0], **_END_TO_END,
                               "stage2.budgets": [4.25, 4.5, 5.0, 6.0]}),
    "vllm-humming": Profile("vLLM, Humming kernels (GPU, experimental)", (2, 3, 4, 8, 16), (True, False),
                            (-1, 32, 64, 128), "fused", "per_layer", ("gamma", "vllm"), settings={
                                "candidates": [2, 3, 4, 8], "uniform_bits": [2, 3, 4], "quantizer.symmetric": False,
                                **_TIED, "stage1.budget": 3.0, "stage1.extra_budgets": [3.5, 4.0], **_END_TO_END,
                                "stage2.budgets": [2.5, 3.0, 3.5, 4.0]}),
    "transformers": Profile("transformers (compressed-tensors loader)", (2, 3, 4, 8, 16), (True, False), None,
                            None, None, ("gamma", "transformers"), "padded", settings={
                                "candidates": [2, 3, 4], "uniform_bits": [2, 3, 4], "quantizer.symmetric": True,
                                **_UNTIED, "stage1.budget": 3.0, "stage1.extra_budgets": [3.5], **_END_TO_END,
                                "stage2.budgets": [2.5, 3.0, 3.5, 4.0]}),
    # vLLM cannot serve its variants anyway (2/3 bits, q/k/v untied): zero-points in the layout
    # transformers reads, and transformers' loader tried on every variant
    "research": Profile("gamma's own loader (every representation gamma has)", (2, 3, 4, 8, 16), (True, False),
                        None, None, None, ("gamma",), "padded", ("transformers",), settings={
                            "candidates": [2, 3, 4], "uniform_bits": [2, 3, 4], "quantizer.symmetric": False,
                            **_UNTIED, "stage1.budget": 3.0, "stage1.extra_budgets": [2.75, 3.5], **_TEACHER_FORCED,
                            "stage2.budgets": [2.5, 3.0, 3.5]}),
}


def fill_from_profile(data: dict, default: str) -> list[str]:
    """Give ``data`` (a configuration as plain nested data) its profile's value of every key of
    ``PROFILE_SETTINGS`` it leaves out; the keys filled, in order. ``default``: the profile when
    ``data`` names none. A section that is not a mapping is left for validation to refuse."""
    serving = data.get("serving")
    name = serving.get("profile", default) if isinstance(serving, dict) else default
    if name not in PROFILES:
        return []  # validation names the bad profile
    filled = []
    for dotted, value in PROFILES[name].settings.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = list(value) if isinstance(value, list) else value
            filled.append(dotted)
    return filled


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
