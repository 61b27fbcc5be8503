"""Stage II at scale: exact multiple-choice knapsack on synthetic score tables the size of real models.

Shapes follow Llama-3 8B (32 blocks x 7 linear modules = 224) and Llama-3 70B (80 x 7 = 560); the
block-wise case cuts the 8B modules into column blocks until there are 100,000 items. Scores have
the shape learned tables have (diminishing returns in bits, a per-module sensitivity spread over
three orders of magnitude, noise), 4 candidates (2/3/4/8 bits). Prints solve time, status and
proven gap per budget; writes benchmarks/results/solver_scale.json. Stage II's ``auto`` solver uses
CBC (exact MIP) up to 5,000 items and the LP-hull greedy (proven bound) above: CBC on the
100,000-item table did not finish within 10 minutes here (pywraplp model building and branching).

    python benchmarks/solver_scale.py [--budgets 2.25,2.5,3,3.5] [--time-limit 120]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from gamma.config import Stage2Config
from gamma.progress import console
from gamma.stage2.projection import project
from gamma.stage2.scores import Scores

CANDIDATES = [2, 3, 4, 8]
LLAMA_8B = {"hidden": 4096, "kv": 1024, "ffn": 14336, "blocks": 32}
LLAMA_70B = {"hidden": 8192, "kv": 1024, "ffn": 28672, "blocks": 80}
EMBEDDINGS_8B = 2 * 128256 * 4096 * 2  # embedding and head at 16 bits: a bytes budget pays them too


def llama_sizes(arch: dict) -> list[tuple[int, int]]:
    h, kv, f = arch["hidden"], arch["kv"], arch["ffn"]
    block = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]  # q k v o gate up down
    return block * arch["blocks"]


def column_blocks(sizes: list[tuple[int, int]], items: int) -> list[tuple[int, int]]:
    """Cut each module into equal column blocks so that the total is about ``items``."""
    per_module = max(1, items // len(sizes))
    out = []
    for rows, cols in sizes:
        width = max(1, cols // per_module)
        out += [(rows, width)] * (cols // width)
    return out[:items]


def synthetic_scores(sizes: list[tuple[int, int]], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = np.array([r * c for r, c in sizes], dtype=np.float64)
    sensitivity = n * 10 ** rng.uniform(-1.5, 1.5, len(sizes))  # error ~ size x sensitivity x 4^-bits
    bits = np.array(CANDIDATES, dtype=np.float64)
    error = sensitivity[:, None] * 4.0 ** -bits[None, :] * rng.uniform(0.8, 1.2, (len(sizes), len(bits)))
    return -error / error.max()


def in_bytes(sizes: list[tuple[int, int]], budgets: list[float]) -> list[tuple[float, str]]:
    """The same budgets as whole-checkpoint bytes (symmetric group-64 storage plus the 16-bit rest)."""
    n = sum(r * c for r, c in sizes)
    return [(float(EMBEDDINGS_8B + int(b * n / 8 + n / 64 * 2)), "bytes") for b in budgets]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2.25,2.5,3,3.5")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--time-limit", type=float, default=120.0)
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    cases = {
        "llama-8b (224 modules)": llama_sizes(LLAMA_8B),
        "llama-70b (560 modules)": llama_sizes(LLAMA_70B),
        f"8b block-wise ({args.items:,} items)": column_blocks(llama_sizes(LLAMA_8B), args.items),
    }
    rows = []
    for case, sizes in cases.items():
        scores = synthetic_scores(sizes)
        modules = [f"m{i}" for i in range(len(sizes))]
        for budget, unit in [(b, "nominal") for b in budgets] + (in_bytes(sizes, budgets) if "224" in case else []):
            stage2 = Stage2Config(window=0.02, time_limit=args.time_limit, unit=unit)
            a = project(Scores(modules, sizes, CANDIDATES, scores), budget, stage2, fixed_bytes=EMBEDDINGS_8B)
            row = {"case": case, "items": len(sizes), "budget": budget, "unit": unit, "solver": a.solver,
                   "status": a.status, "solve_seconds": a.solve_seconds, "gap": a.gap, "bits_used": a.bits_used,
                   "used": a.used, "slack": a.slack}
            rows.append(row)
            console.print(f"{case:32s} B={budget:<12g} {unit:8s} {a.solver:4s} {a.status:9s} "
                          f"{a.solve_seconds:8.3f}s gap={a.gap:.2e} bits={a.bits_used:.4f}")
    path = write_results("solver_scale", {"candidates": CANDIDATES, "time_limit": args.time_limit,
                                          "solver": "OR-Tools CBC, relative gap 0", "window": 0.02,
                                          "fixed_bytes": EMBEDDINGS_8B}, rows, key=("case", "budget", "unit"))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
