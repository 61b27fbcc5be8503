"""What one more budget costs once the scores are registered, against the first full run.

Runs the real main command (`gamma run`, a fresh process each time, as a user would, DVC included) on
the embedded defaults with a private MLflow database:
1. one budget: Stage I runs and is registered;
2. one more budget in a fresh process: Stage I comes from the registry (what an ad-hoc request pays,
   start-up of Python, the Prefect ephemeral API and the DVC check included);
3. several more budgets in one run: each budget's task (Stage II from the registered scores,
   quantization, export, evaluation, registration) is timed from inside, which is what the fan-out
   pays per budget.
Writes benchmarks/results/budget_fanout.json.

    python benchmarks/budget_fanout.py [--first 2.5] [--one 2.75] [--more 3,3.25,3.5] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from gamma.config import command_line, parse_overrides
from gamma.progress import console

ROOT = Path(__file__).resolve().parents[1]


def gamma_run(budgets: list[float], work: Path, extra: dict) -> tuple[float, dict]:
    sets = {"stage2.budgets": budgets, "uniform_bits": [], "output_dir": str(work / "runs"),
            "tracking.uri": f"sqlite:///{work / 'mlflow.db'}", "tracking.artifacts": str(work / "mlartifacts"), **extra}
    cmd = command_line("run", sets)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, json.loads((work / "runs" / "summary.json").read_text())


def budget_rows(run: str, wall: float, summary: dict) -> list[dict]:
    rows = []
    for row in summary["rows"]:
        if "error" in row:
            raise SystemExit(f"budget {row['budget']} failed: {row['error']}")
        rows.append({"run": run, "budget": row["budget"], "run_wall_seconds": wall,
                     "stage1_cached": summary["scores"]["cached"], "task_seconds": row["task_seconds"],
                     "solve_seconds": row["solve_seconds"], "quantize_seconds": row["quantize_seconds"],
                     "eval_seconds": row["eval_seconds"], "perplexity": row["perplexity"]})
        console.print(f"{run:34s} B={row['budget']:<5} run wall {wall:7.1f}s  task {row['task_seconds']:5.1f}s  "
                      f"solve {row['solve_seconds']:.2f}s  quantize {row['quantize_seconds']:.1f}s  "
                      f"eval {row['eval_seconds']:.1f}s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=float, default=2.5)
    ap.add_argument("--one", type=float, default=2.75, help="the budget asked for alone, in a fresh process")
    ap.add_argument("--more", default="3,3.25,3.5", help="budgets asked for together, in one more run")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per variant")
    ap.add_argument("--items", type=int, default=0, help="zero-shot items per task per variant")
    ap.add_argument("--set", action="append", default=[], help="extra config override key=value")
    args = ap.parse_args()
    extra = {"evaluation.max_tokens": args.tokens, "evaluation.zero_shot_items": args.items,
             **parse_overrides(args.set)}
    more = [float(b) for b in args.more.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wall, first = gamma_run([args.first], work, extra)
        stage1 = json.loads(Path(first["scores"]["path"]).read_text())["wall_seconds"]
        rows = budget_rows("first (Stage I + 1 budget)", wall, first)
        one_wall, one = gamma_run([args.one], work, extra)
        rows += budget_rows("one more budget, fresh process", one_wall, one)
        fan_wall, fan = gamma_run(more, work, extra)
        rows += budget_rows(f"{len(more)} more budgets in one run", fan_wall, fan)
    for r in rows[1:]:
        assert r["stage1_cached"], "an additional budget retrained Stage I"
    in_run = [r["task_seconds"] for r in rows[2:]]
    summary = {
        "stage1_seconds": stage1,
        "first_run_seconds": rows[0]["run_wall_seconds"],
        "fresh_process_seconds": one_wall,
        "fresh_process_over_stage1": one_wall / stage1,
        "fixed_start_up_seconds": fan_wall - sum(in_run),
        "in_run_budget_seconds_mean": sum(in_run) / len(in_run),
        "in_run_budget_over_stage1": sum(in_run) / len(in_run) / stage1,
    }
    solve_quantize = [r["solve_seconds"] + r["quantize_seconds"] for r in rows[1:]]
    summary["solve_quantize_seconds_mean"] = sum(solve_quantize) / len(solve_quantize)
    summary["solve_quantize_over_stage1"] = summary["solve_quantize_seconds_mean"] / stage1
    path = write_results("budget_fanout", {"eval_tokens": args.tokens, "zero_shot_items": args.items,
                                           "overrides": args.set, "summary": summary}, rows,
                         ("run", "budget"))
    console.print(f"Stage I {stage1:.0f}s. One more budget inside a run: {summary['in_run_budget_seconds_mean']:.1f}s "
                  f"({100 * summary['in_run_budget_over_stage1']:.1f}% of Stage I); alone in a fresh process "
                  f"{one_wall:.1f}s ({100 * summary['fresh_process_over_stage1']:.1f}%, of which start-up and "
                  f"summary {summary['fixed_start_up_seconds']:.1f}s); Stage II + quantization alone "
                  f"{summary['solve_quantize_seconds_mean']:.1f}s ({100 * summary['solve_quantize_over_stage1']:.2f}%)")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
