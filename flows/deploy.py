"""Scheduled operation: the pipeline and a re-evaluation of registered variants as Prefect
deployments with cron schedules (``schedule`` in params.yaml), served by one long-running process.

Schedules need a real Prefect server (the ephemeral API lives only as long as one flow):

    prefect server start --host 127.0.0.1 --port 4200          # terminal 1
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    gamma serve                                                 # terminal 2: registers and runs them

``gamma serve`` plays the worker's part: it polls the server and runs each scheduled flow run in
its own process. The re-evaluation reloads each registered variant's checkpoint (checked against
its recorded checksum), evaluates it again and records the figures and their drift.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, serve

from gamma.config import load_config
from gamma.model.export import load_checkpoint, verify_checkpoint
from gamma.run.variant import evaluate_model
from gamma.run.workspace import Workspace
from tasks import tracking

PIPELINE_DEPLOYMENT = "scheduled-pipeline"
REEVALUATE_DEPLOYMENT = "scheduled-reevaluation"


@flow(name="gamma-reevaluate")
def reevaluate(params: str = "params.yaml", overrides: dict | None = None) -> list[dict]:
    """Evaluate the newest registered variant of every budget again, from its checkpoint."""
    log = get_run_logger()
    cfg = load_config(params, overrides)
    ws = Workspace(cfg)
    client, experiment = tracking.client_for(cfg)
    names = tracking.names_for(cfg, ws.model_dir)
    rows = []
    for budget in tracking.registered_budgets(client, names):
        version = tracking.latest_version(client, names.variant(budget))
        checkpoint = version.tags.get("checkpoint")
        row = {"budget": budget, "model": version.name, "version": version.version}
        if not checkpoint or not Path(checkpoint).exists():
            rows.append({**row, "error": f"checkpoint {checkpoint!r} is not on this machine"})
            log.warning("%s v%s: %s", version.name, version.version, rows[-1]["error"])
            continue
        if verify_checkpoint(checkpoint) != version.tags.get("checkpoint_sha256"):
            rows.append({**row, "error": "checkpoint differs from the registered checksum"})
            log.error("%s v%s: %s", version.name, version.version, rows[-1]["error"])
            continue
        model, tokenizer = load_checkpoint(checkpoint)
        figures = evaluate_model(ws, model, tokenizer, checkpoint=checkpoint)
        registered = tracking.version_metrics(version).get("perplexity", float("nan"))
        row.update({"perplexity": figures["perplexity"], "zero_shot": figures["zero_shot"],
                    "registered_perplexity": registered, "perplexity_drift": figures["perplexity"] / registered - 1})
        with tracking.child_run(client, experiment, None, f"reevaluate {version.name}", "reevaluation") as run_id:
            for k in ("perplexity", "zero_shot", "perplexity_drift"):
                if row[k] == row[k]:
                    client.log_metric(run_id, k, float(row[k]))
            client.set_tag(run_id, "model_version", f"{version.name} v{version.version}")
        client.set_model_version_tag(version.name, version.version, "last_reevaluation",
                                     f"perplexity {row['perplexity']:.4f} (drift {row['perplexity_drift']:+.2e})")
        log.info("%s v%s: perplexity %.3f (registered %.3f)", version.name, version.version,
                 row["perplexity"], registered)
        rows.append(row)
    return rows


def scheduled_pipeline(cfg):
    """The pipeline flow as its schedule runs it: on the configured task runner (``pipeline.task_runner``,
    ``pipeline.workers``), as ``gamma run`` does."""
    from flows.pipeline import gamma_pipeline, task_runner

    return gamma_pipeline.with_options(task_runner=task_runner(cfg))


def deployments(params: str = "params.yaml", overrides: dict | None = None) -> list:
    """The two scheduled deployments, with the crons of ``schedule`` in params.yaml."""
    cfg = load_config(params, overrides)
    args = {"params": str(Path(params).resolve()), "overrides": overrides or {}}
    return [
        scheduled_pipeline(cfg).to_deployment(PIPELINE_DEPLOYMENT, cron=cfg.schedule.pipeline_cron, parameters=args),
        reevaluate.to_deployment(REEVALUATE_DEPLOYMENT, cron=cfg.schedule.reevaluate_cron, parameters=args),
    ]


def serve_deployments(params: str = "params.yaml", overrides: dict | None = None) -> None:
    """Register the deployments with the server at PREFECT_API_URL and run their scheduled runs."""
    serve(*deployments(params, overrides))
