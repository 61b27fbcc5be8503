"""The main flow: prepare data -> learn preferences -> for each budget: solve, quantize, evaluate
-> summarise. Runs with no server (Prefect's ephemeral API)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))

from prefect import flow  # noqa: E402

from gamma.config import load_config  # noqa: E402
from gamma.plots import plot_pareto  # noqa: E402
from tasks.steps import learn, prepare, uniform, variant  # noqa: E402


@flow(name="gamma-pipeline")
def gamma_pipeline(params: str = "params.yaml", overrides: dict | None = None) -> list[dict]:
    cfg = load_config(params, overrides)
    hashes = prepare(cfg)
    scores = learn(cfg, hashes)
    # Tasks run one after another: each evaluation already uses every core of this machine.
    rows = [uniform(cfg, b) for b in cfg.uniform_bits]
    rows += [variant(cfg, scores, b) for b in cfg.stage2.budgets]
    out = Path(cfg.output_dir)
    (out / "summary.json").write_text(json.dumps({"inputs": hashes, "rows": rows}, indent=1, default=str) + "\n")
    ok = [r for r in rows if "error" not in r]
    plot_pareto(ok, out / "pareto.png")
    from gamma.cli import _table

    _table([{**r, "method": f"{r['method']}-{r['budget']:g}"} for r in ok], "variants")
    for r in rows:
        if "error" in r:
            print(f"budget {r['budget']}: FAILED: {r['error']}")
    print(f"results: {out / 'summary.json'}, {out / 'pareto.png'}")
    return rows
