"""Do perplexity and the KL divergence rank two allocations alike, on text no allocator saw?

GAMMA's end-to-end Stage I loss (``stage1.loss: end_to_end``) is the KL divergence of the mixed
model's next-token distribution from the full-precision model's; the goals are in perplexity. Where
GAMMA is behind the proxy in perplexity, this asks whether it is behind in KL too (its learning
fell short) or ahead there (the two objectives disagree on which allocation is better).

The windows are held out from the calibration side of the text (never the evaluation text the
other benchmarks report on): ``--sequences`` windows of ``text.sequence_length`` tokens, each
apart from every calibration sequence Stage I learned on. For one profile and quantizer of
``serving_profiles.py`` (its settings and Stage I recipe, its cached score tables read back), each
method's variant at each budget is made of the problem's candidates; its per-window NLL and KL
from the full-precision model are compared with the first method's window by window (the first
minus this one, as ``paired_comparison.py``).

Writes ``benchmarks/results/objective_agreement.json`` (rows keyed by profile, quantizer, budget,
Stage I recipe, training budgets and method).

    python benchmarks/objective_agreement.py --profile vllm-marlin --quantizer gptq
        [--budgets 4.25,4.5,5,6] [--methods gamma,hawq] [--sequences 32] [--set key=value]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prepared_allocator, write_results
from serving_profiles import PROFILES, WORK, config

from gamma.evaluation.metrics import kl_divergence, paired_windows, perplexity, reference_logprobs
from gamma.model.candidates import apply_candidates
from gamma.model.text import sample_starts, tokenize_file
from gamma.progress import console
from gamma.run.workspace import Workspace

KEY = ("profile", "quantizer", "budget", "stage1_recipe", "training_budgets", "method")


def held_out_windows(ws, n: int) -> torch.Tensor:
    """``n`` windows of the calibration text that share no token with Stage I's calibration sequences."""
    t = ws.cfg.text
    tokens = tokenize_file(ws.text.calibration, ws.tokenizer)
    learned = sample_starts(tokens.numel(), t.calibration_sequences, t.sequence_length, t.seed)
    apart = [s for s in sample_starts(tokens.numel(), 50 * n, t.sequence_length, t.seed + 1)
             if all(abs(s - u) >= t.sequence_length for u in learned)]
    if len(apart) < n:
        raise SystemExit(f"--sequences {n}: the calibration text holds only {len(apart)} windows apart from "
                         f"Stage I's {t.calibration_sequences}")
    return torch.stack([tokens[s : s + t.sequence_length] for s in apart[:n]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), required=True)
    ap.add_argument("--quantizer", choices=["rtn", "gptq"], required=True)
    ap.add_argument("--budgets", default=None, help="comma-separated (default: the profile's)")
    ap.add_argument("--methods", default="gamma,hawq", help="the first is compared with each other one")
    ap.add_argument("--sequences", type=int, default=32, help="held-out windows")
    ap.add_argument("--set", action="append", default=[], help="a config override key=value (repeatable)")
    args = ap.parse_args()
    args.tokens, args.kl_tokens = 4096, 0  # serving_profiles.config's evaluation: unused here
    cfg = config(args.profile, args.quantizer, args)
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else cfg.stage2.budgets
    ws = Workspace(cfg)
    problem = ws.problem()
    windows = held_out_windows(ws, args.sequences)
    # the reference log-probabilities are float16, vocabulary x length per window: gone with the run
    with tempfile.TemporaryDirectory() as scratch:
        compare(args, cfg, ws, problem, windows, reference_logprobs(problem.model, windows, Path(scratch) / "p.npy"),
                budgets)


def compare(args, cfg, ws, problem, windows: torch.Tensor, reference, budgets: list[float]) -> None:
    base = {"profile": args.profile, "quantizer": args.quantizer, "training_budgets": cfg.stage1.training_budgets,
            "stage1_recipe": f"{cfg.stage1.relaxation}, {cfg.stage1.loss}", "sequences": len(windows),
            "tokens": windows.numel()}
    allocators = {name: prepared_allocator(ws, name, problem, WORK / "tables")[0] for name in args.methods.split(",")}
    rows = []
    for budget in budgets:
        first = None
        for name, allocator in allocators.items():
            problem.keep_originals()
            assignment = allocator.allocate(problem, budget).assignment
            apply_candidates(problem.model, problem.candidates, problem.bits, assignment)
            ppl, kl = perplexity(problem.model, windows), kl_divergence(problem.model, windows, reference)
            problem.restore()
            row = {**base, "budget": budget, "method": name, "nll": ppl.nll, "kl": kl.kl, "kl_se": kl.standard_error,
                   "window_nll": list(ppl.window_nll), "window_kl": list(kl.window_kl)}
            first = first or row
            if row is not first:
                d_nll = paired_windows(first["window_nll"], row["window_nll"])
                d_kl = paired_windows(first["window_kl"], row["window_kl"])
                row.update(nll_diff=d_nll.nll, nll_diff_se=d_nll.standard_error, kl_diff=d_kl.nll,
                           kl_diff_se=d_kl.standard_error)
            rows.append(row)
            console.print(f"{args.profile} {args.quantizer} {budget:g} {name}: nll {row['nll']:.5f} kl {row['kl']:.5f}"
                          + (f"; {next(iter(allocators))} - {name}: nll {row['nll_diff']:+.5f} ± "
                             f"{row['nll_diff_se']:.5f}, kl {row['kl_diff']:+.5f} ± {row['kl_diff_se']:.5f}"
                             if row is not first else ""))
            write_results("objective_agreement", {"profile_settings": PROFILES[args.profile], "overrides": args.set,
                                                  "windows": "held out from the calibration text"}, rows, KEY)


if __name__ == "__main__":
    main()
