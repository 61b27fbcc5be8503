"""Real model sizes: host memory and time of `gamma learn` on random-weight models with the shapes
of real ones (built from a config, saved in bfloat16 like the real checkpoints), next to the
memory estimate gamma prints before it loads the model.

Runs the real command (`gamma learn`, a fresh process) and reads the process's peak resident
memory. `--code DIR` runs the command from another checkout (an older commit, say) with the same
environment, so a before/after ratio is measured in one sitting. Writes
benchmarks/results/model_sizes.json (rows keyed by model, dtype and code).

    python benchmarks/model_sizes.py [--models smollm2-135m,llama-3.2-1b] [--code DIR --label before]
    python benchmarks/model_sizes.py --models llama-3.2-1b --pipeline   # the whole `gamma run`
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, build_model, memory_estimates, write_results

from gamma.config import command_line, load_config
from gamma.progress import console

PIPELINE = {"text.calibration_sequences": 4, "text.sequence_length": 256, "stage1.steps": 2,
            "evaluation.max_tokens": 2048, "evaluation.context_length": 256, "evaluation.zero_shot_items": 5}
SETTINGS = {"text.calibration_sequences": 4, "text.sequence_length": 256, "stage1.steps": 2,
            "stage1.extra_budgets": [], "stage1.checkpoint_every": 1000}


def code_commit(code: str) -> str:
    """The commit of the checkout whose command runs (the row's own ``commit`` is this script's)."""
    run = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", code, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return run.stdout.strip() + ("+changes" if dirty else "") if run.returncode == 0 else "unknown"


def learn(model_dir: Path, out: Path, code: Path, dtype: str) -> dict:
    sets = {**SETTINGS, "model.path": str(model_dir), "model.data_dir": str(ROOT / "data"), "output_dir": str(out),
            **({} if dtype == "auto" else {"model.dtype": dtype})}  # older checkouts know no model.dtype
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    run = subprocess.run(command_line("learn", sets), cwd=code, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if run.returncode != 0:
        raise SystemExit(f"gamma learn failed in {code}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    if peak <= before:
        console.print("[yellow]peak not above an earlier child's: run one model per invocation for exact peaks")
    estimate = out / "memory_estimate.json"
    return {"wall_seconds": round(wall, 1), "peak_host_gb": round(peak / 1024**2, 2),
            "estimate_host_gb": json.loads(estimate.read_text())["host_gb"] if estimate.exists() else None}


def pipeline(model_dir: Path, out: Path, code: Path, dtype: str) -> dict:
    """The whole `gamma run` (DVC, Prefect, MLflow on SQLite, the band of score tables, every
    budget and uniform baseline quantized, exported, evaluated and registered) with small Stage I
    and evaluation settings."""
    sets = {**PIPELINE, "model.path": str(model_dir), "model.data_dir": str(ROOT / "data"), "output_dir": str(out),
            "tracking.uri": f"sqlite:///{out}/mlflow.db", **({} if dtype == "auto" else {"model.dtype": dtype})}
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    run = subprocess.run(command_line("run", sets), cwd=code, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    (RESULTS / "model_sizes_pipeline.log").write_text(run.stdout[-20000:] + run.stderr[-20000:])
    if run.returncode != 0:
        raise SystemExit(f"gamma run failed in {code} (log: benchmarks/results/model_sizes_pipeline.log)")
    summary = json.loads((out / "summary.json").read_text())
    ok = [r for r in summary["rows"] if "error" not in r]
    return {"wall_seconds": round(wall, 1), "peak_host_gb": round(peak / 1024**2, 2),
            "variants_registered": len(ok), "variants_failed": len(summary["rows"]) - len(ok),
            "stage1_seconds": [round(json.loads(Path(t["path"]).read_text())["wall_seconds"], 1)
                               for t in summary["score_tables"]],
            "eval_devices": sorted({r.get("eval_devices", "?") for r in ok}),
            "variants": {f"{r['method']}-{r['budget']:g}": {"avg_bits": round(r["avg_bits"], 3),
                                                          "perplexity": round(r["perplexity"], 1)} for r in ok}}


def estimate_row(name: str) -> dict:
    row = {"model": name, "dtype": "auto", "code": "estimate only", **memory_estimates(name)}
    console.print(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.2-1b")
    ap.add_argument("--dtype", default="auto", help="model.dtype for the run")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose `gamma learn` runs (default: this one)")
    ap.add_argument("--label", default="current", help="row label for --code (e.g. before)")
    ap.add_argument("--pipeline", action="store_true", help="the whole `gamma run` instead of `gamma learn` "
                                                            "(row label: pipeline)")
    ap.add_argument("--estimate-only", default="", help="models whose memory estimate is recorded without a run "
                                                        "(the product's defaults, on a CUDA device), e.g. llama-3.1-8b")
    args = ap.parse_args()
    load_config(ROOT / "params.yaml", {"model.dtype": args.dtype})  # a bad value fails here
    rows = [estimate_row(name) for name in args.estimate_only.split(",") if name]
    for name in filter(None, args.models.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            console.rule(f"{name}: building a random-weight model ({args.label})")
            model_dir = build_model(name, Path(tmp) / name)
            size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1024**3
            measure = pipeline if args.pipeline else learn
            row = {"model": name, "dtype": args.dtype, "code": "pipeline" if args.pipeline else args.label,
                   "code_commit": code_commit(args.code), "checkpoint_gb": round(size, 2),
                   **measure(model_dir, Path(tmp) / "out", Path(args.code), args.dtype)}
        console.print(row)
        rows.append(row)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    write_results("model_sizes", {"settings": SETTINGS, "pipeline_settings": PIPELINE, "device": device}, rows,
                  key=("model", "dtype", "code"))


if __name__ == "__main__":
    main()
