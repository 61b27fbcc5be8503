"""A budget: a number in one of three units, as a user writes it and as the registry names it.

- ``nominal``: average code bits per quantized weight (``3.0``, ``3bit``);
- ``effective``: average stored bits per quantized weight, scales and zero-points included;
- ``bytes``: the checkpoint's tensors in bytes, everything counted (``95MB``, ``1.5GiB``): what a
  device must hold. A fleet thinks in bytes.
"""

from __future__ import annotations

import math
import re

UNITS = ("nominal", "effective", "bytes")
BYTE_SUFFIXES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
BIT_SUFFIXES = ("bit", "bits")
_SHOWN = ("B", "kB", "MB", "GB", "KiB", "MiB", "GiB")  # the units as messages write them
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")


class BudgetSyntaxError(ValueError):
    """A budget that cannot be read; the message names it and the units accepted."""


def parse_budget(value: float | int | str, unit: str) -> tuple[float, str]:
    """``value`` (a number in ``unit``, or text with its own unit) as (number, unit)."""
    if isinstance(value, bool):
        raise BudgetSyntaxError(f"budget {value!r} is not a number")
    if isinstance(value, (int, float)):
        number, suffix, written = float(value), "", ""
    else:
        match = _NUMBER.match(str(value))
        if not match:
            raise BudgetSyntaxError(f"cannot read budget {value!r}: write a number, e.g. 3.0, 3bit or 95MB "
                                    f"(units: bits, {', '.join(_SHOWN)})")
        number, written = float(match.group(1)), match.group(2)
        suffix = written.lower()
    if suffix in BYTE_SUFFIXES:
        number, unit = float(math.floor(number * BYTE_SUFFIXES[suffix])), "bytes"  # whole bytes
    elif suffix in BIT_SUFFIXES:
        unit = "nominal" if unit == "bytes" else unit
    elif suffix:
        raise BudgetSyntaxError(f"budget {value!r}: unknown unit {written!r} (units: bits, {', '.join(_SHOWN)})")
    if not math.isfinite(number) or number <= 0:
        raise BudgetSyntaxError(f"budget {value!r} must be a finite positive number")
    return number, unit


def parse_budgets(values: list, unit: str) -> tuple[list[float], str]:
    """Every budget of a list in one unit; a list mixing bits and bytes is refused, naming both."""
    parsed = [parse_budget(v, unit) for v in values]
    units = {u for _, u in parsed}
    if len(units) > 1:
        by = {u: [v for v, (_, w) in zip(values, parsed) if w == u] for u in sorted(units)}
        raise BudgetSyntaxError(f"budgets mix units: {by}; one run solves budgets of one unit")
    return [b for b, _ in parsed], units.pop() if units else unit


def budget_label(budget: float, unit: str) -> str:
    """The budget as it appears in registry names, folders and tables: ``2.5bit``, ``2.5ebit``, ``95MB``."""
    if unit == "bytes":  # to the byte, so that the name reads back as the very budget
        return f"{budget / 1e6:.6f}".rstrip("0").rstrip(".") + "MB"
    return f"{budget:g}{'e' if unit == 'effective' else ''}bit"


def budget_stem(budget: float, unit: str) -> str:
    """The budget's short form, for file names and tables: ``2.5`` for nominal bits (as the files
    have always been named), the label otherwise."""
    return f"{budget:g}" if unit == "nominal" else budget_label(budget, unit)


def budget_text(budget: float, unit: str) -> str:
    """The budget in words, for messages: ``2.5 bits``, ``2.5 effective bits``, ``95 MB``."""
    if unit == "bytes":
        return budget_label(budget, unit).removesuffix("MB") + " MB"
    return f"{budget:g} {'effective ' if unit == 'effective' else ''}bits"


def label_budget(label: str, unit: str) -> float | None:
    """The budget a ``budget_label`` names in ``unit`` (None: another unit's label)."""
    suffix = {"bytes": "MB", "effective": "ebit", "nominal": "bit"}[unit]
    if not label.endswith(suffix) or (unit == "nominal" and label.endswith("ebit")):
        return None
    try:
        number = float(label[: -len(suffix)])
    except ValueError:
        return None
    return float(round(number * 1e6)) if unit == "bytes" else number
