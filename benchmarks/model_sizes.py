"""Real model sizes: host memory and time of `gamma learn` on random-weight models with the shapes
of real ones (built from a config, saved in bfloat16 like the real checkpoints), next to the
memory estimate gamma prints before it loads the model.

Runs the real command (`gamma learn`, a fresh process) and reads the process's peak resident
memory. `--code DIR` runs the command from another checkout (an older commit, say) with the same
environment, so a before/after ratio is measured in one sitting. Writes
benchmarks/results/model_sizes.json (rows keyed by model, dtype and code).

    python benchmarks/model_sizes.py [--models smollm2-135m,llama-3.2-1b] [--code DIR --label before]
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
from common import write_results

from gamma.config import command_line, load_config
from gamma.progress import console

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # the published configs' shapes
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SETTINGS = {"text.calibration_sequences": 4, "text.sequence_length": 256, "stage1.steps": 2,
            "stage1.extra_budgets": [], "stage1.checkpoint_every": 1000}


def build(name: str, where: Path) -> Path:
    """A random-weight model with ``name``'s shapes, saved in bfloat16, with the embedded tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gamma.model.loading import resolve_model_path

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(where)
    AutoTokenizer.from_pretrained(resolve_model_path("embedded", ROOT / "data")).save_pretrained(where)
    return where


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


def estimate_row(name: str) -> dict:
    """gamma's estimate for ``name``'s shapes in bfloat16 under params.yaml, computing on a CUDA
    device (from config.json alone: nothing is built or run)."""
    from gamma.model.memory import estimate_memory

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({**SHAPES[name], "torch_dtype": "bfloat16"}))
        row = {"model": name, "dtype": "auto", "code": "estimate only"}
        for method in ("rtn", "gptq"):
            cfg = load_config(ROOT / "params.yaml", {"quantizer.method": method})
            estimate = estimate_memory(cfg, tmp)
            estimate.device_name = "cuda"  # where the product runs an 8B model; nothing is allocated
            host, device = estimate.totals()
            row.update({f"estimate_host_gb_{method}": round(host / 1024**3, 2),
                        f"estimate_device_gb_{method}": round(device / 1024**3, 2)})
    console.print(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.2-1b")
    ap.add_argument("--dtype", default="auto", help="model.dtype for the run")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose `gamma learn` runs (default: this one)")
    ap.add_argument("--label", default="current", help="row label for --code (e.g. before)")
    ap.add_argument("--estimate-only", default="", help="models whose memory estimate is recorded without a run "
                                                        "(the product's defaults, on a CUDA device), e.g. llama-3.1-8b")
    args = ap.parse_args()
    load_config(ROOT / "params.yaml", {"model.dtype": args.dtype})  # a bad value fails here
    rows = [estimate_row(name) for name in args.estimate_only.split(",") if name]
    for name in filter(None, args.models.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            console.rule(f"{name}: building a random-weight model ({args.label})")
            model_dir = build(name, Path(tmp) / name)
            size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1024**3
            row = {"model": name, "dtype": args.dtype, "code": args.label, "code_commit": code_commit(args.code),
                   "checkpoint_gb": round(size, 2),
                   **learn(model_dir, Path(tmp) / "out", Path(args.code), args.dtype)}
        console.print(row)
        rows.append(row)
    write_results("model_sizes", {"settings": SETTINGS, "device": "cpu" if not torch.cuda.is_available() else
                                  torch.cuda.get_device_name(0)}, rows, key=("model", "dtype", "code"))


if __name__ == "__main__":
    main()
