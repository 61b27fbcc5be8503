"""Every allocator side by side on the embedded model: same quantizer, candidates, text and budgets.

For each quantizer, the candidates are built once (GPTQ with full-precision Hessians) and every
allocator chooses among those very weights, so the comparison isolates the allocation. Per
(allocator, budget): held-out perplexity (evaluation text never used for calibration) with its
standard error across windows, zero-shot average with its standard error, bits (nominal, and
effective with scales, zero-points and block metadata), bytes, and the cost of serving one more
budget: the allocator's per-budget time (GAMMA and the proxies: a solve; search and RL: their
whole run), with the one-off work (Stage I, Fisher, coefficients) reported beside it, and the
time to apply the answer (GPTQ block assignments: one GPTQ pass per mixed module). Writes
benchmarks/results/compare_allocators.json and a Pareto plot per quantizer; rerunning some
``--allocators`` replaces only their rows. GAMMA's score tables (both granularities) are kept
under runs/compare_allocators/ by their Stage I key and reused by a rerun with the same settings.

    python benchmarks/compare_allocators.py [--quantizers rtn,gptq] [--budgets 2.25,2.5,2.75,3,3.5]
        [--allocators gamma,gamma-blocks,uniform,hawq,higgs,scalebits,windquant,evopress] [--tokens 8192] [--items 20]
        [--set stage1.extra_budgets=[2.5] --suffix +band]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LEARNED, RESULTS, commit, prepared_allocator, previous_rows, quantizer_arguments, write_results

from gamma.allocators import BlockAssignment
from gamma.allocators.column_blocks import block_account
from gamma.config import load_config, parse_overrides
from gamma.model.assignment import account
from gamma.progress import console
from gamma.run.plots import plot_pareto
from gamma.run.variant import evaluate_model
from gamma.run.workspace import Workspace

TABLES = Path(__file__).resolve().parents[1] / "runs" / "compare_allocators"


KEY = ("quantizer", "method", "budget")
ALL = "gamma,gamma-blocks,uniform,hawq,higgs,scalebits,windquant,evopress"


def compare(qname: str, budgets: list[float], names: list[str], args, overrides: dict) -> tuple[list[dict], dict]:
    cfg = load_config("params.yaml", {"evaluation.max_tokens": args.tokens, "evaluation.zero_shot_items": args.items,
                                      "quantizer.method": qname,
                                      "stage1.extra_budgets": [], **overrides})  # one table unless --set
    ws = Workspace(cfg)
    problem = ws.problem()
    tok = ws.tokenizer
    rows: list[dict] = []
    for name in names:
        allocator, cached = prepared_allocator(ws, name, problem, TABLES)
        for budget in budgets:
            try:
                result = allocator.allocate(problem, budget)
            except ValueError as err:
                console.print(f"{qname}: {name} at {budget:g}: {err}")
                rows.append({"quantizer": qname, "method": name + args.suffix, "budget": budget, "error": str(err)})
                continue
            if isinstance(result.assignment, BlockAssignment):
                acct = block_account(problem, result.assignment)
                size = {"effective_bits": acct["effective_bits"], "quantized_bytes": acct["quantized_bytes"],
                        "metadata_bits_per_weight": acct["metadata_bits_per_weight"]}
            else:
                a = account(problem.model, result.assignment, problem.group_size, problem.symmetric)
                size = {"effective_bits": a.effective_bits, "quantized_bytes": a.quantized_bytes,
                        "metadata_bits_per_weight": 0.0}
            try:
                t0 = time.perf_counter()
                allocator.apply(problem, result.assignment)  # GPTQ block assignments: one GPTQ pass per module
                apply_seconds = time.perf_counter() - t0
                figures = evaluate_model(ws, problem.model, tok)
            finally:
                problem.restore()
            notes = {k: v for k, v in result.notes.items() if isinstance(v, (int, float, str))}
            row = {"quantizer": qname, "method": name + args.suffix, "granularity": allocator.granularity,
                   "budget": budget, "avg_bits": result.avg_bits, **size, "one_more_budget_seconds": result.seconds,
                   "apply_seconds": apply_seconds,
                   "prepare_seconds": result.prepare_seconds, **notes, **figures}
            if name in LEARNED:  # Stage I's own wall time, also when its tables came from the cache
                row.update(stage1_seconds=sum(t.wall_seconds for t in allocator.tables), stage1_cached=bool(cached))
            rows.append(row)
            console.print(f"{qname}: {name:9s} B={budget:<5g} bits={result.avg_bits:.3f} "
                          f"eff={size['effective_bits']:.3f} "
                          f"ppl={row['perplexity']:.2f}±{row['perplexity_se']:.2f} zs={row['zero_shot']:.3f} "
                          f"budget {result.seconds:.1f}s (+{result.prepare_seconds:.0f}s once)")
        write_partial(qname, rows)
    settings = {"candidates": cfg.candidates, "quantizer": ws.quantizer_record(), "stage1": cfg.stage1.model_dump(),
                "allocation": cfg.allocation.model_dump(), "calibration_sequences": cfg.text.calibration_sequences,
                "eval_tokens": args.tokens, "zero_shot_items": args.items, "budgets": budgets, "overrides": overrides}
    return rows, settings


def write_partial(qname: str, rows: list[dict]) -> None:
    """Rows so far, so that a long run cut short still leaves its measurements."""
    (RESULTS / f"compare_allocators_{qname}.partial.json").write_text(json.dumps(rows, indent=1, default=str))


def main() -> None:
    ap = quantizer_arguments(__doc__)
    ap.add_argument("--allocators", default=ALL)
    ap.add_argument("--suffix", default="", help="appended to the allocators' names in the rows, so that a run "
                    "with other settings (--set) keeps its own rows beside the defaults', e.g. '+band'")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    overrides = parse_overrides(args.set)
    rows, per_quantizer = previous_rows("compare_allocators")
    for qname in args.quantizers.split(","):
        names = args.allocators.split(",")
        qrows, settings = compare(qname, budgets, names, args, overrides)
        # a rerun replaces the rows of the allocators it ran; the others' rows stay
        kept = [r for r in rows if r["quantizer"] == qname and r["method"] not in [n + args.suffix for n in names]]
        rows = [r for r in rows if r["quantizer"] != qname] + kept + qrows
        # every run's allocators and overrides are kept: a rerun with other settings loses no record
        runs = per_quantizer.get(qname, {}).get("runs", [])
        runs.append({"allocators": [n + args.suffix for n in names], "overrides": overrides, "commit": commit()})
        per_quantizer[qname] = {**settings, "allocators": sorted({r["method"] for r in kept + qrows}), "runs": runs}
        plot_pareto([r for r in rows if r["quantizer"] == qname and "error" not in r],
                    RESULTS / f"compare_allocators_{qname}.png")
        console.print(f"wrote {write_results('compare_allocators', {'per_quantizer': per_quantizer}, rows, KEY)}")
        (RESULTS / f"compare_allocators_{qname}.partial.json").unlink(missing_ok=True)
    for qname in args.quantizers.split(","):
        console.print(f"\n{qname}: perplexity (SE) by budget")
        for budget in budgets:
            by = {r["method"]: r for r in rows
                  if r["quantizer"] == qname and r["budget"] == budget and "error" not in r}
            console.print(f"  B={budget:<5g} " + "  ".join(f"{m} {r['perplexity']:.1f}({r['perplexity_se']:.1f})"
                                                          for m, r in by.items()))


if __name__ == "__main__":
    main()
