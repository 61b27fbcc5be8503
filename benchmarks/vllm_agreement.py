"""vLLM against transformers on the same exported checkpoints: perplexity and zero-shot.

Each variant is quantized (uniform widths or a GAMMA budget), exported as a compressed-tensors
checkpoint, evaluated in this process with transformers (on the reloaded checkpoint, so both
backends read the very same file), then by the vLLM backend in its own environment. Variants the
engine cannot serve are reported with the profile's reason instead of figures. Writes
benchmarks/results/vllm_agreement.json.

    python benchmarks/vllm_agreement.py --python /path/to/vllm-env/bin/python [--device cpu|cuda]
        [--variants 4,8,gamma:2.5] [--tokens 4096] [--items 40] [--set quantizer.symmetric=true ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from gamma.config import VllmConfig, load_config, parse_overrides
from gamma.evaluation.backends import BackendUnavailable, VllmBackend, evaluate_with_vllm
from gamma.model.export import load_checkpoint
from gamma.progress import console
from gamma.run.tables import project_budget
from gamma.run.variant import evaluate_model, quantize_and_evaluate
from gamma.run.workspace import Workspace
from gamma.stage2.scores import ScoreTable

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="python of the vLLM environment")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--variants", default="4", help="uniform widths and gamma:<budget> (needs --scores)")
    ap.add_argument("--scores", help="score table for gamma:<budget> variants")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    args = ap.parse_args()
    overrides = {"quantizer.symmetric": True, "evaluation.max_tokens": args.tokens,
                 "evaluation.zero_shot_items": args.items, **parse_overrides(args.set)}
    cfg = load_config(ROOT / "params.yaml", overrides)
    ws = Workspace(cfg)
    e = cfg.evaluation
    backend = VllmBackend(VllmConfig(python=args.python, device=args.device), e.context_length + 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.variants.split(","):
            if spec.startswith("gamma:"):
                budget = float(spec.split(":")[1])
                assignment = project_budget([ScoreTable.load(args.scores)], budget, cfg).assignment
            else:
                assignment = int(spec)
            console.rule(f"variant {spec}")
            ckpt = Path(tmp) / spec.replace(":", "-")
            row = quantize_and_evaluate(ws, assignment, save_to=ckpt)  # transformers, in-memory model
            model, tok = load_checkpoint(ckpt)
            reloaded = evaluate_model(ws, model, tok)  # transformers on the file vLLM reads
            out = {"variant": spec, "avg_bits": row["avg_bits"], "checkpoint_bytes": row["checkpoint_bytes"],
                   "transformers_perplexity": reloaded["perplexity"], "transformers_zero_shot": reloaded["zero_shot"],
                   "in_memory_perplexity": row["perplexity"]}
            try:
                got = evaluate_with_vllm(backend, ckpt, ws.evaluation, tok, e.zero_shot_tasks, e.zero_shot_items,
                                         e.context_length)
                out.update({"vllm_perplexity": got["perplexity"], "vllm_zero_shot": got["zero_shot"],
                            "vllm_backend": got["eval_backend"], "vllm_seconds": got["eval_seconds"],
                            "perplexity_ratio": got["perplexity"] / reloaded["perplexity"],
                            "zero_shot_difference": got["zero_shot"] - reloaded["zero_shot"]})
            except BackendUnavailable as err:
                out["vllm_unavailable"] = str(err)
            console.print(out)
            rows.append(out)
    settings = {"device": backend.device(), "python": args.python, "tokens": args.tokens, "items": args.items,
                "quantizer": ws.quantizer_record(), "tasks": e.zero_shot_tasks}
    console.print(f"wrote {write_results('vllm_agreement', settings, rows, ('variant',))}")


if __name__ == "__main__":
    main()
