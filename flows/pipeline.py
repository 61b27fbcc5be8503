"""The main flow: prepare (DVC) -> Stage I (cached on the registry) -> fan-out over budgets (solve,
quantize, evaluate, register) -> summary table and Pareto plot. Runs with no server of any kind:
Prefect's ephemeral API, MLflow on SQLite, DVC's local remote."""

from __future__ import annotations

import json
import tempfile
from functools import reduce
from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from gamma.config import load_config
from gamma.progress import markdown_table, print_table
from gamma.run.plots import plot_pareto
from gamma.run.variant import failed
from gamma.stage2.budgets import budget_label
from tasks import tracking
from tasks.prepare import check_inputs, prepare
from tasks.stage1 import learn
from tasks.variants import compared_variant, uniform, variant

SUMMARY_COLUMNS = ["method", "budget", "avg_bits", "effective_bits", "total_bytes", "checkpoint_bytes", "perplexity",
                   "kl_divergence", "zero_shot", "registered"]


@flow(name="gamma-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1))
def gamma_pipeline(params: str = "params.yaml", overrides: dict | None = None, use_dvc: bool = True) -> list[dict]:
    cfg = load_config(params, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from_profile = profile_settings(cfg)
    print(f"serving.profile={cfg.serving.profile} gives: {from_profile or 'nothing (params.yaml and --set give all)'}")
    inputs = prepare(cfg, use_dvc)
    client, experiment = tracking.client_for(cfg)  # database and experiment exist before the fan-out
    parent = client.create_run(experiment, run_name="pipeline",
                               tags={"gamma.kind": "pipeline", "model_md5": inputs["model_md5"],
                                     "text_md5": inputs["text_md5"], "git_commit": inputs["git_commit"],
                                     "serving_profile": cfg.serving.profile, "from_profile": from_profile[:5000]})
    parent_id = parent.info.run_id
    status = "FAILED"
    try:
        methods = cfg.allocation.methods
        tables = learn(cfg, inputs, parent_id) if "gamma" in methods else []
        scores = next((t for t in tables if t["training_budget"] == cfg.stage1.budget), None)
        if scores:
            client.set_tag(parent_id, "score_version", f"{scores['name']} v{scores['version']}")
            client.set_tag(parent_id, "stage1_cached", str(all(t["cached"] for t in tables)))
        retrying = variant.with_options(retries=cfg.pipeline.retries)
        jobs = [({"budget": float(b), "method": "uniform"}, uniform.submit(cfg, b, inputs, parent_id))
                for b in cfg.uniform_bits]
        if scores:
            jobs += [({"budget": b, "method": "gamma"}, retrying.submit(cfg, tables, b, inputs, parent_id))
                     for b in cfg.stage2.budgets]
        jobs += [({"budget": b, "method": m}, compared_variant.submit(cfg, m, b, inputs, parent_id))
                 for m in methods if m != "gamma" for b in cfg.stage2.budgets]
        rows = []
        for key, future in jobs:
            result = future.result(raise_on_failure=False)
            # one failed budget is reported with its reason; the others stand
            rows.append(failed(key["budget"], key["method"], f"{type(result).__name__}: {result}")
                        if isinstance(result, BaseException)
                        else result)
        summarize(client, parent_id, out, inputs, scores, rows, tables)
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
    return rows


def profile_settings(cfg) -> str:
    """The settings the run took from its serving profile, as ``key=value`` text."""
    values = cfg.model_dump()
    return ", ".join(f"{k}={reduce(lambda node, part: node[part], k.split('.'), values)}"
                     for k in cfg.serving.from_profile)


def summarize(client, run_id: str, out: Path, inputs: dict, scores: dict, rows: list[dict],
              tables: list[dict] | None = None) -> None:
    summary = out / "summary.json"
    record = {"inputs": inputs, "scores": scores, "score_tables": tables if tables is not None else [scores],
              "rows": rows}
    summary.write_text(json.dumps(record, indent=1, default=str) + "\n")
    ok = [r for r in rows if "error" not in r]
    pareto = plot_pareto(ok, out / "pareto.png") if ok else None
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "variants.md"
        table.write_text(markdown_table(ok, SUMMARY_COLUMNS))
        for f in (summary, pareto, table):
            if f is not None:
                client.log_artifact(run_id, str(f), "summary")
    print_table([{**r, "method": f"{r['method']}-{budget_label(r['budget'], r.get('budget_unit', 'nominal'))}"}
                 for r in ok], "variants")
    for r in rows:
        if "error" in r:
            print(f"budget {r['budget']}: FAILED: {r['error']}")
    print(f"results: {summary}, {out / 'pareto.png'}")


def task_runner(cfg):
    """The configured runner for the budget fan-out: threads here, or a Dask cluster."""
    p = cfg.pipeline
    if p.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if p.dask_address:
            return DaskTaskRunner(address=p.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": p.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=p.workers)


def run_pipeline(params: str = "params.yaml", overrides: dict | None = None, use_dvc: bool = True) -> list[dict]:
    """The flow on the configured task runner (``pipeline.task_runner``, ``pipeline.workers``)."""
    cfg = load_config(params, overrides)
    check_inputs(cfg)
    runner = task_runner(cfg)
    rows = gamma_pipeline.with_options(task_runner=runner)(params=params, overrides=overrides, use_dvc=use_dvc)
    uri = cfg.tracking.uri
    print(f"MLflow: `mlflow ui --backend-store-uri {uri}` then open http://127.0.0.1:5000 (registry: Models tab)")
    print("Prefect: this run used an ephemeral API; `prefect server start` shows flow runs when a server is up")
    return rows
