"""Stage I ablation and score reuse on the embedded model.

One row per Stage I configuration, one column per budget: perplexity on held-out text (with its
standard error across windows), zero-shot average, bits used, Stage I wall time and peak memory.
Rows: the Fisher proxy (the same exact knapsack over its costs), the untrained proxy-initialised
table, and every named configuration of ``CONFIGS`` asked for (``--rows``). Each trained row is a
real ``gamma learn`` in its own process (so wall time and peak memory are that run's own), with
the row's overrides on top of ``params.yaml``; tables are kept under ``--cache`` and reused when
the same row is asked for again. Every method applies the same precomputed candidate weights, so
the table isolates the allocation.

Score reuse (``--reuse-from 3.0,3.5``): the default configuration is learned at each of those
budgets and at every budget of the grid; each table is projected to every budget and compared
with the table learned at that budget.

Writes benchmarks/results/stage1_ablation.json (method.md's format) and
stage1_ablation_<quantizer>.png (perplexity against budget, one line per row).

    python benchmarks/stage1_ablation.py [--quantizers rtn] [--rows soft-fisher,hard-fisher]
        [--budgets 2.75,3,3.25,3.5,3.75,4] [--candidates 2,3,4,8] [--tokens 32768] [--items 20]
        [--reuse-from 3.0,3.5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results

from gamma.config import command_line, load_config, parse_overrides
from gamma.model.assignment import account
from gamma.model.candidates import apply_candidates, build_candidates
from gamma.progress import console
from gamma.run.tables import SCORES_FILE, run_key
from gamma.run.variant import evaluate_model
from gamma.run.workspace import Workspace
from gamma.stage1.proxy import FisherCosts, costs_to_logits
from gamma.stage1.teacher import capture_teacher
from gamma.stage2.projection import project
from gamma.stage2.scores import Scores, ScoreTable

ROOT = Path(__file__).resolve().parents[1]

# name -> Stage I overrides on top of params.yaml (a key without the "stage1." prefix is a stage1 field)
CONFIGS: dict[str, dict] = {
    "soft-fisher": {"relaxation": "soft", "loss": "fisher", "init": "proxy"},
    "soft-fisher-zero-init": {"relaxation": "soft", "loss": "fisher", "init": "uniform"},
    "soft-update": {"relaxation": "soft", "loss": "update", "init": "proxy"},
    "soft-update-zero-init": {"relaxation": "soft", "loss": "update", "init": "uniform"},
    "hard-fisher": {"relaxation": "hard", "loss": "fisher", "init": "proxy"},
    "hard-fisher-zero-init": {"relaxation": "hard", "loss": "fisher", "init": "uniform"},
    "hard-update": {"relaxation": "hard", "loss": "update", "init": "proxy"},
    "hard-update-zero-init": {"relaxation": "hard", "loss": "update", "init": "uniform"},
    # levers, each on top of soft-fisher (or hard-fisher where it concerns sampling)
    "soft-fisher-steps25": {"steps": 25},
    "soft-fisher-steps50": {"steps": 50},
    "soft-fisher-steps200": {"steps": 200},
    "soft-fisher-4seq": {"sequences_per_step": 4},
    "soft-fisher-full-length": {"tokens_per_sequence": 512},
    "soft-fisher-anneal": {"temperature": 2.0, "temperature_end": 0.5},
    "soft-fisher-multiplier-zero": {"multiplier_init": "zero"},
    "soft-fisher-channel-fisher": {"fisher_weight": "channel"},
    "hard-fisher-4samples": {"relaxation": "hard", "samples": 4},
    "hard-fisher-4antithetic": {"relaxation": "hard", "samples": 4, "antithetic": True},
    "soft-fisher-clip8": {"proxy_clip": 8.0},
}
UNTRAINED_CLIPS = {"untrained proxy init": 0.0, "untrained proxy init clip8": 8.0}


# a row is one (quantizer, kind, configuration, budget, training budget, evaluation length)
# zero_shot_items: a rerun without zero-shot (items 0) keeps the rows that have it
KEY = ("quantizer", "kind", "row", "budget", "training_budget", "max_tokens", "zero_shot_items")
EXTRA: dict = {}  # --set overrides, applied to every configuration


def row_overrides(name: str, budget: float, quantizer: str, candidates: list[int]) -> dict:
    # one table per row: params.yaml's score band (stage1.extra_budgets) would learn its other tables too
    base = {"stage1.budget": budget, "stage1.extra_budgets": [], "quantizer.method": quantizer,
            "candidates": candidates, **EXTRA}
    return {**base, **{(k if "." in k else f"stage1.{k}"): v for k, v in CONFIGS[name].items()}}


def learned_table(name: str, budget: float, quantizer: str, candidates: list[int], cache: Path) -> ScoreTable:
    """The score table of one configuration, from the cache or from a fresh ``gamma learn`` process."""
    overrides = row_overrides(name, budget, quantizer, candidates)
    cfg = load_config(ROOT / "params.yaml", overrides)
    key = run_key(Workspace(cfg))
    out = cache / key[:16]
    path = out / SCORES_FILE
    if not path.exists():
        console.print(f"[bold]Stage I: {name} at {budget:g} bits ({quantizer})")
        subprocess.run(command_line("learn", {**overrides, "output_dir": str(out)}), cwd=ROOT, check=True)
    return ScoreTable.load(path)


class Evaluator:
    """Applies assignments to one model with precomputed candidates; caches figures by assignment."""

    def __init__(self, quantizer: str, candidates: list[int], args, cache: Path):
        self.cfg = load_config(ROOT / "params.yaml", {
            **EXTRA, "quantizer.method": quantizer, "candidates": candidates, "evaluation.max_tokens": args.tokens,
            "evaluation.zero_shot_items": args.items})
        self.ws = Workspace(self.cfg)
        self.model, self.tokenizer = self.ws.load()
        self.modules, self.sizes = self.ws.module_sizes(self.model)
        q = self.cfg.quantizer
        self.candidates = build_candidates(self.model, self.ws.quantizer(), candidates, q.group_size, q.symmetric,
                                           self.ws.hessians(self.model))
        self.cache_file = cache / f"evaluations-{quantizer}-{args.tokens}-{args.items}.json"
        self.cache = json.loads(self.cache_file.read_text()) if self.cache_file.exists() else {}

    def proxy_costs(self) -> np.ndarray:
        proxy = FisherCosts(self.model, self.candidates)
        capture_teacher(self.model, self.ws.calibration, device=self.ws.device, on_fisher=proxy)
        return proxy.table

    def solve(self, scores: np.ndarray, budget: float) -> dict[str, int]:
        q = self.cfg.quantizer
        rows = Scores(self.modules, self.sizes, self.cfg.candidates, scores)
        return project(rows, budget, self.cfg.stage2, group_size=q.group_size, symmetric=q.symmetric).assignment

    def evaluate(self, assignment: dict[str, int]) -> dict:
        key = hashlib.md5(json.dumps(assignment, sort_keys=True).encode()).hexdigest()
        if key not in self.cache:
            apply_candidates(self.model, self.candidates, self.cfg.candidates, assignment)
            q = self.cfg.quantizer
            acct = account(self.model, assignment, q.group_size, q.symmetric)
            self.cache[key] = {"avg_bits": acct.nominal_bits, "effective_bits": acct.effective_bits,
                               **evaluate_model(self.ws, self.model, self.tokenizer)}
            self.cache_file.write_text(json.dumps(self.cache, indent=1) + "\n")
        return {**self.cache[key], "window": self.cfg.stage2.window, "max_tokens": self.cfg.evaluation.max_tokens,
                "zero_shot_items": self.cfg.evaluation.zero_shot_items}


def plot(rows: list[dict], quantizer: str, tokens: int, path: Path) -> None:
    """``rows``: those evaluated on ``tokens`` held-out tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    names = list(dict.fromkeys(r["row"] for r in rows if r["quantizer"] == quantizer and r["kind"] == "ablation"))
    # Twenty-odd rows: colour and dash together keep each line its own (ten colours alone repeat);
    # the dash shifts each time the twenty colours come round again.
    colours, dashes = plt.get_cmap("tab20").colors, ["-", "--", ":", "-."]
    for i, name in enumerate(names):
        pts = sorted({r["budget"]: r["perplexity"] for r in rows
                      if r["quantizer"] == quantizer and r["row"] == name and r["kind"] == "ablation"}.items())
        main_line = name in ("proxy", "soft-fisher")
        colour = {"proxy": "black", "soft-fisher": "tab:red"}.get(name, colours[i % 20])
        ax.plot(*zip(*pts), marker="o", ms=3, label=name, color=colour,
                ls="-" if main_line else dashes[(i + i // 20) % 4], lw=2.5 if main_line else 1)
    ax.set_yscale("log")
    ax.set_xlabel("average bits (budget)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"Stage I ablation ({quantizer}, {tokens:,} held-out tokens)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantizers", default="rtn")
    ap.add_argument("--rows", default="soft-fisher", help=f"configurations, comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--train-budget", type=float, default=3.0, help="training budget of the ablation rows")
    ap.add_argument("--budgets", default="2.75,3,3.25,3.5,3.75,4")
    ap.add_argument("--candidates", default="2,3,4,8")
    ap.add_argument("--tokens", type=int, default=32768, help="held-out evaluation tokens")
    ap.add_argument("--items", type=int, default=20, help="zero-shot items per task")
    ap.add_argument("--reuse-from", default="", help="training budgets whose tables are projected to the grid")
    ap.add_argument("--reuse-row", default="soft-fisher", help="configuration used for the reuse matrix")
    ap.add_argument("--reuse-own", default="", help="budgets whose own tables are learned for the comparison "
                    "(default: every budget of the grid)")
    ap.add_argument("--untrained", default=",".join(UNTRAINED_CLIPS), help="untrained-table rows to include")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "stage1_ablation"))
    ap.add_argument("--set", action="append", default=[], help="override for every row, key=value (YAML value)")
    args = ap.parse_args()
    EXTRA.update(parse_overrides(args.set))
    budgets = [float(b) for b in args.budgets.split(",")]
    bits = [int(b) for b in args.candidates.split(",")]
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --rows {unknown}; known: {list(CONFIGS)}")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "stage1_ablation.json"
    rows = json.loads(previous.read_text())["rows"] if previous.exists() else []

    def record(new: dict) -> None:
        rows[:] = [r for r in rows if any(r.get(k) != new[k] for k in KEY)] + [new]
        console.print(f"{new['quantizer']} {new['kind']:8s} {new['row']:28s} trained {new['training_budget']} "
                      f"B={new['budget']:<5} bits={new['avg_bits']:.3f} ppl={new['perplexity']:.2f}"
                      f"±{new['perplexity_se']:.2f} zs={new.get('zero_shot', math.nan):.3f}")

    for qname in args.quantizers.split(","):
        ev = Evaluator(qname, bits, args, cache)
        settings = {"note": "rows accumulate over invocations (soft-fisher: the default, proxy_clip 0)",
                    "candidates": bits, "eval_tokens": "per row: max_tokens asked, eval_tokens counted",
                    "zero_shot_items": "per row (zero_shot_items, zero_shot_tasks)",
                    "train_budget": args.train_budget, "configs": CONFIGS, "params": ev.cfg.stage1.model_dump(),
                    "calibration_sequences": ev.cfg.text.calibration_sequences, "model_md5": ev.ws.model_hash,
                    "text_md5": ev.ws.text_hash, "context_length": ev.cfg.evaluation.context_length}
        costs = ev.proxy_costs()
        fixed = {"proxy": -costs}
        for name in [n for n in args.untrained.split(",") if n]:
            clip = UNTRAINED_CLIPS[name]
            init = costs_to_logits(costs, [r * c for r, c in ev.sizes], bits, args.train_budget, clip=clip)
            fixed[name] = torch.log_softmax(torch.tensor(init), -1).numpy()
        for name, scores in fixed.items():
            for b in budgets:
                record({"quantizer": qname, "kind": "ablation", "row": name, "method": name.split()[0],
                        "training_budget": args.train_budget, "budget": b, "stage1_seconds": 0.0,
                        "stage1_peak_mb": None, **ev.evaluate(ev.solve(scores, b))})
        for name in names:
            table = learned_table(name, args.train_budget, qname, bits, cache)
            for b in budgets:
                record({"quantizer": qname, "kind": "ablation", "row": name, "method": "gamma",
                        "training_budget": args.train_budget, "budget": b, "stage1_seconds": table.wall_seconds,
                        "stage1_peak_mb": table.peak_memory_mb, "stage1_steps": len(table.history["loss"]),
                        **ev.evaluate(ev.solve(np.asarray(table.scores), b))})
            write_results("stage1_ablation", settings, rows, KEY)
        reuse_from = [float(b) for b in args.reuse_from.split(",") if b]
        if reuse_from:
            own = [float(b) for b in args.reuse_own.split(",") if b] or budgets
            for trained in sorted(set(reuse_from) | set(own)):
                if trained >= max(bits):
                    continue
                table = learned_table(args.reuse_row, trained, qname, bits, cache)
                for b in budgets if trained in reuse_from else [trained]:
                    record({"quantizer": qname, "kind": "reuse", "row": args.reuse_row, "method": "gamma",
                            "training_budget": trained, "budget": b, "stage1_seconds": table.wall_seconds,
                            "stage1_peak_mb": table.peak_memory_mb,
                            **ev.evaluate(ev.solve(np.asarray(table.scores), b))})
                write_results("stage1_ablation", settings, rows, KEY)
        path = write_results("stage1_ablation", settings, rows, KEY)
        console.print(f"wrote {path}")
        this_length = [r for r in rows if r["max_tokens"] == args.tokens]  # figures compare at one length
        plot(this_length, qname, args.tokens, RESULTS / f"stage1_ablation_{qname}.png")
        summarize(this_length, qname, budgets)


def summarize(rows: list[dict], quantizer: str, budgets: list[float]) -> None:
    ours = [r for r in rows if r["quantizer"] == quantizer and r["kind"] == "ablation"]
    proxy = {r["budget"]: r["perplexity"] for r in ours if r["row"] == "proxy"}
    console.print(f"\n{quantizer}: perplexity / proxy's, by budget")
    for name in dict.fromkeys(r["row"] for r in ours):
        by = {r["budget"]: r["perplexity"] for r in ours if r["row"] == name}
        console.print(f"  {name:28s} " + "  ".join(
            f"{b:g}: {by[b]:.1f} ({by[b] / proxy[b]:.2f}x)" for b in budgets if b in by and b in proxy))
    reuse = [r for r in rows if r["quantizer"] == quantizer and r["kind"] == "reuse"]
    own = {r["budget"]: r["perplexity"] for r in reuse if r["training_budget"] == r["budget"]}
    for trained in sorted({r["training_budget"] for r in reuse}):
        by = {r["budget"]: r["perplexity"] for r in reuse if r["training_budget"] == trained}
        if len(by) > 1:
            console.print(f"  reuse from {trained:g}: " + "  ".join(
                f"{b:g}: {p:.1f} ({p / own[b]:.2f}x own)" for b, p in sorted(by.items()) if b in own))


if __name__ == "__main__":
    main()
