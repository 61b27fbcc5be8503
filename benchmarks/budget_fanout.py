"""What one more budget costs once the scores are registered, against the first full run.

Runs the real main command (`gamma run`, a fresh process each time, as a user would, DVC included) on the embedded
defaults with a private MLflow database: first with one budget (Stage I runs and is registered),
then once per additional budget (Stage I comes from the registry; Stage II, quantization and
evaluation run). Prints each run's wall time with its parts (Stage I, Stage II solve, quantization,
evaluation); writes benchmarks/results/budget_fanout.json.

    python benchmarks/budget_fanout.py [--first 2.5] [--more 2.75,3,3.25] [--tokens 4096]
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
from common import write_results  # noqa: E402

from gamma.progress import console  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def gamma_run(budget: float, work: Path, extra: list[str]) -> tuple[float, dict]:
    sets = [f"stage2.budgets=[{budget}]", "uniform_bits=[]", f"output_dir={work / 'runs'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"tracking.artifacts={work / 'mlartifacts'}", *extra]
    cmd = [str(Path(sys.executable).parent / "gamma"), "run"] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, json.loads((work / "runs" / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=float, default=2.5)
    ap.add_argument("--more", default="2.75,3,3.25")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per variant")
    ap.add_argument("--items", type=int, default=0, help="zero-shot items per task per variant")
    ap.add_argument("--set", action="append", default=[], help="extra config override key=value")
    args = ap.parse_args()
    extra = [f"evaluation.max_tokens={args.tokens}", f"evaluation.zero_shot_items={args.items}", *args.set]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i, budget in enumerate([args.first] + [float(b) for b in args.more.split(",")]):
            wall, summary = gamma_run(budget, work, extra)
            [row] = [r for r in summary["rows"] if r["method"] == "gamma"]
            if "error" in row:
                raise SystemExit(f"budget {budget} failed: {row['error']}")
            table = json.loads(Path(summary["scores"]["path"]).read_text())
            rows.append({"run": "first (Stage I + 1 budget)" if i == 0 else "additional budget", "budget": budget,
                         "wall_seconds": wall, "stage1_cached": summary["scores"]["cached"],
                         "stage1_seconds": 0.0 if summary["scores"]["cached"] else table["wall_seconds"],
                         "solve_seconds": row["solve_seconds"], "quantize_seconds": row["quantize_seconds"],
                         "eval_seconds": row["eval_seconds"], "perplexity": row["perplexity"]})
            console.print(f"{rows[-1]['run']:28s} B={budget:<5} wall {wall:7.1f}s  Stage I "
                          f"{rows[-1]['stage1_seconds']:6.1f}s  solve {row['solve_seconds']:.2f}s  "
                          f"quantize {row['quantize_seconds']:.1f}s  eval {row['eval_seconds']:.1f}s")
    stage1 = rows[0]["stage1_seconds"]
    more = rows[1:]
    summary = {
        "stage1_seconds": stage1,
        "first_run_seconds": rows[0]["wall_seconds"],
        "additional_wall_mean": sum(r["wall_seconds"] for r in more) / len(more),
        "additional_solve_quantize_mean": sum(r["solve_seconds"] + r["quantize_seconds"] for r in more) / len(more),
    }
    summary["additional_wall_over_stage1"] = summary["additional_wall_mean"] / stage1
    summary["additional_solve_quantize_over_stage1"] = summary["additional_solve_quantize_mean"] / stage1
    for r in more:
        assert r["stage1_cached"], "an additional budget retrained Stage I"
    path = write_results("budget_fanout", {"eval_tokens": args.tokens, "zero_shot_items": args.items,
                                           "overrides": args.set, "summary": summary}, rows)
    console.print(f"one more budget: {summary['additional_wall_mean']:.1f}s wall "
                  f"({100 * summary['additional_wall_over_stage1']:.1f}% of Stage I's {stage1:.0f}s); "
                  f"Stage II + quantization alone {summary['additional_solve_quantize_mean']:.1f}s "
                  f"({100 * summary['additional_solve_quantize_over_stage1']:.2f}%)")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
