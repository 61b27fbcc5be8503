"""The score table: modules x candidate bits, with everything that reproduces it, and score
reuse: a budget is projected from the table learned nearest to it (``nearest_table``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


class ScoreTableError(ValueError):
    """A score table that does not belong to this model or module set."""


@dataclass
class Scores:
    """Rows to project without a learned table's provenance (a proxy's negated costs, say)."""

    modules: list[str]
    sizes: list[tuple[int, int]]
    bits: list[int]
    scores: np.ndarray  # [M, K], higher is better


@dataclass
class ScoreTable:
    modules: list[str]
    sizes: list[tuple[int, int]]  # (out, in) of each module
    bits: list[int]
    scores: list[list[float]]  # s_mb = log p_mb
    model_hash: str
    text_hash: str
    quantizer: dict  # name + settings + group size + symmetry
    training_budget: float
    settings: dict  # the Stage I configuration
    seed: int
    multiplier: float
    penalty: float
    violation: float
    history: dict = field(default_factory=dict)  # loss, violation, multiplier, ... per step
    wall_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    devices: dict = field(default_factory=dict)  # phase -> the device it computed on (ComputeRecord)
    walk_error: float | None = None  # the block walk's logits against the model's own (blocks.walk_error)
    notes: list = field(default_factory=list)  # warnings of the run (Workspace.notes)
    fixed_bytes: int | None = None  # the checkpoint's tensors besides the rows' (what a bytes budget also pays)

    def array(self) -> np.ndarray:
        return np.array(self.scores, dtype=np.float64)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".partial")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        path = Path(path)
        if not path.exists():
            raise ScoreTableError(f"no score table at {path}; run `gamma learn` first")
        try:
            data = json.loads(path.read_text())
            data["sizes"] = [tuple(s) for s in data["sizes"]]
            table = cls(**data)
        except (ValueError, KeyError, TypeError) as err:  # not JSON, not an object, fields missing or foreign
            raise ScoreTableError(f"{path} is not a gamma score table ({type(err).__name__}: {err})") from None
        if not table.modules or len(table.scores) != len(table.modules) or len(table.sizes) != len(table.modules):
            raise ScoreTableError(f"{path} is not a gamma score table: {len(table.modules)} modules, "
                                  f"{len(table.scores)} score rows, {len(table.sizes)} sizes")
        return table

    def check_matches(self, modules: list[str], sizes: list[tuple[int, int]], model_hash: str | None = None,
                      bits: list[int] | None = None, quantizer: dict | None = None) -> None:
        """Refuse a table learned for another model, module set, candidate set or quantizer (name,
        group size, symmetry and the quantizer's settings, as far as the table records them),
        naming the field that differs."""
        if bits is not None and list(bits) != list(self.bits):
            raise ScoreTableError(f"score table was learned over candidates {self.bits}, not over this run's "
                                  f"candidates {list(bits)}")
        for field_name in sorted(set(quantizer or {}) & set(self.quantizer)):
            if quantizer[field_name] != self.quantizer[field_name]:
                raise ScoreTableError(f"score table was learned with quantizer {field_name}="
                                      f"{self.quantizer[field_name]!r}, this run has {quantizer[field_name]!r}")
        if model_hash is not None and model_hash != self.model_hash:
            raise ScoreTableError(
                f"score table was learned on model {self.model_hash[:12]}, not on this model ({model_hash[:12]})"
            )
        if list(modules) != self.modules:
            missing = sorted(set(modules) - set(self.modules))[:3]
            extra = sorted(set(self.modules) - set(modules))[:3]
            raise ScoreTableError(
                f"score table covers a different module set ({len(self.modules)} vs {len(modules)} modules; "
                f"missing {missing}, foreign {extra})"
            )
        if [tuple(s) for s in sizes] != [tuple(s) for s in self.sizes]:
            raise ScoreTableError("score table module shapes differ from this model's")


def nearest_table(tables: list[ScoreTable], budget: float) -> ScoreTable:
    """The table learned at the training budget nearest ``budget`` (the higher one on a tie): a
    table ranks candidates best near the budget it was learned at, and reuses better upward
    than downward (docs/results.md, "Score bands")."""
    if not tables:
        raise ScoreTableError("no score table to project from; run `gamma learn` first")
    return min(tables, key=lambda t: (abs(t.training_budget - budget), -t.training_budget))
