"""Promotion gate: may a variant take a registry alias? Pure decision over evaluation figures.

A challenger is promoted only when it beats the uniform variant of equal or larger size (lower
perplexity, and a zero-shot average not lower by more than one standard error: with a few
hundred items zero-shot figures are noisy) and is not worse than the alias's current holder
(perplexity no higher). The decision carries every figure it used, so it can be recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    figures: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _beats(a: dict, b: dict) -> tuple[bool, str]:
    if not a["perplexity"] < b["perplexity"]:
        return False, f"perplexity {a['perplexity']:.3f} is not below {b['perplexity']:.3f}"
    zs_a, zs_b, se = a.get("zero_shot"), b.get("zero_shot"), a.get("zero_shot_se") or 0.0
    if zs_a is not None and zs_b is not None and zs_a == zs_a and zs_b == zs_b and zs_a < zs_b - se:
        return False, f"zero-shot {zs_a:.3f} is more than one SE ({se:.3f}) below {zs_b:.3f}"
    return True, f"perplexity {a['perplexity']:.3f} < {b['perplexity']:.3f}"


def decide_promotion(challenger: dict, uniform: list[dict], holder: dict | None) -> Decision:
    """``challenger`` and each entry of ``uniform``/``holder``: perplexity, zero_shot(_se), total_bytes."""
    reasons: list[str] = []
    figures: dict = {"challenger": challenger}
    larger = sorted((u for u in uniform if u["total_bytes"] >= challenger["total_bytes"]),
                    key=lambda u: u["total_bytes"])
    if not larger:
        return Decision(False, ["no registered uniform variant of equal or larger size to compare with"], figures)
    reference = larger[0]
    figures["uniform"] = reference
    ok, why = _beats(challenger, reference)
    reasons.append(("beats" if ok else "does not beat") + f" uniform {reference.get('name', '')}: {why}")
    if not ok:
        return Decision(False, reasons, figures)
    if holder is not None:
        figures["holder"] = holder
        if challenger["perplexity"] > holder["perplexity"]:
            reasons.append(f"worse than the current holder: perplexity {challenger['perplexity']:.3f} > "
                           f"{holder['perplexity']:.3f}")
            return Decision(False, reasons, figures)
        reasons.append(f"not worse than the current holder ({holder['perplexity']:.3f})")
    return Decision(True, reasons, figures)
