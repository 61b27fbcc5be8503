"""What a variant quantizes and what it keeps at 16 bits, and why: every parameter of the model is
accounted for, so that no weight is silently skipped and none is silently quantized.

Quantized: the weight of every ``nn.Linear`` projection inside the decoder blocks
(``quantizable_modules``). Kept at 16 bits, each for its reason: embeddings and the head (outside
the blocks), norms and biases (vectors), routers and scalar gates of mixture-of-experts blocks (by
rule: a few thousand weights that decide where every token goes), and any parameter of a kind
gamma does not quantize (experts stored as 3-D tensors, other non-Linear weights), listed by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from gamma.model.loading import is_router, quantizable_modules

REASONS = {
    "embeddings": "embeddings (outside the blocks)",
    "head": "language-model head (outside the blocks)",
    "norms": "norms (vectors)",
    "biases": "biases (vectors)",
    "routers": "routers and gates (16 bits by rule)",
    "unassigned": "projections the assignment leaves at 16 bits",
    "unknown": "parameters of a kind gamma does not quantize",
}


@dataclass
class Coverage:
    quantized: int  # weights in the quantized projections
    block_weights: int  # every parameter inside the decoder blocks
    total: int  # every parameter of the model, tied ones once
    kept: dict[str, int] = field(default_factory=dict)  # reason -> weights kept at 16 bits
    unknown: list[str] = field(default_factory=list)  # names of the parameters of a kind gamma does not quantize

    @property
    def block_fraction(self) -> float:
        return self.quantized / self.block_weights

    def line(self) -> str:
        kept = ", ".join(f"{REASONS[r]} {_count(n)}" for r, n in self.kept.items() if n)
        out = (f"coverage: quantized {self.block_fraction:.1%} of the block weights ({_count(self.quantized)} of "
               f"{_count(self.block_weights)}), {self.quantized / self.total:.1%} of all; kept at 16 bits: {kept}")
        if self.unknown:
            out += f"; NOT quantized, of a kind gamma does not quantize: {', '.join(self.unknown[:6])}" + (
                f" and {len(self.unknown) - 6} more" if len(self.unknown) > 6 else "")
        return out

    def as_dict(self) -> dict:
        return {"quantized_weights": self.quantized, "block_weights": self.block_weights, "all_weights": self.total,
                "quantized_fraction_of_blocks": round(self.block_fraction, 6),
                "kept_at_16_bits": {REASONS[r]: n for r, n in self.kept.items() if n}, "not_quantizable": self.unknown}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _reason(name: str, param: nn.Parameter, module: nn.Module, in_blocks: bool) -> str:
    if not in_blocks:
        if "embed" in name:
            return "embeddings"
        return "norms" if param.dim() == 1 else "head"
    if is_router(name.rsplit(".", 1)[0], module):
        return "routers"
    if name.endswith(".bias"):
        return "biases"
    if param.dim() == 1:
        return "norms"
    return "unknown"


def coverage(model: nn.Module, quantized: set[str] | None = None) -> Coverage:
    """The account of ``model``'s parameters; ``quantized``: the modules a variant quantizes (all
    quantizable ones by default)."""
    modules = quantizable_modules(model)
    names = set(modules) if quantized is None else set(quantized)
    done = {id(modules[n].weight) for n in names}
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    seen: set[int] = set()
    cov = Coverage(0, 0, 0, dict.fromkeys(REASONS, 0))
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue  # a tied weight counts once
        seen.add(id(p))
        n, in_blocks = p.numel(), ".layers." in f".{name}"
        cov.total += n
        cov.block_weights += n if in_blocks else 0
        if id(p) in done:
            cov.quantized += n
            continue
        module = name.removesuffix(".weight")
        reason = "unassigned" if module in modules else _reason(name, p, owner[id(p)], in_blocks)
        cov.kept[reason] += n
        if reason == "unknown":
            cov.unknown.append(name)
    return cov
