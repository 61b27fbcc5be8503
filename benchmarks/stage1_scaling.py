"""Stage I over 1 and over N data-parallel processes: wall time and peak memory per process.

Runs the real command a user runs (`gamma learn`, a fresh process; with stage1.processes > 1 it
launches the workers through `accelerate launch`) on the embedded defaults, and checks that the
tables agree (largest score difference, identical Stage II assignment at 2.5 bits). On a GPU
machine the launched processes take one GPU each. Writes benchmarks/results/stage1_scaling.json.

    python benchmarks/stage1_scaling.py [--processes 1,2] [--set stage1.steps=100 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from gamma.config import command_line, load_config, parse_overrides
from gamma.progress import console
from gamma.run.tables import SCORES_FILE, project_budget
from gamma.stage2.scores import ScoreTable

ROOT = Path(__file__).resolve().parents[1]


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    import os

    return f"CPU ({os.cpu_count()} cores), no GPU"


def learn(processes: int, out: Path, extra: dict) -> tuple[float, ScoreTable, list[dict]]:
    sets = {"stage1.processes": processes, "stage1.extra_budgets": [], "output_dir": str(out), **extra}  # one table
    cmd = command_line("learn", sets)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    table = ScoreTable.load(out / SCORES_FILE)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("scores.json.rank*.json"))]
    if not ranks:  # one process: the table records its own figures
        ranks = [{"rank": 0, "world": 1, "device": "cpu", "stage1_seconds": table.wall_seconds,
                  "peak_memory_mb": table.peak_memory_mb}]
    return wall, table, ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--set", action="append", default=[], help="extra config override key=value")
    args = ap.parse_args()
    counts = [int(p) for p in args.processes.split(",")]
    overrides = parse_overrides(args.set)
    cfg = load_config(ROOT / "params.yaml", overrides)
    rows, tables = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            console.rule(f"Stage I over {n} process(es)")
            wall, table, ranks = learn(n, Path(tmp) / f"p{n}", overrides)
            tables[n] = table
            for r in ranks:
                rows.append({"processes": n, "rank": r["rank"], "device": r["device"], "command_wall_seconds": wall,
                             "stage1_seconds": r["stage1_seconds"], "peak_memory_mb": r["peak_memory_mb"]})
    base = tables[counts[0]]
    agreement = {}
    for n, t in tables.items():
        a_base, a_n = (project_budget([x], 2.5, cfg) for x in (base, t))
        agreement[n] = {"max_abs_score_difference": float(np.abs(np.asarray(t.scores) - np.asarray(base.scores)).max()),
                        "same_assignment_at_2.5": a_base.assignment == a_n.assignment}
    for r in rows:
        r.update(agreement[r["processes"]])
        console.print(f"{r['processes']} process(es), rank {r['rank']}: command {r['command_wall_seconds']:.0f} s, "
                      f"Stage I {r['stage1_seconds']:.0f} s, peak {r['peak_memory_mb']:.0f} MB, "
                      f"max |score diff| {r['max_abs_score_difference']:.2e}, "
                      f"same 2.5-bit assignment: {r['same_assignment_at_2.5']}")
    settings = {"device": device_name(), "stage1": cfg.stage1.model_dump(exclude={"processes"}),
                "calibration_sequences": cfg.text.calibration_sequences, "overrides": args.set}
    console.print(f"wrote {write_results('stage1_scaling', settings, rows, ('processes', 'rank'))}")


if __name__ == "__main__":
    main()
