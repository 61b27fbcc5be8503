"""The Stage I task: a score table per training budget, learned once and registered, or taken
from the registry when model, text and settings are the same (the cache key)."""

from __future__ import annotations

import json

from prefect import get_run_logger, task

from gamma.config import GammaConfig
from gamma.run.plots import plot_learning_curves
from gamma.run.tables import CURVES_FILE, MEMORY_FILE, SCORES_FILE, Band, run_key, run_settings, table_dir
from gamma.run.workspace import Workspace
from tasks import tracking
from tasks.prepare import lineage, workspace


def _table_key(cfg: GammaConfig, inputs: dict) -> tuple[Workspace, dict, str]:
    ws = workspace(cfg, inputs)
    settings = json.loads(json.dumps(run_settings(ws)))
    return ws, settings, run_key(ws)


def registered_tables(cfg: GammaConfig, inputs: dict) -> list[dict]:
    """The registered score tables of every training budget of ``cfg`` (model, text and settings
    as now), downloaded; budgets with no registered table are left out."""
    client, _ = tracking.client_for(cfg)
    names = tracking.names_for(cfg, inputs["model_dir"])
    found = []
    for b in cfg.stage1.training_budgets:
        hit = tracking.find_scores(client, names, _table_key(cfg.for_training_budget(b), inputs)[2])
        if hit is not None:
            path = tracking.download_scores(client, hit, table_dir(cfg, b) / "registered")
            found.append({"path": str(path), "name": names.scores, "version": hit.version, "cached": True,
                          "training_budget": b})
    return found


@task(name="learn preferences (Stage I)")
def learn(cfg: GammaConfig, inputs: dict, parent_run: str) -> list[dict]:
    """The score table of every training budget: the registered one when model, text and settings
    are the same, else learned (the band's tables on one teacher capture) and registered, each in
    a child run of ``parent_run``."""
    band = Band(workspace(cfg, inputs))
    return [_learn_one(cfg, inputs, parent_run, b, band) for b in cfg.stage1.training_budgets]


def _learn_one(cfg: GammaConfig, inputs: dict, parent_run: str, budget: float, band: Band) -> dict:
    log = get_run_logger()
    out = table_dir(cfg, budget)
    cfg = cfg.for_training_budget(budget)
    client, experiment = tracking.client_for(cfg)
    names = tracking.names_for(cfg, inputs["model_dir"])
    _, settings, key = _table_key(cfg, inputs)
    hit = tracking.find_scores(client, names, key)
    if hit is not None:
        path = tracking.download_scores(client, hit, out / "registered")
        log.info("Stage I cache hit: reusing registered %s v%s (same model, text and settings, %g bits)",
                 names.scores, hit.version, budget)
        return {"path": str(path), "name": names.scores, "version": hit.version, "cached": True,
                "training_budget": budget}
    log.info("Stage I: learning preferences at %.2f bits (no registered table for key %s)", budget, key[:12])
    with tracking.child_run(client, experiment, parent_run, f"stage1 ({budget:g} bits)", "stage1") as run_id:
        table = band.learn(budget, on_line=log.info)
        path = out / SCORES_FILE
        curves = plot_learning_curves(table.history, out / CURVES_FILE)
        for k in ("training_budget", "multiplier", "penalty", "violation", "wall_seconds", "peak_memory_mb"):
            client.log_metric(run_id, k, float(getattr(table, k)))
        for step, (loss, viol) in enumerate(zip(table.history.get("loss", []), table.history.get("violation", []))):
            client.log_metric(run_id, "loss", float(loss), step=step)
            client.log_metric(run_id, "constraint_violation", float(viol), step=step)
        version = tracking.register_scores(
            client, run_id, names, [path, curves, *([out / MEMORY_FILE] if (out / MEMORY_FILE).exists() else [])],
            {**lineage(inputs), "cache_key": key, "quantizer": json.dumps(table.quantizer),
             "training_budget": table.training_budget, "settings": json.dumps(settings)[:4000],
             "devices": json.dumps(table.devices)})
    log.info("registered %s v%s", names.scores, version.version)
    return {"path": str(path), "name": names.scores, "version": version.version, "cached": False,
            "training_budget": budget}
