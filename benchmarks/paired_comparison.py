"""Is one variant really worse than another? Allocators compared window by window on many tokens.

``serving_profiles.py`` evaluates each variant on 4,096 held-out tokens: 8 windows of 512, so a
perplexity's standard error is a few percent and two allocations a percent or two apart cannot be
told apart there. The windows differ far more among themselves than two variants differ on one
window; the mean of the per-window NLL differences and its standard error
(``gamma.evaluation.metrics.paired_difference``) cancel the windows' own difficulty and separate
the variants on the same text.

For one profile, quantizer and budget of ``serving_profiles.py`` (its settings and Stage I recipe;
its saved score tables are read, not learned again, when they exist), each method's variant is
made of the problem's candidates, evaluated on ``--tokens`` held-out tokens (and the KL divergence
on the first ``--kl-tokens``), and compared with the first method: ``nll_diff`` is the first
method's mean NLL minus this one's (positive: the first is worse), ``ratio`` its perplexity over
this one's.

Writes ``benchmarks/results/paired_comparison.json`` (rows keyed by profile, quantizer, budget,
method, tokens, and the Stage I recipe and training budgets of the GAMMA its rows are compared with).

    python benchmarks/paired_comparison.py --profile vllm-humming --quantizer rtn --budget 3.0
        [--methods gamma,uniform,hawq] [--tokens 32768] [--kl-tokens 4096] [--set key=value]
    python benchmarks/paired_comparison.py --table     # the results file as docs/serving_profiles.md shows it
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, prepared_allocator, write_results
from serving_profiles import METHODS, PROFILES, WORK, config

from gamma.evaluation.metrics import paired_difference, perplexity_from_nll
from gamma.progress import console
from gamma.run.variant import quantize_and_evaluate
from gamma.run.workspace import Workspace

KEY = ("profile", "quantizer", "budget", "method", "eval_tokens", "training_budgets", "stage1_recipe")


def table(rows: list[dict]) -> str:
    """docs/serving_profiles.md's table: each comparison's variants, and each against the first."""
    lines = ["| profile | quantizer | bits | method | tokens | perplexity ± SE (KL) | the first minus this one "
             "(nats per token) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        against = f"{r['nll_diff']:+.4f} ± {r['nll_diff_se']:.4f}" if "nll_diff" in r else "(the first)"
        method = METHODS.get(r["method"], r["method"])
        if r["method"] == "gamma":
            method += f" ({r['stage1_recipe']}; tables at " + ", ".join(f"{b:g}" for b in r["training_budgets"]) + ")"
        lines.append(f"| {r['profile']} | {r['quantizer'].upper()} | {r['budget']:g} | {method} "
                     f"| {r['eval_tokens']:,} | {r['perplexity']:.2f} ± {r['perplexity_se']:.2f} "
                     f"({r['kl_divergence']:.3f}) | {against} |")
    return "\n".join(lines)


def recipe(cfg, args) -> str:
    """GAMMA's Stage I recipe as the rows name it; more calibration text or steps than the
    benchmarks' own (params.yaml's) is a different comparison, and says so."""
    name = f"{cfg.stage1.relaxation}, {cfg.stage1.loss}"
    own = config(args.profile, args.quantizer, argparse.Namespace(**{**vars(args), "set": []}))
    if (cfg.text.calibration_sequences, cfg.stage1.steps) != (own.text.calibration_sequences, own.stage1.steps):
        name += f", {cfg.text.calibration_sequences} sequences, {cfg.stage1.steps} steps"
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="print the results file's table and stop")
    ap.add_argument("--profile", choices=list(PROFILES))
    ap.add_argument("--quantizer", choices=["rtn", "gptq"])
    ap.add_argument("--budget", type=float)
    ap.add_argument("--methods", default="gamma,uniform,hawq", help="the first is compared with each other one")
    ap.add_argument("--tokens", type=int, default=32768, help="held-out evaluation tokens")
    ap.add_argument("--kl-tokens", type=int, default=4096, help="tokens of the KL divergence")
    ap.add_argument("--set", action="append", default=[], help="a config override key=value (repeatable)")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads((RESULTS / "paired_comparison.json").read_text())["rows"]))
        return
    if None in (args.profile, args.quantizer, args.budget):
        ap.error("--profile, --quantizer and --budget name the comparison")
    methods = args.methods.split(",")
    if len(methods) < 2:
        ap.error(f"--methods {args.methods!r}: name at least two methods to compare")
    cfg = config(args.profile, args.quantizer, args)
    ws = Workspace(cfg)
    problem = ws.problem()
    # GAMMA's Stage I recipe and training budgets name the comparison: its rows are compared with that GAMMA's
    base = {"profile": args.profile, "quantizer": args.quantizer, "budget": args.budget,
            "training_budgets": cfg.stage1.training_budgets, "stage1_recipe": recipe(cfg, args),
            "overrides": args.set}  # the file's settings hold only the last run's
    rows, first = [], None
    for name in methods:
        allocator, cached = prepared_allocator(ws, name, problem, WORK / "tables")
        t0 = time.perf_counter()
        result = allocator.allocate(problem, args.budget)
        row = quantize_and_evaluate(ws, result.assignment, problem=problem)
        keep = ("avg_bits", "effective_bits", "total_bytes", "perplexity", "perplexity_se", "kl_divergence",
                "kl_divergence_se", "kl_tokens", "eval_tokens", "context_length", "window_nll")
        row = {**base, "method": name, "tables_read_back": cached, "seconds": time.perf_counter() - t0,
               **{k: row[k] for k in keep}}
        ppl = perplexity_from_nll(torch.tensor(row["window_nll"]), row["context_length"])
        first = first or ppl
        if ppl is not first:
            d = paired_difference(first, ppl)
            row.update(nll_diff=d.nll, nll_diff_se=d.standard_error, ratio=d.ratio, windows=d.windows)
        rows.append(row)
        console.print(f"{args.profile} {args.quantizer} {name} {args.budget:g}: ppl {row['perplexity']:.2f} "
                      f"± {row['perplexity_se']:.2f} on {row['eval_tokens']} tokens, kl {row['kl_divergence']:.4f}"
                      + (f"; {methods[0]} - {name}: {d.nll:+.4f} ± {d.standard_error:.4f} nats/token "
                         f"(perplexity ratio {d.ratio:.4f})" if ppl is not first else ""))
        write_results("paired_comparison", {"tokens": args.tokens, "kl_tokens": args.kl_tokens,
                                            "profile_settings": PROFILES[args.profile], "overrides": args.set},
                      rows, KEY)


if __name__ == "__main__":
    main()
