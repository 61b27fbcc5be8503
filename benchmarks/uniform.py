"""Uniform baselines on the embedded model: unquantized, RTN and GPTQ at 8, 4, 3, 2 bits.

Prints perplexity (with standard error), zero-shot average (with standard error), nominal and
effective bits, bytes, and the wall time of quantization and evaluation; writes
benchmarks/results/uniform.json.

    python benchmarks/uniform.py [--tokens 16384] [--items 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from gamma.config import load_config
from gamma.progress import console, print_table
from gamma.run.variant import evaluate_model, quantize_and_evaluate
from gamma.run.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--bits", default="8,4,3,2")
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    rows = []
    base = {"evaluation.max_tokens": args.tokens, "evaluation.zero_shot_items": args.items}
    ws = Workspace(load_config("params.yaml", base))
    model, tok = ws.load()
    rows.append({"quantizer": "none", "method": "unquantized", "budget": 16.0, "avg_bits": 16.0,
                 **evaluate_model(ws, model, tok)})
    for qname in ("rtn", "gptq"):
        ws = Workspace(load_config("params.yaml", {**base, "quantizer.method": qname}))
        t0 = time.perf_counter()
        hessians = ws.reusable_hessians(model)
        hessian_seconds = time.perf_counter() - t0
        for b in bits:
            row = quantize_and_evaluate(ws, b, hessians)
            row["quantize_seconds"] += hessian_seconds / len(bits)
            rows.append({"method": "uniform", "budget": float(b), **row})
            console.print(f"{qname} {b}-bit: perplexity {row['perplexity']:.2f}, zero-shot {row['zero_shot']:.3f}")
    cfg = ws.cfg
    settings = {"model": ws.model_hash, "text": ws.text_hash, "context": cfg.evaluation.context_length,
                "tokens": rows[0]["eval_tokens"], "zero_shot_items": args.items, "group_size": cfg.quantizer.group_size,
                "calibration_sequences": cfg.text.calibration_sequences, "gptq": cfg.quantizer.gptq.model_dump()}
    path = write_results("uniform", settings, rows, ("quantizer", "method", "budget"))
    print_table([{**r, "method": f"{r.get('quantizer', '')}-{r['budget']:g}"} for r in rows], "uniform baselines")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
