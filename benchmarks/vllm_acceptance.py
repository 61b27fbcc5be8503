"""vLLM acceptance: does vLLM itself load each serving profile's variants, and what does it compute?

For each serving profile one mixed-precision variant of the embedded model (RTN, the profile's
widths dealt round-robin over its allocation units, so every width it claims is used and its tie
groups hold), plus uniform 4-bit symmetric and 4-bit asymmetric ``vllm-marlin`` variants and a
``vllm-marlin`` 4/16 mix, and uniform 4-bit ``vllm-marlin`` variants of two small random-weight
mixture-of-experts models (Mixtral, Qwen3-MoE: experts quantized, stored under vLLM's per-expert
names). Each is quantized and exported the pipeline's way
(``quantize_and_evaluate``: transformers' perplexity on the in-memory model, which is exactly what
the checkpoint stores), then handed to vLLM in its own environment (``vllm_accepts``: its
compressed-tensors config parsing and per-layer schemes, its weight loading, one forward), and
its verdict is recorded with vLLM's own error. gamma's own prediction (``serving_problems``, the
CPU and GPU profiles) is recorded next to it, so a profile that promises what vLLM refuses shows.
Every accepted ``vllm-marlin`` variant whose quantized modules are all 4-bit is also evaluated
through vLLM (perplexity on the same windows) when this machine runs them: vLLM's CPU build has
4-bit kernels only, and only on AVX-512. The Marlin and Humming mixes are also re-checked and
evaluated with the worker's reference kernel standing in for the missing 8/3/2-bit kernels
(``-reference`` variants): vLLM's loader for every width, and what its forward computes.

Writes ``benchmarks/results/vllm_acceptance.json``, rows merged by variant (a rerun replaces
only the variants it recomputed).

    python benchmarks/vllm_acceptance.py [--python /path/to/vllm-env/bin/python] [--variants a,b]
        [--tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, vllm_perplexity, write_results

from gamma.config import VllmConfig, load_config
from gamma.evaluation.backends import (
    CHECK_ENV,
    VLLM_PROFILES,
    BackendUnavailable,
    checkpoint_group_sizes,
    checkpoint_schemes,
    checkpoint_unquantized,
    cpu_runs_vllm_int4,
    serving_problems,
    vllm_accepts,
    vllm_environment_problem,
)
from gamma.model.loading import quantizable_modules
from gamma.model.units import allocation_units
from gamma.operations.profiles import PROFILES
from gamma.progress import console
from gamma.run.variant import quantize_and_evaluate
from gamma.run.workspace import Workspace

# variant: (serving profile, widths dealt over its allocation units, symmetric[, architecture of a
# small random-weight model built from its config instead of the embedded model])
VARIANTS = {
    "research-mixed": ("research", (2, 3, 4, 8, 16), False),
    "transformers-mixed": ("transformers", (2, 3, 4, 8, 16), True),
    "vllm-marlin-mixed": ("vllm-marlin", (4, 8, 16), True),
    "vllm-humming-mixed": ("vllm-humming", (2, 3, 4, 8, 16), False),
    "vllm-marlin-4-16": ("vllm-marlin", (4, 16), True),
    "vllm-marlin-w4-symmetric": ("vllm-marlin", (4,), True),
    "vllm-marlin-w4-asymmetric": ("vllm-marlin", (4,), False),
    "mixtral-w4": ("vllm-marlin", (4,), True, "Mixtral"),
    "qwen3moe-w4": ("vllm-marlin", (4,), True, "Qwen3Moe"),
}
# variant: the variant it re-checks with the worker's reference kernel standing in where the CPU
# build has none (8-bit, 2/3-bit): vLLM's loader and what its forward computes, for every width
REFERENCE_KERNEL = {"vllm-marlin-mixed-reference": "vllm-marlin-mixed",
                    "vllm-humming-mixed-reference": "vllm-humming-mixed"}
MOE = {"Mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
       "Qwen3Moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "head_dim": 64}}
KEY = ("variant",)


def moe_model(arch: str, where: Path) -> Path:
    """A 2-block random-weight ``arch`` model (4 experts, widths 256) with the embedded tokenizer."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / "data" / "models" / "smollm2-135m")
    config = getattr(transformers, f"{arch}Config")(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, vocab_size=len(tokenizer), **MOE[arch])
    torch.manual_seed(0)
    folder = where / f"{arch.lower()}-fp"
    getattr(transformers, f"{arch}ForCausalLM")(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config(profile: str, widths: tuple[int, ...], symmetric: bool, args, model: Path | None = None):
    p = PROFILES[profile]
    # the variant's own widths (and 16), which its profile takes with this symmetry
    return load_config(ROOT / "params.yaml", {**({"model.path": str(model)} if model else {}),
        "serving.profile": profile, "candidates": sorted({*widths, 16}), "uniform_bits": [min(widths)],
        "quantizer.method": "rtn",
        "quantizer.symmetric": symmetric, "allocation.ties": p.ties or "none",
        "allocation.experts": p.experts or "per_expert", "evaluation.max_tokens": args.tokens,
        "evaluation.kl_tokens": 0, "evaluation.zero_shot_items": 0,
        "output_dir": str(ROOT / "runs" / "vllm_acceptance"),
        # no allocator runs here; budgets only have to lie inside the variant's widths
        "stage1.budget": min(widths) + 0.5, "stage1.extra_budgets": [], "stage2.budgets": [min(widths) + 0.5]})


def dealt(model, widths: tuple[int, ...], ties: str, experts: str) -> dict[str, int]:
    """Unit i gets ``widths[i % len(widths)]``: every width used, every tie group one width."""
    modules = list(quantizable_modules(model))
    return {modules[i]: widths[u % len(widths)]
            for u, unit in enumerate(allocation_units(modules, ties, experts)) for i in unit}


def gamma_predicts(ckpt: Path) -> dict:
    """gamma's own pre-check of the checkpoint against vLLM's CPU and GPU profiles."""
    args = (checkpoint_schemes(ckpt),)
    extra = (checkpoint_group_sizes(ckpt), checkpoint_unquantized(ckpt))
    return {f"gamma_{device}_problems": serving_problems(*args, VLLM_PROFILES[device], *extra)
            for device in ("cpu", "cuda")}


def measure(name: str, args, where: Path) -> dict:
    reference = name in REFERENCE_KERNEL
    profile, widths, symmetric, *arch = VARIANTS[REFERENCE_KERNEL.get(name, name)]
    ws = Workspace(config(profile, widths, symmetric, args, moe_model(arch[0], where) if arch else None))
    model, tokenizer = ws.load()
    a = ws.cfg.allocation
    assignment = dealt(model, widths, a.ties, a.experts)
    ckpt = where / name
    t0 = time.perf_counter()
    row = quantize_and_evaluate(ws, assignment, save_to=ckpt, loaded=(model, tokenizer))
    out = {"variant": name, "profile": profile, "widths": sorted(set(assignment.values())),
           "quantized_bits": sorted({b for b, _ in checkpoint_schemes(ckpt).values()}), "symmetric": symmetric,
           "group_size": ws.cfg.quantizer.group_size, "ties": a.ties, "avg_bits": row["avg_bits"],
           "total_bytes": row["total_bytes"], "loads_in": row["loads_in"],
           "transformers_perplexity": row["perplexity"], "transformers_perplexity_se": row["perplexity_se"],
           "eval_tokens": row["eval_tokens"], "quantize_and_evaluate_seconds": time.perf_counter() - t0,
           **gamma_predicts(ckpt)}
    verdict = vllm_accepts(args.python, ckpt, "cpu", reference_kernel=reference)
    out["reference_kernel"] = reference
    out.update({k: verdict.get(k) for k in ("accepted", "stage", "error", "raised_at")},
               vllm=verdict.get("vllm"), vllm_schemes=verdict.get("schemes"), vllm_kernels=verdict.get("kernels"),
               vllm_next_token=verdict.get("next_token"), check_seconds=verdict.get("seconds"))
    four_bit_marlin = profile == "vllm-marlin" and out["quantized_bits"] == [4]
    if verdict["accepted"] and (four_bit_marlin or reference):
        try:  # the backend's own check says why not (no AVX-512 for the CPU build's int4 kernel...)
            cpu = VllmConfig(python=args.python, device="cpu", gpu_memory_utilization=0.1)
            out.update(vllm_perplexity(ws, ckpt, cpu, reference))
            out["perplexity_ratio"] = out["vllm_perplexity"] / out["transformers_perplexity"]
        except BackendUnavailable as err:
            out["vllm_perplexity_skipped"] = str(err)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=os.environ.get("GAMMA_VLLM_PYTHON", ""), help="python of the vLLM env")
    ap.add_argument("--variants", default=",".join([*VARIANTS, *REFERENCE_KERNEL]))
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens of each perplexity")
    args = ap.parse_args()
    problem = vllm_environment_problem(args.python) if args.python else "pass --python or set GAMMA_VLLM_PYTHON"
    if problem:
        sys.exit(f"no vLLM environment ({problem}); scripts/install_vllm.sh builds one")
    # the scoring worker inherits these: a small KV cache on the CPU build (its default is a share of RAM)
    os.environ.update({k: v for k, v in CHECK_ENV.items() if k == "VLLM_CPU_KVCACHE_SPACE"})
    settings = {"python": args.python, "device": "cpu", "avx512": cpu_runs_vllm_int4(), "eval_tokens": args.tokens,
                "quantizer": "rtn, group size of params.yaml",
                "variants": {k: {"profile": v[0], "widths": list(v[1]), "symmetric": v[2], "model": v[3] if v[3:] else
                                 "embedded"} for k, v in VARIANTS.items()},
                "reference_kernel": {k: f"{v}, re-checked and evaluated with vllm_worker.py --reference-kernel"
                                     for k, v in REFERENCE_KERNEL.items()},
                "assignment": "the profile's widths dealt round-robin over its allocation units",
                "check_env": CHECK_ENV, "check": "vllm_worker.py --check-load: config, load, one forward"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gamma-vllm-acceptance-") as tmp:
        for name in args.variants.split(","):
            console.rule(name)
            rows.append(measure(name, args, Path(tmp)))
            console.print(rows[-1])
            path = write_results("vllm_acceptance", settings, rows, KEY)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
