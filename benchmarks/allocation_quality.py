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

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, previous_rows, quantizer_arguments, write_results

from gamma.allocators.uniform import SPLIT_ORDERS, two_level_split
from gamma.config import load_config, parse_overrides
from gamma.evaluation.metrics import perplexity
from gamma.model.assignment import account
from gamma.model.candidates import apply_candidates
from gamma.progress import console
from gamma.run.plots import plot_pareto
from gamma.run.tables import project_budget
from gamma.run.variant import evaluate_model
from gamma.run.workspace import Workspace
from gamma.stage1.learn import learn_score_table
from gamma.stage1.proxy import relative_error_costs
from gamma.stage2.projection import project
from gamma.stage2.scores import Scores

KEY = ("quantizer", "method", "budget")


def compare(qname: str, budgets: list[float], args, overrides: dict) -> tuple[list[dict], dict]:
    """Every method at every budget for one quantizer; returns the rows and the settings used."""
    cfg = load_config("params.yaml", {"evaluation.max_tokens": args.tokens, "evaluation.zero_shot_items": args.items,
                                      "quantizer.method": qname,
                                      "stage1.extra_budgets": [], **overrides})  # one table unless --set
    ws = Workspace(cfg)
    q = cfg.quantizer
    problem = ws.problem()
    model, tok, candidates, bits = problem.model, ws.tokenizer, problem.candidates, problem.bits
    modules, sizes = problem.modules, problem.sizes
    proxy_scores = -relative_error_costs(model, candidates)
    torch.manual_seed(cfg.stage1.seed)
    table = learn_score_table(problem, cfg.stage1)
    console.print(f"{qname}: Stage I: {table.wall_seconds:.0f}s, peak {table.peak_memory_mb:.0f} MB, "
                  f"E - B = {table.violation:+.4f}")
    gamma_allocs = {}
    for b in budgets:
        try:
            gamma_allocs[b] = project_budget([table], b, cfg)
        except ValueError as err:
            gamma_allocs[b] = err
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
        proxy = project(Scores(modules, sizes, bits, proxy_scores), budget, cfg.stage2, group_size=q.group_size,
                        symmetric=q.symmetric)
        run("proxy", budget, proxy.assignment)
        best = None
        for name, order in SPLIT_ORDERS.items():
            if budget < min(bits):
                continue
            split = two_level_split(modules, [r * c for r, c in sizes], bits, budget, order)
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
    args = quantizer_arguments(__doc__).parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    overrides = parse_overrides(args.set)
    _, per_quantizer = previous_rows("allocation_quality")
    rows = []
    for qname in args.quantizers.split(","):
        qrows, per_quantizer[qname] = compare(qname, budgets, args, overrides)
        rows += qrows
        per_quantizer[qname].update({"eval_tokens": qrows[0]["eval_tokens"], "zero_shot_items": args.items,
                                     "overrides": overrides, "budgets": budgets})
        path = write_results("allocation_quality", {"per_quantizer": per_quantizer}, rows, KEY)
        console.print(f"wrote {path}")
    for qname in args.quantizers.split(","):
        console.print(f"\n{qname}: perplexity by budget (gamma / proxy / split)")
        for budget in budgets:
            by = {r["method"]: r for r in rows if r["quantizer"] == qname and r["budget"] == budget}
            console.print(f"  B={budget:<5} " + "  ".join(
                f"{m} {by[m]['perplexity']:.2f}" for m in ("gamma", "proxy", "split") if m in by))


if __name__ == "__main__":
    main()
