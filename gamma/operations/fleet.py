"""Fleet rollouts: which variant each device class gets.

A fleet file lists device classes (memory, a reserve for the KV cache and runtime, a count, and
optionally the engine that serves them). A class holds a variant whose tensors fit in ``memory -
reserve``: its budget is that many bytes, solved directly in bytes (``stage2.unit: bytes``), up to
what the widest candidates spend. ``plan_rollout`` picks, for every class, the best registered
variant that fits and loads in the class's engine: the alias holder with the lowest perplexity,
or, when no alias holder fits, the best fitting variant, flagged as such.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gamma.model.assignment import module_stored_bytes
from gamma.quant.interface import QuantSpec

MB = 2**20
ENGINES = ("gamma", "transformers", "vllm")


class FleetError(ValueError):
    """The fleet file is invalid; the message names the field and the value."""


class DeviceClass(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    memory_mb: float = Field(gt=0, description="memory a replica may use for the model and its cache")
    kv_cache_reserve_mb: float = Field(0.0, ge=0, description="kept free for the KV cache and the runtime")
    count: int = Field(1, ge=1)
    engine: Literal[ENGINES] | None = Field(None, description=(  # type: ignore[valid-type]
        "the engine that serves this class: only variants whose loads_in names it are offered"))

    @property
    def model_bytes(self) -> float:
        return (self.memory_mb - self.kv_cache_reserve_mb) * MB


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classes: list[DeviceClass] = Field(min_length=1)
    alias: str = "production"


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


def bytes_range(sizes: list[tuple[int, int]], bits: list[int], group_size: int, symmetric: bool,
                fixed_bytes: int, zero_points: str = "packed") -> tuple[int, int]:
    """The fewest and the most bytes a variant's tensors can take: every module at the narrowest,
    then at the widest candidate, plus the tensors stored as they are."""
    def total(b: int) -> int:
        spec = QuantSpec(b, group_size, symmetric)
        return fixed_bytes + sum(module_stored_bytes(r, c, spec, zero_points) for r, c in sizes)

    return total(min(bits)), total(max(bits))


def needed_bytes(device: DeviceClass, reachable: tuple[int, int]) -> int | None:
    """The bytes budget of a class: all its model memory, at most what the widest candidates spend;
    None when even the narrowest variant does not fit."""
    lo, hi = reachable
    room = math.floor(device.model_bytes)
    return None if room < lo else min(room, hi)


def plan_rollout(fleet: Fleet, variants: list[dict]) -> list[dict]:
    """One manifest entry per class. ``variants``: registered variants with ``budget``, ``bytes``
    (their tensors' exact bytes), ``perplexity``, ``alias_holder`` (bool), ``loads_in`` (the
    loaders checked) and what the entry should carry (name, version, checkpoint URI, checksum)."""
    entries = []
    for c in fleet.classes:
        fits = [v for v in variants if v["bytes"] <= c.model_bytes]
        if c.engine is not None:
            fits = [v for v in fits if c.engine in v.get("loads_in", ())]
        holders = [v for v in fits if v["alias_holder"]]
        pool, note = (holders, f"alias {fleet.alias!r}") if holders else (fits, f"no {fleet.alias!r} holder fits")
        entry = {"class": c.name, "count": c.count, "engine": c.engine, "model_budget_mb": round(c.model_bytes / MB, 3)}
        if not pool:
            why = f" and loads in {c.engine}" if c.engine else ""
            entries.append({**entry, "variant": None, "note": f"no registered variant fits this class{why}"})
            continue
        best = min(pool, key=lambda v: (v["perplexity"], -v["bytes"]))
        entries.append({**entry, "variant": best, "note": note,
                        "headroom_mb": round((c.model_bytes - best["bytes"]) / MB, 3)})
    return entries
