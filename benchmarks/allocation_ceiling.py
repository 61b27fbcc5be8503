"""The ceiling of module allocation: what an allocation could reach if it saw the evaluation text.

Each allocation unit (under the profile's tie groups) is moved alone from ``--base`` to
``--upgrade`` bits on the uniform ``--base`` model, and the drop in held-out NLL this buys is
measured on the evaluation windows themselves. The exact knapsack then picks, within each budget,
the units whose summed drops are largest (a unit at 16 bits is scored as at ``--upgrade``: it
costs more for at most what 8 bits leave, which is not measured), and that assignment is evaluated on the same
windows, the way ``serving_profiles.py`` evaluates its variants. It is not a method: the drops are
measured on the test text and assumed additive, so it is an optimistic reference that says how
much of a goal any module-level allocation can reach on this model, not one an allocator learning
from calibration text is expected to reach.

Writes ``benchmarks/results/allocation_ceiling.json`` (rows keyed by profile, quantizer, method and
budget; the per-unit drops in the ``unit_gains`` row).

    python benchmarks/allocation_ceiling.py [--profile vllm-marlin] [--quantizer gptq] [--base 4]
        [--upgrade 8] [--tokens 4096] [--set key=value]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results
from serving_profiles import PROFILES, config

from gamma.evaluation.metrics import perplexity
from gamma.model.assignment import apply_assignment, uniform_assignment
from gamma.model.export import round_to_storage
from gamma.model.loading import quantizable_modules
from gamma.progress import console, track
from gamma.run.variant import quantize_and_evaluate
from gamma.run.workspace import Workspace
from gamma.stage2.projection import project
from gamma.stage2.scores import Scores

KEY = ("profile", "quantizer", "method", "budget")


def units_of(problem) -> list[list[int]]:
    """The problem's allocation units (module indices), each module its own when nothing is tied."""
    return problem.units or [[i] for i in range(len(problem.modules))]


def unit_gains(ws: Workspace, problem, base: int, upgrade: int) -> tuple[np.ndarray, float]:
    """Each unit's drop in mean NLL on the evaluation windows when it alone moves from ``base`` to
    ``upgrade`` bits on the uniform ``base`` model, and that model's NLL."""
    model, _ = ws.load()
    q = ws.cfg.quantizer
    records, _ = apply_assignment(model, uniform_assignment(model, base), ws.quantizer(), q.group_size, q.symmetric,
                                  zero_points=ws.cfg.serving.zero_points, held=problem.candidate)
    round_to_storage(model, set(records))
    batch = max(1, ws.cfg.evaluation.batch_size // 2)
    start = perplexity(model, ws.evaluation, batch, str(ws.device)).nll
    layers = quantizable_modules(model)
    units = units_of(problem)
    gains = np.zeros(len(units))
    for u, members in track(list(enumerate(units)), f"units moved to {upgrade} bits", total=len(units)):
        names = [problem.modules[i] for i in members]
        kept = {n: layers[n].weight.detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                layers[n].weight.copy_(problem.candidate(n, upgrade).dequantize().to(layers[n].weight.dtype))
            gains[u] = start - perplexity(model, ws.evaluation, batch, str(ws.device)).nll
            for n in names:
                layers[n].weight.copy_(kept[n])
    return gains, start


def ceiling_scores(problem, gains: np.ndarray, base: int, upgrade: int) -> Scores:
    """Rows for the knapsack: a unit's drop on its first member at ``upgrade`` (and 16), nothing at
    ``base``, and far below any drop at every other width (never chosen)."""
    bits = problem.bits
    scores = np.full((len(problem.modules), len(bits)), -1e3)
    for members, gain in zip(units_of(problem), gains):
        scores[members, bits.index(base)] = 0.0
        for b in (upgrade, 16):
            if b in bits:
                scores[members, bits.index(b)] = 0.0
                scores[members[0], bits.index(b)] = gain
    return Scores(problem.modules, problem.sizes, bits, scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default="vllm-marlin")
    ap.add_argument("--quantizer", choices=["rtn", "gptq"], default="gptq")
    ap.add_argument("--base", type=int, default=4)
    ap.add_argument("--upgrade", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="held-out evaluation tokens (serving_profiles' own)")
    ap.add_argument("--kl-tokens", type=int, default=4096)
    ap.add_argument("--set", action="append", default=[], help="a config override key=value (repeatable)")
    args = ap.parse_args()
    cfg = config(args.profile, args.quantizer, args)
    for b in (args.base, args.upgrade):
        if b not in cfg.candidates:
            ap.error(f"--base/--upgrade {b}: not among the profile's candidates {cfg.candidates}")
    ws = Workspace(cfg)
    problem = ws.problem()
    t0 = time.perf_counter()
    gains, start = unit_gains(ws, problem, args.base, args.upgrade)
    base = {"profile": args.profile, "quantizer": args.quantizer}
    names = ["+".join(problem.modules[i] for i in u) for u in units_of(problem)]
    named = sorted(zip(gains.tolist(), names), reverse=True)
    rows = [{**base, "method": "unit_gains", "budget": float(args.base), "base_nll": start,
             "seconds": time.perf_counter() - t0, "gains": [{"unit": n, "nll_drop": g} for g, n in named]}]
    console.print("largest drops: " + ", ".join(f"{n} {g:.4f}" for g, n in named[:8]))
    scores = ceiling_scores(problem, gains, args.base, args.upgrade)
    settings = {"base": args.base, "upgrade": args.upgrade, "eval_tokens": args.tokens,
                "profile_settings": PROFILES[args.profile], "overrides": args.set}
    for budget in cfg.stage2.budgets:
        chosen = project(scores, budget, problem.stage2, group_size=problem.group_size, symmetric=problem.symmetric,
                         units=problem.units, fixed_bytes=problem.fixed_bytes, zero_points=problem.zero_points)
        row = quantize_and_evaluate(ws, chosen.assignment, problem=problem)
        rows.append({**base, "method": "ceiling", "budget": budget, "predicted_nll": start - chosen.objective,
                     **{k: row[k] for k in ("avg_bits", "total_bytes", "perplexity", "perplexity_se", "kl_divergence",
                                            "eval_tokens")}})
        console.print(f"ceiling {budget:g}: ppl {row['perplexity']:.2f} ± {row['perplexity_se']:.2f} "
                      f"(additive prediction {np.exp(start - chosen.objective):.2f}), kl {row['kl_divergence']:.4f}")
        write_results("allocation_ceiling", settings, rows, KEY)


if __name__ == "__main__":
    main()
