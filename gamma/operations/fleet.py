"""Fleet rollouts: which variant each device class gets.

A fleet file lists device classes (memory, a reserve for the KV cache and runtime, a count). A
class can hold a variant whose checkpoint fits in ``memory - reserve``; the budget it needs is the
largest budget on a grid (``budget_step`` bits) whose predicted size fits. ``plan_rollout``
picks, for every class, the best registered variant that fits: the alias holder with the lowest
perplexity, or, when no alias holder fits, the best fitting variant, flagged as such.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gamma.model.assignment import UNQUANTIZED_BITS
from gamma.quant.interface import SCALE_BITS

MB = 2**20
BYTES_PER_STORED_TENSOR = 160  # a safetensors header entry plus weight_shape, rounded up


class FleetError(ValueError):
    """The fleet file is invalid; the message names the field and the value."""


class DeviceClass(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    memory_mb: float = Field(gt=0, description="memory a replica may use for the model and its cache")
    kv_cache_reserve_mb: float = Field(0.0, ge=0, description="kept free for the KV cache and the runtime")
    count: int = Field(1, ge=1)

    @property
    def model_bytes(self) -> float:
        return (self.memory_mb - self.kv_cache_reserve_mb) * MB


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classes: list[DeviceClass] = Field(min_length=1)
    alias: str = "production"
    budget_step: float = Field(0.25, gt=0, description="grid of the budgets a class may ask for")


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path)
    if not path.exists():
        raise FleetError(f"fleet file {path} does not exist")
    try:
        fleet = Fleet.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as err:
        raise FleetError(f"{path}: {err}") from None
    names = [c.name for c in fleet.classes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FleetError(f"{path}: device class name(s) {', '.join(map(repr, repeated))} appear more than once: "
                         "each class needs its own name (its variant is chosen and reported by name)")
    for c in fleet.classes:
        if c.kv_cache_reserve_mb >= c.memory_mb:
            raise FleetError(f"{path}: class {c.name!r}: kv_cache_reserve_mb={c.kv_cache_reserve_mb} leaves no "
                             f"memory of memory_mb={c.memory_mb} for the model")
    return fleet


def predicted_bytes(budget: float, sizes: list[tuple[int, int]], other_params: int, group_size: int,
                    symmetric: bool, max_bits: int, other_tensors: int = 0) -> float:
    """Checkpoint file size at ``budget`` average bits: codes, scales and zero-points (counted at the
    widest candidate, an upper bound) of the quantized modules, the rest at 16 bits, and the
    safetensors header."""
    n = sum(r * c for r, c in sizes)
    groups = sum(r * (1 if group_size == -1 else c // group_size) for r, c in sizes)
    meta = groups * (SCALE_BITS + (0 if symmetric else max_bits))
    header = BYTES_PER_STORED_TENSOR * (4 * len(sizes) + other_tensors)
    return (budget * n + meta) / 8 + other_params * UNQUANTIZED_BITS / 8 + header


def needed_budget(device: DeviceClass, bits: list[int], step: float, size_of) -> float | None:
    """The largest budget on the grid from min(bits) to max(bits) whose ``size_of(budget)`` fits the
    class, or None when even the smallest does not."""
    lo, hi = min(bits), max(bits)
    best = None
    for k in range(int(math.floor((hi - lo) / step + 1e-9)) + 1):
        b = round(lo + k * step, 6)
        if size_of(b) <= device.model_bytes:
            best = b
    return best


def plan_rollout(fleet: Fleet, variants: list[dict]) -> list[dict]:
    """One manifest entry per class. ``variants``: registered variants with ``budget``, ``bytes``
    (real checkpoint size where known), ``perplexity``, ``alias_holder`` (bool) and what the entry
    should carry (name, version, checkpoint URI, checksum)."""
    entries = []
    for c in fleet.classes:
        fits = [v for v in variants if v["bytes"] <= c.model_bytes]
        holders = [v for v in fits if v["alias_holder"]]
        pool, note = (holders, f"alias {fleet.alias!r}") if holders else (fits, f"no {fleet.alias!r} holder fits")
        entry = {"class": c.name, "count": c.count, "model_budget_mb": round(c.model_bytes / MB, 3)}
        if not pool:
            entries.append({**entry, "variant": None, "note": "no registered variant fits this class"})
            continue
        best = min(pool, key=lambda v: (v["perplexity"], -v["budget"]))
        entries.append({**entry, "variant": best, "note": note,
                        "headroom_mb": round((c.model_bytes - best["bytes"]) / MB, 3)})
    return entries
