"""Allocation quality on the embedded model: GAMMA against uniform, two-level split and proxy.

For each quantizer (RTN, GPTQ) one score table is learned (Stage I, at the configured training
budget) and projected to every budget; the competitors are
- uniform 2/3/4 bits,
- the best two-level split at the same budget: the lower and upper candidate around B, the
  upper width given to modules in one of four orders (deepest first, shallowest first, MLP first,
  attention first) until the budget is spent; the order is chosen on *calibration* perplexity,
- the proxy: per-module relative quantization error weighted by size, the same exact knapsack.
Every method applies the same precomputed candidate weights (GPTQ with full-precision Hessians,
as Stage I sees them), so the comparison isolates the allocation. Perplexity is measured on
evaluation text never used for calibration. Writes benchmarks/results/allocation_quality.json and
a Pareto plot per quantizer.

    python benchmarks/allocation_quality.py [--quantizers rtn,gptq] [--budgets 2.25,2.5,2.75,3,3.5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from gamma.assignment import account  # noqa: E402
from gamma.candidates import apply_candidates, build_candidates  # noqa: E402
from gamma.config import load_config  # noqa: E402
from gamma.evaluate import perplexity  # noqa: E402
from gamma.model import block_index  # noqa: E402
from gamma.plots import plot_pareto  # noqa: E402
from gamma.progress import console  # noqa: E402
from gamma.projection import allocate_bits  # noqa: E402
from gamma.proxy import relative_error_costs  # noqa: E402
from gamma.steps import allocate, evaluate_model, hessians_for, learn_score_table  # noqa: E402
from gamma.workspace import Workspace  # noqa: E402

SPLIT_ORDERS = {
    "deepest first": lambda n: -block_index(n),
    "shallowest first": lambda n: block_index(n),
    "mlp first": lambda n: (0 if ".mlp." in n else 1, block_index(n)),
    "attention first": lambda n: (0 if ".self_attn." in n else 1, block_index(n)),
}


def two_level_split(modules, sizes, bits, budget, order) -> dict[str, int] | None:
    """Lower candidate everywhere, then the upper one module by module in ``order`` while it fits."""
    lower = max((b for b in bits if b <= budget), default=None)
    upper = min((b for b in bits if b > budget), default=None)
    if lower is None:
        return None
    n = {m: r * c for m, (r, c) in zip(modules, sizes)}
    room = budget * sum(n.values()) - lower * sum(n.values())
    assignment = dict.fromkeys(modules, lower)
    if upper is None:
        return assignment
    for m in sorted(modules, key=order):
        extra = n[m] * (upper - lower)
        if extra <= room + 1e-6:
            assignment[m], room = upper, room - extra
    return assignment


def compare(qname: str, budgets: list[float], args, overrides: dict) -> tuple[list[dict], dict]:
    """Every method at every budget for one quantizer; returns the rows and the settings used."""
    cfg = load_config("params.yaml", {"evaluation.max_tokens": args.tokens, "evaluation.zero_shot_items": args.items,
                                      "quantizer.method": qname, **overrides})
    ws = Workspace(cfg)
    q = cfg.quantizer
    model, tok = ws.load()
    modules, sizes = ws.module_sizes(model)
    bits = cfg.candidates
    candidates = build_candidates(model, ws.quantizer(), bits, q.group_size, q.symmetric, hessians_for(ws, model))
    proxy_scores = -relative_error_costs(model, candidates)
    torch.manual_seed(cfg.stage1.seed)
    table = learn_score_table(ws, candidates=candidates)
    console.print(f"{qname}: Stage I: {table.wall_seconds:.0f}s, peak {table.peak_memory_mb:.0f} MB, "
                  f"E - B = {table.violation:+.4f}")
    gamma_allocs = allocate(table, budgets, cfg)
    calib = ws.calibration[: min(8, len(ws.calibration))]
    rows: list[dict] = []

    def run(method: str, budget: float, assignment: dict[str, int], extra: dict | None = None) -> None:
        apply_candidates(model, candidates, bits, assignment)
        acct = account(model, assignment, q.group_size, q.symmetric)
        row = {"quantizer": qname, "method": method, "budget": budget, "avg_bits": acct.nominal_bits,
               "effective_bits": acct.effective_bits, "total_bytes": acct.total_bytes, **(extra or {})}
        row.update(evaluate_model(ws, model, tok))
        rows.append(row)
        console.print(f"{qname}: {method:10s} B={budget:<5} bits={acct.nominal_bits:.3f} "
                      f"ppl={row['perplexity']:.2f}±{row['perplexity_se']:.2f} zs={row['zero_shot']:.3f}")

    for b in bits:
        run("uniform", float(b), dict.fromkeys(modules, b))
    for budget in budgets:
        alloc = gamma_allocs[budget]
        if isinstance(alloc, Exception):
            console.print(f"{qname}: GAMMA B={budget}: {alloc}")
        else:
            run("gamma", budget, alloc.assignment, {"solve_seconds": alloc.solve_seconds,
                                                    "stage1_seconds": table.wall_seconds,
                                                    "stage1_peak_mb": table.peak_memory_mb})
        proxy = allocate_bits(modules, sizes, proxy_scores, bits, budget, window=cfg.stage2.window,
                              group_size=q.group_size, symmetric=q.symmetric)
        run("proxy", budget, proxy.assignment)
        best = None
        for name, order in SPLIT_ORDERS.items():
            split = two_level_split(modules, sizes, bits, budget, order)
            if split is None:
                continue
            apply_candidates(model, candidates, bits, split)
            calib_ppl = perplexity(model, calib).perplexity
            if best is None or calib_ppl < best[0]:
                best = (calib_ppl, name, split)
        if best:
            run("split", budget, best[2], {"split_order": best[1], "calibration_perplexity": best[0]})
    plot_pareto(rows, RESULTS / f"allocation_quality_{qname}.png")
    settings = {"stage1_budget": cfg.stage1.budget, "candidates": bits, "stage1": cfg.stage1.model_dump(),
                "calibration_sequences": cfg.text.calibration_sequences, "quantizer": ws.quantizer_record(),
                "stage1_seconds": table.wall_seconds, "stage1_peak_mb": table.peak_memory_mb}
    return rows, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--budgets", default="2.25,2.5,2.75,3,3.5")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], help="extra config override key=value (repeatable)")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    # Each quantizer's rows replace that quantizer's rows of an earlier run, so RTN and GPTQ can
    # be measured in separate sittings and land in one table.
    previous = RESULTS / "allocation_quality.json"
    old = json.loads(previous.read_text()) if previous.exists() else {"settings": {}, "rows": []}
    rows = old["rows"]
    per_quantizer = old["settings"].get("per_quantizer", {})
    for qname in args.quantizers.split(","):
        qrows, per_quantizer[qname] = compare(qname, budgets, args, overrides)
        rows = [r for r in rows if r["quantizer"] != qname] + qrows
        per_quantizer[qname].update({"eval_tokens": qrows[0]["eval_tokens"], "zero_shot_items": args.items,
                                     "overrides": overrides, "budgets": budgets})
        path = write_results("allocation_quality", {"per_quantizer": per_quantizer}, rows)
        console.print(f"wrote {path}")
    for qname in args.quantizers.split(","):
        console.print(f"\n{qname}: perplexity by budget (gamma / proxy / split)")
        for budget in budgets:
            by = {r["method"]: r for r in rows if r["quantizer"] == qname and r["budget"] == budget}
            console.print(f"  B={budget:<5} " + "  ".join(
                f"{m} {by[m]['perplexity']:.2f}" for m in ("gamma", "proxy", "split") if m in by))


if __name__ == "__main__":
    main()
